"""Activation range observers: what PTQ and QAT learn about a layer's inputs from calibration batches.

An observer sees batches of activations (`update(x)`) and then gives the scale and zero point of the `bits`-bit
asymmetric grid for them (`qparams(bits)`), the grid of [`hf_r2.quant.uniform`]: `2^b` levels evenly spaced over
`[lo, hi]`, with `lo <= 0 <= hi` so that 0 is exactly a level (after a ReLU `lo = 0`: the unsigned grid
`{0, s, ..., (2^b - 1) s}`). The range `[lo, hi]` is chosen by the observer:

- `"minmax"`: the smallest and largest value seen in all batches (nothing is clipped);
- `"percentile"`: the `100 - p` and `p` percentiles of a fixed-size random sample of the values (outliers clipped);
- `"mse"`: `r * [min, max]` with the clip ratio `r` of least squared quantization error over that sample, from
  the same 100-ratio search as weights (`scale_method="mse"`), so its error is never above `"minmax"`'s.

The sample is a reservoir of at most `sample_size` values (uniform over everything seen, with a fixed seed), so
memory stays bounded whatever the number of calibration batches.
"""

from __future__ import annotations

import enum

import torch
from torch import Tensor

from .._utils import check_choice, check_positive_int
from ._affine import grid_qparams, mse_clip_ratio

__all__ = ["ObserverType", "RangeObserver"]


class ObserverType(str, enum.Enum):
    """How an activation range is chosen from calibration data."""

    MINMAX = "minmax"
    PERCENTILE = "percentile"
    MSE = "mse"


class RangeObserver:
    """Running range statistics of a stream of tensors, turned into `bits`-bit asymmetric qparams.

    Args:
        method (`str` or [`ObserverType`], *optional*, defaults to `"mse"`):
            `"minmax"`, `"percentile"` or `"mse"` (see the module docstring).
        percentile (`float`, *optional*, defaults to `99.99`):
            With `"percentile"`: the upper percentile `p` in `(50, 100]`; the lower one is `100 - p`.
        sample_size (`int`, *optional*, defaults to `2**18`):
            How many values the reservoir sample keeps for `"percentile"` and `"mse"`.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the reservoir sampling.
    """

    def __init__(
        self, method: str | ObserverType = "mse", percentile: float = 99.99, sample_size: int = 1 << 18, seed: int = 0
    ) -> None:
        self.method = check_choice("method", method, ObserverType)
        if not 50 < percentile <= 100:
            raise ValueError(f"`percentile` must be in (50, 100], got {percentile!r}.")
        check_positive_int("sample_size", sample_size)
        self.percentile = float(percentile)
        self.sample_size = sample_size
        self.min: Tensor | None = None
        self.max: Tensor | None = None
        self.count = 0
        self._sample: Tensor | None = None
        self._generator = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """Fold the values of `x` into the running min / max and the reservoir sample."""
        x = x.detach().reshape(-1).float()
        if x.numel() == 0:
            return
        lo, hi = x.min(), x.max()
        self.min = lo if self.min is None else torch.minimum(self.min, lo)
        self.max = hi if self.max is None else torch.maximum(self.max, hi)
        if self.method != ObserverType.MINMAX.value:
            self._reservoir(x)
        self.count += x.numel()

    def _reservoir(self, x: Tensor) -> None:
        # Reservoir sampling in bulk: every value seen so far is kept with probability sample_size / count.
        n, seen = x.numel(), self.count
        if self._sample is None or self._sample.numel() < self.sample_size:
            room = self.sample_size - (0 if self._sample is None else self._sample.numel())
            take = x[:room].to("cpu", copy=True)  # a copy: `x` may be a view of the caller's activation
            self._sample = take if self._sample is None else torch.cat([self._sample, take])
            x, seen = x[room:], seen + take.numel()
            n = x.numel()
            if n == 0:
                return
        # value i of this batch (global position seen + i + 1) replaces a random slot with prob size / position
        positions = torch.arange(seen + 1, seen + n + 1, dtype=torch.float64)
        keep = torch.rand(n, generator=self._generator, dtype=torch.float64) < self.sample_size / positions
        idx = keep.nonzero().squeeze(1)
        if idx.numel():
            slots = torch.randint(0, self.sample_size, (idx.numel(),), generator=self._generator)
            # A slot drawn twice keeps the later value, as one-at-a-time reservoir sampling would. (A plain
            # `sample[slots] = values` leaves the winner of a duplicate undefined: with several threads it changed
            # from run to run, and so did every MSE / percentile activation range.)
            last = torch.full((self.sample_size,), -1, dtype=torch.long)
            last.scatter_reduce_(0, slots, torch.arange(slots.numel()), reduce="amax")
            filled = (last >= 0).nonzero().squeeze(1)
            self._sample[filled] = x.cpu()[idx[last[filled]]]

    @torch.no_grad()
    def qparams(self, bits: int) -> tuple[Tensor, Tensor]:
        """Scale and zero point (0-dim float32 tensors) of the `bits`-bit asymmetric grid for the observed range."""
        if self.min is None:
            raise RuntimeError(
                "The observer has seen no data: run calibration batches through the model before computing "
                "activation qparams."
            )
        lo, hi = self.min.clamp_max(0).cpu(), self.max.clamp_min(0).cpu()
        if self.method == ObserverType.PERCENTILE.value:
            q = torch.tensor([1 - self.percentile / 100, self.percentile / 100], dtype=torch.float64)
            plo, phi = torch.quantile(self._sample.double(), q).float()
            lo, hi = torch.maximum(lo, plo.clamp_max(0)), torch.minimum(hi, phi.clamp_min(0))
        elif self.method == ObserverType.MSE.value:
            ratio = mse_clip_ratio(self._sample[None], lo[None], hi[None], bits, False, 100, 0.2)
            lo, hi = lo * ratio[0], hi * ratio[0]
        scale, zero_point = grid_qparams(lo, hi, bits, symmetric=False)
        return scale.float(), zero_point.float()
