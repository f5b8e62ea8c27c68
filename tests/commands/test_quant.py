"""`hf-r2 ptq / qat / compress / evaluate` end to end on a tiny saved model and tiny CIFAR-10.

Every reported low-bit accuracy is checked against an independent count: the export is loaded with `load_low_bit`,
run image by image, and its argmax compared with the labels here.
"""

import os
import stat

import pytest
import torch

from hf_r2.cli import main
from hf_r2.data import load_image_dataset, with_transforms
from hf_r2.hub import from_pretrained
from hf_r2.model_card import build_model_card
from hf_r2.quant import load_low_bit
from hf_r2.quant.results import read_results
from hf_r2.saving import update_training_info

N_EVAL = 48


def _data_flags(data_dir, calibrate=True, n_eval=N_EVAL):
    flags = ["--dataset", "cifar10-tiny", "--data-dir", str(data_dir), "--input-size", "32",
             "--max-eval-samples", str(n_eval), "--batch-size", "16"]
    return flags + (["--calibration-samples", "32"] if calibrate else [])


def _rows(folder):
    return {(r["setting"], r["method"]): r for r in read_results(folder)}


def _count_correct(model, data_dir, n=N_EVAL) -> int:
    """Correct top-1 predictions of `model` on the `n` evaluation images the commands draw, counted one by one."""
    test = load_image_dataset("cifar10-tiny", data_dir=data_dir, max_eval_samples=n, seed=0)["test"]
    rows = with_transforms(test, model, train=False, input_size=32)
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(len(rows)):
            row = rows[i]
            logits = model(row["pixel_values"].unsqueeze(0))
            correct += int(int(logits[0].argmax()) == int(row["labels"]))
    return correct


def _check_accuracy(row, export_dir, data_dir, n=N_EVAL):
    model, _ = load_low_bit(export_dir)
    assert row["accuracy"] == pytest.approx(_count_correct(model, data_dir, n) / n, abs=1e-9)


def test_ptq_command_exports_and_records(model_dir, data_dir, tmp_path, capsys):
    out = str(tmp_path / "w2a8")
    old_mask = os.umask(0o022)
    try:
        code = main(["ptq", model_dir, *_data_flags(data_dir), "--w-bits", "2", "--a-bits", "8", "--output-dir", out])
    finally:
        os.umask(old_mask)
    assert code == 0
    printed = capsys.readouterr().out
    assert "| W2A8 | ptq-nearest |" in printed and "| FP | float |" in printed and f"{N_EVAL} images" in printed
    rows = _rows(model_dir)
    row, fp = rows[("W2A8", "ptq-nearest")], rows[("FP", "float")]
    assert row["export"].endswith("w2a8")
    # each row says what it was measured on
    for r in (row, fp):
        assert (r["dataset"], r["split"], r["num_images"], r["input_size"]) == ("cifar10-tiny", "test", N_EVAL, 32)
    assert 2 < row["bits_per_weight"] < 3  # 2-bit codes + per-channel scales / zero points (8-bit first/last)
    _check_accuracy(row, out, data_dir)
    assert fp["accuracy"] == pytest.approx(_count_correct(from_pretrained(model_dir).model, data_dir) / N_EVAL)
    # saved files respect the umask (not mkstemp's 0600 / mkdtemp's 0700)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o755
    for name in ("low_bit_results.json", "low_bit_config.json", "low_bit.safetensors"):
        assert stat.S_IMODE(os.stat(os.path.join(out, name)).st_mode) == 0o644, name
    assert _rows(out) == rows
    model, description = load_low_bit(out)
    assert description["method"] == "ptq" and description["method_config"]["w_bits"] == 2
    assert main(["evaluate", out, *_data_flags(data_dir, calibrate=False)]) == 0
    again = _rows(out)[("W2A8", "ptq")]
    assert again["accuracy"] == pytest.approx(row["accuracy"])


def test_ptq_rounding_bn_grid_options(model_dir, data_dir, tmp_path):
    """--rounding adaround, --bn fold, --per-tensor and --first-last-bits reach the export."""
    out = str(tmp_path / "opts")
    assert main(["ptq", model_dir, *_data_flags(data_dir), "--w-bits", "2", "--a-bits", "none", "--rounding",
                 "adaround", "--adaround-iters", "4", "--bn", "fold", "--per-tensor", "--first-last-bits", "4",
                 "--output-dir", out]) == 0
    model, description = load_low_bit(out)
    config = description["method_config"]
    assert (config["rounding"], config["bn"], config["per_channel"], config["first_last_bits"]) == (
        "adaround", "fold", False, 4)
    assert description["folded_bn"]  # the batch norms were folded into their convs
    bits = [info["bits"] for info in description["layers"].values()]
    assert bits[0] == 4 and bits[-1] == 4 and set(bits[1:-1]) == {2}
    for name, module in model.named_modules():  # per tensor: one grid of 2^bits values for the whole weight
        if name in description["layers"] and description["layers"][name]["bits"] == 2:
            assert torch.unique(module.weight).numel() <= 4
    _check_accuracy(_rows(model_dir)[("W2", "ptq-adaround")], out, data_dir)


def test_ptq_bad_values_are_one_line(model_dir, data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    for flags, message in ((["--w-bits", "9"], "--w-bits takes 1 to 8"),
                           (["--a-bits", "eight"], "--a-bits takes 2 to 8 or 'none'")):
        with pytest.raises(SystemExit, match="^2$"):
            main(["ptq", model_dir, *_data_flags(data_dir), *flags])
        assert message in capsys.readouterr().err
    assert main(["ptq", str(tmp_path / "missing"), *_data_flags(data_dir)]) == 1
    assert "no such folder" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["model"]  # no export folder was created


def test_ptq_rounding_brecq_exports_and_reloads(model_dir, data_dir, tmp_path):
    """--rounding brecq (QDrop with --drop-prob) runs block reconstruction and exports like PTQ."""
    out = str(tmp_path / "qdrop")
    assert main(["ptq", model_dir, *_data_flags(data_dir), "--rounding", "brecq", "--brecq-iters", "2", "--drop-prob",
                 "0.5", "--output-dir", out]) == 0
    _, description = load_low_bit(out)
    assert description["method"] == "ptq" and description["method_config"]["drop_prob"] == 0.5
    _check_accuracy(_rows(model_dir)[("W2A8", "ptq-qdrop")], out, data_dir)


def test_qat_command_with_r2_weight(model_dir, data_dir, tmp_path, monkeypatch):
    from hf_r2.regularizer import R2Regularizer

    calls = []
    forward = R2Regularizer.forward
    monkeypatch.setattr(R2Regularizer, "forward", lambda self: calls.append(self.config.weight) or forward(self))
    out = str(tmp_path / "w2a2")
    assert main(["qat", model_dir, *_data_flags(data_dir), "--max-train-samples", "32", "--epochs", "1",
                 "--r2-weight", "0.5", "--output-dir", out]) == 0
    assert calls and set(calls) == {0.5}  # R2 was on during the fine-tune, with --r2-weight's lambda
    row = _rows(model_dir)[("W2A2", "qat-lsq")]
    _, description = load_low_bit(out)
    # the first conv keeps 8-bit weights and inputs, the others 2-bit
    bits = [info["bits"] for info in description["layers"].values()]
    assert bits[0] == 8 and bits[-1] == 8 and set(bits[1:-1]) == {2}
    assert description["layers"][next(iter(description["layers"]))]["input_bits"] == 8
    _check_accuracy(row, out, data_dir)


def test_evaluate_keeps_rows_of_other_data_apart(model_dir, data_dir, capsys):
    assert main(["evaluate", model_dir, *_data_flags(data_dir, calibrate=False)]) == 0
    assert f"Measured on {N_EVAL} images" in capsys.readouterr().out
    assert main(["evaluate", model_dir, *_data_flags(data_dir, calibrate=False, n_eval=16)]) == 0
    assert main(["evaluate", model_dir, *_data_flags(data_dir, calibrate=False)]) == 0  # replaces its own row
    rows = read_results(model_dir)
    assert sorted(r["num_images"] for r in rows) == [16, N_EVAL]
    model = from_pretrained(model_dir).model
    for row in rows:
        assert row["accuracy"] == pytest.approx(_count_correct(model, data_dir, row["num_images"]) / row["num_images"])
    # the card names the training data and shows only rows measured on it, with the image count
    update_training_info(model_dir, dataset="cifar10-tiny", data={
        "dataset": "cifar10-tiny", "source": "local copy", "hub_id": None, "train_split": "train",
        "eval_split": "test", "train_images": 16, "eval_images": 16, "input_size": 32})
    rows[0]["dataset"] = "other"
    from hf_r2._utils import write_json_atomic

    write_json_atomic(os.path.join(model_dir, "low_bit_results.json"), {"rows": rows + [
        {**rows[1], "setting": "W2A8", "method": "ptq-nearest", "dataset": "other", "accuracy": 0.123}]})
    card = str(build_model_card(model_dir))
    assert "uoft-cs/cifar10" not in card  # 16 images of a local subset are not the Hub dataset
    assert "| 0.1230 |" not in card and "`other`" not in card  # the row measured on other data is left out
    fp = [r for r in rows if r["dataset"] == "cifar10-tiny"][-1]
    assert (f"| full precision | float | {fp['accuracy']:.4f} | `cifar10-tiny`, `test` split, {fp['num_images']} "
            "images | - |") in card
    assert "## Data\n\n`cifar10-tiny` (local copy): trained on 16 images" in card


def test_compress_kmeans_command(model_dir, data_dir, tmp_path):
    out = str(tmp_path / "w1")
    assert main(["compress", model_dir, *_data_flags(data_dir), "--method", "kmeans", "--bits", "1",
                 "--output-dir", out]) == 0
    model, description = load_low_bit(out)
    for name, module in model.named_modules():
        if name in description["layers"]:
            assert torch.unique(module.weight).numel() <= 2
    _check_accuracy(_rows(model_dir)[("W1", "kmeans")], out, data_dir)


def test_compress_dkm_groups_skip_first_last_r2(model_dir, data_dir, tmp_path, monkeypatch):
    from hf_r2.regularizer import R2Regularizer

    calls = []
    forward = R2Regularizer.forward
    monkeypatch.setattr(R2Regularizer, "forward", lambda self: calls.append(self.config.weight) or forward(self))
    out = str(tmp_path / "dkm")
    assert main(["compress", model_dir, *_data_flags(data_dir), "--method", "dkm", "--bits", "1", "--group-size",
                 "4", "--skip-first-last", "--r2-lambda", "0.25", "--max-train-samples", "32", "--epochs", "0.5",
                 "--output-dir", out]) == 0
    assert calls and set(calls) == {0.25}
    model, description = load_low_bit(out)
    assert description["method_config"]["group_size"] == 4
    float_model = from_pretrained(model_dir).model
    targets = [n for n, m in float_model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert targets[0] not in description["layers"] and targets[-1] not in description["layers"]  # skipped
    for name, module in model.named_modules():
        if name in description["layers"]:
            rows = module.weight.reshape(module.weight.shape[0], -1)
            for start in range(0, rows.shape[0], 4):  # one palette of 2 values per group of 4 output channels
                assert torch.unique(rows[start:start + 4]).numel() <= 2
    _check_accuracy(_rows(model_dir)[("W1", "dkm")], out, data_dir)


def test_ptq_dot_names_the_export_from_the_folder(model_dir, data_dir, monkeypatch):
    monkeypatch.chdir(model_dir)
    assert main(["ptq", ".", *_data_flags(data_dir), "--a-bits", "none", "--bn", "keep"]) == 0
    assert os.path.isdir(f"{model_dir}-w2-ptq") and not any(n.startswith(".-") for n in os.listdir("."))
