"""`hf-r2 reproduce` for R2 fine-tuning of a trained model (issue: the paper's claim on converged models): variants
that start from the model's baseline (`init_from`), with their own epochs / lr and a same-length control they are
compared to; a validation split that every row is measured on and that lambda sweeps choose on; an SGD recipe with
per-model weight decay; and baselines trained elsewhere (`baselines`), copied instead of trained."""

import hashlib
import json
import logging
import os

import pytest
import torch
from conftest import assert_png

from hf_r2.reproduce import ReproduceConfig, run_reproduce
from hf_r2.reproduce.plan import plan
from hf_r2.reproduce.sweep import choose_lambda, chosen_lambdas

W2 = "W2A8 per-tensor maxabs"
VARIANTS = [
    {"name": "baseline", "loss": "baseline"},
    {"name": "control", "loss": "baseline", "init_from": "baseline", "epochs": 1, "lr": 1e-9},
    {"name": "linf-ft", "loss": "linf", "weight": 1.0, "per_channel": True, "init_from": "baseline", "epochs": 2,
     "lr": 0.01, "compare_to": "control"},
]


def _config(out, data_dir, **changes) -> ReproduceConfig:
    values = dict(
        output_dir=str(out), dataset="cifar10-tiny", data_dir=str(data_dir), input_size=32, max_train_samples=64,
        max_eval_samples=32, validation_size=100, models=["test_resnet"], variants=VARIANTS, epochs=1,
        batch_size=32, optimizer="sgd", lr=0.05, recipes={"test_resnet": {"weight_decay": 1e-4}}, seeds=[0, 1],
        lambda_sweep={"variant": "linf-ft", "lambdas": [0.1, 1.0, 10.0], "settings": [W2]},
        low_bit=[{"method": "ptq", "w_bits": 2, "a_bits": 8, "per_channel": False, "weight_range": "maxabs"},
                 {"method": "kmeans", "w_bits": 1}],
        calibration_samples=32,
    )
    return ReproduceConfig(**{**values, **changes})


def _sha1(path) -> str:
    return hashlib.sha1(open(path, "rb").read()).hexdigest()


@torch.no_grad()
def _count_correct(run_dir, raw_split, input_size=32) -> float:
    """Top-1 of a saved run on a split, counted here image by image (independent of hf_r2.metrics)."""
    from hf_r2.data import collate_fn, with_transforms
    from hf_r2.models import create_model

    model = create_model(run_dir, pretrained=True).eval()
    rows = with_transforms(raw_split, model, train=False, input_size=input_size)
    batch = collate_fn([rows[i] for i in range(len(rows))])
    return (model(batch["pixel_values"]).argmax(-1) == batch["labels"]).double().mean().item()


def test_fine_tunes_start_from_the_baseline_and_choose_on_validation(tmp_path, data_dir):
    from hf_r2.data import load_image_dataset

    config = _config(tmp_path / "out", data_dir)
    runs = plan(config)
    base_dir = os.path.join(config.output_dir, "runs", "test_resnet", "baseline", "seed0")
    # baselines first; every fine-tune (both seeds, the sweep) starts from the first seed's baseline
    assert [r.init_dir is None for r in runs] == [True, True] + [False] * (len(runs) - 2)
    assert {r.init_dir for r in runs[2:]} == {base_dir}
    assert config.recipe("test_resnet", VARIANTS[2]) == {"lr": 0.01, "weight_decay": 1e-4, "epochs": 2.0,
                                                         "warmup_ratio": 0.05}

    results = run_reproduce(config, progress=False, print_fn=None)
    by_name = {(r["variant"]["name"], r["seed"]): r for r in results["runs"]}
    base = by_name[("baseline", 0)]
    for name in ("control", "linf-ft"):
        for seed in (0, 1):
            info = json.load(open(os.path.join(by_name[(name, seed)]["run_dir"], "reproduce_run.json")))
            assert info["spec"]["init_from"] == {"folder": os.path.abspath(base_dir),
                                                 "sha1": _sha1(os.path.join(base_dir, "model.safetensors"))}
            assert info["spec"]["optimizer"] == "sgd" and info["spec"]["weight_decay"] == 1e-4
    # the control ran at lr 1e-9: its weights are the baseline's (a fine-tune really starts from it)
    from hf_r2.models import create_model

    start = create_model(base_dir, pretrained=True).state_dict()
    control = create_model(by_name[("control", 0)]["run_dir"], pretrained=True).state_dict()
    for key, value in start.items():
        if key.endswith("weight") and value.dim() > 1:
            torch.testing.assert_close(control[key], value, rtol=0, atol=1e-6)

    # every row is measured on the validation split too, and FP agrees with a count made here
    held = load_image_dataset("cifar10-tiny", data_dir=str(data_dir), validation_size=100, max_train_samples=64)
    test = load_image_dataset("cifar10-tiny", data_dir=str(data_dir), max_eval_samples=32)["test"]
    assert results["data"]["validation_images"] == 100 and results["data"]["train_images"] == 64
    for run in results["runs"]:
        assert all("val_accuracy" in row for row in run["rows"].values())
        assert run["rows"]["FP"]["val_accuracy"] == pytest.approx(_count_correct(run["run_dir"], held["test"]))
        assert run["rows"]["FP"]["accuracy"] == pytest.approx(_count_correct(run["run_dir"], test))
        assert set(run["val_curve"]) == {f"{e:g}" for e in range(1, 3 if run["variant"]["epochs"] == 2 else 2)}
    assert set(results["val_summary"]["test_resnet"]["FP"]) == {"baseline", "control", "linf-ft"}

    # the gains of the fine-tune are measured against the same-length control, seed by seed
    summary = results["summary"]["test_resnet"]
    gain = results["gains"]["test_resnet"][W2]["linf-ft"]
    assert gain["reference"] == "control"
    assert gain["delta"] == pytest.approx(100 * (summary[W2]["linf-ft"]["mean"] - summary[W2]["control"]["mean"]))
    assert "control" not in results["gains"]["test_resnet"][W2]  # a baseline-loss variant has no gain

    # the sweep: the reference row first, then each lambda; the choice follows the written rule
    (sweep,) = results["lambda_sweep"]
    table = sweep["models"]["test_resnet"]
    assert sweep["reference"] == "control" and [r["lambda"] for r in table["rows"]] == [0.0, 0.1, 1.0, 10.0]
    rows = table["rows"]
    floor = rows[0]["val_accuracy"]["FP"] - 0.01
    allowed = [r for r in rows[1:] if r["val_accuracy"]["FP"] >= floor]
    expected = max(allowed, key=lambda r: r["val_accuracy"][W2])["lambda"] if allowed else None
    assert (table["chosen"] or {}).get("lambda") == expected
    report = open(os.path.join(config.output_dir, "results.md")).read()
    assert "Chosen on the validation split" in report and "100 training images held out" in report
    assert "linf-ft (fine-tune 2 ep, λ=1, per channel)" in report
    assert_png(results["plots"]["test_resnet"]["validation curves"])

    # a baseline trained elsewhere is copied, not trained; fine-tunes start from that folder
    outside = tmp_path / "trained-elsewhere"
    outside.mkdir()
    for name in ("model.safetensors", "config.json", "trainer_state.json"):
        if os.path.isfile(os.path.join(base_dir, name)):
            os.link(os.path.join(base_dir, name), outside / name)
    copied = _config(tmp_path / "out2", data_dir, baselines={"test_resnet": str(outside)}, lambda_sweep=None,
                     variants=VARIANTS[:2], seeds=[0])
    again = run_reproduce(copied, progress=False, print_fn=None)
    runs2 = {r["variant"]["name"]: r for r in again["runs"]}
    assert runs2["baseline"]["train_seconds"] == 0.0
    assert runs2["baseline"]["rows"]["FP"]["accuracy"] == base["rows"]["FP"]["accuracy"]
    info = json.load(open(os.path.join(runs2["control"]["run_dir"], "reproduce_run.json")))
    assert info["spec"]["init_from"]["folder"] == str(outside)
    assert "baselines trained elsewhere: test_resnet" in open(os.path.join(copied.output_dir, "results.md")).read()


def test_weight_chosen_trains_each_seed_at_the_sweeps_choice(tmp_path, data_dir):
    """`weight: chosen`: the sweep runs first (seed 0), then the variant's other seeds train at the lambda it chose;
    its seed-0 run is the sweep's own training at that lambda. `seeds` / `models` restrict a variant."""
    variants = [
        {"name": "baseline", "loss": "baseline"},
        {"name": "control", "loss": "baseline", "init_from": "baseline", "epochs": 1, "lr": 0.01},
        {"name": "linf-ft", "loss": "linf", "weight": "chosen", "per_channel": True, "init_from": "baseline",
         "epochs": 1, "lr": 0.01, "compare_to": "control"},
        {"name": "linf-scratch", "loss": "linf", "weight": 0.5, "seeds": [0], "models": ["test_resnet"]},
    ]
    # tiny lambdas: each fine-tune stays within a point of the control, so the rule has lambdas to choose from
    config = _config(tmp_path / "out", data_dir, variants=variants,
                     lambda_sweep={"variant": "linf-ft", "lambdas": [1e-6, 2e-6, 4e-6], "settings": [W2]})
    assert not any(r.variant["name"] == "linf-ft" for r in plan(config))  # before the sweep: left out
    results = run_reproduce(config, progress=False, print_fn=None)
    table = results["lambda_sweep"][0]["models"]["test_resnet"]
    lam = table["chosen"]["lambda"]
    assert results["chosen_lambdas"] == {"linf-ft": {"test_resnet": lam}}
    runs = [r for r in results["runs"] if "linf-ft" in r["variant_names"]]
    assert sorted(r["seed"] for r in runs) == [0, 1] and all(r["variant"]["weight"] == lam for r in runs)
    sweep_run = next(r for r in table["rows"] if r["lambda"] == lam)["run_dir"]
    assert next(r["run_dir"] for r in runs if r["seed"] == 0) == sweep_run  # no second training of seed 0
    assert len({r["run_dir"] for r in results["runs"]}) == len(results["runs"]) == 2 + 2 + 3 + 1 + 1
    info = json.load(open(os.path.join(next(r["run_dir"] for r in runs if r["seed"] == 1), "reproduce_run.json")))
    assert info["spec"]["variant"]["weight"] == lam and info["spec"]["seed"] == 1
    assert results["summary"]["test_resnet"]["FP"]["linf-ft"]["seeds"] == [0, 1]
    assert results["summary"]["test_resnet"]["FP"]["linf-scratch"]["seeds"] == [0]  # its `seeds`
    report = open(os.path.join(config.output_dir, "results.md")).read()
    assert f"linf-ft (fine-tune 1 ep, λ={lam:g} chosen, per channel)" in report
    assert "linf-scratch (λ=0.5, per channel, seed 0)" in report
    stats = results["weight_stats"]["test_resnet"]  # the range statistics of every column, kurtosis included
    assert "| mean kurtosis | " + " | ".join(f"{stats[v['name']]['mean_kurtosis']:.2f}" for v in variants) in report
    # a rerun reuses everything
    again = run_reproduce(config, progress=False, print_fn=None)
    assert again["timing"]["trained_now"] == 0 and again["timing"]["rows_computed"] == 0


def test_chosen_lambdas_and_their_plan():
    config = ReproduceConfig(
        models=["test_resnet", "test_vit"], validation_size=10, seeds=[0, 1],
        variants=["baseline", {"name": "l", "loss": "linf", "weight": "chosen"},
                  {"name": "m", "loss": "margin", "weight": 0.1, "models": ["test_vit"]}],
        lambda_sweep={"variant": "l", "lambdas": [1, 2, 3], "models": ["test_resnet", "test_vit"]})
    tables = [{"variant": "l", "models": {"test_resnet": {"chosen": {"lambda": 2.0}}, "test_vit": {"chosen": None}}}]
    chosen = chosen_lambdas(config, tables)
    assert chosen == {"l": {"test_resnet": 2.0, "test_vit": None}}  # none kept FP on test_vit: not run there
    headline = [(r.model, r.variant["name"], r.variant["weight"], r.seed) for r in plan(config, chosen)
                if "headline" in r.roles]
    assert ("test_resnet", "l", 2.0, 1) in headline and not any(m == "test_vit" and n == "l" for m, n, *_ in headline)
    assert {(m, s) for m, n, _, s in headline if n == "m"} == {("test_vit", 0), ("test_vit", 1)}  # its `models`
    # one model selected: the variant's models follow
    assert config.select_models(["test_resnet"]).variants[2]["models"] == []


def test_a_setting_with_variants_or_models_is_measured_on_those_only():
    from hf_r2.reproduce.plan import row_spec

    qat = {"method": "qat", "w_bits": 2, "a_bits": 2, "variants": ["baseline", "l"], "models": ["test_vit"]}
    config = ReproduceConfig(models=["test_resnet", "test_vit"], seeds=[0], lambda_sweep=None,
                             variants=["baseline", {"name": "l", "loss": "linf"}, {"name": "m", "loss": "margin"}],
                             low_bit=[{"method": "kmeans", "w_bits": 1}, qat])
    measured = {(r.model, r.variant["name"]): r.settings for r in plan(config)}
    assert measured[("test_vit", "baseline")] == measured[("test_vit", "l")] == ["W1 k-means", "W2A2 QAT"]
    assert measured[("test_vit", "m")] == measured[("test_resnet", "l")] == ["W1 k-means"]
    # where a row is measured does not change how: the cache spec is the same as without `variants` / `models`
    plain = ReproduceConfig(models=["test_resnet"], seeds=[0], lambda_sweep=None, variants=["baseline"],
                            low_bit=[{"method": "qat", "w_bits": 2, "a_bits": 2}])
    assert row_spec(config.setting("W2A2 QAT"), config) == row_spec(plain.setting("W2A2 QAT"), plain)
    assert config.select_models(["test_resnet"]).setting("W2A2 QAT")["models"] == []
    with pytest.raises(ValueError, match=r"`variants` \['nope'\], which are not"):
        ReproduceConfig(models=["test_resnet"], lambda_sweep=None, variants=["baseline"],
                        low_bit=[{**qat, "variants": ["nope"], "models": None}])


def test_select_variants_keeps_what_they_need_and_the_same_cache():
    """`--variants`: a subset of the variants with the baseline they start from and the variant they are compared to;
    every training and row it plans is planned (same folder, same spec, same rows) by the whole config."""
    from hf_r2.reproduce import load_config
    from hf_r2.reproduce.plan import train_spec

    config = load_config("evidence")  # hf_r2/reproduce/configs/evidence.yaml
    names = lambda c: [v["name"] for v in c.variants]  # noqa: E731
    scratch = config.select_variants(["linf_scratch"])
    assert names(scratch) == ["baseline", "linf_scratch"]
    assert [s["variant"] for s in scratch.lambda_sweep] == ["linf_scratch"]
    sub = config.select_variants(["linf"])
    assert names(sub) == ["baseline", "control", "linf"] and [s["variant"] for s in sub.lambda_sweep] == ["linf"]
    assert names(config.select_variants(["control"])) == ["baseline", "control"]
    chosen = {"linf": {"mobilenetv2_100": 3.0, "resnet18": 3.0},
              "linf_scratch": {"mobilenetv2_100": 1.0, "resnet18": 0.3}}
    whole = {r.run_dir: (train_spec(r, config), r.settings) for r in plan(config, chosen)}
    for sub in (config.select_variants(["linf_scratch"]), config.select_variants(["linf"]),
                scratch.select_models(["mobilenetv2_100"])):
        runs = plan(sub, chosen)
        assert runs and all(r.run_dir in whole for r in runs)
        for r in runs:
            spec, settings = whole[r.run_dir]
            assert train_spec(r, sub) == spec and set(r.settings) <= set(settings), r.run_dir
    # a setting limited to variants keeps the kept ones among them; one limited to dropped variants goes
    assert scratch.setting("W2A2 QAT")["variants"] == ["baseline", "linf_scratch"]
    assert scratch.setting("W1 k-means")["variants"] is None
    data = config.to_dict()
    data["low_bit"] = [*data["low_bit"], {"method": "kmeans", "w_bits": 2, "variants": ["control", "linf"]}]
    two = ReproduceConfig.from_dict(data)
    assert "W2 k-means" in [s["name"] for s in two.select_variants(["control"]).low_bit]
    assert "W2 k-means" not in [s["name"] for s in two.select_variants(["linf_scratch"]).low_bit]
    with pytest.raises(ValueError, match=r"non-empty subset of the variants .* got \['nope'\]"):
        config.select_variants(["nope"])


def test_choose_lambda_rule():
    ref = {"lambda": 0.0, "val_accuracy": {"FP": 0.80, "W2": 0.50}}
    rows = [ref,
            {"lambda": 1.0, "variant": "a", "val_accuracy": {"FP": 0.795, "W2": 0.60}},
            {"lambda": 3.0, "variant": "b", "val_accuracy": {"FP": 0.785, "W2": 0.70}},  # FP more than 1 point down
            {"lambda": 10.0, "variant": "c", "val_accuracy": {"FP": 0.81, "W2": 0.55}}]
    assert choose_lambda(rows, ["W2"]) == {"lambda": 1.0, "variant": "a", "score": pytest.approx(0.60)}
    assert choose_lambda([ref, rows[2]], ["W2"]) is None
    assert choose_lambda([{"lambda": 0.0, "accuracy": {}}, rows[1]], ["W2"]) is None  # no validation numbers


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"variants": [{"loss": "linf", "init_from": "scratch"}]}, "`init_from` must be 'baseline'"),
        ({"variants": [{"loss": "baseline", "epochs": 3}]}, "a same-length control of a fine-tune"),
        ({"variants": [{"loss": "linf", "init_from": "baseline"}]}, r"\['test_resnet'\] have none"),
        ({"variants": ["baseline", {"loss": "linf", "compare_to": "nope"}]}, "`compare_to='nope'`, which is not"),
        ({"variants": ["baseline", {"loss": "linf", "lr": -1}]}, "`lr` must be a positive number"),
        ({"optimizer": "lion"}, "`optimizer` must be 'adamw' or 'sgd'"),
        ({"recipes": {"vit": {"lr": 1}}}, "`recipes` names 'vit'"),
        ({"recipes": {"test_resnet": {"momentum": 1}}}, r"unknown key\(s\) \['momentum'\]"),
        ({"baselines": {"vit": "x"}}, r"`baselines` names \['vit'\]"),
        ({"validation_size": 0}, "`validation_size` must be a positive integer"),
        ({"variants": ["baseline", {"loss": "linf", "weight": "chosen"}]}, "needs a `validation_size` and a sweep"),
        ({"variants": ["baseline", {"loss": "linf", "weight": "chosen"}], "validation_size": 10},
         r"\(none on \['test_resnet'\]\)"),
        ({"variants": [{"loss": "baseline", "weight": "chosen"}]}, "it has no lambda to choose"),
        ({"variants": ["baseline", {"loss": "linf", "weight": "big"}]}, "`weight` must be a number"),
        ({"variants": ["baseline", {"loss": "linf", "seeds": [7]}]}, r"`seeds` \[7\], which are not"),
        ({"variants": ["baseline", {"loss": "linf", "models": "vit"}]}, "`models` must be a list of model names"),
    ],
)
def test_config_errors(changes, message):
    values = {"models": ["test_resnet"], "lambda_sweep": None, "variants": ["baseline", "linf"], **changes}
    with pytest.raises(ValueError, match=message):
        ReproduceConfig(**values)


def test_a_baseline_of_another_task_is_refused(tmp_path, data_dir):
    from conftest import make_timm

    from hf_r2.saving import save_model_folder

    model = make_timm("test_resnet")
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, 32, 32),
                            "label_names": [f"class{i}" for i in range(10)]}  # ten classes, not CIFAR-10's
    folder = save_model_folder(model, str(tmp_path / "other"))
    config = _config(tmp_path / "out", data_dir, baselines={"test_resnet": str(folder)}, lambda_sweep=None,
                     variants=VARIANTS[:2], seeds=[0])
    with pytest.raises(ValueError, match=r"does not fit this config: its classes \['class0'"):
        run_reproduce(config, progress=False, print_fn=None)


def test_the_report_shows_each_model_only_its_own_columns_and_rows(tmp_path, data_dir):
    """A variant or a setting limited to one model (`models`) gets no column / row in the other model's tables."""
    variants = ["baseline", {"name": "m", "loss": "margin", "weight": 0.1, "seeds": [0], "models": ["test_vit"]}]
    low_bit = [{"method": "kmeans", "w_bits": 1},
               {"method": "kmeans", "w_bits": 2, "models": ["test_vit"]}]
    config = _config(tmp_path / "out", data_dir, models=["test_resnet", "test_vit"], variants=variants,
                     seeds=[0], lambda_sweep=None, low_bit=low_bit, recipes={}, validation_size=None,
                     model_kwargs={"test_vit": {"img_size": 32}})
    run_reproduce(config, progress=False, print_fn=None)
    report = open(os.path.join(config.output_dir, "results.md")).read()
    resnet, vit = report.split("## test_vit")[0].split("## test_resnet")[1], report.split("## test_vit")[1]
    assert "m (λ=0.1" not in resnet and "m (λ=0.1, per channel, seed 0)" in vit
    assert "| W2 k-means" not in resnet and "| W2 k-means" in vit
    assert resnet.count("|---|") == 1 and "| setting | baseline (no R2) |\n" in resnet


def test_an_interrupted_training_resumes_from_its_last_epoch(tmp_path, data_dir, monkeypatch, caplog):
    """A training stopped after its first epoch's checkpoint continues from it on the next run (same settings),
    to the same weights as an uninterrupted one; a finished run keeps no checkpoint."""
    import safetensors.torch

    from hf_r2.trainer import R2Trainer

    def config(out):
        return _config(out, data_dir, variants=["baseline"], seeds=[0], epochs=2, lambda_sweep=None,
                       low_bit=[{"method": "kmeans", "w_bits": 1}])

    whole = config(tmp_path / "whole")
    run_reproduce(whole, progress=False, print_fn=None)
    run_dir = os.path.join(whole.output_dir, "runs", "test_resnet", "baseline", "seed0")
    assert not [n for n in os.listdir(run_dir) if n.startswith("checkpoint-")]
    expected = safetensors.torch.load_file(os.path.join(run_dir, "model.safetensors"))

    original = R2Trainer._save_checkpoint

    def save_then_stop(self, *args, **kwargs):
        original(self, *args, **kwargs)
        raise KeyboardInterrupt  # the session ends after the first epoch's checkpoint

    cut = config(tmp_path / "cut")
    monkeypatch.setattr(R2Trainer, "_save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run_reproduce(cut, progress=False, print_fn=None)
    monkeypatch.setattr(R2Trainer, "_save_checkpoint", original)
    cut_dir = os.path.join(cut.output_dir, "runs", "test_resnet", "baseline", "seed0")
    assert [n for n in os.listdir(cut_dir) if n.startswith("checkpoint-")]
    with caplog.at_level(logging.WARNING):
        results = run_reproduce(cut, progress=False, print_fn=None)
    assert "resuming it from its last epoch" in caplog.text
    assert results["timing"]["trained_now"] == 1
    resumed = safetensors.torch.load_file(os.path.join(cut_dir, "model.safetensors"))
    for name, value in expected.items():
        torch.testing.assert_close(resumed[name], value, rtol=1e-5, atol=1e-6)
