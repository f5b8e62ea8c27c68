"""The rows AdaRound learns from: a layer's inputs as rows (`im2col` for convolutions), their float targets
`W x_f`, and the bounded cache of rows drawn uniformly from all calibration batches ([`cache_rows`]).

A row is one output position: one token of a Linear layer, one spatial position of one image of a convolution
(whose input patch is gathered as `unfold` would, padded as the layer pads). [`row_source`] gives the rows of a
layer input, [`grouped_weight`] the weight shaped to match them, and [`apply_weight`] `W x` on them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...models import forward_logits

__all__ = [
    "UnsupportedLayer",
    "RowCache",
    "apply_weight",
    "cache_rows",
    "check_rows",
    "grouped_weight",
    "layer_input",
    "row_source",
]


def _groups(module: nn.Module) -> int:
    return 1 if isinstance(module, nn.Linear) else module.groups


def grouped_weight(module: nn.Module, weight: Tensor) -> Tensor:
    """`(G, out_channels / G, in_channels / G * prod(kernel_size))`, matching the rows of [`row_source`]."""
    g = _groups(module)
    return weight.reshape(g, weight.shape[0] // g, -1)


def row_source(module: nn.Module, x: Tensor) -> tuple[int, Any]:
    """The number of rows of the layer input `x` and a function `gather(idx) -> (len(idx), G, K)` of them.

    A Linear row is one token (`x[..., :]`); a convolution row is the input patch of one output position of one
    image, padded as the layer pads, in the channel-major order of `weight.reshape(out_channels, -1)`.
    """
    if isinstance(module, nn.Linear):
        rows = x.reshape(-1, x.shape[-1])
        return rows.shape[0], lambda idx: rows[idx].unsqueeze(1)
    nd = x.dim() - 2
    same = _timm_conv2d_same()
    if same is not None and isinstance(module, same[0]):  # TensorFlow "SAME" padding, computed from the input size
        x = same[1](x, module.kernel_size, module.stride, module.dilation)
    pad = list(module._reversed_padding_repeated_twice)
    if any(pad):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, pad, mode=mode)
    for i, (k, s, d) in enumerate(zip(module.kernel_size, module.stride, module.dilation)):
        x = x.unfold(2 + i, d * (k - 1) + 1, s)  # appends the window dim: (N, C, *out, *window)
    if any(d > 1 for d in module.dilation):
        x = x[(..., *(slice(None, None, d) for d in module.dilation))]
    positions = (x.shape[0], *x.shape[2 : 2 + nd])
    g = module.groups

    def gather(idx: Tensor) -> Tensor:
        coords = torch.unravel_index(idx, positions)
        patches = x[(coords[0], slice(None), *coords[1:])]  # (m, C, *kernel_size)
        return patches.reshape(idx.shape[0], g, -1)

    return math.prod(positions), gather


def _timm_conv2d_same() -> tuple[type[nn.Module], Any] | None:
    try:
        from timm.layers import Conv2dSame
        from timm.layers.padding import pad_same
    except ImportError:  # pragma: no cover - timm is a dependency
        return None
    return Conv2dSame, pad_same


class UnsupportedLayer(Exception):
    """The layer's output is not `W x` on the rows AdaRound builds (a custom forward): it is left as it is."""


def check_rows(float_module: nn.Module, x: Tensor, num_rows: int, gather: Any, float_weight: Tensor) -> None:
    """Check, on a few rows, that `W x` on AdaRound's rows is the layer's own output (bias aside): a layer with a
    custom forward (weight standardisation, its own padding) would otherwise be rounded against the wrong target."""
    out = float_module(x)
    out = out.reshape(-1, out.shape[-1]) if isinstance(float_module, nn.Linear) else out.movedim(1, -1)
    out = out.reshape(-1, out.shape[-1])
    if float_module.bias is not None:
        out = out - float_module.bias
    idx = torch.linspace(0, num_rows - 1, min(num_rows, 64), device=x.device).long()
    if out.shape[0] != num_rows:
        raise UnsupportedLayer(f"its output has {out.shape[0]} positions, {num_rows} expected")
    got = apply_weight(gather(idx).to(float_weight.dtype), float_weight).reshape(len(idx), -1)
    expected = out[idx].to(got.dtype)
    tol = 1e-3 * expected.abs().max().clamp_min(1e-12)
    if not torch.allclose(got, expected, rtol=1e-3, atol=float(tol)):
        raise UnsupportedLayer("its output is not the convolution / matrix product of its weight and input")


def apply_weight(rows: Tensor, grouped_weight: Tensor) -> Tensor:
    """`W x` for rows `(m, G, K)` and a grouped weight `(G, O, K)`: `(m, G, O)`."""
    return torch.einsum("mgk,gok->mgo", rows, grouped_weight)


class RowCache:
    """Up to `capacity` rows drawn uniformly without replacement from everything added (each row gets a uniform
    random key; the rows of the `capacity` smallest keys are kept)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.keys: Tensor | None = None
        self.inputs: Tensor | None = None
        self.targets: Tensor | None = None
        self._pending: Tensor | None = None  # the keys of the rows `candidates` chose, for `add`

    def candidates(self, num_rows: int, generator: torch.Generator) -> Tensor:
        """Indices of the new rows that may enter the cache (the others are not gathered at all)."""
        keys = torch.rand(num_rows, generator=generator, dtype=torch.float64)
        new_keys, idx = torch.topk(keys, min(num_rows, self.capacity), largest=False)
        if self.keys is not None and self.keys.shape[0] >= self.capacity:
            keep = new_keys < self.keys.max()
            new_keys, idx = new_keys[keep], idx[keep]
        self._pending = new_keys
        return idx

    def add(self, inputs: Tensor, targets: Tensor) -> None:
        keys = self._pending.to(inputs.device)
        if self.keys is not None:
            keys = torch.cat([self.keys, keys])
            inputs = torch.cat([self.inputs, inputs])
            targets = torch.cat([self.targets, targets])
        if keys.shape[0] > self.capacity:
            keys, keep = torch.topk(keys, self.capacity, largest=False)
            inputs, targets = inputs[keep], targets[keep]
        self.keys, self.inputs, self.targets = keys, inputs, targets


class _StopForward(Exception):
    """Raised by a capture hook to end a forward pass once the layer's input is known."""


def layer_input(model: nn.Module, module: nn.Module, pixel_values: Tensor) -> Tensor:
    """The first input of `module` in a forward of `model` on `pixel_values` (the forward stops there)."""
    box: list[Tensor] = []

    def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        box.append(args[0] if args else next(iter(kwargs.values())))
        raise _StopForward

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        forward_logits(model, pixel_values)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not box:
        raise RuntimeError(f"{type(module).__name__} did not run in the forward pass: cannot capture its input.")
    return box[0]


def cache_rows(
    model: nn.Module,
    float_model: nn.Module,
    name: str,
    batches: Iterable[Tensor],
    num_samples: int,
    generator: torch.Generator,
) -> RowCache:
    """Rows of the layer's (quantized) inputs and of its float outputs `W x_f`, over the calibration batches."""
    module, float_module = model.get_submodule(name), float_model.get_submodule(name)
    input_quantizer = getattr(module, "input_quantizer", None)
    float_weight = grouped_weight(float_module, float_module.weight.detach())
    cache = RowCache(num_samples)
    with torch.no_grad():
        for pixel_values in batches:
            x_q = layer_input(model, module, pixel_values)
            if input_quantizer is not None:
                x_q = input_quantizer(x_q)
            x_f = layer_input(float_model, float_module, pixel_values)
            num_rows, gather_q = row_source(module, x_q)
            _, gather_f = row_source(float_module, x_f)
            if cache.inputs is None:
                check_rows(float_module, x_f, num_rows, gather_f, float_weight)
            idx = cache.candidates(num_rows, generator).to(x_q.device)
            rows_f = gather_f(idx).to(float_weight.dtype)
            cache.add(gather_q(idx).to(float_weight.dtype), apply_weight(rows_f, float_weight))
    if cache.inputs is None:
        raise ValueError("`calibration_data` gave no batch: AdaRound needs calibration inputs.")
    return cache
