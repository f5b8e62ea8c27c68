"""Top-1 accuracy and mean cross-entropy of an image classifier over a data loader (timm or transformers model)."""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .models import forward_logits

__all__ = ["evaluate_accuracy"]


@torch.no_grad()
def evaluate_accuracy(
    model: nn.Module, dataloader: Iterable[dict[str, torch.Tensor]], device: str | torch.device | None = None
) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy of `model` over every batch of `dataloader`.

    The model runs in eval mode (batch norm uses its running statistics) and is put back in the mode it was in.
    `accuracy = #(argmax logits == label) / N` and `loss = sum_i CE(logits_i, label_i) / N` over all `N` examples
    (so a smaller last batch weighs right), both as Python floats.

    Args:
        model (`nn.Module`):
            A timm or transformers classifier (logits through [`hf_r2.models.forward_logits`]).
        dataloader (iterable of `dict`):
            Batches `{"pixel_values": (B, 3, H, W), "labels": (B,)}`, e.g. a `DataLoader` with
            [`hf_r2.data.collate_fn`].
        device (`str` or `torch.device`, *optional*):
            Where to run; defaults to the device of the model's first parameter.

    Returns:
        `dict[str, float]`: `{"accuracy": ..., "loss": ..., "num_samples": N}`.
    """
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    correct, total, loss_sum = 0, 0, 0.0
    try:
        for batch in dataloader:
            pixel_values = batch["pixel_values"].to(device)
            labels = batch["labels"].to(device)
            logits = forward_logits(model, pixel_values).float()
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += (logits.argmax(dim=-1) == labels).sum().item()
            total += labels.numel()
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("`dataloader` yielded no examples: cannot compute an accuracy over an empty set.")
    return {"accuracy": correct / total, "loss": loss_sum / total, "num_samples": total}
