"""`hf-r2 ptq --pre cle magr`: the range reductions run on the float model before quantizing, in the order given,
are recorded in the export, keep their rows apart from plain PTQ's, and the export reloads to the accuracy reported."""

import pytest
import torch

from hf_r2.cli import main
from hf_r2.data import load_image_dataset, with_transforms
from hf_r2.quant import load_low_bit
from hf_r2.quant.results import read_results

N_EVAL = 32


def _flags(data_dir):
    return ["--dataset", "cifar10-tiny", "--data-dir", str(data_dir), "--input-size", "32", "--max-eval-samples",
            str(N_EVAL), "--batch-size", "16", "--calibration-samples", "32"]


def _accuracy(model, data_dir) -> float:
    test = load_image_dataset("cifar10-tiny", data_dir=data_dir, max_eval_samples=N_EVAL, seed=0)["test"]
    rows = with_transforms(test, model, train=False, input_size=32)
    model.eval()
    with torch.no_grad():
        correct = sum(int(model(rows[i]["pixel_values"][None])[0].argmax()) == int(rows[i]["labels"])
                      for i in range(len(rows)))
    return correct / len(rows)


def test_ptq_pre_cle_magr_in_order(model_dir, data_dir, tmp_path, monkeypatch):
    import hf_r2.quant as quant

    order = []
    for name in ("equalize_", "magr_"):
        verb = getattr(quant, name)
        monkeypatch.setattr(quant, name, lambda *a, _v=verb, _n=name, **k: order.append(_n) or _v(*a, **k))
    out = str(tmp_path / "w2a8-pre")
    assert main(["ptq", model_dir, *_flags(data_dir), "--pre", "magr", "cle", "--output-dir", out]) == 0
    assert order == ["magr_", "equalize_"]
    rows = {(r["setting"], r["method"]): r for r in read_results(model_dir)}
    row = rows[("W2A8", "ptq-nearest-magr-cle")]
    model, description = load_low_bit(out)
    pre = description["method_config"]["pre"]
    assert [p["step"] for p in pre] == ["magr", "cle"] and pre[1]["config"]["relu6"] == "bounded"
    assert description["folded_bn"]  # CLE folded the batch norms; the export rebuilds that structure
    assert row["accuracy"] == pytest.approx(_accuracy(model, data_dir), abs=1e-9)


def test_ptq_pre_rejects_unknown_steps(model_dir, data_dir, capsys):
    with pytest.raises(SystemExit, match="^2$"):
        main(["ptq", model_dir, *_flags(data_dir), "--pre", "awq"])
    assert "invalid choice: 'awq'" in capsys.readouterr().err


def test_ptq_bias_correction_after_cle(model_dir, data_dir, tmp_path):
    """`--pre cle --bias-correction`: recorded in the export's config, a row of its own, reloads to its accuracy."""
    out = str(tmp_path / "w2a8-cle-bc")
    assert main(["ptq", model_dir, *_flags(data_dir), "--pre", "cle", "--bias-correction", "--output-dir", out]) == 0
    rows = {(r["setting"], r["method"]): r for r in read_results(model_dir)}
    row = rows[("W2A8", "ptq-nearest-cle-bc")]
    model, description = load_low_bit(out)
    assert description["method_config"]["bias_correction"] is True
    assert row["accuracy"] == pytest.approx(_accuracy(model, data_dir), abs=1e-9)

