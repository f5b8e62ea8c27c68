"""The affine grid's two computations, shared by weights ([`hf_r2.quant.uniform`]) and activations
([`hf_r2.quant.observers`]): the scale and zero point of the grid over a range, and the MSE clip-ratio search.

The grids themselves (levels, zero point, where 0 lies) are tabled in the docstring of [`hf_r2.quant.uniform`].
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["grid_qparams", "mse_clip_ratio"]

# Squared errors of all clip ratios are computed at once in chunks of at most this many elements.
_MSE_CHUNK_ELEMENTS = 1 << 23


def grid_qparams(lo: Tensor, hi: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    """Scale and zero point of the grid spanning `[lo, hi]` (`lo = -hi` when symmetric); 0 scale for an empty range."""
    steps = 2**bits - 1
    scale = (hi - lo) / steps
    if symmetric:
        return scale, torch.full_like(scale, steps / 2)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero_point = torch.where(scale > 0, torch.round(-lo / safe), torch.zeros_like(scale)).clamp(0, steps)
    return scale, zero_point


def mse_clip_ratio(
    x: Tensor, lo: Tensor, hi: Tensor, bits: int, symmetric: bool, num_ratios: int, min_ratio: float
) -> Tensor:
    """Per row of `x` `(C, K)`, the clip ratio of least squared error (ties go to the larger ratio)."""
    ratios = torch.linspace(1.0, min_ratio, num_ratios, dtype=x.dtype, device=x.device)
    best_err = torch.full((x.shape[0],), float("inf"), dtype=torch.float64, device=x.device)
    best_ratio = torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
    chunk = min(num_ratios, max(1, _MSE_CHUNK_ELEMENTS // max(1, x.numel())))
    # one buffer for all chunks: a fresh large tensor per ratio costs more (page faults) than the arithmetic
    buf = torch.empty((chunk, *x.shape), dtype=x.dtype, device=x.device)
    for start in range(0, num_ratios, chunk):
        r = ratios[start : start + chunk, None]  # (R, 1)
        scale, zero_point = grid_qparams(lo * r, hi * r, bits, symmetric)  # (R, C)
        s, z = scale[..., None], zero_point[..., None]
        d = buf[: r.shape[0]]
        # the values uniform's fake quantization gives (same operations, in place), minus x
        torch.div(x, torch.where(s > 0, s, torch.ones_like(s)), out=d)
        d.add_(z).round_().clamp_(0, 2**bits - 1).sub_(z).mul_(s).sub_(x)
        err = torch.linalg.vector_norm(d, dim=-1).double().square()
        err_min, idx = err.min(0)  # the first minimum: the largest ratio among ties
        better = err_min < best_err
        best_err = torch.where(better, err_min, best_err)
        best_ratio = torch.where(better, r[idx, 0], best_ratio)
    return best_ratio
