"""Calibration batches for the quant verbs: the images of a batch (`pixel_values`), the model's device, and the
first batches of the calibration data (as a list for PTQ, as a re-iterable of image tensors for AdaRound)."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ..models import forward_logits

__all__ = ["pixel_values", "model_device", "first_batches", "image_batches", "run_logits", "output_channels"]


def pixel_values(batch: Any) -> Tensor:
    """The images of a batch: a dict's `"pixel_values"` (the hf-r2 convention), the first entry of an
    `(images, labels)` pair, or the tensor itself."""
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


def model_device(model: nn.Module) -> torch.device:
    """The device of `model`'s first parameter (or buffer); the CPU for a module with neither."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def first_batches(calibration_data: Iterable[Any] | None, count: int, why: str) -> list[Any]:
    """The first `count` batches of `calibration_data`, as a list; a `ValueError` naming `why` they are needed
    when there is no data, or when it gives no batch."""
    if calibration_data is None:
        raise ValueError(
            f"{why} needs `calibration_data` (an iterable of batches, e.g. a DataLoader of training images); "
            "for data-free weight quantization use `PTQConfig(a_bits=None, rounding='nearest', bn='keep')`."
        )
    batches = list(itertools.islice(iter(calibration_data), count))
    if not batches:
        raise ValueError("`calibration_data` gave no batch.")
    return batches


def image_batches(
    calibration_data: Iterable[Any], num_batches: int | None, device: torch.device
) -> tuple[Iterable[Tensor], Tensor]:
    """A re-iterable of the image tensors of the first `num_batches` batches (all with `None`) on `device`, and the
    first one. A single batch (a tensor or a dict) counts as a list of one; an iterator, which can be read only
    once, is read into a list."""
    if isinstance(calibration_data, (Tensor, dict)):
        calibration_data = [calibration_data]

    class _Batches:
        def __iter__(self) -> Iterator[Tensor]:
            for i, batch in enumerate(calibration_data):
                if num_batches is not None and i >= num_batches:
                    break
                yield pixel_values(batch).to(device)

    batches: Iterable[Tensor] = _Batches()
    if isinstance(calibration_data, Iterator):  # a generator or iterator: it can be read only once
        batches = list(batches)
    first = next(iter(batches), None)
    if first is None:
        raise ValueError("`calibration_data` gave no batch: AdaRound needs calibration inputs.")
    return batches, first


def output_channels(module: nn.Module, t: Tensor) -> Tensor:
    """A layer output as `(channels, -1)` (dim 1 of a conv output, the last dim of a Linear one), float64."""
    t = t.detach().double()
    t = t.movedim(-1, 1) if isinstance(module, nn.Linear) and t.dim() > 1 else t
    return t.transpose(0, 1).reshape(t.shape[1], -1)


def run_logits(model: nn.Module, batches: list[Any], hooks: dict, pre_hooks: dict | None = None, grad=False) -> list:
    """The logits of `batches` in eval mode (modes restored after), with forward `hooks` and `pre_hooks` on."""
    handles = [module.register_forward_hook(hook) for module, hook in hooks.items()]
    handles += [module.register_forward_pre_hook(hook) for module, hook in (pre_hooks or {}).items()]
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.set_grad_enabled(grad):
            return [forward_logits(model, pixel_values(b).to(model_device(model))) for b in batches]
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training
