"""Tests of the `hf-r2 reproduce` pipeline (hf_r2.reproduce.pipeline / report) on tiny data: the whole run, its
results and report, resuming, caching, and one process per model."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_png

from hf_r2.commands.reproduce import reproduce_command, reproduce_command_parser
from hf_r2.reproduce import (
    REPORT_NAME,
    RESULTS_NAME,
    RUN_INFO_NAME,
    ReproduceConfig,
    run_reproduce,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY = REPO_ROOT / "hf_r2" / "reproduce" / "configs" / "reproduce_tiny.yaml"
FULL = REPO_ROOT / "hf_r2" / "reproduce" / "configs" / "reproduce.yaml"
LONG = REPO_ROOT / "hf_r2" / "reproduce" / "configs" / "reproduce_long.yaml"


def _tiny_config(out: Path, data_dir: Path, **changes) -> ReproduceConfig:
    config = ReproduceConfig.from_file(TINY)
    return ReproduceConfig.from_dict({**config.to_dict(), "output_dir": str(out), "data_dir": str(data_dir),
                                      **changes})


def _expected_settings(config: ReproduceConfig, run: dict) -> set:
    """The rows a run must hold, worked out from the config alone."""
    names = {s["name"] for s in config.low_bit}
    expected = {"FP"}
    if "headline" in run["roles"]:
        expected |= names if run["seed"] == config.seeds[0] else set(config.headline_settings)
    if any(role.startswith("sweep:") for role in run["roles"]):
        expected |= set(config.lambda_sweep[0]["settings"])
    return expected


@torch.no_grad()
def _fp_accuracy(run_dir: str, config: ReproduceConfig) -> float:
    """The float top-1 of a saved run, measured here independently of hf_r2.metrics."""
    from hf_r2.data import collate_fn, load_image_dataset, with_transforms
    from hf_r2.models import create_model

    model = create_model(run_dir, pretrained=True).eval()
    raw = load_image_dataset(config.dataset, data_dir=config.data_dir, max_train_samples=config.max_train_samples,
                             max_eval_samples=config.max_eval_samples, seed=config.data_seed)
    rows = with_transforms(raw["test"], model, train=False, input_size=config.input_size)
    batch = collate_fn([rows[i] for i in range(len(rows))])
    predictions = model(batch["pixel_values"]).argmax(dim=-1)
    return (predictions == batch["labels"]).double().mean().item()


def test_reproduce_tiny_end_to_end_and_resume(tmp_path, data_dir):
    out = tmp_path / "out"
    config = _tiny_config(out, data_dir)
    results = run_reproduce(config, progress=False, print_fn=None)

    # results.json is what run_reproduce returned
    with open(out / RESULTS_NAME) as f:
        saved = json.load(f)
    assert saved["summary"] == json.loads(json.dumps(results["summary"]))
    assert ReproduceConfig.from_dict(saved["config"]).to_dict() == config.to_dict()

    # the plan: 2 models x 2 seeds, + lambdas 0.1 and 1 (lambda 3 is the linf column's own seed-0 training)
    runs = saved["runs"]
    assert len(runs) == 6 and saved["timing"]["trained_now"] == 6
    keys = {(r["variant"]["loss"], r["variant"]["weight"], r["seed"]) for r in runs}
    assert keys == {("baseline", 0.0, 0), ("baseline", 0.0, 1), ("linf", 3.0, 0), ("linf", 3.0, 1),
                    ("linf", 0.1, 0), ("linf", 1.0, 0)}
    linf0 = next(r for r in runs if r["variant"]["name"] == "linf" and r["seed"] == 0)
    assert sorted(linf0["roles"]) == ["headline", "sweep:linf:3"]
    assert len({r["run_dir"] for r in runs}) == 6

    # every configured row of every run, each an accuracy over the 32 test images
    n_eval = saved["data"]["test_images"]
    assert n_eval == 32
    for run in runs:
        assert set(run["rows"]) == _expected_settings(config, run), run["run_dir"]
        for name, row in run["rows"].items():
            assert 0.0 <= row["accuracy"] <= 1.0
            assert abs(row["accuracy"] * n_eval - round(row["accuracy"] * n_eval)) < 1e-9, (name, row["accuracy"])
        for file in ("model.safetensors", "config.json", RUN_INFO_NAME, "low_bit_results.json"):
            assert os.path.isfile(os.path.join(run["run_dir"], file)), (run["run_dir"], file)
    # FP of one run, measured independently
    assert linf0["rows"]["FP"]["accuracy"] == pytest.approx(_fp_accuracy(linf0["run_dir"], config), abs=1e-12)

    # mean / std over seeds for headline rows, first seed only for the others, against numpy
    summary = saved["summary"]["test_resnet"]
    assert list(summary) == ["FP"] + [s["name"] for s in config.low_bit]
    for setting, cells in summary.items():
        headline = setting == "FP" or config.setting(setting)["headline"]
        for variant in config.variants:
            cell = cells[variant["name"]]
            seeds = config.seeds if headline else config.seeds[:1]
            values = [next(r for r in runs if r["seed"] == s and r["variant"]["name"] == variant["name"])
                      ["rows"][setting]["accuracy"] for s in seeds]
            assert cell["seeds"] == seeds and cell["values"] == values and cell["headline"] == headline
            assert cell["mean"] == pytest.approx(np.mean(values), abs=1e-12)
            if headline:
                assert cell["std"] == pytest.approx(np.std(values, ddof=1), abs=1e-12)
            else:
                assert cell["std"] is None

    # R2 minus baseline on the rows with a paper target (FP, W2A8, W2A2, W1), from the per-seed values
    gains = saved["gains"]["test_resnet"]
    assert set(gains) == {"FP", "W2A8 per-channel mse", "W2A8 per-channel adaround", "W2A2 QAT", "W1 k-means"}
    targets = {"FP": -1.0, "W2A8 per-channel mse": 8.0, "W2A8 per-channel adaround": 8.0, "W2A2 QAT": 3.0,
               "W1 k-means": 7.0}
    for setting, cells in gains.items():
        base, r2 = summary[setting]["baseline"], summary[setting]["linf"]
        differences = [100 * (a - b) for a, b in zip(r2["values"], base["values"])]
        cell = cells["linf"]
        assert set(cells) == {"linf"} and cell["target"] == targets[setting]
        assert cell["delta"] == pytest.approx(np.mean(differences), abs=1e-9)
        # a low-bit target counts only where R2's FP is within a point of the baseline's (the float rule)
        fp_delta = 100 * (summary["FP"]["linf"]["mean"] - summary["FP"]["baseline"]["mean"])
        assert cell["fp_delta"] == pytest.approx(fp_delta, abs=1e-9)
        assert cell["met"] == (cell["delta"] >= targets[setting] and (setting == "FP" or fp_delta >= -1))
        if setting != "FP":
            assert cell["retention"] == pytest.approx([base["mean"] / summary["FP"]["baseline"]["mean"],
                                                      r2["mean"] / summary["FP"]["linf"]["mean"]])
        if len(differences) > 1:
            assert cell["std"] == pytest.approx(np.std(differences, ddof=1), abs=1e-9)
        else:
            assert cell["std"] is None

    # the lambda sweep: baseline (lambda 0) then the three lambdas, each row from its own run
    (table,) = saved["lambda_sweep"]
    assert table["variant"] == "linf" and table["reference"] == "baseline"
    sweep = table["models"]["test_resnet"]["rows"]
    assert table["models"]["test_resnet"]["chosen"] is None  # no validation split: nothing is chosen
    assert [row["lambda"] for row in sweep] == [0.0, 0.1, 1.0, 3.0]
    for row in sweep:
        run = next(r for r in runs if r["run_dir"] == row["run_dir"])
        assert set(row["accuracy"]) == {"FP", *config.lambda_sweep[0]["settings"]} and "val_accuracy" not in row
        assert all(row["accuracy"][s] == run["rows"][s]["accuracy"] for s in row["accuracy"])

    # results.md holds the tables with the same numbers
    report = (out / REPORT_NAME).read_text()
    assert "| setting | baseline (no R2) | linf (λ=3, per channel) |" in report
    fp = summary["FP"]
    cells = [f"{100 * fp[v]['mean']:.2f} ± {100 * fp[v]['std']:.2f}" for v in ("baseline", "linf")]
    assert f"| FP | {cells[0]} | {cells[1]} |" in report
    dkm = summary["W2 DKM"]
    assert f"| W2 DKM † | {100 * dkm['baseline']['mean']:.2f} | {100 * dkm['linf']['mean']:.2f} |" in report
    assert "## Lambda sweep: linf on test_resnet (seed 0)" in report
    assert "| 0 (baseline) |" in report and "| 0.1 |" in report and "| 3 |" in report
    assert "## R2 minus its reference, against the paper's claims" in report
    assert ("Low-bit: first and last layer at 8 bits in every row; PTQ and clustering rows re-estimate BN on 32 "
            "training images; QAT and DKM fine-tune 2 steps (AdamW lr 0.001, R2 off); AdaRound 4 iterations per "
            "layer.") in report
    w1 = gains["W1 k-means"]["linf"]
    assert (f"| W1 k-means | 1-bit clustering, +7 | {'**' if w1['met'] else ''}{w1['delta']:+.2f} ± "
            f"{w1['std']:.2f}") in report
    assert "Seeds: [0, 1]" in report and "64 training / 32 test images" in report and "## Time" in report

    # the plots exist, are PNGs, and results.md links them
    plots = saved["plots"]["test_resnet"]
    assert set(plots) == {"weight histograms", "per-layer ranges", "accuracy vs bits"}
    for path in plots.values():
        assert_png(path)
        assert os.path.relpath(path, out) in report

    # second run, through the CLI: nothing retrained, nothing recomputed, the same numbers
    marker_files = [os.path.join(r["run_dir"], f) for r in runs for f in ("model.safetensors", RUN_INFO_NAME)]
    mtimes = {p: os.stat(p).st_mtime_ns for p in marker_files}
    args = reproduce_command_parser().parse_args(
        [str(TINY), "--output-dir", str(out), "--data-dir", str(data_dir), "--no-progress"]
    )
    assert reproduce_command(args) == 0
    with open(out / RESULTS_NAME) as f:
        again = json.load(f)
    assert again["timing"]["trained_now"] == 0 and again["timing"]["reused_trainings"] == 6
    assert again["timing"]["rows_computed"] == 0
    assert all(row["cached"] for r in again["runs"] for row in r["rows"].values())
    assert {p: os.stat(p).st_mtime_ns for p in marker_files} == mtimes
    assert again["summary"] == saved["summary"]

    # an interrupted training (no marker) is trained again; a missing cached row is recomputed; nothing else
    lost = next(r for r in runs if r["variant"]["name"] == "baseline" and r["seed"] == 1)
    os.remove(os.path.join(lost["run_dir"], RUN_INFO_NAME))
    cache = os.path.join(linf0["run_dir"], "low_bit_results.json")
    with open(cache) as f:
        cached_rows = json.load(f)["rows"]
    with open(cache, "w") as f:
        json.dump({"rows": [row for row in cached_rows if row["setting"] != "W1 k-means"]}, f)
    third = run_reproduce(config, progress=False, print_fn=None)
    assert third["timing"]["trained_now"] == 1
    assert [r["run_dir"] for r in third["runs"] if r["trained_now"]] == [lost["run_dir"]]
    assert third["timing"]["rows_computed"] == len(lost["rows"]) + 1
    relinf = next(r for r in third["runs"] if r["run_dir"] == linf0["run_dir"])
    assert not relinf["rows"]["W1 k-means"]["cached"]
    assert relinf["rows"]["W1 k-means"]["accuracy"] == linf0["rows"]["W1 k-means"]["accuracy"]  # deterministic

    # a folder trained with another recipe is an error, not silently reused
    with pytest.raises(ValueError, match="trained with other settings .*'lr'"):
        run_reproduce(_tiny_config(out, data_dir, lr=0.01), progress=False, print_fn=None)


def test_model_kwargs_and_one_process_per_model(tmp_path, data_dir, capsys):
    """model_kwargs reach create_model and the saved folder; --models runs a subset into the same output_dir and a
    last run without it reuses those trainings; a config with other kwargs does not reuse them."""
    from hf_r2.models import create_model

    config = _tiny_config(tmp_path / "out", data_dir, seeds=[0], lambda_sweep=None,
                          models=["test_resnet", "resnet10t"], model_kwargs={"test_resnet": {"act_layer": "relu6"}},
                          low_bit=[{"method": "ptq", "w_bits": 2, "a_bits": 8}])
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config.to_dict()))
    only = config.select_models(["test_resnet"])
    assert only.models == ["test_resnet"] and only.model_kwargs == {"test_resnet": {"act_layer": "relu6"}}
    assert config.select_models(["resnet10t"]).model_kwargs == {}
    with pytest.raises(ValueError, match="non-empty subset of `models`"):
        config.select_models(["vit"])

    args = reproduce_command_parser().parse_args([str(path), "--models", "test_resnet", "--no-progress"])
    assert reproduce_command(args) == 0
    results = json.loads((tmp_path / "out" / RESULTS_NAME).read_text())
    assert list(results["summary"]) == ["test_resnet"] and len(results["runs"]) == 2
    assert "## test_resnet (act_layer=relu6)" in (tmp_path / "out" / REPORT_NAME).read_text()
    for run in results["runs"]:
        model = create_model(run["run_dir"], pretrained=True)
        assert any(isinstance(m, torch.nn.ReLU6) for m in model.modules())
        assert not any(type(m) is torch.nn.ReLU for m in model.modules())
        info = json.loads((Path(run["run_dir"]) / RUN_INFO_NAME).read_text())
        assert info["spec"]["model_kwargs"] == {"act_layer": "relu6"}
    # other kwargs for the same folder: an error that names the difference, not a silent reuse
    changed = ReproduceConfig.from_dict({**only.to_dict(), "model_kwargs": {}})
    with pytest.raises(ValueError, match=r"trained with other settings \(differing: \['model_kwargs'\]\)"):
        run_reproduce(changed, progress=False, print_fn=None)
    capsys.readouterr()
