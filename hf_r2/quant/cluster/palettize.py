"""Weight palettization (clustering): every target weight takes one of `2^b` values of a look-up table.

A palettized layer keeps a small *palette* (the centroids, sorted) per group of output channels, and each weight
is the palette entry nearest to it, so it can be stored as a `b`-bit index plus the palette. Unlike the uniform
grids of [`hf_r2.quant.uniform`] the levels are free: they follow the weights' distribution (1-D k-means), so
they need no clipping choice and adapt to skewed or multi-modal weights. Palettes are chosen either after
training (`method="kmeans"`, data-free, here) or during training with differentiable k-means (`method="dkm"`,
[`hf_r2.quant.cluster.dkm`]), as in Apple's coremltools and torchao's codebook quantization.

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

from ..._finite import check_finite_model
from ..._targets import find_target_modules
from ..._utils import JsonConfigMixin, check_choice, check_patterns
from .._grid import check_bits, layer_bits
from ._palette import count_groups, finalize_learned_palettes_, kmeans_1d, learned_palette_modules, set_palette

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


class PalettizeMethod(str, enum.Enum):
    """How the palettes are found. Plain strings are accepted wherever a `PalettizeMethod` is."""

    KMEANS = "kmeans"
    DKM = "dkm"


@dataclass
class PalettizeConfig(JsonConfigMixin):
    """Configuration of weight palettization (see [`palettize_`] and [`~hf_r2.quant.prepare_dkm`]).

    Each target weight is split into groups of output channels, each group gets `2^bits` centroids (its palette),
    and each weight becomes its group's nearest centroid.

    > Parameters of the palette

    bits (`int`, *optional*, defaults to `2`):
        Bits per weight index, 1 to 8: each palette has `2^bits` centroids (2 at 1 bit, 256 at 8 bits).
    method (`str` or [`PalettizeMethod`], *optional*, defaults to `"kmeans"`):
        `"kmeans"`: data-free, post-training 1-D k-means ([`kmeans_1d`]: optimal on runs of the sorted weights
        up to 16 centroids, then Lloyd) on each group. `"dkm"`: differentiable
        k-means during training: [`~hf_r2.quant.prepare_dkm`] before training, [`palettize_`] (or
        [`~hf_r2.quant.finalize_dkm`]) after it; on a model that was not prepared it is the same as `"kmeans"`.
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

    > Parameters of DKM (`method="dkm"`, used by [`~hf_r2.quant.prepare_dkm`])

    temperature (`float`, *optional*, defaults to `1.0`):
        Softness of DKM's attention, relative to the weight scale: `tau = temperature * D0`, with `D0` the mean
        squared distance of the group's weights to their nearest initial centroid. Lower is closer to hard
        assignment; see [`~hf_r2.quant.DKMParametrization`].
    dkm_iters (`int`, *optional*, defaults to `3`):
        Centroid updates per forward pass (warm-started from the previous pass' centroids); the gradient flows
        through all of them. Compute grows linearly with it, memory does not.
    """

    config_name: ClassVar[str] = PALETTIZE_CONFIG_NAME

    # the palette
    bits: int = field(default=2, metadata={"help": "Bits per weight index, 1 to 8 (2^bits centroids per palette)."})
    method: str = field(
        default="kmeans",
        metadata={"help": "kmeans (post-training 1-D k-means, no data) or dkm (differentiable k-means in training).",
                  "choices": PalettizeMethod},
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
        check_bits("bits", self.bits, what=" (2^bits centroids)")
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
        check_bits("first_last_bits", self.first_last_bits, allow_none=True)
        if self.first_last_bits is not None and self.skip_first_last:
            raise ValueError(
                "`skip_first_last=True` leaves the first and last layer in float, so `first_last_bits` "
                f"({self.first_last_bits}) would not apply; set one of them."
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
        """The bits of target layer `index` of `count`: `bits`, or `max(first_last_bits, bits)` at either end (the
        same rule as PTQ's and QAT's `first_last_bits`)."""
        return layer_bits(self.bits, self.first_last_bits, index, count)


def _palettize_module(name: str, module: nn.Module, config: PalettizeConfig, bits: int) -> None:
    weight = module.weight
    groups = count_groups(name, weight, config.group_size)
    with torch.no_grad():
        palette, indices = kmeans_1d(weight.detach().reshape(groups, -1), 2**bits, config.kmeans_iters)
        weight.copy_(palette.gather(1, indices).reshape(weight.shape))
    set_palette(module, palette)


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
    [`~hf_r2.quant.prepare_dkm`] are finalized ([`~hf_r2.quant.finalize_dkm`]: nearest trained centroid,
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
    config = PalettizeConfig.resolve(config, kwargs)
    prepared = learned_palette_modules(model)
    if prepared and config.method != PalettizeMethod.DKM.value:
        raise ValueError(
            f"`model` was prepared for DKM ({len(prepared)} layers) but `method={config.method!r}`; k-means would "
            "discard what DKM learnt. Use `palettize_(model, config, method='dkm')` or `finalize_dkm(model)`."
        )
    if prepared:
        finalize_learned_palettes_(model)
    done = {id(m) for _, m in prepared}
    all_targets = find_target_modules(model, config.include, config.exclude, config.skip_first_last)
    targets = [(i, n, m) for i, (n, m) in enumerate(all_targets) if id(m) not in done]
    for _, name, module in targets:  # check every layer before changing any
        count_groups(name, module.weight, config.group_size)
    check_finite_model({f"{name}.weight": module.weight for _, name, module in targets}, "the model to palettize")
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
