"""Uniform (affine) weight quantization primitives: qparams, tensor <-> integer codes, fake-quant with STE rounding.

Every grid here is the affine grid of `2^b` levels

    w_hat = (q - z) * s,    q in {0, 1, ..., 2^b - 1}  (the integer codes),

with a float `scale` `s >= 0` and a float `zero_point` `z`. Quantization rounds to the nearest level:
`q = clamp(round(w / s + z), 0, 2^b - 1)`. The grids, for `b` bits and a clipping range chosen per tensor or per
output channel (dim 0):

| case | levels (`k = -2^(b-1) .. 2^(b-1) - 1`) | zero point `z` | 0 a level? | scale `s` |
|---|---|---|---|---|
| `symmetric=True`, `b >= 2` | `2^b`, symmetric about 0: `c (2k + 1) / n` | `n / 2` (half-integer) | no | `2 c / n` |
| `symmetric=True`, `b = 1` | 2: `{-c, +c}`, `c = mean(abs(w))` (binary) | `1/2` | no | `2 c` |
| `symmetric=False`, `b >= 2` | `2^b`, evenly spaced over `[lo, hi]` | `round(-lo / s)` | yes | `(hi - lo) / n` |

Here `n = 2^b - 1` is the number of steps, `c` the symmetric clip value (the outermost levels are `+-c`) and
`[lo, hi] = [min(w_min, 0), max(w_max, 0)]` the asymmetric range, shrunk together when clipping.

For 2 bits the symmetric grid is `{-1, -1/3, 1/3, 1} * c`: four levels, symmetric, no zero. We chose this mid-rise
grid over the two usual integer grids after measuring the relative squared error `|W_hat - W|^2 / |W|^2` of
2-bit per-channel quantization (rows of 576 weights, as a 3x3x64 conv; "maxabs" / best of the 100-ratio "mse"
search; asymmetric given for reference):

| weights | mid-rise (ours) | restricted `{-1, 0, 1} s` | full signed `{-2, -1, 0, 1} s`, `s = max/2` | asymmetric |
|---|---|---|---|---|
| Gaussian | 0.418 / **0.118** | 0.718 / 0.190 | **0.236** / 0.148 | 0.349 / 0.145 |
| Laplace | 1.354 / **0.197** | 0.756 / 0.264 | **0.368** / 0.204 | 0.466 / 0.198 |
| uniform (bounded) | **0.110** / **0.062** | 0.248 / 0.110 | **0.110** / 0.110 | **0.110** / 0.106 |

With a clipping search the mid-rise grid is best in every row (it spends all four levels symmetrically), and on
bounded weights (such as range-restricted ones) it is best or tied for both methods. With plain max-abs on
heavy-tailed (unregularised) weights the full signed grid, which clips half its positive range, has lower error:
use `scale_method="mse"` there. Two more reasons: the grid puts levels exactly at `+-c`, where range-restricted
(R2) weights pile up, and it is *idempotent* (quantizing a quantized tensor returns it unchanged, for both scale
methods), which grids that clip their own extremes (the full signed grid, or a mid-rise grid whose cells rather
than levels end at `+-c`) are not. The 1-bit case is the same grid with `c = mean |w|`: for fixed signs,
`a = mean |w|` minimises `|W - a sign(W)|^2` (XNOR-Net, https://huggingface.co/papers/1603.05279), so both scale
methods give it. Since 0 is not a level of a symmetric grid, a zero weight becomes `+-s/2` (`+-c` at 1 bit),
except in an all-zero channel, which stays exactly zero (scale 0).

The clip value `c` (symmetric) or range `[lo, hi]` (asymmetric) comes from `scale_method`:

- `"maxabs"`: `c = max |w|` (`lo = min(w_min, 0)`, `hi = max(w_max, 0)`): nothing is clipped;
- `"mse"`: `c = r * max |w|` (`[r lo, r hi]`) with the ratio `r` out of 100 values from 1.0 down to 0.2 (see
  `mse_ratios`, `mse_min_ratio`) that gives the least squared error, per channel, vectorised over channels. Ratio
  1.0 is tried first and kept on ties, so the error is never larger than with `"maxabs"` (up to the rounding of
  the error sums, in float32 for float32 weights: about 1e-7 relative).

Scales and zero points are computed in float32 (float64 for float64 weights), from the detached weight. Rounding
uses a straight-through estimator (`_RoundSTE`), so [`fake_quantize`] can be used in quantization-aware training:
its gradient in `w` is 1 where `round(w / s + z)` falls in `[0, 2^b - 1]` (the clipping range widened by half a
step on each side, as in `torch.fake_quantize_per_tensor_affine`) and 0 for clipped weights (none with
`"maxabs"`), and [`fake_quantize_affine`] also passes gradients to a learnable `scale` (as LSQ does).
"""

from __future__ import annotations

import enum
import math

import torch
from torch import Tensor

from .._utils import check_choice, check_positive_int
from ._affine import grid_qparams, mse_clip_ratio
from ._grid import check_bits, check_grid

__all__ = [
    "ScaleMethod",
    "compute_qparams",
    "quantize_tensor",
    "dequantize_tensor",
    "fake_quantize_affine",
    "fake_quantize",
]


class ScaleMethod(str, enum.Enum):
    """How the clipping range is chosen. Plain strings are accepted wherever a `ScaleMethod` is."""

    MAXABS = "maxabs"
    MSE = "mse"


class _RoundSTE(torch.autograd.Function):
    """`round(x)` forward, identity backward (the straight-through estimator)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


def _check_scale_method(scale_method: str | ScaleMethod) -> str:
    return check_choice("scale_method", scale_method, ScaleMethod)


def _work_dtype(w: Tensor) -> torch.dtype:
    return torch.float64 if w.dtype == torch.float64 else torch.float32


def _rows(w: Tensor, per_channel: bool) -> Tensor:
    """`(C, K)` per output channel, `(1, numel)` per tensor."""
    if per_channel and w.dim() >= 1:
        return w.reshape(w.shape[0], math.prod(w.shape[1:]))
    return w.reshape(1, w.numel())


def _fake(x: Tensor, scale: Tensor, zero_point: Tensor, bits: int) -> Tensor:
    """`(clamp(round(x / s + z), 0, 2^b - 1) - z) * s`, differentiable through `_RoundSTE`; 0 where `s == 0`."""
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    r = _RoundSTE.apply(x / safe + zero_point)
    # clamp, with the gradient masked as torch.fake_quantize_per_tensor_affine does: 1 for codes in [0, 2^b - 1]
    # (bounds included; torch.clamp's own backward drops them), 0 for clipped ones
    inside = (r >= 0) & (r <= 2**bits - 1)
    q = torch.where(inside, r, r.detach().clamp(0, 2**bits - 1))
    return (q - zero_point) * scale


@torch.no_grad()
def compute_qparams(
    w: Tensor,
    bits: int,
    *,
    symmetric: bool = True,
    per_channel: bool = True,
    scale_method: str | ScaleMethod = "maxabs",
    mse_ratios: int = 100,
    mse_min_ratio: float = 0.2,
) -> tuple[Tensor, Tensor]:
    """Scale and zero point of the `bits`-bit grid for `w` (the grids are tabled in the module docstring).

    Args:
        w (`torch.Tensor`):
            A weight of shape `(C, ...)`; dim 0 is the output channel.
        bits (`int`):
            Bit width, 1 to 8. 1 bit is binary (`{-a, +a}`, `a = mean |w|`) and needs `symmetric=True`.
        symmetric (`bool`, *optional*, defaults to `True`):
            Mid-rise grid symmetric about 0 (zero point `(2^b - 1) / 2`), or an asymmetric grid with an integer
            zero point on which 0 is exactly a level.
        per_channel (`bool`, *optional*, defaults to `True`):
            One grid per output channel (dim 0), or one for the whole tensor.
        scale_method (`str` or [`ScaleMethod`], *optional*, defaults to `"maxabs"`):
            `"maxabs"` (no clipping) or `"mse"` (the clip ratio of least squared error). Ignored for 1 bit.
        mse_ratios (`int`, *optional*, defaults to `100`):
            With `"mse"`: how many clip ratios to try, evenly spaced from 1.0 down to `mse_min_ratio`.
        mse_min_ratio (`float`, *optional*, defaults to `0.2`):
            With `"mse"`: the smallest clip ratio tried, in `(0, 1]`.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: `(scale, zero_point)`, float32 (float64 for float64 `w`), with as many
        dims as `w`: size `C` on dim 0 per channel, 1 everywhere else, so they broadcast against `w`. A scale of 0
        (an all-zero channel) dequantizes to exactly 0.
    """
    check_grid(bits, symmetric)
    method = _check_scale_method(scale_method)
    if method == ScaleMethod.MSE.value:
        check_positive_int("mse_ratios", mse_ratios)
        if not 0 < mse_min_ratio <= 1:
            raise ValueError(f"`mse_min_ratio` must be in (0, 1], got {mse_min_ratio!r}.")
    if not w.is_floating_point():
        raise TypeError(f"`w` must be a floating-point tensor, got dtype {w.dtype}.")
    x = _rows(w.detach(), per_channel).to(_work_dtype(w))
    if x.shape[1] == 0:  # no elements: any grid will do
        lo = hi = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    elif bits == 1:
        hi = x.abs().mean(1)
        lo = -hi
    elif symmetric:
        hi = x.abs().amax(1)
        lo = -hi
    else:
        hi, lo = x.amax(1).clamp_min(0), x.amin(1).clamp_max(0)
    if method == ScaleMethod.MSE.value and bits > 1 and x.shape[1] > 0:
        ratio = mse_clip_ratio(x, lo, hi, bits, symmetric, mse_ratios, mse_min_ratio)
        lo, hi = lo * ratio, hi * ratio
    scale, zero_point = grid_qparams(lo, hi, bits, symmetric)
    shape = [-1] + [1] * (w.dim() - 1) if (per_channel and w.dim() >= 1) else [1] * w.dim()
    return scale.reshape(shape), zero_point.reshape(shape)


def quantize_tensor(w: Tensor, scale: Tensor, zero_point: Tensor, bits: int) -> Tensor:
    """Integer codes `q = clamp(round(w / s + z), 0, 2^b - 1)` as `torch.uint8` (`bits` <= 8).

    `scale` and `zero_point` broadcast against `w` (as [`compute_qparams`] returns them); where the scale is 0 the
    codes are `round(z)` and dequantize to 0.
    """
    check_bits("bits", bits)
    x = w.detach().to(scale.dtype)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.clamp(torch.round(x / safe + zero_point), 0, 2**bits - 1).to(torch.uint8)


def dequantize_tensor(codes: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    """Weights `(q - z) * s` from integer codes, in the dtype of `scale`."""
    return (codes.to(scale.dtype) - zero_point) * scale


def fake_quantize_affine(w: Tensor, scale: Tensor, zero_point: Tensor, bits: int) -> Tensor:
    """`dequantize_tensor(quantize_tensor(w))` for given qparams, differentiable: straight-through rounding.

    The gradient in `w` is 1 where `round(w / s + z)` lies in `[0, 2^b - 1]` and 0 where it is clipped; a `scale` that
    requires grad receives LSQ's gradient (https://huggingface.co/papers/1902.08153). Computed in the dtype of
    `scale`; the result has the dtype of `scale` too.
    """
    return _fake(w.to(scale.dtype), scale, zero_point, bits)


def fake_quantize(
    w: Tensor,
    bits: int,
    *,
    symmetric: bool = True,
    per_channel: bool = True,
    scale_method: str | ScaleMethod = "maxabs",
    mse_ratios: int = 100,
    mse_min_ratio: float = 0.2,
) -> Tensor:
    """Quantize `w` to `bits` bits and back (round to nearest), keeping its shape and dtype.

    The grids for each case (levels, zero point, where 0 lies) are tabled in the module docstring of
    `hf_r2.quant.uniform`; the arguments are those of [`compute_qparams`]. The scale and zero point are computed
    from the detached weight and are constants for autograd; rounding is straight-through, so the gradient in `w`
    is 1 except for clipped weights (0). Each output channel (or the tensor) holds at most `2^bits` distinct
    values, and `fake_quantize(fake_quantize(w, ...), ...)` equals `fake_quantize(w, ...)` up to float rounding.

    ```python
    >>> import torch
    >>> from hf_r2.quant import fake_quantize
    >>> w = torch.tensor([[-1.0, -0.2, 0.1, 0.6]])
    >>> fake_quantize(w, bits=2)  # levels {-1, -1/3, 1/3, 1} * max|w|
    tensor([[-1.0000, -0.3333,  0.3333,  0.3333]])
    ```
    """
    scale, zero_point = compute_qparams(
        w,
        bits,
        symmetric=symmetric,
        per_channel=per_channel,
        scale_method=scale_method,
        mse_ratios=mse_ratios,
        mse_min_ratio=mse_min_ratio,
    )
    return fake_quantize_affine(w, scale, zero_point, bits).to(w.dtype)
