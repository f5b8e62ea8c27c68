"""The one accuracy code of hf-r2: top-1 counting, `evaluate_accuracy` (a model over data), the Trainer's
`compute_accuracy` (timm or transformers classifiers), and what tells a model that learnt nothing
(`compute_accuracy_and_chance`, `at_chance`)."""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .models import forward_logits

__all__ = ["count_correct", "evaluate_accuracy", "compute_accuracy", "compute_accuracy_and_chance", "at_chance"]


def count_correct(logits: torch.Tensor, labels: torch.Tensor) -> int:
    """`#(argmax logits == label)`: the number of top-1 hits of `logits` `(N, num_classes)` against `labels` `(N,)`."""
    return int((logits.argmax(dim=-1) == labels).sum().item())


def _batches(data: Any, batch_size: int) -> Iterable[Any]:
    """`data` itself if it is a DataLoader / iterable of batches, else a DataLoader over a map-style dataset."""
    if isinstance(data, torch.utils.data.DataLoader) or not hasattr(data, "__getitem__"):
        return data
    if isinstance(data, (list, tuple)) and data and isinstance(data[0], dict):
        labels = data[0]["labels"]
        if isinstance(labels, torch.Tensor) and labels.dim() == 1:
            return data  # a list of batches
    from .data import collate_fn  # lazily: the data package sits above this module

    return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)


@torch.no_grad()
def evaluate_accuracy(
    model: nn.Module,
    data: Any,
    *,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    gather: Callable[[Any], Any] | None = None,
) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy of `model` over every example of `data`.

    The model runs in eval mode (batch norm uses its running statistics) and is put back in the mode it was in.
    `accuracy = #(argmax logits == label) / N` and `loss = sum_i CE(logits_i, label_i) / N` over all `N` examples
    (so a smaller last batch weighs right), both as Python floats.

    Args:
        model (`nn.Module`):
            A timm or transformers classifier (logits through [`hf_r2.models.forward_logits`]).
        data (`DataLoader`, list of batches or dataset):
            Batches `{"pixel_values": (B, 3, H, W), "labels": (B,)}` (a `DataLoader` with [`hf_r2.data.collate_fn`]
            or a list of such dicts), or a map-style dataset of rows in that form (e.g.
            [`hf_r2.data.with_transforms`]'s output), batched here with `collate_fn`.
        batch_size (`int`, defaults to 256):
            Batch size when `data` is a dataset of rows.
        device (`str` or `torch.device`, *optional*):
            Where to run; defaults to the device of the model's first parameter.
        gather (`Callable`, *optional*):
            Under several processes, `accelerator.gather_for_metrics`: each batch's logits, labels and losses are
            gathered from all processes (the samples a prepared dataloader repeats dropped), so every process
            returns the numbers of one pass over the whole dataset.

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
        for batch in _batches(data, batch_size):
            pixel_values = batch["pixel_values"].to(device)
            labels = batch["labels"].to(device)
            logits = forward_logits(model, pixel_values).float()
            losses = F.cross_entropy(logits, labels, reduction="none")
            if gather is not None:
                logits, labels, losses = gather((logits, labels, losses))
            loss_sum += losses.sum().item()
            correct += count_correct(logits, labels)
            total += labels.numel()
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("`dataloader` yielded no examples: cannot compute an accuracy over an empty set.")
    return {"accuracy": correct / total, "loss": loss_sum / total, "num_samples": total}


def compute_accuracy(eval_pred: Any) -> dict[str, float]:
    """Top-1 accuracy for the Trainer's `compute_metrics`: `{"accuracy": #(argmax logits == label) / N}`.

    Args:
        eval_pred ([`~transformers.EvalPrediction`] or `tuple`):
            `(predictions, label_ids)`, with predictions the logits `(N, num_classes)` (or a tuple whose first
            entry they are) and label_ids `(N,)`, as numpy arrays.

    ```python
    >>> trainer = R2Trainer(model, args, train_dataset=train, eval_dataset=val, compute_metrics=compute_accuracy)
    >>> trainer.evaluate()["eval_accuracy"]
    ```
    """
    logits, labels = eval_pred[0], eval_pred[1]
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    logits, labels = np.asarray(logits), np.asarray(labels)
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"`compute_accuracy` needs logits of shape (N, num_classes) and labels of shape (N,), got logits "
            f"{np.shape(logits)} and labels {labels.shape}."
        )
    if not labels.size:
        return {"accuracy": float("nan")}
    return {"accuracy": count_correct(torch.as_tensor(logits), torch.as_tensor(labels)) / labels.size}


def compute_accuracy_and_chance(eval_pred: Any) -> dict[str, float]:
    """[`compute_accuracy`] plus what tells a model that learnt nothing: `chance_accuracy` (the share of the most
    frequent label, what always guessing that class scores) and `predicted_classes` (how many classes the model
    predicts at all: 1 is the same class for every image). `hf-r2 train` reports a model at chance ([`at_chance`])."""
    out = compute_accuracy(eval_pred)
    logits, labels = eval_pred[0], np.asarray(eval_pred[1])
    logits = np.asarray(logits[0] if isinstance(logits, (tuple, list)) else logits)
    if labels.size:
        out["chance_accuracy"] = float(np.unique(labels, return_counts=True)[1].max() / labels.size)
        out["predicted_classes"] = int(np.unique(logits.argmax(-1)).size)
    return out


def at_chance(accuracy: float, chance_accuracy: float, num_images: int) -> bool:
    """Whether `accuracy` on `num_images` images is no better than `chance_accuracy` (always guessing the most frequent
    class): at most two binomial standard errors above it. False for a NaN accuracy (nothing measured)."""
    margin = 2 * math.sqrt(chance_accuracy * (1 - chance_accuracy) / max(num_images, 1))
    return accuracy <= chance_accuracy + margin
