"""Quantization-aware training with LSQ: `QATConfig` and `prepare_qat(model, config)`, then train, then export.

`prepare_qat` makes every target Conv (depthwise included) and Linear a fake-quantized layer
([`~hf_r2.quant.layers`]) whose weight and input step sizes are learnt with LSQ (Esser et al., 2020,
https://huggingface.co/papers/1902.08153). Step sizes start from the data: weights from their MSE-optimal (or
max-abs) range, activations from an observer over a few calibration batches (or, without calibration data, from
the first training batch). The layers keep their class hierarchy and parameters, so the prepared model trains
with [`~hf_r2.R2Trainer`] or [`~hf_r2.train_with_accelerate`] as it is, R2-Loss included; the step sizes are
ordinary parameters the optimizer sees. [`~hf_r2.quant.export.low_bit_layers`] gives the integer codes and
scales afterwards, and [`~hf_r2.quant.export.save_low_bit`] saves them.

The first and the last layer stay at 8 bits by default (`first_last_bits`), as in the paper's W2A2 baselines.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from .._targets import find_target_modules
from .._utils import JsonConfigMixin, check_choice
from ._batches import first_batches
from ._grid import check_grid_fields, layer_bits
from .api import register_quantize_handler
from .calibrate import calibrate_activations_
from .layers import FakeQuantizer, quantize_layer_
from .observers import ObserverType
from .uniform import ScaleMethod

__all__ = ["QATConfig", "QAT_CONFIG_NAME", "prepare_qat"]

logger = logging.getLogger(__name__)

QAT_CONFIG_NAME = "qat_config.json"


@dataclass
class QATConfig(JsonConfigMixin):
    """Quantization-aware training settings (see [`prepare_qat`]).

    w_bits (`int`, *optional*, defaults to `2`):
        Weight bit width, 1 to 8.
    a_bits (`int`, *optional*, defaults to `2`):
        Input bit width of quantized layers, 2 to 8; `None` trains weight-only quantization.
    per_channel (`bool`, *optional*, defaults to `True`):
        One weight step size per output channel instead of one per tensor.
    weight_init (`str`, *optional*, defaults to `"mse"`):
        Initial weight range: `"mse"` (least squared error) or `"maxabs"`.
    act_observer (`str`, *optional*, defaults to `"mse"`):
        How the initial activation ranges are chosen: `"minmax"`, `"percentile"` or `"mse"`.
    first_last_bits (`int`, *optional*, defaults to `8`):
        Bits of the first and last quantized layer (weights and input); `None` quantizes them like the rest.
    learn_scales (`bool`, *optional*, defaults to `True`):
        Learn the step sizes (LSQ); `False` keeps them at their initial values (plain STE QAT).
    calibration_batches (`int`, *optional*, defaults to `4`):
        Batches of `calibration_data` used to initialise the activation step sizes.
    include (`list[str]`, *optional*):
        Regular expressions over module names; only matching Conv/Linear layers are quantized.
    exclude (`list[str]`, *optional*):
        Regular expressions over module names to leave in float.
    """

    config_name: ClassVar[str] = QAT_CONFIG_NAME

    # `metadata` as PTQConfig's: also the help, choices and flag of `hf-r2 qat`
    w_bits: int = field(default=2, metadata={"help": "Weight bit width, 1 to 8."})
    a_bits: int | None = field(default=2, metadata={"help": "Activation bit width, 2 to 8, or 'none'."})
    per_channel: bool = field(default=True, metadata={
        "help": "One weight step size per output channel.", "flag": "per-tensor",
        "flag_help": "One weight step size per tensor (default: one per output channel)."})
    weight_init: str = field(default="mse", metadata={
        "help": "Initial weight range: mse (least squared error) or maxabs.", "choices": ScaleMethod})
    act_observer: str = field(default="mse", metadata={
        "help": "How the initial activation ranges are chosen: minmax, percentile or mse.", "choices": ObserverType})
    first_last_bits: int | None = field(default=8, metadata={
        "help": "Bits of the first and last layer, never below the others' ('none': like the others)."})
    learn_scales: bool = field(default=True, metadata={
        "help": "Learn step sizes with LSQ.", "flag": "no-learn-scales",
        "flag_help": "Keep the step sizes at their initial values (plain STE QAT) instead of learning them (LSQ)."})
    calibration_batches: int = field(default=4, metadata={"help": "Batches to initialise activation ranges."})
    include: list[str] | None = field(default=None, metadata={"help": "Regexes of the layers to quantize."})
    exclude: list[str] | None = field(default=None, metadata={"help": "Regexes of layers to leave in float."})
    version: int = field(default=1, metadata={"help": "Format version of this config."})

    def __post_init__(self) -> None:
        check_grid_fields(self)
        if not isinstance(self.learn_scales, bool):
            raise ValueError(f"`learn_scales` must be `True` or `False`, got {self.learn_scales!r}.")
        self.weight_init = check_choice("weight_init", self.weight_init, ScaleMethod)


@register_quantize_handler(QATConfig)
def prepare_qat(
    model: nn.Module, config: QATConfig | None = None, calibration_data: Iterable[Any] | None = None
) -> nn.Module:
    """Make `model`'s target Conv/Linear layers fake-quantized with learnable (LSQ) step sizes, in place.

    Call it before building the optimizer (the step sizes are new parameters), then train as usual:

    ```python
    >>> from hf_r2 import R2Trainer
    >>> from hf_r2.quant import QATConfig, prepare_qat, save_low_bit
    >>> prepare_qat(model, QATConfig(w_bits=2, a_bits=2), calibration_data=train_loader)
    >>> R2Trainer(model=model, args=args, train_dataset=train, data_collator=collate_fn).train()
    >>> save_low_bit(model, "outputs/w2a2")  # integer codes + step sizes
    ```

    Args:
        model (`torch.nn.Module`):
            A timm or transformers model (or any module with Conv/Linear layers).
        config ([`QATConfig`], *optional*):
            Defaults to W2A2 with 8-bit first and last layers.
        calibration_data (iterable of batches, *optional*):
            Batches to initialise the activation step sizes from (the first `config.calibration_batches`);
            without it each activation step is initialised from the first batch it sees in training.

    Returns:
        `torch.nn.Module`: `model`.
    """
    config = QATConfig() if config is None else config
    if not isinstance(config, QATConfig):
        raise TypeError(f"`config` must be a `QATConfig`, got {type(config).__name__}.")
    targets = find_target_modules(model, config.include, config.exclude)
    for i, (_, module) in enumerate(targets):
        w_bits = layer_bits(config.w_bits, config.first_last_bits, i, len(targets))
        weight_q = FakeQuantizer(
            w_bits,
            symmetric=True,
            per_channel=config.per_channel,
            channels=module.weight.shape[0],
            learnable=config.learn_scales,
        ).init_from(module.weight, config.weight_init)
        a_bits = layer_bits(config.a_bits, config.first_last_bits, i, len(targets))
        input_q = None
        if a_bits is not None:
            input_q = FakeQuantizer(
                a_bits, symmetric=False, activation=True, learnable=config.learn_scales, observer=config.act_observer
            )
        quantize_layer_(module, weight_q, input_q)
    if config.a_bits is not None and calibration_data is not None:
        calibrate_activations_(model, first_batches(calibration_data, config.calibration_batches, "QAT"))
    logger.info(
        "Prepared %d layers for QAT: W%d%s, %s, LSQ step sizes %s",
        len(targets),
        config.w_bits,
        f"A{config.a_bits}" if config.a_bits else "",
        "per channel" if config.per_channel else "per tensor",
        "learnt" if config.learn_scales else "frozen",
    )
    return model
