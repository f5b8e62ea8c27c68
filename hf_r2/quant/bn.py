"""Batch-norm re-estimation: recompute BN running statistics after the weights changed (e.g. were quantized).

Quantizing the weights shifts every layer's output distribution, so the running mean / variance a BN layer learnt
in float no longer match what it sees; recomputing them on a few batches recovers much of the lost accuracy at
low bit widths (as in "Data-Free Quantization Through Weight Equalization and Bias Correction", Nagel et al.,
https://huggingface.co/papers/1906.04721, and "Overcoming Oscillations in Quantization-Aware Training", Nagel et
al., https://huggingface.co/papers/2203.11086, which re-estimates BN after QAT).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..models import forward_logits

__all__ = ["reestimate_bn_stats"]

logger = logging.getLogger(__name__)

_STAT_NAMES = ("running_mean", "running_var", "num_batches_tracked")


def _pixel_values(batch: Any) -> Tensor:
    if isinstance(batch, dict):
        if "pixel_values" not in batch:
            raise ValueError(f"A batch dict must hold `pixel_values`; got keys {sorted(batch)}.")
        return batch["pixel_values"]
    if isinstance(batch, (list, tuple)):
        return batch[0]
    if isinstance(batch, Tensor):
        return batch
    raise TypeError(
        f"Batches must be dicts with `pixel_values`, `(images, labels)` pairs or tensors; got {type(batch).__name__}."
    )


def _device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def reestimate_bn_stats(model: nn.Module, dataloader: Iterable[Any], num_batches: int | None = 10) -> nn.Module:
    """Recompute the running mean and variance of every batch-norm layer of `model` from `num_batches` batches.

    Every module that inherits `torch.nn.modules.batchnorm._BatchNorm` and tracks running statistics is covered:
    `BatchNorm1d/2d/3d`, timm's `BatchNormAct2d`, `SyncBatchNorm`. Their statistics are reset and, with
    `momentum=None`, accumulated as the cumulative average over the batches, while the rest of the model stays in
    eval mode (dropout and drop-path off). For a BN layer with input `x_t` `(N, C, ...)` in batch `t = 1..T`:

        running_mean[c] = (1 / T) sum_t mean(x_t[:, c])
        running_var[c]  = (1 / T) sum_t var(x_t[:, c])    (unbiased: divided by N * spatial - 1)

    the statistics that torch's own cumulative average gives. With equal batches the mean is the mean over all
    the data; the variance is the average within-batch variance, below the pooled variance by the (small)
    variance of the batch means. Each BN layer sees the activations of the layers before it normalised with batch
    statistics, as in training.

    Momentum, the train/eval mode of every module, and (on error) the previous statistics are restored.

    Args:
        model (`torch.nn.Module`):
            A timm or transformers model (run through [`~hf_r2.models.forward_logits`]).
        dataloader (iterable of batches):
            Batches as dicts with `"pixel_values"` (the hf-r2 convention), `(images, labels)` pairs or image
            tensors; moved to the model's device.
        num_batches (`int`, *optional*, defaults to `10`):
            How many batches to use; `None` uses the whole dataloader.

    Returns:
        `torch.nn.Module`: `model`, with its BN statistics updated in place.
    """
    bad_count = isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1
    if num_batches is not None and bad_count:
        raise ValueError(f"`num_batches` must be a positive integer or `None`, got {num_batches!r}.")
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not bns:
        logger.info("No batch-norm layer with running statistics in %s: nothing to re-estimate", type(model).__name__)
        return model
    modes = [(m, m.training) for m in model.modules()]
    momenta = [bn.momentum for bn in bns]
    saved = [{k: getattr(bn, k).clone() for k in _STAT_NAMES if getattr(bn, k, None) is not None} for bn in bns]
    device = _device(model)
    seen = 0
    try:
        model.eval()
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
            bn.train()
        with torch.no_grad():
            for batch in dataloader:
                if num_batches is not None and seen >= num_batches:
                    break
                forward_logits(model, _pixel_values(batch).to(device))
                seen += 1
        if seen == 0:
            raise ValueError("`dataloader` gave no batch: cannot re-estimate batch-norm statistics.")
    except BaseException:
        with torch.no_grad():
            for bn, state in zip(bns, saved):
                for name, value in state.items():
                    getattr(bn, name).copy_(value)
        raise
    finally:
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
        for module, training in modes:
            module.training = training
    logger.info("Re-estimated the statistics of %d batch-norm layers on %d batches", len(bns), seen)
    return model
