"""`hf-r2 ptq / qat / compress / evaluate` end to end on a tiny saved model and tiny CIFAR-10."""

import json

import pytest
import torch
from conftest import make_timm

from hf_r2.cli import main
from hf_r2.quant import load_low_bit
from hf_r2.quant.results import LOW_BIT_RESULTS_NAME, read_results
from hf_r2.saving import save_model_folder


@pytest.fixture
def model_dir(tmp_path):
    model = make_timm("test_resnet")
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, 32, 32), "crop_pct": 1.0}
    return str(save_model_folder(model, str(tmp_path / "model")))


def _data_flags(data_dir):
    return ["--dataset", "cifar10-tiny", "--data-dir", str(data_dir), "--input-size", "32",
            "--max-eval-samples", "48", "--calibration-samples", "32", "--batch-size", "16"]


def _rows(folder):
    return {(r["setting"], r["method"]): r for r in read_results(folder)}


def test_ptq_command_exports_and_records(model_dir, data_dir, tmp_path, capsys):
    out = str(tmp_path / "w2a8")
    code = main(["ptq", model_dir, *_data_flags(data_dir), "--w-bits", "2", "--a-bits", "8", "--output-dir", out])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| W2A8 | ptq-nearest |" in printed and "| FP | float |" in printed
    rows = _rows(model_dir)
    row = rows[("W2A8", "ptq-nearest")]
    assert 0 <= row["accuracy"] <= 1 and row["export"].endswith("w2a8")
    assert 2 < row["bits_per_weight"] < 3  # 2-bit codes + per-channel scales / zero points (8-bit first/last)
    # the same numbers are in the export, and the export evaluates to the same accuracy
    assert _rows(out) == rows
    model, description = load_low_bit(out)
    assert description["method"] == "ptq" and description["method_config"]["w_bits"] == 2
    assert main(["evaluate", out, *_data_flags(data_dir)]) == 0
    again = _rows(out)[("W2A8", "ptq")]
    assert again["accuracy"] == pytest.approx(row["accuracy"])


def test_ptq_weight_only_and_errors(model_dir, data_dir, tmp_path, capsys):
    out = str(tmp_path / "w4")
    assert main(["ptq", model_dir, *_data_flags(data_dir), "--w-bits", "4", "--a-bits", "none", "--bn", "keep",
                 "--output-dir", out]) == 0
    model, description = load_low_bit(out)
    assert description["method_config"]["a_bits"] is None
    assert all("input_bits" not in info for info in description["layers"].values())
    capsys.readouterr()
    assert main(["ptq", model_dir, *_data_flags(data_dir), "--w-bits", "9"]) == 1
    assert "`w_bits` must be an integer from 1 to 8" in capsys.readouterr().err
    assert main(["ptq", str(tmp_path / "missing"), *_data_flags(data_dir)]) == 1


def test_qat_command(model_dir, data_dir, tmp_path):
    out = str(tmp_path / "w2a2")
    code = main(["qat", model_dir, *_data_flags(data_dir), "--max-train-samples", "32", "--epochs", "1",
                 "--output-dir", out])
    assert code == 0
    row = _rows(model_dir)[("W2A2", "qat-lsq")]
    model, description = load_low_bit(out)
    # the first conv keeps 8-bit weights and inputs, the others 2-bit
    bits = [info["bits"] for info in description["layers"].values()]
    assert bits[0] == 8 and bits[-1] == 8 and set(bits[1:-1]) == {2}
    assert description["layers"][next(iter(description["layers"]))]["input_bits"] == 8
    assert 0 <= row["accuracy"] <= 1


def test_evaluate_float_folder_writes_json(model_dir, data_dir):
    assert main(["evaluate", model_dir, *_data_flags(data_dir)]) == 0
    with open(f"{model_dir}/{LOW_BIT_RESULTS_NAME}") as f:
        rows = json.load(f)["rows"]
    assert rows[0]["setting"] == "FP" and rows[0]["num_samples"] == 48


def test_compress_kmeans_command(model_dir, data_dir, tmp_path):
    out = str(tmp_path / "w1")
    assert main(["compress", model_dir, *_data_flags(data_dir), "--method", "kmeans", "--bits", "1",
                 "--output-dir", out]) == 0
    model, description = load_low_bit(out)
    for name, module in model.named_modules():
        if name in description["layers"]:
            assert torch.unique(module.weight).numel() <= 2
    assert ("W1", "kmeans") in _rows(model_dir)
