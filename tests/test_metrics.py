"""Tests of hf_r2.metrics.evaluate_accuracy against a float64 reference over the whole set at once."""

import pytest
import torch

from hf_r2.metrics import evaluate_accuracy


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
