"""The fine-tune budget curve (issue 34): R2 fine-tunes of one recipe at several lengths against their same-length
controls, per low-bit row, beside QAT of the checkpoint at the same budget and the gain of R2 from scratch; numbers
from a synthetic results dict, checked against hand-computed ones."""

import json
import math
from pathlib import Path

import pytest
from conftest import assert_png

from hf_r2.reproduce import ReproduceConfig
from hf_r2.reproduce.budget import attach_budget, budget_tables, format_budget, from_scratch_gains, plot_budgets
from hf_r2.reproduce.report import assemble_results, format_report

ROOT = Path(__file__).resolve().parents[2]
W2, W1 = "W2A8 per-tensor maxabs", "W1 k-means"
R2 = {"loss": "linf", "weight": 1.0, "per_channel": True}
FINETUNES = [
    {"name": "control2", "loss": "baseline", "init_from": "baseline", "epochs": 2, "lr": 0.01},
    {"name": "linf2", **R2, "init_from": "baseline", "epochs": 2, "lr": 0.01, "compare_to": "control2"},
    {"name": "control4", "loss": "baseline", "init_from": "baseline", "epochs": 4, "lr": 0.01},
    {"name": "linf4", **R2, "init_from": "baseline", "epochs": 4, "lr": 0.01, "compare_to": "control4"},
]
QAT = {"method": "qat", "w_bits": 2, "a_bits": 8, "per_channel": False, "variants": ["baseline"]}
LOW_BIT = [{"method": "ptq", "w_bits": 2, "a_bits": 8, "per_channel": False, "weight_range": "maxabs"},
           {"method": "kmeans", "w_bits": 1},
           # 640 training images at batch 64: 10 steps an epoch, so 20 / 40 steps are the 2 / 4 epoch budgets
           *({**QAT, "name": f"W2A8 QAT {steps // 10} ep", "finetune_steps": steps} for steps in (20, 30, 40))]
# top-1 per row and variant, one value a seed (seeds 0 and 1); NaN: a row that produced no number
TOP1 = {
    "FP": {"baseline": [0.70], "control2": [0.71], "linf2": [0.705], "control4": [0.72], "linf4": [0.715],
           "scratch": [0.69]},
    W2: {"baseline": [0.20], "control2": [0.20, 0.22], "linf2": [0.26, 0.30], "control4": [0.25, 0.25],
         "linf4": [0.33, 0.35], "scratch": [0.40]},
    W1: {"baseline": [0.10], "control2": [0.15], "linf2": [0.18], "control4": [math.nan]},  # linf4: not measured
    "W2A8 QAT 2 ep": {"baseline": [0.33]}, "W2A8 QAT 3 ep": {"baseline": [0.36]},
    "W2A8 QAT 4 ep": {"baseline": [0.38]},
}


def _config(variants, **changes) -> ReproduceConfig:
    return ReproduceConfig(**{**dict(models=["test_resnet"], seeds=[0, 1], epochs=30, batch_size=64, lambda_sweep=None,
                                     validation_size=100, variants=variants, low_bit=LOW_BIT), **changes})


def _cell(values: list[float]) -> dict:
    mean = sum(values) / len(values)
    return {"seeds": list(range(len(values))), "values": values, "mean": mean, "std": None, "headline": True}


def _results(config: ReproduceConfig, top1=TOP1) -> dict:
    names = {v["name"] for v in config.variants}
    summary = {row: {n: _cell(v) for n, v in cells.items() if n in names} for row, cells in top1.items()}
    val = {W2: {"control2": _cell([0.30]), "linf2": _cell([0.33])}}
    return {"config": config.to_dict(), "output_dir": "/out", "data": {"train_images": 640},
            "summary": {"test_resnet": summary}, "val_summary": {"test_resnet": val}}


def test_gains_against_the_budget_are_the_hand_computed_ones():
    config = _config(["baseline", *FINETUNES, {"name": "scratch", **R2}])
    (family,) = budget_tables(_results(config))["test_resnet"]["families"]
    assert (family["name"], family["variants"]) == ("linf2", ["linf2", "linf4"])
    two, four = family["budgets"]
    assert (two["epochs"], two["control"], four["epochs"], four["control"]) == (2.0, "control2", 4.0, "control4")
    assert two["percent"] == pytest.approx(100 * 2 / 30) and four["percent"] == pytest.approx(100 * 4 / 30)
    assert list(two["rows"]) == list(four["rows"]) == ["FP", W2, W1]  # the QAT rows have no R2 fine-tune
    w2 = two["rows"][W2]
    assert w2["control"] == pytest.approx(0.21) and w2["r2"] == pytest.approx(0.28)
    assert w2["gain"] == pytest.approx(7.0) and w2["std"] == pytest.approx(math.sqrt(2))  # per-seed +6, +8
    assert w2["val_gain"] == pytest.approx(3.0)
    # QAT of the checkpoint at the same budget, over the same control; the 3-epoch QAT matches no budget
    assert {k: (a["epochs"], round(a["gain"], 6)) for k, a in w2["alternatives"].items()} == {
        "W2A8 QAT 2 ep": (2.0, 12.0)}
    assert four["rows"][W2]["gain"] == pytest.approx(9.0)
    assert {k: round(a["gain"], 6) for k, a in four["rows"][W2]["alternatives"].items()} == {"W2A8 QAT 4 ep": 13.0}
    assert two["rows"][W1]["gain"] == pytest.approx(3.0) and two["rows"][W1]["alternatives"] == {}
    assert four["rows"][W1] == {"control": None, "r2": None, "gain": None, "std": None, "val_gain": None,
                                "alternatives": {}}  # NaN and not measured are missing, never 0
    assert two["rows"]["FP"]["gain"] == pytest.approx(-0.5)
    scratch = family["from_scratch"]
    assert (scratch["variant"], scratch["reference"], scratch["source"]) == ("scratch", "baseline", "this study")
    assert scratch["gains"][W2] == pytest.approx(20.0) and W1 not in scratch["gains"]


def test_the_section_and_the_plot(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    config = _config(["baseline", *FINETUNES, {"name": "scratch", **R2}])
    tables = budget_tables(_results(config))
    drawn = []
    plot = Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda ax, xs, ys, *a, **k: drawn.extend(ys) or plot(ax, xs, ys, *a, **k))
    plot_budgets(tables, str(tmp_path))
    (family,) = tables["test_resnet"]["families"]
    assert_png(family["plot"])
    assert drawn and all(math.isfinite(y) for y in drawn) and 0.0 not in drawn  # gaps, never zeros
    assert len(drawn) == 3 * 2 + 2 * 2 + 1 + 1 + 1  # W2: 3 curves x 2 budgets a panel, W1: one budget
    lines = format_budget(tables, str(tmp_path))
    assert "Budgets: 2 ep (6.7 %), 4 ep (13.3 %) of the checkpoint's 30 epochs. Variants: linf2 against control2, " \
           "linf4 against control4." in lines
    assert ("| 2 ep (6.7 %) | W2A8 per-tensor maxabs | 21.00 | 28.00 | +7.00 ± 1.41 (+3.00) | W2A8 QAT 2 ep 33.00 "
            "(+12.00) | +20.00 |") in lines
    assert "| 4 ep (13.3 %) | W1 k-means | - | - | - | - | - |" in lines
    assert "![fine-tune budget: linf2](test_resnet_linf2_finetune_budget.png)" in lines


def test_one_budget_says_so_and_without_fine_tunes_there_is_no_section(tmp_path):
    config = _config(["baseline", *FINETUNES[:2]])
    tables = budget_tables(_results(config))
    plot_budgets(tables, str(tmp_path))
    (family,) = tables["test_resnet"]["families"]
    assert_png(family["plot"])
    assert any("(one budget so far: points, no curve)" in line for line in format_budget(tables, str(tmp_path)))
    assert family["from_scratch"] is None
    plain = _config(["baseline", {"name": "scratch", **R2}])
    assert budget_tables(_results(plain)) == {} and format_budget({}, "/out") == []
    # a committed report with fine-tunes but no stored curve renders as it was committed
    committed = ROOT / "docs/results/evidence"
    results = json.loads((committed / "results.json").read_text(encoding="utf-8"))
    assert format_report(results) == (committed / "results.md").read_text(encoding="utf-8")


def test_from_scratch_from_the_study_that_trained_the_baseline(tmp_path):
    """A baseline trained by another study (`baselines`) brings that study's from-scratch gain, if it has one."""
    study = tmp_path / "headline"
    headline = _config(["baseline", {"name": "scratch", **R2}])
    (study / "runs/test_resnet/baseline/seed0").mkdir(parents=True)
    (study / "results.json").write_text(json.dumps(_results(headline)), encoding="utf-8")
    folder = study / "runs/test_resnet/baseline/seed0"
    config = _config(["baseline", *FINETUNES], baselines={"test_resnet": str(folder)})
    (family,) = budget_tables(_results(config))["test_resnet"]["families"]
    assert family["from_scratch"]["source"] == str(study / "results.json")
    assert family["from_scratch"]["gains"] == from_scratch_gains(_results(headline), "test_resnet", "linf")["gains"]
    assert family["from_scratch"]["gains"][W2] == pytest.approx(20.0)


def test_assemble_results_stores_the_curve_and_the_report_shows_it(tmp_path):
    config = _config(["baseline", *FINETUNES], output_dir=str(tmp_path))
    runs = [{"model": "test_resnet", "variant": v, "variant_names": [v["name"]], "seed": seed, "train_seconds": 1.0,
             "stats": {"overall": {"max_abs": 1.0, "mean_max_over_std": 5.0, "mean_kurtosis": 3.0}},
             "rows": {row: {"accuracy": cells[v["name"]][seed], "cached": True} for row, cells in TOP1.items()
                      if len(cells.get(v["name"], [])) > seed}}
            for v in config.variants for seed in (0, 1)]
    timing = {"seconds": 1.0, "trainings": 10, "trained_now": 0}
    results = assemble_results(config, runs, {"train_images": 640, "test_images": 100, "calibration_images": 64},
                               timing, {}, {})
    (family,) = results["finetune_budget"]["test_resnet"]["families"]
    assert family["budgets"][1]["rows"][W2]["gain"] == pytest.approx(9.0)
    assert_png(family["plot"])
    report = format_report(json.loads(json.dumps(results)))  # as read back from results.json
    assert "## R2 fine-tune against its budget" in report
    assert "![fine-tune budget: linf2](plots/test_resnet_linf2_finetune_budget.png)" in report


def test_attach_budget_to_a_committed_results_json(tmp_path):
    """The evidence study (2-epoch fine-tunes of four losses, linf also from scratch) gains the section and nothing
    else: its report is the committed one with the section added."""
    committed = ROOT / "docs/results/evidence"
    results = attach_budget(json.loads((committed / "results.json").read_text(encoding="utf-8")), str(tmp_path))
    families = results["finetune_budget"]["mobilenetv2_100"]["families"]
    assert [f["name"] for f in families] == ["linf", "soft_min_max", "margin", "kure"]
    assert [len(f["budgets"]) for f in families] == [1, 1, 1, 1] and families[0]["from_scratch"]["variant"] == (
        "linf_scratch")
    for family in families:
        assert_png(family["plot"])
    section = "\n".join(format_budget(results["finetune_budget"], results["output_dir"]))
    report = format_report(results)
    assert section in report
    assert report.replace(section + "\n", "", 1) == (committed / "results.md").read_text(encoding="utf-8")
