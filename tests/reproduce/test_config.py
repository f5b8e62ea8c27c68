"""Tests of hf_r2.reproduce.config and .variants: the config files, their normalised settings and names, and
the errors a bad config gets."""

import json
from pathlib import Path

import pytest

from hf_r2.commands.reproduce import reproduce_command, reproduce_command_parser
from hf_r2.reproduce import (
    DEFAULT_LOW_BIT,
    ReproduceConfig,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY = REPO_ROOT / "hf_r2" / "reproduce" / "configs" / "reproduce_tiny.yaml"
FULL = REPO_ROOT / "hf_r2" / "reproduce" / "configs" / "reproduce.yaml"
LONG = REPO_ROOT / "hf_r2" / "reproduce" / "configs" / "reproduce_long.yaml"


def test_config_files_load_and_round_trip(tmp_path):
    tiny = ReproduceConfig.from_file(TINY)
    full = ReproduceConfig.from_file(FULL)
    long = ReproduceConfig.from_file(LONG)
    default = ReproduceConfig()
    for config in (tiny, full, long, default):
        config.output_dir = str(tmp_path / "x")
        config.save_pretrained(tmp_path)
        assert ReproduceConfig.from_pretrained(tmp_path).to_dict() == config.to_dict()
        assert ReproduceConfig.from_file(tmp_path).to_dict() == config.to_dict()
    # the tiny config: 7 rows, 4 of them headline; QAT, k-means and DKM all present
    assert [s["method"] for s in tiny.low_bit] == ["ptq", "ptq", "ptq", "ptq", "qat", "kmeans", "dkm"]
    assert tiny.headline_settings == ["W8A8 per-channel mse", "W4A8 per-tensor maxabs", "W2A8 per-channel mse",
                                      "W1 k-means"]
    # the full config: the five variants, >= 3 lambdas, every method
    assert [v["loss"] for v in full.variants] == ["baseline", "linf", "margin", "soft_min_max", "kurtosis"]
    assert len(full.lambda_sweep) == 1 and len(full.lambda_sweep[0]["lambdas"]) >= 3
    assert {s["method"] for s in full.low_bit} == {"ptq", "qat", "kmeans", "dkm"}
    # the longer-training follow-up: the same data, models and recipe but the epochs
    same = ("dataset", "max_train_samples", "max_eval_samples", "models", "model_kwargs", "lr", "weight_decay")
    assert all(getattr(long, k) == getattr(full, k) for k in same) and long.epochs == 4 * full.epochs
    assert len(default.low_bit) == len(DEFAULT_LOW_BIT)
    # JSON works like YAML
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"models": ["test_resnet"], "variants": ["baseline", "linf"]}))
    config = ReproduceConfig.from_file(path)
    assert config.variants[1] == {"name": "linf", "loss": "linf", "weight": 3.0, "per_channel": True, "r2": {},
                                  "init_from": None, "epochs": None, "lr": None, "warmup_ratio": None,
                                  "weight_decay": None,
                                  "compare_to": None, "seeds": None, "models": None}


def test_setting_names_and_defaults():
    config = ReproduceConfig(low_bit=[
        {"method": "ptq", "w_bits": 4, "a_bits": 8, "per_channel": False, "weight_range": "maxabs"},
        {"method": "ptq", "w_bits": 2, "rounding": "adaround"},
        {"method": "qat"},
        {"method": "kmeans", "w_bits": 1},
        {"method": "dkm", "w_bits": 2, "headline": True, "name": "my dkm"},
    ], lambda_sweep=None)
    assert [s["name"] for s in config.low_bit] == ["W4A8 per-tensor maxabs", "W2A8 per-channel adaround",
                                                   "W2A2 QAT", "W1 k-means", "my dkm"]
    assert [s["headline"] for s in config.low_bit] == [True, False, False, True, True]


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"variants": [{"loss": "linff"}]}, r"`variants\[0\].loss` must be one of"),
        ({"variants": [{"loss": "soft-min-max", "weight": 1}]}, "Did you mean"),
        ({"variants": [{"loss": "baseline", "weight": 0.1}]}, "baseline .* `weight` must be 0"),
        ({"variants": [{"loss": "linf", "weight": 0}]}, r"needs a `weight` \(lambda\) > 0"),
        ({"variants": [{"loss": "linf", "lamda": 1}]}, r"unknown key\(s\) \['lamda'\]"),
        ({"variants": ["baseline", "baseline"]}, "holds 'baseline' twice"),
        ({"variants": [{"loss": "linf", "r2": {"weight": 2}}]}, r"`variants\[0\].r2` has unknown key"),
        ({"seeds": []}, "`seeds` must be a non-empty list"),
        ({"seeds": [0, 0]}, "holds 0 twice"),
        ({"models": []}, "`models` must be a non-empty list"),
        ({"model_kwargs": {"vit": {}}}, "`model_kwargs` names 'vit', which is not in `models`"),
        ({"models": ["resnet10t"], "model_kwargs": {"resnet10t": "relu6"}}, r"`model_kwargs\['resnet10t'\]` must"),
        ({"max_steps": 0}, "`max_steps` must be > 0"),
        ({"low_bit": [{"method": "gptq"}]}, r"`low_bit\[0\].method` must be one of 'ptq', 'qat', 'kmeans', 'dkm'"),
        ({"low_bit": [{"method": "kmeans", "a_bits": 8}]}, r"takes no \['a_bits'\]"),
        ({"low_bit": [{"method": "ptq", "w_bits": 9}]}, "`w_bits` must be an integer from 1 to 8"),
        ({"low_bit": [{"method": "ptq"}, {"method": "ptq"}]}, "holds 'W2A8 per-channel mse' twice"),
        ({"lambda_sweep": {"variant": "linf", "lambdas": [1, 3]}}, "at least 3 positive numbers"),
        ({"lambda_sweep": {"variant": "baseline", "lambdas": [1, 2, 3]}}, "must name one of the R2 variants"),
        ({"lambda_sweep": {"variant": "linf", "lambdas": [1, 2, 3], "settings": ["W9"]}}, r"\['W9'\] are not"),
        ({"lambda_sweep": {"variant": "linf", "lambdas": [1, 2, 3], "models": ["vit"]}}, "are not in `models`"),
    ],
)
def test_config_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        ReproduceConfig(**changes)


def test_config_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        ReproduceConfig.from_file(tmp_path / "missing.yaml")
    (tmp_path / "c.txt").write_text("models: [a]")
    with pytest.raises(ValueError, match="must be a .yaml, .yml or .json file"):
        ReproduceConfig.from_file(tmp_path / "c.txt")
    (tmp_path / "c.yaml").write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        ReproduceConfig.from_file(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("epoch: 3\n")
    with pytest.raises(ValueError, match=r"Unknown `ReproduceConfig` field\(s\) \['epoch'\]"):
        ReproduceConfig.from_file(tmp_path / "d.yaml")
    args = reproduce_command_parser().parse_args([str(tmp_path / "d.yaml"), "--no-progress"])
    assert reproduce_command(args) == 1
    args = reproduce_command_parser().parse_args([str(TINY), "--variants", "nope", "--output-dir", str(tmp_path)])
    assert reproduce_command(args) == 1  # a clear error naming the variants, nothing trained
    assert not (tmp_path / "runs").exists()


def test_onnx_settings(monkeypatch):
    """`onnx_settings` name low-bit rows that are also checked in ONNX Runtime; without the extra the row's spec says
    so (measured as usual, no check), and the check runs once the extra is installed (the spec changes)."""
    from hf_r2.reproduce import plan as plan_module
    from hf_r2.reproduce.plan import row_spec

    low_bit = [{"method": "ptq", "w_bits": 2, "a_bits": 8}, {"method": "kmeans", "w_bits": 1}]
    config = ReproduceConfig(models=["test_resnet"], variants=["baseline"], lambda_sweep=None, low_bit=low_bit,
                             onnx_settings=["W2A8 per-channel mse"])
    monkeypatch.setattr(plan_module, "onnx_check_available", lambda: False)
    assert row_spec(config.setting("W2A8 per-channel mse"), config)["onnx"] is False
    assert "onnx" not in row_spec(config.setting("W1 k-means"), config)
    monkeypatch.setattr(plan_module, "onnx_check_available", lambda: True)
    assert row_spec(config.setting("W2A8 per-channel mse"), config)["onnx"] is True
    with pytest.raises(ValueError, match=r"`onnx_settings` \['W3A8'\] are not low-bit settings"):
        ReproduceConfig(models=["test_resnet"], variants=["baseline"], lambda_sweep=None, low_bit=low_bit,
                        onnx_settings=["W3A8"])


def test_one_verdict_scores_each_claim_on_its_own_method_and_the_float_rule():
    """`met` only where the gain reaches its own claim's target AND R2's float top-1 is within a point of its
    reference's: a model 23.6 points below in float is never counted, a W2A2 PTQ row is not the QAT claim, and a NaN
    never meets anything."""
    from hf_r2.reproduce.summary import claim_of, gains, verdict

    config = ReproduceConfig(
        models=["m"], seeds=[0], lambda_sweep=None,
        variants=["baseline", {"name": "r2", "loss": "linf", "weight": 1.0}],
        low_bit=[{"method": "ptq", "w_bits": 2, "a_bits": 8, "per_channel": False, "weight_range": "maxabs"},
                 {"method": "ptq", "w_bits": 2, "a_bits": 2}, {"method": "qat", "w_bits": 2, "a_bits": 2},
                 {"method": "kmeans", "w_bits": 1}, {"method": "ptq", "w_bits": 1, "a_bits": 8}])

    def cell(value):
        return {"seeds": [0], "values": [value], "mean": value, "std": None}

    def summary(fp_r2):
        table = {"FP": {"baseline": cell(0.70), "r2": cell(fp_r2)}}
        for name in ("W2A8 per-tensor maxabs", "W2A2 per-channel mse", "W2A2 QAT", "W1 k-means",
                     "W1A8 per-channel mse"):
            table[name] = {"baseline": cell(0.20), "r2": cell(0.60)}  # +40 points everywhere
        return {"m": table}

    kept = gains(config, summary(0.695))["m"]  # FP -0.5: within the rule
    assert set(kept) == {"FP", "W2A8 per-tensor maxabs", "W2A2 QAT", "W1 k-means"}  # W2A2 / W1 PTQ: no claim
    assert [kept[s]["r2"]["claim"] for s in ("W2A8 per-tensor maxabs", "W2A2 QAT", "W1 k-means")] == [
        "W2A8 PTQ", "W2A2 QAT", "1-bit clustering"]
    assert all(kept[s]["r2"]["met"] for s in kept)
    assert kept["W2A8 per-tensor maxabs"]["r2"]["retention"] == pytest.approx([0.20 / 0.70, 0.60 / 0.695])
    fell = gains(config, summary(0.464))["m"]  # FP -23.6: a collapsed float model
    assert not fell["FP"]["r2"]["met"]
    assert {fell[s]["r2"]["verdict"] for s in fell if s != "FP"} == {"outside the float rule"}
    assert not any(fell[s]["r2"]["met"] for s in fell)
    assert verdict(float("nan"), 8.0, 0.0) == "missed" and verdict(9.0, 8.0, float("nan")) == "outside the float rule"
    assert verdict(9.0, 8.0, None) == "outside the float rule" and verdict(7.9, 8.0, 0.0) == "missed"
    assert claim_of(config.setting("W2A2 per-channel mse")) is None


def test_a_variants_own_schedule_is_its_training_and_its_folder():
    """`lr` / `warmup_ratio` / `weight_decay` on a variant (e.g. a re-warmed fine-tune) reach its training spec and
    give it its own folder; a variant without them trains with the config's recipe, in the folder it always had."""
    from hf_r2.reproduce.plan import plan, train_spec

    config = ReproduceConfig(
        models=["m"], seeds=[0], lambda_sweep=None, warmup_ratio=0.01, lr=0.05, low_bit=[],
        variants=["baseline",
                  {"name": "control", "loss": "baseline", "init_from": "baseline", "epochs": 2, "lr": 0.005},
                  {"name": "rewarm", "loss": "baseline", "init_from": "baseline", "epochs": 2, "lr": 0.03,
                   "warmup_ratio": 0.1}])
    runs = {r.variant["name"]: r for r in plan(config)}
    assert train_spec(runs["baseline"], config)["warmup_ratio"] == 0.01
    assert train_spec(runs["control"], config)["warmup_ratio"] == 0.01
    spec = train_spec(runs["rewarm"], config)
    assert (spec["warmup_ratio"], spec["lr"], spec["epochs"]) == (0.1, 0.03, 2.0)
    assert len({r.run_dir for r in runs.values()}) == 3 and runs["baseline"].run_dir.endswith("baseline/seed0")
    with pytest.raises(ValueError, match=r"`warmup_ratio` must be a fraction of the steps in \[0, 1\)"):
        ReproduceConfig(models=["m"], lambda_sweep=None, variants=[{"loss": "baseline", "warmup_ratio": 2}])


# The run folders of two presets as their trainings were cached (~/.cache/hf-r2/<preset>/runs): a digest over a
# variant's settings names each, so renaming a setting (say `weight` to `r2_lambda`) would orphan the trainings.
CACHED_RUN_FOLDERS = {
    "finetune": [
        "baseline", "baseline-ft-11d13ab5", "baseline-ft-9d9af309", "linf-pc-w0.3-ft-6d9b51fd",
        "linf-pc-w0.3-ft-ba892ca6", "linf-pc-w0.3-ft-bbdec929", "linf-pc-w1-ft-6d9b51fd", "linf-pc-w1-ft-ba892ca6",
        "linf-pc-w1-ft-bbdec929", "linf-pc-w3-ft-6d9b51fd", "linf-pc-w3-ft-ba892ca6", "linf-pc-w3-ft-bbdec929",
        "linf-w0.3-ft-ba892ca6", "linf-w1-ft-ba892ca6", "linf-w3-ft-ba892ca6",
    ],
    "headline": [
        "baseline", "baseline-own-wd0.00012-75f28b5d", "baseline-own-wd0.0004-cc3c60d3",
        "baseline-own-wd0.0012-da44f267", "baseline-own-wd0.0003-bed5580a", "baseline-own-wd0.001-64eea830",
        "baseline-own-wd0.003-30ce9f46",
    ],
}


@pytest.mark.parametrize("preset", sorted(CACHED_RUN_FOLDERS))
def test_preset_run_folders_are_unchanged(preset):
    from hf_r2.reproduce import load_config
    from hf_r2.reproduce.plan import plan

    folders = {Path(r.run_dir).parent.name for r in plan(load_config(preset))}
    assert folders == set(CACHED_RUN_FOLDERS[preset])


@pytest.mark.parametrize("name", ["..", ".", "../x", "/abs/model", "a/b/c", "a\\b", "x y", "-rf", "a/..", "org/.."])
def test_model_names_must_be_plain(tmp_path, capsys, name):
    """Each model name becomes a folder under runs/: `hf-r2 reproduce` refuses one that is not a timm name or a Hub
    id, in one line, before anything is written; timm names and Hub ids pass."""
    import json

    from hf_r2.cli import main

    with pytest.raises(ValueError, match="not plain model names"):
        ReproduceConfig(models=[name])
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"models": [name], "output_dir": str(tmp_path / "out")}))
    assert main(["reproduce", str(path), "--no-progress"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("hf-r2 reproduce: error:") and "not plain model names" in line
    assert not (tmp_path / "out").exists()
    assert ReproduceConfig(models=["resnet10t", "vit_tiny_patch16_224.augreg_in21k", "org/name",
                                   "hf-hub:timm/resnet18.a1_in1k"]).models[2] == "org/name"
