"""Weight palettes shared by k-means palettization ([`palettize`]) and DKM ([`dkm`]): 1-D
k-means ([`kmeans_1d`]), the groups of a weight ([`count_groups`]), the `weight_palette` buffer ([`set_palette`]), and
the base class of parametrizations that learn a palette in training ([`LearnedPalette`]), which [`palettize_`]
finalizes without importing DKM.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

__all__ = [
    "kmeans_1d",
    "count_groups",
    "set_palette",
    "LearnedPalette",
    "learned_palette_modules",
    "finalize_learned_palettes_",
]

logger = logging.getLogger(__name__)

# k-means initialisation by dynamic programming over runs of the sorted values: max(_DP_MIN_RUNS, _DP_RUNS_PER_K * k)
# runs, used by default up to _DP_MAX_AUTO_K centroids (allowed up to _DP_MAX_K), with at most _DP_CHUNK_ELEMENTS
# entries of the (groups, runs + 1, runs + 1) cost table at once.
_DP_MIN_RUNS = 32
_DP_RUNS_PER_K = 8
_DP_MAX_AUTO_K = 16
_DP_MAX_K = 64
_DP_CHUNK_ELEMENTS = 1 << 21


# ---- 1-D k-means --------------------------------------------------------------------------------------------------


def _dp_init(s: Tensor, k: int) -> Tensor:
    """Centroids `(G, k)` of the optimal `k`-partition of each sorted row `s` `(G, n)` cut into `B` runs of (nearly)
    equal count, `B = min(n, max(32, 8 k))`: the exact dynamic programme of 1-D k-means (Wang & Song,
    "Ckmeans.1d.dp", The R Journal 2011) over runs instead of values, so that it costs `O(k B^2)` per row whatever
    `n`. Needs `k < n`."""
    num_groups, n = s.shape
    bins = min(n, max(_DP_MIN_RUNS, _DP_RUNS_PER_K * k))
    dev = s.device
    edges = (torch.arange(bins + 1, device=dev) * n) // bins
    centred = s - s.mean(dim=1, keepdim=True)  # the costs subtract large sums: keep them near 0
    zero = centred.new_zeros(num_groups, 1)
    p1 = torch.cat([zero, centred.cumsum(dim=1)], dim=1)[:, edges]
    p2 = torch.cat([zero, centred.square().cumsum(dim=1)], dim=1)[:, edges]
    count = edges.to(torch.float64)
    size = count[None, :] - count[:, None]  # (a, b): values in runs a..b-1
    out = torch.empty(num_groups, k, dtype=s.dtype, device=dev)
    step = max(1, _DP_CHUNK_ELEMENTS // (bins + 1) ** 2)
    for g0 in range(0, num_groups, step):
        q1, q2 = p1[g0 : g0 + step], p2[g0 : g0 + step]
        sums = q1[:, None, :] - q1[:, :, None]
        cost = (q2[:, None, :] - q2[:, :, None]) - sums.square() / size.clamp(min=1)  # SSE of runs a..b-1
        cost = torch.where(size > 0, cost.clamp_(min=0), torch.full_like(cost, math.inf))
        best = cost[:, 0, :].clone()  # best[b]: runs 0..b-1 in exactly m clusters (here m = 1)
        choices = []
        for _ in range(k - 1):
            best, arg = (best[:, :, None] + cost).min(dim=1)
            choices.append(arg)
        cut = torch.full((q1.shape[0], 1), bins, dtype=torch.long, device=dev)
        cuts = [cut]
        for arg in reversed(choices):
            cut = arg.gather(1, cut)
            cuts.append(cut)
        cuts.append(torch.zeros_like(cut))
        cuts = torch.cat(cuts[::-1], dim=1)  # (g, k + 1) run boundaries, ascending
        lo, hi = cuts[:, :-1], cuts[:, 1:]
        out[g0 : g0 + step] = (q1.gather(1, hi) - q1.gather(1, lo)) / (count[hi] - count[lo])
    return out + s.mean(dim=1, keepdim=True)


def kmeans_1d(values: Tensor, k: int, iters: int = 50, *, init: str = "auto") -> tuple[Tensor, Tensor]:
    """Exact Lloyd k-means on 1-D data, vectorised over groups: `(centroids, indices)`.

    Each row of `values` (`(G, n)`; a 1-D `(n,)` tensor is one group) is clustered on its own. The centroids are
    initialised deterministically (`init`), then each Lloyd iteration assigns every value to its nearest centroid
    and moves each centroid to the mean of its values, until no value changes cluster or after `iters`
    iterations. In 1-D the clusters are runs of the sorted row cut at the midpoints between consecutive centroids,
    so after one `O(n log n)` sort each iteration costs `O(k log n)` (`searchsorted` of the midpoints, then cluster
    sums from a float64 prefix sum); the final assignment is an `O(n log k)` bucketize of `values` on the
    midpoints. A value exactly on a midpoint goes to the lower centroid, in both places.

    Initialisations:

    - `"quantile"`: the sorted row's values at positions `floor((j + 1/2) n / k)`, `j = 0..k-1`;
    - `"dp"`: the optimal partition of the sorted row cut into `B = max(32, 8 k)` runs of equal count (exact
      dynamic programming, `O(k B^2)` per row), so the global optimum for rows of up to `B` values. Lloyd from
      quantiles stops in poor local optima on small groups and at 8 to 16 centroids: on Gaussian rows of 200 to
      2300 values at `k = 16` its squared error was 1.05x to 3x the optimum, against at most 1.04x from `"dp"`
      (at most 1.01x for `k = 8`, 1.001x for `k <= 4`);
    - `"auto"` (default): `"dp"` for `k <= 16`, `"quantile"` above (where the programme would cost too much).

    Special cases, none of which produces NaN: an empty cluster keeps its previous centroid; a row with at most
    `k` distinct values gets exactly those values as centroids (padded with its largest value), so clustering a
    clustered tensor returns it unchanged; a constant (e.g. all-zero) row gets `k` copies of its value.

    Args:
        values (`torch.Tensor`):
            Floating point `(n,)` or `(G, n)`, finite, `n >= 1`.
        k (`int`):
            Number of centroids, `>= 1`.
        iters (`int`, *optional*, defaults to `50`):
            Most Lloyd iterations (`0`: the initialisation only).
        init (`str`, *optional*, defaults to `"auto"`):
            `"auto"`, `"dp"` (needs `k <= 64`) or `"quantile"`, as above.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: the centroids, `(k,)` or `(G, k)` in `values`' dtype, sorted
        ascending along the last dim; and the `int64` index of each value's nearest centroid, shaped like `values`.
    """
    if not torch.is_floating_point(values):
        raise ValueError(f"`values` must be a floating point tensor, got dtype {values.dtype}.")
    if values.dim() not in (1, 2) or values.shape[-1] == 0:
        raise ValueError(f"`values` must have shape (n,) or (G, n) with n >= 1, got {tuple(values.shape)}.")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"`k` must be an integer >= 1, got {k!r}.")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"`iters` must be an integer >= 0, got {iters!r}.")
    if init not in ("auto", "dp", "quantile") or (init == "dp" and k > _DP_MAX_K):
        raise ValueError(f"`init` must be 'auto', 'dp' (k <= {_DP_MAX_K}) or 'quantile', got {init!r} with k={k}.")
    squeeze = values.dim() == 1
    x = values.detach().reshape(1, -1) if squeeze else values.detach()
    if not torch.isfinite(x).all():
        raise ValueError("`values` holds NaN or infinite entries; k-means needs finite weights.")
    num_groups, n = x.shape
    x64 = x.to(torch.float64).contiguous()
    s, _ = torch.sort(x64, dim=1)
    prefix = torch.zeros(num_groups, n + 1, dtype=torch.float64, device=x.device)
    torch.cumsum(s, dim=1, out=prefix[:, 1:])

    # rows with at most k distinct values get exactly those values (optimal, zero error); the others an init
    new_value = s[:, 1:] != s[:, :-1]
    few = new_value.sum(dim=1) + 1 <= k
    if init == "auto":
        init = "dp" if k <= _DP_MAX_AUTO_K else "quantile"
    c = None
    if not few.all():  # then n > k, as some row has more than k distinct values
        if init == "dp":
            c = _dp_init(s, k)
        else:
            pos = (torch.arange(k, device=x.device, dtype=torch.float64) + 0.5) * n / k
            c = s[:, pos.floor().long().clamp_(max=n - 1)]
    if few.any():
        rank = torch.zeros(num_groups, n, dtype=torch.long, device=x.device)
        torch.cumsum(new_value, dim=1, out=rank[:, 1:])
        exact = s[:, -1:].expand(num_groups, k).clone()
        exact.scatter_(1, rank.clamp_(max=k - 1), s)  # equal ranks carry equal values, so collisions agree
        c = exact if c is None else torch.where(few[:, None], exact, c)
        del rank

    prev = None
    for _ in range(iters):
        bounds = torch.searchsorted(s, ((c[:, 1:] + c[:, :-1]) / 2).contiguous(), right=True)  # #values <= midpoint
        if prev is not None and torch.equal(bounds, prev):
            break  # same clusters as last time, so `c` already holds their means
        prev = bounds
        edges = torch.cat([bounds.new_zeros(num_groups, 1), bounds, bounds.new_full((num_groups, 1), n)], dim=1)
        sums = prefix.gather(1, edges[:, 1:]) - prefix.gather(1, edges[:, :-1])
        counts = edges[:, 1:] - edges[:, :-1]
        c = torch.where(counts > 0, sums / counts.clamp(min=1), c)

    c, _ = torch.sort(c, dim=1)
    indices = torch.searchsorted(((c[:, 1:] + c[:, :-1]) / 2).contiguous(), x64, right=False)
    centroids = c.to(values.dtype)
    if squeeze:
        return centroids.reshape(k), indices.reshape(n)
    return centroids, indices


# ---- groups and the palette buffer --------------------------------------------------------------------------------


def count_groups(name: str, weight: Tensor, group_size: int | None) -> int:
    """`G` for `weight`, or a `ValueError` when `group_size` does not divide its output channels."""
    if group_size is None:
        return 1
    out_channels = weight.shape[0]
    if out_channels % group_size:
        divisors = [d for d in range(1, out_channels + 1) if out_channels % d == 0]
        raise ValueError(
            f"`group_size={group_size}` does not divide the {out_channels} output channels of layer {name!r} "
            f"(weight {tuple(weight.shape)}). Choose a `group_size` that divides every target layer's output "
            f"channels (here one of {divisors[:12]}{' ...' if len(divisors) > 12 else ''}), use `group_size=None`, "
            f"or leave the layer out with `exclude=[{name!r}]`."
        )
    return out_channels // group_size


def set_palette(module: nn.Module, palette: Tensor) -> None:
    """Attach the `(G, K)` sorted palette as the non-persistent buffer `weight_palette`."""
    if "weight_palette" in module._buffers:
        del module._buffers["weight_palette"]
    module.register_buffer("weight_palette", palette.detach().clone(), persistent=False)


# ---- palettes learnt in training ----------------------------------------------------------------------------------


class LearnedPalette(nn.Module):
    """Base class of the weight parametrizations that learn a palette during training (DKM's
    [`~hf_r2.quant.cluster.dkm.DKMParametrization`]). [`finalize_learned_palettes_`] (and so
    [`~hf_r2.quant.cluster.palettize.palettize_`]) finds them by this type and calls [`finalize_`]."""

    def finalize_(self, module: nn.Module) -> None:
        """Make `module`'s weight a plain parameter holding palette values, set its `weight_palette` buffer and
        remove this parametrization."""
        raise NotImplementedError


def learned_palette_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The `(name, module)` pairs whose `weight` carries a [`LearnedPalette`] parametrization."""
    found = []
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight") and any(
            isinstance(p, LearnedPalette) for p in module.parametrizations.weight
        ):
            found.append((name, module))
    return found


def finalize_learned_palettes_(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Finalize every [`LearnedPalette`] of `model` in place (nearest learnt centroid, parametrization removed);
    returns the `(name, module)` pairs finalized (empty if there were none)."""
    prepared = learned_palette_modules(model)
    for name, module in prepared:
        plist = module.parametrizations.weight
        if len(plist) != 1:
            raise ValueError(
                f"Layer {name!r} has {len(plist)} parametrizations on its weight; DKM can only be finalized when it "
                "is the only one."
            )
        plist[0].finalize_(module)
    if prepared:
        logger.info("Finalized DKM on %d layers", len(prepared))
    return prepared
