"""Tests of hf_r2.metrics: evaluate_accuracy against a float64 reference over the whole set at once, count_correct
against a plain loop, and the Trainer's compute_accuracy."""

import numpy as np
import pytest
import torch
from transformers import EvalPrediction

from hf_r2.metrics import compute_accuracy, count_correct, evaluate_accuracy


def _batches(x, y, sizes):
    out, start = [], 0
    for size in sizes:
        out.append({"pixel_values": x[start:start + size], "labels": y[start:start + size]})
        start += size
    return out


@pytest.mark.parametrize("fixture", ["timm_cnn", "hf_resnet"])
def test_matches_reference_with_uneven_batches(fixture, request):
    model = request.getfixturevalue(fixture)
    model.train()
    x = torch.randn(11, 3, 32, 32)
    y = torch.randint(0, 10, (11,))
    with torch.no_grad():
        model.eval()
        out = model(pixel_values=x) if fixture == "hf_resnet" else model(x)
        logits = (out.logits if fixture == "hf_resnet" else out).double()
        model.train()
    y[0] = logits[0].argmax()  # at least one right, one wrong answer
    y[1] = (logits[1].argmax() + 1) % 10
    ref_acc = (logits.argmax(-1) == y).double().mean().item()
    ref_loss = (torch.logsumexp(logits, -1) - logits[torch.arange(11), y]).mean().item()
    result = evaluate_accuracy(model, _batches(x, y, [4, 4, 3]))
    assert result["num_samples"] == 11
    assert result["accuracy"] == pytest.approx(ref_acc, abs=1e-12)
    assert result["loss"] == pytest.approx(ref_loss, rel=1e-5)
    assert model.training  # mode restored


def test_eval_mode_uses_running_stats(timm_cnn):
    """Batch norm must use its running statistics: a one-example batch gives the same answer as in a big batch."""
    x = torch.randn(6, 3, 32, 32)
    y = torch.zeros(6, dtype=torch.long)
    whole = evaluate_accuracy(timm_cnn, _batches(x, y, [6]))
    single = evaluate_accuracy(timm_cnn, _batches(x, y, [1] * 6))
    assert whole["loss"] == pytest.approx(single["loss"], rel=1e-5)


def test_empty_loader_raises(timm_cnn):
    with pytest.raises(ValueError, match="yielded no examples"):
        evaluate_accuracy(timm_cnn, [])


def test_evaluate_accuracy_batches_a_dataset_of_rows(timm_cnn):
    """A map-style dataset of rows is batched with collate_fn: same result as the hand-made batches."""
    x = torch.randn(7, 3, 32, 32)
    y = torch.randint(0, 10, (7,))
    rows = [{"pixel_values": x[i], "labels": int(y[i])} for i in range(7)]
    by_rows = evaluate_accuracy(timm_cnn, rows, batch_size=3)
    by_batches = evaluate_accuracy(timm_cnn, _batches(x, y, [3, 3, 1]))
    assert by_rows["num_samples"] == 7
    assert by_rows["accuracy"] == by_batches["accuracy"]
    assert by_rows["loss"] == pytest.approx(by_batches["loss"], rel=1e-6)


def test_count_correct_against_a_loop():
    torch.manual_seed(0)
    logits = torch.randn(50, 7)
    labels = torch.randint(0, 7, (50,))
    expected = 0
    for row, label in zip(logits.tolist(), labels.tolist()):
        expected += int(max(range(7), key=lambda k: row[k]) == label)
    assert count_correct(logits, labels) == expected
    assert isinstance(count_correct(logits, labels), int)
    assert count_correct(logits[:0], labels[:0]) == 0


def test_compute_accuracy():
    logits = np.array([[0.1, 0.9, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 3.0], [0.0, 5.0, 1.0]])
    labels = np.array([1, 0, 1, 2])
    assert compute_accuracy(EvalPrediction(predictions=logits, label_ids=labels)) == {"accuracy": 0.5}
    assert compute_accuracy(((logits, np.zeros(4)), labels)) == {"accuracy": 0.5}
    with pytest.raises(ValueError, match="logits of shape"):
        compute_accuracy((logits, labels[:3]))
