"""Activation calibration shared by PTQ ([`~hf_r2.quant.ptq.post_training_quantize_`]) and QAT
([`~hf_r2.quant.qat.prepare_qat`]): every input quantizer of a model's quantized layers observes its inputs over a
few batches and sets its grid from them. Its own module so that QAT does not import the PTQ family.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..models import forward_logits
from ._batches import model_device, pixel_values
from .layers import quantized_layers

__all__ = ["calibrate_activations_"]


@torch.no_grad()
def calibrate_activations_(model: nn.Module, batches: Iterable[Any], observer_sample_size: int = 1 << 18) -> list[str]:
    """Calibrate every input quantizer of `model`'s quantized layers on `batches` (a forward pass each, model in
    eval mode, quantized weights in use; activations pass unquantized while observed). Returns the names of the
    layers calibrated."""
    layers = [(n, m) for n, m in quantized_layers(model) if m.input_quantizer is not None]
    for _, module in layers:
        module.input_quantizer.observe(observer_sample_size)
    was_training = model.training
    model.eval()
    device = model_device(model)
    try:
        for batch in batches:
            forward_logits(model, pixel_values(batch).to(device))
    finally:
        model.train(was_training)
        done = [name for name, module in layers if module.input_quantizer.calibrate()]
    missing = sorted({n for n, _ in layers} - set(done))
    if missing:
        raise ValueError(
            f"No calibration value reached the inputs of {missing}: they are not used by the forward pass. "
            "`exclude` them from quantization."
        )
    return done
