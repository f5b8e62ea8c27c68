"""Post-training quantization: `PTQConfig` and its verb `post_training_quantize_(model, config, calibration_data)`
(what [`hf_r2.quant.quantize_`] runs for a `PTQConfig`).

The steps, in this order (each optional, chosen by [`PTQConfig`]):

1. batch-norm folding (`bn="fold"`): every conv followed by a BN is folded into it first, so the weights that get
   quantized are the ones a deployment runs ([`~hf_r2.quant.ptq.bn.fold_bn_`]);
2. weights: every target Conv/Linear gets a frozen [`~hf_r2.quant.layers.FakeQuantizer`] with a `w_bits` grid per
   output channel or per tensor, range by max-abs or MSE search ([`~hf_r2.quant.uniform.compute_qparams`]);
3. rounding (`rounding="adaround"`): AdaRound learns, layer by layer on the calibration set, whether each weight
   rounds up or down ([`~hf_r2.quant.ptq.adaround.adaround_`]); `"nearest"` rounds to nearest;
4. batch-norm re-estimation (`bn="reestimate"`): BN statistics recomputed with the quantized weights
   ([`~hf_r2.quant.ptq.bn.reestimate_bn_stats`]);
5. activations (`a_bits`): an `a_bits` asymmetric grid at the input of every quantized layer, its range calibrated
   by an observer (min-max, percentile or MSE, [`~hf_r2.quant.observers`]).

AdaRound comes before BN re-estimation because it makes each layer reproduce its float outputs, and BN is
re-estimated for the rounding that stays; activations come last so that their ranges are those of the final
weights and statistics.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from ..._targets import find_target_modules
from ..._utils import JsonConfigMixin, check_choice
from .._batches import first_batches, model_device, pixel_values
from .._grid import check_grid_fields, layer_bits
from ..api import register_quantize_handler
from ..calibrate import calibrate_activations_
from ..layers import FakeQuantizer, quantize_layer_, quantized_layers
from ..observers import ObserverType
from ..uniform import ScaleMethod
from .adaround import AdaRoundConfig, adaround_
from .bias_correction import correct_bias_
from .bn import fold_bn_, reestimate_bn_stats

__all__ = [
    "PTQConfig",
    "PTQ_CONFIG_NAME",
    "BNHandling",
    "Rounding",
    "post_training_quantize_",
]

logger = logging.getLogger(__name__)

PTQ_CONFIG_NAME = "ptq_config.json"


class BNHandling(str, enum.Enum):
    """What PTQ does with batch norms: fold them into the convs first, re-estimate their statistics after
    quantization, or keep them as they are."""

    FOLD = "fold"
    REESTIMATE = "reestimate"
    KEEP = "keep"


class Rounding(str, enum.Enum):
    """Round-to-nearest or AdaRound."""

    NEAREST = "nearest"
    ADAROUND = "adaround"


@dataclass
class PTQConfig(JsonConfigMixin):
    """Post-training quantization settings (see [`post_training_quantize_`]); `W2A8` is
    `PTQConfig(w_bits=2, a_bits=8)`, and `PTQConfig(a_bits=None, bn="keep")` is data-free weight-only PTQ.

    > The grids

    w_bits (`int`, *optional*, defaults to `2`):
        Weight bit width, 1 to 8 (1 = binary `sign(w) * mean|w|`).
    a_bits (`int`, *optional*, defaults to `8`):
        Bit width of the inputs of quantized layers, 2 to 8; `None` leaves activations in float (weight-only).
    per_channel (`bool`, *optional*, defaults to `True`):
        One weight scale per output channel instead of one per tensor.
    weight_range (`str`, *optional*, defaults to `"mse"`):
        `"maxabs"` (nothing clipped) or `"mse"` (the clip ratio of least squared error).
    act_observer (`str`, *optional*, defaults to `"mse"`):
        How activation ranges are calibrated: `"minmax"`, `"percentile"` or `"mse"`.
    act_percentile (`float`, *optional*, defaults to `99.99`):
        The upper percentile with `act_observer="percentile"`.
    first_last_bits (`int`, *optional*, defaults to `8`):
        Weight and input bits of the first and the last quantized layer (8, as the paper's baselines keep them): they
        get `max(first_last_bits, w_bits)` (and likewise for inputs), so they are never below the others; `None`
        quantizes them like the others. To keep them in float, `exclude` them.

    > The method

    rounding (`str`, *optional*, defaults to `"nearest"`):
        `"nearest"` or `"adaround"` (learnt up/down rounding, needs calibration data).
    adaround (`dict`, *optional*):
        Fields of [`~hf_r2.quant.ptq.adaround.AdaRoundConfig`] (iterations, regulariser weight, ...).
    bn (`str`, *optional*, defaults to `"reestimate"`):
        `"fold"` (fold conv+BN pairs before quantizing), `"reestimate"` (recompute BN statistics after) or
        `"keep"`.
    bias_correction (`bool`, *optional*, defaults to `False`):
        Correct each quantized layer's bias for the mean shift its quantization causes, as the last step
        ([`~hf_r2.quant.correct_bias_`], on the calibration batches): what a BN-folded model (`bn="fold"`, or
        after [`~hf_r2.quant.equalize_`]) has instead of BN re-estimation.
    calibration_batches (`int`, *optional*, defaults to `16`):
        How many batches of the calibration data are used (by AdaRound, BN re-estimation and observers).

    > The layers

    include (`list[str]`, *optional*):
        Regular expressions over module names; only matching Conv/Linear layers are quantized.
    exclude (`list[str]`, *optional*):
        Regular expressions over module names to leave in float.
    """

    config_name: ClassVar[str] = PTQ_CONFIG_NAME

    # `metadata`: "help" is the `hf-r2 ptq` flag's help too, "choices" the enum of a string field, "flag" / "flag_help"
    # the flag that sets a default-True field to False (hf_r2/commands/gen_low_bit_flags.py writes the flags)
    w_bits: int = field(default=2, metadata={"help": "Weight bit width, 1 to 8."})
    a_bits: int | None = field(default=8, metadata={"help": "Activation bit width, 2 to 8, or 'none' (weight-only)."})
    per_channel: bool = field(default=True, metadata={
        "help": "One weight scale per output channel.", "flag": "per-tensor",
        "flag_help": "One weight scale per tensor (default: one per output channel)."})
    weight_range: str = field(default="mse", metadata={
        "help": "How each weight scale is chosen: maxabs (the largest |w|, nothing clipped) or mse (the clipping that "
        "minimises the squared quantization error).", "choices": ScaleMethod})
    act_observer: str = field(default="mse", metadata={
        "help": "How each activation range is calibrated: minmax (observed min / max), percentile (clip the extreme "
        "0.01%%) or mse (the clipping with the least squared error).", "choices": ObserverType})
    act_percentile: float = field(default=99.99, metadata={"help": "Upper percentile for act_observer=percentile."})
    first_last_bits: int | None = field(default=8, metadata={
        "help": "Bits of the first and last layer, never below the others' ('none': like the others)."})
    rounding: str = field(default="nearest", metadata={
        "help": "Weight rounding: nearest, or adaround (learned up / down rounding per weight, layer by layer on the "
        "calibration images; slower, better at 2 bits).", "choices": Rounding})
    adaround: dict[str, Any] | None = field(default=None, metadata={"help": "AdaRoundConfig fields."})
    bn: str = field(default="reestimate", metadata={
        "help": "Batch norm after quantizing: reestimate its statistics on the calibration images, fold it into the "
        "preceding conv before quantizing, or keep it as trained.", "choices": BNHandling})
    bias_correction: bool = field(default=False, metadata={
        "help": "Correct each quantized layer's bias for the mean shift its quantization causes, last, on the "
        "calibration images (what a BN-folded model has instead of BN re-estimation: with CLE or bn='fold')."})
    calibration_batches: int = field(default=16, metadata={"help": "Calibration batches used."})
    include: list[str] | None = field(default=None, metadata={"help": "Regexes of the layers to quantize."})
    exclude: list[str] | None = field(default=None, metadata={"help": "Regexes of layers to leave in float."})
    version: int = field(default=1, metadata={"help": "Format version of this config."})

    def __post_init__(self) -> None:
        check_grid_fields(self)
        self.weight_range = check_choice("weight_range", self.weight_range, ScaleMethod)
        self.rounding = check_choice("rounding", self.rounding, Rounding)
        self.bn = check_choice("bn", self.bn, BNHandling)
        if not isinstance(self.bias_correction, bool):
            raise ValueError(f"`bias_correction` must be True or False, got {self.bias_correction!r}.")
        if not 50 < self.act_percentile <= 100:
            raise ValueError(f"`act_percentile` must be in (50, 100], got {self.act_percentile!r}.")
        if self.adaround is not None:
            self.adaround_config()  # validates the fields now rather than mid-run

    def adaround_config(self) -> AdaRoundConfig:
        """The [`~hf_r2.quant.ptq.adaround.AdaRoundConfig`] that `adaround` describes."""
        if isinstance(self.adaround, AdaRoundConfig):
            self.adaround = {f.name: getattr(self.adaround, f.name) for f in dataclasses.fields(AdaRoundConfig)}
        if self.adaround is not None and not isinstance(self.adaround, dict):
            raise ValueError(f"`adaround` must be a dict of AdaRoundConfig fields or `None`, got {self.adaround!r}.")
        return AdaRoundConfig.from_dict(self.adaround or {})

    @property
    def needs_data(self) -> bool:
        return self.a_bits is not None or self.rounding == Rounding.ADAROUND.value or self.bn != BNHandling.KEEP.value


@register_quantize_handler(PTQConfig)
def post_training_quantize_(
    model: nn.Module, config: PTQConfig | None = None, calibration_data: Iterable[Any] | None = None
) -> nn.Module:
    """Post-training quantization of `model`, in place: its target Conv/Linear layers become fake-quantized
    layers ([`~hf_r2.quant.layers.QuantConv2d`], ...) with the grids [`PTQConfig`] describes.

    ```python
    >>> from hf_r2.metrics import evaluate_accuracy
    >>> from hf_r2.quant import PTQConfig, post_training_quantize_
    >>> post_training_quantize_(model, PTQConfig(w_bits=2, a_bits=8, rounding="adaround"), train_loader)
    >>> evaluate_accuracy(model, eval_loader)["accuracy"]
    ```

    Args:
        model (`torch.nn.Module`):
            A timm or transformers image classifier (or any module with Conv/Linear layers).
        config ([`PTQConfig`], *optional*):
            Defaults to `PTQConfig()` (W2A8, MSE ranges, round-to-nearest, BN re-estimation).
        calibration_data (iterable of batches, *optional*):
            Batches as dicts with `"pixel_values"` (or `(images, labels)` pairs); the first
            `config.calibration_batches` are used. Needed for activations, AdaRound, BN folding and BN
            re-estimation.

    Returns:
        `torch.nn.Module`: `model`. [`~hf_r2.quant.export.save_low_bit`] saves the integer codes and scales.
    """
    config = PTQConfig() if config is None else config
    if not isinstance(config, PTQConfig):
        raise TypeError(f"`config` must be a `PTQConfig`, got {type(config).__name__}.")
    batches: list[Any] = []
    if config.needs_data:
        why = (
            f"`a_bits={config.a_bits}`"
            if config.a_bits is not None
            else f"`rounding={config.rounding!r}`"
            if config.rounding == Rounding.ADAROUND.value
            else f"`bn={config.bn!r}`"
        )
        batches = first_batches(calibration_data, config.calibration_batches, f"PTQ with {why}")
    if config.bn == BNHandling.FOLD.value:
        folded = fold_bn_(model, pixel_values(batches[0])[:2].to(model_device(model)))
        logger.info("Folded %d batch norms into their convs", len(folded))

    targets = find_target_modules(model, config.include, config.exclude)
    for i, (_, module) in enumerate(targets):
        w_bits = layer_bits(config.w_bits, config.first_last_bits, i, len(targets))
        weight_q = FakeQuantizer(
            w_bits, symmetric=True, per_channel=config.per_channel, channels=module.weight.shape[0]
        ).init_from(module.weight, config.weight_range)
        input_q = None
        a_bits = layer_bits(config.a_bits, config.first_last_bits, i, len(targets))
        if a_bits is not None:
            input_q = FakeQuantizer(
                a_bits,
                symmetric=False,
                activation=True,
                observer=config.act_observer,
                percentile=config.act_percentile,
            )
            input_q.enabled = False  # float inputs until calibrated (AdaRound and BN re-estimation run first)
        quantize_layer_(module, weight_q, input_q)

    if config.rounding == Rounding.ADAROUND.value:
        adaround_(model, batches, config.adaround_config())
    if config.bn == BNHandling.REESTIMATE.value:
        reestimate_bn_stats(model, batches, num_batches=None)
    if config.a_bits is not None:
        calibrate_activations_(model, batches)
        for _, module in quantized_layers(model):
            if module.input_quantizer is not None:
                module.input_quantizer.enabled = True
    if config.bias_correction:
        correct_bias_(model, batches, num_batches=len(batches))
    logger.info(
        "Quantized %d layers: W%d%s, %s, %s range, %s rounding, bn=%s%s",
        len(targets),
        config.w_bits,
        f"A{config.a_bits}" if config.a_bits else "",
        "per channel" if config.per_channel else "per tensor",
        config.weight_range,
        config.rounding,
        config.bn,
        ", biases corrected" if config.bias_correction else "",
    )
    return model
