"""Weight palettization (clustering): every target weight takes one of `2^b` values of a look-up table.

A palettized layer keeps a small *palette* (the centroids, sorted) per group of output channels, and each weight
is the palette entry nearest to it, so it can be stored as a `b`-bit index plus the palette. Unlike the uniform
grids of [`hf_r2.quant.uniform`] the levels are free: they follow the weights' distribution (1-D k-means), so
they need no clipping choice and adapt to skewed or multi-modal weights. Palettes are chosen either after
training (`method="kmeans"`, data-free, here) or during training with differentiable k-means (`method="dkm"`,
[`hf_r2.quant.dkm`]), as in Apple's coremltools and torchao's codebook quantization.

Shapes. A weight `W` of shape `(C_out, ...)` is split into `G` groups of consecutive output channels
(`group_size=None`: `G = 1`, one palette for the whole tensor; `group_size=g`: `G = C_out / g`); each group is the
row `W.reshape(G, -1)[g]` of `n = W.numel() / G` weights, and gets its own `K = 2^b` centroids.

| what | shape | dtype |
|---|---|---|
| `module.weight` (after palettization) | unchanged | unchanged; every entry is one of its group's centroids |
| `module.weight_palette` (non-persistent buffer) | `(G, K)`, each row sorted ascending | the weight's |
| [`palette_indices`]`(module)` | the weight's | `torch.uint8`, the index into the group's row |

The buffer is non-persistent, so `model.state_dict()` keeps its keys and a palettized model still loads into plain
timm / transformers; the export code stores the palette and the indices.
"""

from __future__ import annotations

import copy
import enum
import logging
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .._utils import JsonConfigMixin, check_choice, check_patterns
from ..regularizer import find_target_modules

__all__ = [
    "PalettizeConfig",
    "PalettizeMethod",
    "PALETTIZE_CONFIG_NAME",
    "kmeans_1d",
    "palettize",
    "palettize_",
    "palette_indices",
]

logger = logging.getLogger(__name__)

PALETTIZE_CONFIG_NAME = "palettization_config.json"

# k-means initialisation by dynamic programming over runs of the sorted values: max(_DP_MIN_RUNS, _DP_RUNS_PER_K * k)
# runs, used by default up to _DP_MAX_AUTO_K centroids (allowed up to _DP_MAX_K), with at most _DP_CHUNK_ELEMENTS
# entries of the (groups, runs + 1, runs + 1) cost table at once.
_DP_MIN_RUNS = 32
_DP_RUNS_PER_K = 8
_DP_MAX_AUTO_K = 16
_DP_MAX_K = 64
_DP_CHUNK_ELEMENTS = 1 << 21


class PalettizeMethod(str, enum.Enum):
    """How the palettes are found. Plain strings are accepted wherever a `PalettizeMethod` is."""

    KMEANS = "kmeans"
    DKM = "dkm"


@dataclass
class PalettizeConfig(JsonConfigMixin):
    """Configuration of weight palettization (see [`palettize_`] and [`~hf_r2.quant.dkm.prepare_dkm`]).

    Each target weight is split into groups of output channels, each group gets `2^bits` centroids (its palette),
    and each weight becomes its group's nearest centroid.

    > Parameters of the palette

    bits (`int`, *optional*, defaults to `2`):
        Bits per weight index, 1 to 8: each palette has `2^bits` centroids (2 at 1 bit, 256 at 8 bits).
    method (`str` or [`PalettizeMethod`], *optional*, defaults to `"kmeans"`):
        `"kmeans"`: data-free, post-training 1-D k-means ([`kmeans_1d`]: optimal on runs of the sorted weights
        up to 16 centroids, then Lloyd) on each group. `"dkm"`: differentiable
        k-means during training: [`~hf_r2.quant.dkm.prepare_dkm`] before training, [`palettize_`] (or
        [`~hf_r2.quant.dkm.finalize_dkm`]) after it; on a model that was not prepared it is the same as `"kmeans"`.
    group_size (`int`, *optional*):
        `None`: one palette per tensor. An integer `g`: one palette per group of `g` consecutive output channels
        (dim 0), so `g=1` is one palette per channel. It must divide the output channels of every target layer.

    > Parameters that choose the layers

    include (`list[str]`, *optional*):
        Regular expressions (`re.search`) over module names; only matching Conv/Linear layers are palettized.
        `None` palettizes every Conv1d/2d/3d (depthwise too) and Linear layer.
    exclude (`list[str]`, *optional*):
        Regular expressions over module names to leave in float, applied after `include`.
    skip_first_last (`bool`, *optional*, defaults to `False`):
        Leave the first and the last target layer in float.
    first_last_bits (`int`, *optional*):
        Bits of the first and the last target layer: they get `max(first_last_bits, bits)` (`8`: 256-entry
        palettes, as [`~hf_r2.quant.PTQConfig`] keeps them at 8 bits by default, and the usual choice at 1 to 4
        bits). `None` palettizes them like the others. Not together with `skip_first_last`.

    > Parameters of k-means

    kmeans_iters (`int`, *optional*, defaults to `50`):
        Most Lloyd iterations of [`kmeans_1d`] (it stops earlier once no weight changes cluster). Also used for
        the initial centroids of DKM.

    > Parameters of DKM (`method="dkm"`, used by [`~hf_r2.quant.dkm.prepare_dkm`])

    temperature (`float`, *optional*, defaults to `1.0`):
        Softness of DKM's attention, relative to the weight scale: `tau = temperature * D0`, with `D0` the mean
        squared distance of the group's weights to their nearest initial centroid. Lower is closer to hard
        assignment; see [`~hf_r2.quant.dkm.DKMParametrization`].
    dkm_iters (`int`, *optional*, defaults to `3`):
        Centroid updates per forward pass (warm-started from the previous pass' centroids); the gradient flows
        through all of them. Compute grows linearly with it, memory does not.
    """

    config_name: ClassVar[str] = PALETTIZE_CONFIG_NAME

    # the palette
    bits: int = field(default=2, metadata={"help": "Bits per weight index, 1 to 8 (2^bits centroids per palette)."})
    method: str = field(
        default="kmeans",
        metadata={"help": "'kmeans' (post-training 1-D k-means) or 'dkm' (differentiable k-means in training)."},
    )
    group_size: int | None = field(
        default=None,
        metadata={"help": "None: one palette per tensor; g: one palette per g consecutive output channels."},
    )
    # the layers
    include: list[str] | None = field(
        default=None,
        metadata={"help": "Regexes over module names: only matching Conv/Linear layers are palettized (default all)."},
    )
    exclude: list[str] | None = field(
        default=None, metadata={"help": "Regexes over module names to leave in float, applied after `include`."}
    )
    skip_first_last: bool = field(
        default=False, metadata={"help": "Leave the first and the last target layer in float."}
    )
    first_last_bits: int | None = field(
        default=None, metadata={"help": "Bits of the first and last target layer, max(first_last_bits, bits)."}
    )
    # k-means
    kmeans_iters: int = field(default=50, metadata={"help": "Most Lloyd iterations of the 1-D k-means."})
    # DKM
    temperature: float = field(
        default=1.0,
        metadata={"help": "DKM softness: tau = temperature * (mean squared distance to the initial centroids)."},
    )
    dkm_iters: int = field(default=3, metadata={"help": "DKM centroid updates per forward pass (gradient flows)."})
    # bookkeeping
    version: int = field(default=1, metadata={"help": "Format version of this config."})

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise ValueError(f"`bits` must be an integer from 1 to 8 (2^bits centroids), got {self.bits!r}.")
        self.method = check_choice("method", self.method, PalettizeMethod)
        if self.group_size is not None and (
            isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1
        ):
            raise ValueError(
                f"`group_size` must be a positive integer (output channels per palette) or `None` (one palette per "
                f"tensor), got {self.group_size!r}."
            )
        if not isinstance(self.skip_first_last, bool):
            raise ValueError(f"`skip_first_last` must be `True` or `False`, got {self.skip_first_last!r}.")
        if self.first_last_bits is not None:
            value = self.first_last_bits
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 8:
                raise ValueError(f"`first_last_bits` must be an integer from 1 to 8 or `None`, got {value!r}.")
            if self.skip_first_last:
                raise ValueError(
                    "`skip_first_last=True` leaves the first and last layer in float, so `first_last_bits` "
                    f"({value}) would not apply; set one of them."
                )
        for name in ("kmeans_iters", "dkm_iters"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")
        if (
            isinstance(self.temperature, bool)
            or not isinstance(self.temperature, (int, float))
            or not math.isfinite(self.temperature)
            or self.temperature <= 0
        ):
            raise ValueError(
                f"`temperature` must be a finite number > 0 (relative to the weights' squared quantization error; "
                f"`1.0` is a good start), got {self.temperature!r}."
            )
        self.temperature = float(self.temperature)
        self.include = check_patterns("include", self.include)
        self.exclude = check_patterns("exclude", self.exclude)

    @property
    def num_centroids(self) -> int:
        """`2^bits`, the palette size."""
        return 2**self.bits

    def layer_bits(self, index: int, count: int) -> int:
        """The bits of target layer `index` of `count`: `bits`, or `max(first_last_bits, bits)` at either end."""
        if self.first_last_bits is not None and index in (0, count - 1):
            return max(self.first_last_bits, self.bits)
        return self.bits


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


# ---- helpers shared with hf_r2.quant.dkm -------------------------------------------------------------------------


def _num_groups(name: str, weight: Tensor, group_size: int | None) -> int:
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


def _set_palette(module: nn.Module, palette: Tensor) -> None:
    """Attach the `(G, K)` sorted palette as the non-persistent buffer `weight_palette`."""
    if "weight_palette" in module._buffers:
        del module._buffers["weight_palette"]
    module.register_buffer("weight_palette", palette.detach().clone(), persistent=False)


def _palettize_module(name: str, module: nn.Module, config: PalettizeConfig, bits: int) -> None:
    weight = module.weight
    num_groups = _num_groups(name, weight, config.group_size)
    with torch.no_grad():
        palette, indices = kmeans_1d(weight.detach().reshape(num_groups, -1), 2**bits, config.kmeans_iters)
        weight.copy_(palette.gather(1, indices).reshape(weight.shape))
    _set_palette(module, palette)


# ---- public entry points ------------------------------------------------------------------------------------------


def palette_indices(module: nn.Module) -> Tensor:
    """The `uint8` index of each weight of a palettized `module` into its group's palette, shaped like the weight.

    `module.weight.reshape(G, -1)[g, i] == module.weight_palette[g, idx.reshape(G, -1)[g, i]]` exactly (with
    duplicate palette entries, the first one). Raises `ValueError` if `module` was not palettized, or if its weight
    no longer holds palette values (it was changed, e.g. trained, after [`palettize_`]).
    """
    palette = getattr(module, "weight_palette", None)
    if not isinstance(palette, Tensor) or palette.dim() != 2:
        raise ValueError(
            f"{type(module).__name__} has no `weight_palette` buffer; palettize the model first with "
            "`palettize_(model, PalettizeConfig(...))`."
        )
    num_groups, k = palette.shape
    weight = module.weight.detach()
    rows = weight.reshape(num_groups, -1).to(palette.dtype).contiguous()
    indices = torch.searchsorted(palette.contiguous(), rows, right=False).clamp_(max=k - 1)
    if not torch.equal(palette.gather(1, indices), rows):
        raise ValueError(
            f"The weight of this {type(module).__name__} no longer holds only values of its `weight_palette` (was "
            "it changed after palettization?). Palettize it again with `palettize_`."
        )
    return indices.to(torch.uint8).reshape(weight.shape)


def palettize_(model: nn.Module, config: PalettizeConfig | None = None, **kwargs: Any) -> nn.Module:
    """Palettize the weights of `model`'s target Conv/Linear layers in place, and return `model`.

    With `method="kmeans"` each group of each target weight is clustered by [`kmeans_1d`] into `2^bits`
    centroids and every weight replaced by its nearest centroid. With `method="dkm"` the layers prepared by
    [`~hf_r2.quant.dkm.prepare_dkm`] are finalized ([`~hf_r2.quant.dkm.finalize_dkm`]: nearest trained centroid,
    parametrization removed) and any other target layer is clustered as with `"kmeans"`. Every palettized layer
    gets the non-persistent buffer `weight_palette` (`(G, 2^bits)`, sorted) and its `weight` holds exactly palette
    values, in its own dtype and device; biases, norms and the state-dict keys are unchanged.

    Args:
        model (`torch.nn.Module`):
            A timm or transformers model (or any module with Conv/Linear layers).
        config ([`PalettizeConfig`], *optional*):
            The settings; keyword arguments build one if omitted, or override its fields if given
            (`palettize_(model, bits=4)`).

    Returns:
        `torch.nn.Module`: `model` itself.
    """
    from .dkm import _dkm_modules, finalize_dkm

    config = PalettizeConfig.resolve(config, kwargs)
    prepared = _dkm_modules(model)
    if prepared and config.method != PalettizeMethod.DKM.value:
        raise ValueError(
            f"`model` was prepared for DKM ({len(prepared)} layers) but `method={config.method!r}`; k-means would "
            "discard what DKM learnt. Use `palettize_(model, config, method='dkm')` or `finalize_dkm(model)`."
        )
    if prepared:
        finalize_dkm(model)
    done = {id(m) for _, m in prepared}
    all_targets = find_target_modules(model, config.include, config.exclude, config.skip_first_last)
    targets = [(i, n, m) for i, (n, m) in enumerate(all_targets) if id(m) not in done]
    for _, name, module in targets:  # check every layer before changing any
        _num_groups(name, module.weight, config.group_size)
    for index, name, module in targets:
        _palettize_module(name, module, config, config.layer_bits(index, len(all_targets)))
    logger.info(
        "Palettized %d layers to %d centroids (%s)%s",
        len(targets) + len(prepared),
        config.num_centroids,
        "per tensor" if config.group_size is None else f"{config.group_size} output channels per palette",
        f", {len(prepared)} of them finalized from DKM" if prepared else "",
    )
    return model


def palettize(model: nn.Module, config: PalettizeConfig | None = None, **kwargs: Any) -> nn.Module:
    """A deep copy of `model` whose target Conv/Linear weights are palettized ([`palettize_`]).

    `model` is left untouched.

    ```python
    >>> import timm
    >>> from hf_r2.quant import PalettizeConfig, palettize, palette_indices
    >>> model = timm.create_model("resnet18", num_classes=10)
    >>> p2 = palettize(model, PalettizeConfig(bits=2, group_size=16))
    >>> p2.conv1.weight_palette.shape  # 64 output channels / 16 = 4 palettes of 4 centroids
    torch.Size([4, 4])
    >>> palette_indices(p2.conv1).dtype
    torch.uint8
    ```
    """
    config = PalettizeConfig.resolve(config, kwargs)
    return palettize_(copy.deepcopy(model), config)
