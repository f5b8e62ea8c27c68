"""`hf_r2.quant.results`: setting names both ways, `float_row`, `format_table` against a hand-written table,
`update_results` / `read_results` on disk, and `low_bit_table` against a brute-force count of correct predictions."""

import copy
import json

import pytest
import torch
from conftest import make_timm

from hf_r2.quant import (
    LOW_BIT_RESULTS_NAME,
    PTQConfig,
    float_row,
    format_setting,
    format_table,
    low_bit_table,
    parse_setting,
    post_training_quantize_,
    read_results,
    row_key,
    update_results,
)


@pytest.mark.parametrize(
    "text, bits, name",
    [
        ("fp", (None, None), "FP"),
        ("FP32", (None, None), "FP"),
        (" float ", (None, None), "FP"),
        ("w2a8", (2, 8), "W2A8"),
        ("W4A4", (4, 4), "W4A4"),
        ("w1", (1, None), "W1"),
    ],
)
def test_parse_and_format_setting(text, bits, name):
    assert parse_setting(text) == bits
    assert format_setting(*bits) == name
    assert parse_setting(name) == bits


@pytest.mark.parametrize("text", ["w2a", "a8", "w22a8", "int8", ""])
def test_parse_setting_errors(text):
    with pytest.raises(ValueError, match="Unknown low-bit setting"):
        parse_setting(text)


def test_float_row():
    assert float_row(0.5) == {"setting": "FP", "method": "float", "w_bits": None, "a_bits": None, "accuracy": 0.5}
    row = float_row(0.25, dataset="cifar10", seconds=1.5)
    assert list(row) == ["setting", "method", "w_bits", "a_bits", "accuracy", "dataset", "seconds"]
    assert row["dataset"] == "cifar10" and row["seconds"] == 1.5


def test_format_table():
    rows = [
        float_row(0.91234),
        {"setting": "W2A8", "method": "ptq", "accuracy": 0.5, "bits_per_weight": 2.0625},
        {"setting": "W1", "accuracy": 0.1},
    ]
    expected = (
        "### resnet18\n"
        "\n"
        "| setting | method | top-1 (%) | bits / weight |\n"
        "|---|---|---|---|\n"
        "| FP | float | 91.23 |  |\n"
        "| W2A8 | ptq | 50.00 | 2.06 |\n"
        "| W1 |  | 10.00 |  |"
    )
    assert format_table(rows, "resnet18") == expected
    assert format_table(rows[:1]) == "| setting | method | top-1 (%) | bits / weight |\n|---|---|---|---|\n" + (
        "| FP | float | 91.23 |  |"
    )


def test_update_and_read_results(tmp_path):
    assert read_results(tmp_path) == []
    first = [float_row(0.9), {"setting": "W2A8", "method": "ptq", "accuracy": 0.4}]
    path = update_results(tmp_path, first)
    assert path == str(tmp_path / LOW_BIT_RESULTS_NAME)
    assert read_results(tmp_path) == first
    # same setting and method: replaced; same setting, other method: added
    update_results(tmp_path, [{"setting": "W2A8", "method": "ptq", "accuracy": 0.6}])
    update_results(tmp_path, [{"setting": "W2A8", "method": "qat", "accuracy": 0.7}])
    with open(path) as f:
        on_disk = json.load(f)
    assert on_disk == {
        "rows": [
            float_row(0.9),
            {"setting": "W2A8", "method": "ptq", "accuracy": 0.6},
            {"setting": "W2A8", "method": "qat", "accuracy": 0.7},
        ]
    }
    assert read_results(tmp_path) == on_disk["rows"]


def test_rows_measured_on_other_data_are_kept_apart(tmp_path):
    """A row replaces only the row of the same setting and method measured on the same data (dataset, split,
    number of images, input size): `hf-r2 evaluate --dataset OTHER` must not overwrite the training data's row."""
    on = {"dataset": "cifar10-tiny", "split": "test", "num_images": 200, "input_size": 32}
    update_results(tmp_path, [float_row(0.9, **on)])
    for change in ({"dataset": "/data/pets"}, {"split": "validation"}, {"num_images": 16}, {"input_size": 64}):
        update_results(tmp_path, [float_row(0.1, **{**on, **change})])
    rows = read_results(tmp_path)
    assert len(rows) == 5 and rows[0] == float_row(0.9, **on)
    update_results(tmp_path, [float_row(0.8, **on)])  # the same data: replaced, the others stay
    rows = read_results(tmp_path)
    assert len(rows) == 5 and [r["accuracy"] for r in rows if r["dataset"] == "cifar10-tiny" and
                               r["num_images"] == 200 and r["input_size"] == 32 and r["split"] == "test"] == [0.8]
    assert row_key(rows[-1]) == ("FP", "float", "cifar10-tiny", "test", 200, 32)


def _brute_force_accuracy(model, batches) -> float:
    """Correct predictions counted one image at a time, with a Python loop over the logits."""
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for batch in batches:
            for image, label in zip(batch["pixel_values"], batch["labels"].tolist()):
                logits = model(image[None])[0].tolist()
                best = max(range(len(logits)), key=lambda k: logits[k])
                correct += int(best == label)
                total += 1
    return correct / total


def test_low_bit_table_against_brute_force():
    g = torch.Generator().manual_seed(0)
    model = make_timm("test_resnet").eval()
    x = torch.randn(12, 3, 32, 32, generator=g)
    with torch.no_grad():
        predicted = model(x).argmax(-1)
    labels = torch.where(torch.arange(12) % 3 == 0, predicted, (predicted + 1) % 10)  # 4 of 12 right in float
    eval_data = [{"pixel_values": x[:5], "labels": labels[:5]}, {"pixel_values": x[5:], "labels": labels[5:]}]
    calibration = [{"pixel_values": torch.randn(4, 3, 32, 32, generator=g)} for _ in range(2)]
    state = {k: v.clone() for k, v in model.state_dict().items()}

    rows = low_bit_table(model, eval_data, calibration, settings=("fp", "w4a8", "w2"), calibration_batches=2)

    for key, value in model.state_dict().items():  # left untouched
        assert torch.equal(value, state[key]), key
    assert [(r["setting"], r["method"], r["w_bits"], r["a_bits"]) for r in rows] == [
        ("FP", "float", None, None),
        ("W4A8", "ptq", 4, 8),
        ("W2", "ptq", 2, None),
    ]
    assert rows[0] == float_row(4 / 12)
    assert rows[0]["accuracy"] == _brute_force_accuracy(model, eval_data)
    for row, (w_bits, a_bits) in zip(rows[1:], [(4, 8), (2, None)]):
        config = PTQConfig(w_bits=w_bits, a_bits=a_bits, calibration_batches=2)
        assert row["config"] == config.to_dict()
        quantized = post_training_quantize_(copy.deepcopy(model), config, calibration)
        assert row["accuracy"] == _brute_force_accuracy(quantized, eval_data)
