"""Empirical bias correction of a quantized model: `correct_bias_`.

"Data-Free Quantization Through Weight Equalization and Bias Correction", Nagel et al., 2019,
https://huggingface.co/papers/1906.04721 (section 4.2). Quantizing `W` to `Q(W)` shifts a layer's mean output by
`E[(W - Q(W)) x]`; [`correct_bias_`] measures it on calibration data and adds it to the bias (the paper's empirical
variant, not the data-free one). It is what a BN-folded model has instead of BN re-estimation: after cross-layer
equalization ([`~hf_r2.quant.equalize_`], which folds BN) or `PTQConfig(bn="fold")`; `PTQConfig(bias_correction=True)`
runs it as the last PTQ step.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .._batches import first_batches, output_channels, run_logits
from ..layers import quantized_layers

logger = logging.getLogger(__name__)

__all__ = ["correct_bias_"]


@torch.no_grad()
def correct_bias_(model: nn.Module, calibration_data: Iterable[Any], num_batches: int = 16) -> nn.Module:
    """Empirical bias correction of a quantized `model`, in place: each quantized layer's bias `b` becomes

        b + E[W x] - E[Q(W) x]        (per output channel; mean over the batches and positions)

    with `x` the layer's input in the quantized model (through its input quantizer, if any) on the first
    `num_batches` batches, `Q(W)` its fake-quantized weight. One pass measures every layer (the corrections of earlier
    layers are not yet in the inputs: a second-order effect). Layers without a bias are skipped: a batch norm after
    them, re-estimated ([`~hf_r2.quant.ptq.bn.reestimate_bn_stats`]), takes the shift. E.g. after
    `post_training_quantize_(model, PTQConfig(w_bits=4, bn="fold"), data)`, `correct_bias_(model, data)`.

    Args:
        model (`torch.nn.Module`):
            A model quantized by [`~hf_r2.quant.post_training_quantize_`] or [`~hf_r2.quant.prepare_qat`].
        calibration_data (iterable of batches):
            Batches as dicts with `"pixel_values"` (or `(images, labels)` pairs).
        num_batches (`int`, *optional*, defaults to `16`):
            How many batches are used.

    Returns:
        `torch.nn.Module`: `model`.
    """
    batches = first_batches(calibration_data, num_batches, "Bias correction")
    layers = [m for _, m in quantized_layers(model) if m.bias is not None and m.weight_quantizer is not None]
    skipped = [name for name, m in quantized_layers(model) if m.bias is None]
    if skipped:
        logger.info("Bias correction skips %d quantized layers without a bias: %s", len(skipped), skipped)
    sums: dict[nn.Module, tuple[Tensor, int]] = {}

    def hook(module: nn.Module, args: Any, output: Tensor) -> None:
        enabled, module.weight_quantizer.enabled = module.weight_quantizer.enabled, False
        try:
            reference = module.forward(*args)  # the same input, the float weight (`forward` runs no hooks)
        finally:
            module.weight_quantizer.enabled = enabled
        diff = output_channels(module, reference - output)
        total, count = sums.get(module, (0, 0))
        sums[module] = (total + diff.sum(1), count + diff.shape[1])

    run_logits(model, batches, {module: hook for module in layers})
    for module, (total, count) in sums.items():
        module.bias.add_((total / count).to(module.bias.dtype))
    logger.info("Corrected the biases of %d quantized layers on %d batches", len(sums), len(batches))
    return model
