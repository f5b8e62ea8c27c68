"""Fake-quantized layers: `FakeQuantizer` (a grid with a learnable LSQ step size) and the Conv/Linear layers that
quantize their weight and input with it. PTQ ([`hf_r2.quant.ptq`]) and QAT ([`hf_r2.quant.qat`]) both build on them.

A quantized layer is the original layer whose class is swapped in place for a subclass (`QuantConv2d` for
`nn.Conv2d`, a generated `QuantConv2dSame` for timm's `Conv2dSame`, ...) that adds two attributes:

- `weight_quantizer`: the weight as the layer uses it is `weight_quantizer(weight)`;
- `input_quantizer`: the input is `input_quantizer(x)` before the layer runs (or `None`: float input).

Swapping the class keeps the same parameters (an optimizer or an [`~hf_r2.R2Regularizer`] built before still points
at them), the layer's own forward (padding of `Conv2dSame`, weight standardisation, ...), and `isinstance` checks:
R2-Loss finds a `QuantConv2d` like any `nn.Conv2d`, so a prepared model trains with R2 unchanged.
[`dequantize_layers_`] swaps the classes back.

LSQ ("Learned Step Size Quantization", Esser et al., 2020, https://huggingface.co/papers/1902.08153): the step
size `s` is a parameter; with `v_hat = (clamp(round(v / s + z), 0, n) - z) s` and straight-through rounding,

    d v_hat / d s = round(v / s + z) - z - v / s    inside the clipping range,
                    clamp(round(v / s + z), 0, n) - z    outside,

and the step's gradient is scaled by `g = 1 / sqrt(N Q_p)` (`N` values per step size: weights per output channel
or features per sample; `Q_p` the largest code magnitude: `max(1, n / 2)` on the symmetric weight grid (1 for
binary weights), `n` on the unsigned / asymmetric activation grid), which the paper found necessary for stable
training at 2 bits.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .._targets import TARGET_LAYER_TYPES
from .._utils import check_choice
from ._grid import check_grid
from .observers import ObserverType, RangeObserver
from .uniform import compute_qparams, fake_quantize_affine

__all__ = [
    "FakeQuantizer",
    "QuantConv1d",
    "QuantConv2d",
    "QuantConv3d",
    "QuantLinear",
    "QuantLayerMixin",
    "quantize_layer_",
    "dequantize_layers_",
    "quantized_layers",
]


def _grad_scaled(x: Tensor, g: float) -> Tensor:
    """`x` in the forward pass, `g * grad` in the backward pass (LSQ's gradient scaling)."""
    # `x + (y - y)` is exactly `x`; the paper's `(x - y).detach() + y` can be off by an ulp, which would make the
    # step used in training differ from the one used in eval and exported
    y = x * g
    return x.detach() + (y - y.detach())


class FakeQuantizer(nn.Module):
    """Quantize and dequantize a tensor on a `bits`-bit uniform grid whose step size can be learnt (LSQ).

    The grid is that of [`hf_r2.quant.uniform`]: `v_hat = (clamp(round(v / s + z), 0, 2^b - 1) - z) s`, with
    `s = |scale|` (so a step pushed below 0 by the optimizer stays a valid step) and a fixed zero point `z`.

    Args:
        bits (`int`):
            Bit width, 1 to 8 (1 only with `symmetric=True`: binary weights).
        symmetric (`bool`, *optional*, defaults to `True`):
            Weights: the mid-rise grid symmetric about 0 (`z = (2^b - 1) / 2`). Activations use `False`: an
            asymmetric grid on which 0 is a level (unsigned after a ReLU).
        per_channel (`bool`, *optional*, defaults to `False`):
            One step size per output channel (dim 0), or one for the tensor.
        channels (`int`, *optional*, defaults to `1`):
            The number of output channels, with `per_channel=True`.
        learnable (`bool`, *optional*, defaults to `False`):
            Train the step size with LSQ (QAT); frozen otherwise (PTQ).
        observer (`str`, *optional*, defaults to `"mse"`):
            For activations: how the range is calibrated ([`~hf_r2.quant.observers.RangeObserver`]).
        activation (`bool`, *optional*, defaults to `False`):
            Quantizes activations (dim 0 is the batch): LSQ's `N` is then the number of features per sample.
        percentile (`float`, *optional*, defaults to `99.99`):
            The upper percentile of the `"percentile"` observer.

    The quantizer starts uninitialised. [`init_from`] sets the grid from a tensor (weights, the data-free way);
    for activations, `observe()` makes forward passes record ranges and pass values through unchanged, and
    [`calibrate`] turns what was seen into the grid. An uninitialised quantizer met in a forward pass initialises
    itself from that batch (so a QAT run started without calibration still works). `enabled = False` passes
    values through.
    """

    def __init__(
        self,
        bits: int,
        *,
        symmetric: bool = True,
        per_channel: bool = False,
        channels: int = 1,
        learnable: bool = False,
        observer: str | ObserverType = "mse",
        activation: bool = False,
        percentile: float = 99.99,
    ) -> None:
        super().__init__()
        check_grid(bits, symmetric)
        self.bits = bits
        self.symmetric = symmetric
        self.per_channel = per_channel
        self.learnable = learnable
        self.activation = activation
        self.observer_method = check_choice("observer", observer, ObserverType)
        self.percentile = percentile
        self.quant_min, self.quant_max = 0, 2**bits - 1
        size = channels if per_channel else 1
        self.scale = nn.Parameter(torch.ones(size), requires_grad=learnable)
        self.register_buffer("zero_point", torch.zeros(size))
        self.register_buffer("initialized", torch.tensor(False))
        self.enabled = True
        self._observer: RangeObserver | None = None

    def extra_repr(self) -> str:
        kind = "per_channel" if self.per_channel else "per_tensor"
        sym = "symmetric" if self.symmetric else "asymmetric"
        return f"bits={self.bits}, {sym}, {kind}, learnable={self.learnable}"

    def _view(self, t: Tensor, x: Tensor) -> Tensor:
        return t.reshape(-1, *([1] * (x.dim() - 1))) if self.per_channel else t.reshape([1] * x.dim())

    @torch.no_grad()
    def init_from(self, x: Tensor, scale_method: str = "mse") -> FakeQuantizer:
        """Set the grid from `x` with [`~hf_r2.quant.uniform.compute_qparams`] (weights: max-abs or MSE range)."""
        scale, zero_point = compute_qparams(
            x, self.bits, symmetric=self.symmetric, per_channel=self.per_channel, scale_method=scale_method
        )
        self.scale.copy_(scale.reshape(-1).to(self.scale))
        self.zero_point.copy_(zero_point.reshape(-1).to(self.zero_point))
        self.initialized.fill_(True)
        return self

    def observe(self, sample_size: int = 1 << 18) -> None:
        """Start recording the ranges of the values that pass (calibration); they pass unchanged meanwhile."""
        self._observer = RangeObserver(self.observer_method, self.percentile, sample_size=sample_size)

    @torch.no_grad()
    def calibrate(self) -> bool:
        """Set the grid from the values recorded since `observe()`, and stop observing. Returns `False` (and
        leaves the grid alone) if nothing passed."""
        observer, self._observer = self._observer, None
        if observer is None or observer.min is None:
            return False
        if self.per_channel or self.symmetric:
            raise ValueError(
                "Calibration from observed values gives per-tensor asymmetric grids; this quantizer is "
                f"{self.extra_repr()}. Use `init_from(weight)` for weights."
            )
        scale, zero_point = observer.qparams(self.bits)
        self.scale.fill_(float(scale))
        self.zero_point.fill_(float(zero_point))
        self.initialized.fill_(True)
        return True

    def forward(self, x: Tensor) -> Tensor:
        if self._observer is not None:
            self._observer.update(x)
            return x
        if not self.enabled:
            return x
        if not bool(self.initialized):
            if not self.activation:
                self.init_from(x)
            else:
                observer = RangeObserver(self.observer_method, self.percentile)
                observer.update(x)
                self._observer = observer
                self.calibrate()
        scale = self.scale.abs()
        if self.learnable and torch.is_grad_enabled():
            # N: the values that share one step (a channel, a weight tensor, or one sample's features)
            if self.per_channel:
                per_step = x.numel() // max(1, x.shape[0])
            else:
                per_step = x[0].numel() if self.activation else x.numel()
            q_p = (self.quant_max / 2) if self.symmetric else self.quant_max
            scale = _grad_scaled(scale, 1.0 / math.sqrt(max(1, per_step) * max(q_p, 1)))
        return fake_quantize_affine(x, self._view(scale, x), self._view(self.zero_point, x), self.bits).to(x.dtype)


class QuantLayerMixin:
    """Adds `weight_quantizer` and `input_quantizer` to a Conv/Linear layer: the layer's own forward runs on
    `input_quantizer(x)` with `weight_quantizer(weight)` in place of its weight."""

    weight_quantizer: FakeQuantizer | None
    input_quantizer: FakeQuantizer | None
    _hf_r2_float_class: type[nn.Module]

    def quantized_weight(self) -> Tensor:
        """The weight as the layer uses it (a tensor attached to `weight` for autograd)."""
        w = self.weight  # type: ignore[attr-defined]
        return w if self.weight_quantizer is None else self.weight_quantizer(w)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        if self.weight_quantizer is None:
            return super().forward(x, *args, **kwargs)  # type: ignore[misc]
        params = self._parameters  # type: ignore[attr-defined]
        weight = params["weight"]
        params["weight"] = self.quantized_weight()  # the layer's own forward reads `self.weight`
        try:
            return super().forward(x, *args, **kwargs)  # type: ignore[misc]
        finally:
            params["weight"] = weight


class QuantConv1d(QuantLayerMixin, nn.Conv1d):
    """`nn.Conv1d` with fake-quantized weight and input (see [`QuantLayerMixin`])."""


class QuantConv2d(QuantLayerMixin, nn.Conv2d):
    """`nn.Conv2d` (depthwise included) with fake-quantized weight and input (see [`QuantLayerMixin`])."""


class QuantConv3d(QuantLayerMixin, nn.Conv3d):
    """`nn.Conv3d` with fake-quantized weight and input (see [`QuantLayerMixin`])."""


class QuantLinear(QuantLayerMixin, nn.Linear):
    """`nn.Linear` with fake-quantized weight and input (see [`QuantLayerMixin`])."""


_QUANT_CLASSES: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
    nn.Conv3d: QuantConv3d,
    nn.Linear: QuantLinear,
}


def _quant_class(cls: type[nn.Module]) -> type[nn.Module]:
    """`QuantConv2d` for `nn.Conv2d`; for a subclass (timm's `Conv2dSame`, ...) a generated `Quant<name>`."""
    if cls not in _QUANT_CLASSES:
        _QUANT_CLASSES[cls] = type(f"Quant{cls.__name__}", (QuantLayerMixin, cls), {"__module__": cls.__module__})
    return _QUANT_CLASSES[cls]


def quantize_layer_(
    module: nn.Module, weight_quantizer: FakeQuantizer | None, input_quantizer: FakeQuantizer | None
) -> nn.Module:
    """Make `module` (a Conv1d/2d/3d or Linear, subclasses included) a quantized layer in place.

    A layer that is already quantized gets the new quantizers. The quantizers are moved to the weight's device.
    """
    if isinstance(module, QuantLayerMixin):
        float_class = module._hf_r2_float_class
    else:
        if not isinstance(module, TARGET_LAYER_TYPES):
            raise TypeError(f"Only Conv1d/2d/3d and Linear layers can be quantized, got {type(module).__name__}.")
        float_class = type(module)
        module.__class__ = _quant_class(float_class)
    device = module.weight.device
    module._hf_r2_float_class = float_class
    module.weight_quantizer = None if weight_quantizer is None else weight_quantizer.to(device)
    module.input_quantizer = None if input_quantizer is None else input_quantizer.to(device)
    return module


def quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The `(name, module)` pairs of `model`'s quantized layers, in registration order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLayerMixin)]


def dequantize_layers_(model: nn.Module) -> nn.Module:
    """Swap every quantized layer of `model` back to its float class (weights unchanged), in place."""
    for _, module in quantized_layers(model):
        del module.weight_quantizer
        del module.input_quantizer
        module.__class__ = module._hf_r2_float_class
        del module._hf_r2_float_class
    return model
