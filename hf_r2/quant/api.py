"""The weight-quantization verbs: `quantize_weights` (a quantized copy) and `quantize_weights_` (in place).

Data-free post-training quantization: every target Conv (depthwise included) and Linear weight is replaced by its
fake-quantized value (quantized and dequantized, so the model still runs in float), with the primitives of
[`hf_r2.quant.uniform`]. The target layers are chosen by the same rules as R2-Loss'
([`~hf_r2.regularizer.find_target_modules`]), so a model trained with R2 on some layers is quantized on those.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from .._utils import JsonConfigMixin, check_choice, check_patterns
from ..regularizer import find_target_modules
from .uniform import ScaleMethod, fake_quantize

__all__ = ["WeightQuantConfig", "quantize_weights", "quantize_weights_", "WEIGHT_QUANT_CONFIG_NAME"]

logger = logging.getLogger(__name__)

WEIGHT_QUANT_CONFIG_NAME = "quantization_config.json"


@dataclass
class WeightQuantConfig(JsonConfigMixin):
    """Configuration of data-free uniform weight quantization (see [`quantize_weights`]).

    The grids (levels, zero point, where 0 lies) are tabled in [`hf_r2.quant.uniform`]. In short: symmetric
    `b`-bit weights take `2^b` levels symmetric about 0 (`{-1, -1/3, 1/3, 1} * c` at 2 bits, no zero level),
    asymmetric ones `2^b` levels over `[min(w_min, 0), max(w_max, 0)]` with 0 exactly a level, and 1 bit is binary
    `sign(w) * mean|w|`.

    > Parameters of the grid

    bits (`int`, *optional*, defaults to `2`):
        Bit width of the weights, 1 to 8 (1 is binary and must be symmetric).
    symmetric (`bool`, *optional*, defaults to `True`):
        Grid symmetric about 0 (mid-rise, half-integer zero point) or asymmetric (integer zero point).
    per_channel (`bool`, *optional*, defaults to `True`):
        One scale per output channel (dim 0) instead of one per tensor.
    scale_method (`str` or [`~hf_r2.quant.uniform.ScaleMethod`], *optional*, defaults to `"maxabs"`):
        `"maxabs"` (the range of the weights, nothing clipped) or `"mse"` (the clip ratio of least squared error,
        searched over 100 ratios from 1.0 to 0.2; never a larger error than `"maxabs"`).

    > Parameters that choose the layers

    include (`list[str]`, *optional*):
        Regular expressions (`re.search`) over module names; only matching Conv/Linear layers are quantized.
        `None` quantizes every Conv1d/2d/3d (depthwise too) and Linear layer.
    exclude (`list[str]`, *optional*):
        Regular expressions over module names to leave in float, applied after `include`.
    skip_first_last (`bool`, *optional*, defaults to `False`):
        Leave the first and the last target layer in float (the usual choice at 1 to 4 bits).
    """

    config_name: ClassVar[str] = WEIGHT_QUANT_CONFIG_NAME


    # the grid
    bits: int = field(default=2, metadata={"help": "Bit width of the weights, 1 to 8 (1 = binary, symmetric)."})
    symmetric: bool = field(
        default=True, metadata={"help": "Grid symmetric about 0 (no zero level) or asymmetric (zero point)."}
    )
    per_channel: bool = field(
        default=True, metadata={"help": "One scale per output channel (dim 0) instead of one per tensor."}
    )
    scale_method: str = field(
        default="maxabs",
        metadata={"help": "'maxabs' (no clipping) or 'mse' (clip ratio of least squared error)."},
    )
    # the layers
    include: list[str] | None = field(
        default=None,
        metadata={"help": "Regexes over module names: only matching Conv/Linear layers are quantized (default: all)."},
    )
    exclude: list[str] | None = field(
        default=None, metadata={"help": "Regexes over module names to leave in float, applied after `include`."}
    )
    skip_first_last: bool = field(
        default=False, metadata={"help": "Leave the first and the last target layer in float."}
    )
    # bookkeeping
    version: int = field(default=1, metadata={"help": "Format version of this config."})

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise ValueError(f"`bits` must be an integer from 1 to 8, got {self.bits!r}.")
        for name in ("symmetric", "per_channel", "skip_first_last"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be `True` or `False`, got {getattr(self, name)!r}.")
        if self.bits == 1 and not self.symmetric:
            raise ValueError(
                "`bits=1` is binary quantization `sign(w) * mean|w|`, which is symmetric only; got "
                "`symmetric=False`. Use `WeightQuantConfig(bits=1, symmetric=True)`."
            )
        self.scale_method = check_choice("scale_method", self.scale_method, ScaleMethod)
        self.include = check_patterns("include", self.include)
        self.exclude = check_patterns("exclude", self.exclude)


def quantize_weights_(model: nn.Module, config: WeightQuantConfig | None = None, **kwargs: Any) -> nn.Module:
    """Fake-quantize the weights of `model`'s target Conv/Linear layers in place, and return `model`.

    Biases, norms and embeddings stay in float. Each weight `W` of a target layer becomes
    `fake_quantize(W, bits, symmetric=..., per_channel=..., scale_method=...)`, in its own dtype and device.

    Args:
        model (`torch.nn.Module`):
            A timm or transformers model (or any module with Conv/Linear layers).
        config ([`WeightQuantConfig`], *optional*):
            The settings; keyword arguments build one if omitted, or override its fields if given
            (`quantize_weights_(model, bits=4)`).

    Returns:
        `torch.nn.Module`: `model` itself.
    """
    config = WeightQuantConfig.resolve(config, kwargs)
    targets = find_target_modules(model, config.include, config.exclude, config.skip_first_last)
    with torch.no_grad():
        for _, module in targets:
            module.weight.copy_(
                fake_quantize(
                    module.weight,
                    config.bits,
                    symmetric=config.symmetric,
                    per_channel=config.per_channel,
                    scale_method=config.scale_method,
                )
            )
    logger.info(
        "Quantized the weights of %d layers to %d bits (%s, %s, %s)",
        len(targets),
        config.bits,
        "symmetric" if config.symmetric else "asymmetric",
        "per channel" if config.per_channel else "per tensor",
        config.scale_method,
    )
    return model


def quantize_weights(model: nn.Module, config: WeightQuantConfig | None = None, **kwargs: Any) -> nn.Module:
    """A deep copy of `model` whose target Conv/Linear weights are fake-quantized (data-free PTQ).

    `model` is left untouched; see [`quantize_weights_`] for the in-place verb and [`WeightQuantConfig`] for the
    settings.

    ```python
    >>> import timm
    >>> from hf_r2.quant import WeightQuantConfig, quantize_weights
    >>> model = timm.create_model("resnet18", num_classes=10)
    >>> q2 = quantize_weights(model, WeightQuantConfig(bits=2, scale_method="mse"))
    >>> q4 = quantize_weights(model, bits=4)
    ```
    """
    config = WeightQuantConfig.resolve(config, kwargs)
    return quantize_weights_(copy.deepcopy(model), config)
