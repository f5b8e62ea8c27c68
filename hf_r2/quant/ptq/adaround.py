"""AdaRound: learn, layer by layer, whether each weight rounds up or down, from a few calibration batches.

Rounding every weight to the nearest grid level is not what minimises a layer's output error. AdaRound (Nagel et
al., "Up or Down? Adaptive Rounding for Post-Training Quantization", https://huggingface.co/papers/2004.10568)
keeps each weight's grid scale `s` and zero point `z` fixed and learns only the rounding direction. With
`x = W / s + z`, the soft-quantized weight is

    W~ = s * (clamp(floor(x) + h(V), 0, 2^b - 1) - z),    h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)

(a rectified sigmoid, `zeta = 1.1`, `gamma = -0.1`), with `V` initialised so that `h(V) = x - floor(x)`. AdaRound
minimises, with Adam on `V` alone,

    mean_rows || W~ x_q - W x_f ||^2  +  lambda * sum (1 - |2 h(V) - 1|^beta)

where `x_q` is the layer's input in the model whose earlier layers are already rounded (through the layer's
`input_quantizer` if it has one), `x_f` its input in the float model, and the regulariser (off for the first
`warmup` fraction of the iterations, then with `beta` annealed from `beta_start` to `beta_end` by a cosine, as in
the authors' implementation in AIMET) drives every `h(V)` to 0 or 1. At the end each weight is rounded up where
`h(V) >= 0.5` and down otherwise, so it lands on its grid, at the level just below or just above `W / s + z`
(round-to-nearest is kept for a layer where that does better on the cached rows, as it can after too few steps).

A row is one output position: one token of a Linear layer, one spatial position of one image of a convolution
(whose input patch is gathered as `unfold` would). Up to `num_samples` rows per layer, drawn uniformly from all the
calibration batches, are cached, which bounds the memory whatever the image size.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..._targets import TARGET_LAYER_TYPES
from ..._utils import JsonConfigMixin, check_positive_int
from ...models import forward_logits
from .._batches import image_batches, model_device
from ..api import register_quantize_handler
from ._layer_rows import UnsupportedLayer, apply_weight, cache_rows, grouped_weight
from ._progress import UnitProgress

# the rounding maths (the last four) is shared with block reconstruction (block_reconstruction.py)
__all__ = ["ADAROUND_CONFIG_NAME", "AdaRoundConfig", "adaround", "adaround_", "check_rounding_fields",
           "rectified_sigmoid", "inverse_rectified_sigmoid", "annealed_beta", "weight_qparams"]

logger = logging.getLogger(__name__)

ADAROUND_CONFIG_NAME = "adaround_config.json"

# Stretch of the rectified sigmoid (the paper's zeta and gamma).
_ZETA, _GAMMA = 1.1, -0.1


@dataclass
class AdaRoundConfig(JsonConfigMixin):
    """Configuration of AdaRound (see [`adaround_`]).

    The defaults are scaled down from the paper's (10,000 iterations at learning rate 1e-3, batches of 32 images)
    to run on a CPU in seconds per layer; the larger learning rate makes up for the fewer steps.

    > Parameters of the optimisation

    iters (`int`, *optional*, defaults to `1000`):
        Adam steps per layer.
    lr (`float`, *optional*, defaults to `1e-2`):
        Learning rate of Adam on the rounding variables `V`.
    batch_size (`int`, *optional*, defaults to `256`):
        Rows (output positions: tokens, or spatial positions of one image) per optimisation step, drawn with
        replacement from the cached rows.

    > Parameters of the rounding regulariser

    reg_weight (`float`, *optional*, defaults to `0.01`):
        `lambda`, the weight of `sum (1 - |2 h(V) - 1|^beta)` in the loss (0 turns it off; the final rounding is
        then `h(V) >= 0.5`).
    beta_start (`float`, *optional*, defaults to `20.0`):
        The exponent `beta` when the regulariser starts (a high `beta` leaves most `h` free to move).
    beta_end (`float`, *optional*, defaults to `2.0`):
        The exponent `beta` at the last step (a low `beta` pushes every `h` to 0 or 1); at most `beta_start`.
    warmup (`float`, *optional*, defaults to `0.2`):
        Fraction of the iterations, in `[0, 1)`, run on the reconstruction loss alone before the regulariser starts.

    > Parameters of the calibration data

    num_samples (`int`, *optional*, defaults to `8192`):
        Most rows cached per layer (inputs and float targets), drawn uniformly from all the calibration batches.
        The memory is about `num_samples * (in_channels * kernel_size + out_channels)` floats per layer.
    num_batches (`int`, *optional*):
        Use only the first `num_batches` calibration batches; `None` uses them all.
    seed (`int`, *optional*, defaults to `0`):
        Seed of the row sampling and of the minibatch draws.
    """

    config_name: ClassVar[str] = ADAROUND_CONFIG_NAME

    # the optimisation
    iters: int = field(default=1000, metadata={"help": "Adam steps per layer."})
    lr: float = field(default=1e-2, metadata={"help": "Learning rate of Adam on the rounding variables V."})
    batch_size: int = field(
        default=256, metadata={"help": "Rows (tokens / spatial positions of one image) per optimisation step."}
    )
    # the rounding regulariser
    reg_weight: float = field(
        default=0.01, metadata={"help": "lambda, the weight of the rounding regulariser (0 turns it off)."}
    )
    beta_start: float = field(default=20.0, metadata={"help": "The regulariser's exponent beta when it starts."})
    beta_end: float = field(default=2.0, metadata={"help": "The regulariser's exponent beta at the last step."})
    warmup: float = field(
        default=0.2, metadata={"help": "Fraction of the iterations, in [0, 1), without the regulariser."}
    )
    # the calibration data
    num_samples: int = field(default=8192, metadata={"help": "Most rows (inputs and float targets) cached per layer."})
    num_batches: int | None = field(
        default=None, metadata={"help": "Use only the first num_batches calibration batches (default: all)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the row sampling and the minibatch draws."})
    # bookkeeping
    version: int = field(default=1, metadata={"help": "Format version of this config."})

    def __post_init__(self) -> None:
        for name in ("iters", "batch_size", "num_samples"):
            check_positive_int(name, getattr(self, name))
        check_positive_int("num_batches", self.num_batches, allow_none=True)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"`seed` must be an integer, got {self.seed!r}.")
        check_rounding_fields(self)
        if self.lr <= 0:
            raise ValueError(f"`lr` must be positive, got {self.lr!r}.")


def check_rounding_fields(config: Any, numbers: Sequence[str] = ("lr",)) -> None:
    """Check (and make floats of) the learnt-rounding fields AdaRound and block reconstruction share: the finite
    numbers `numbers` plus `reg_weight >= 0`, the annealed `beta_start >= beta_end > 0` and `warmup` in [0, 1)."""
    for name in (*numbers, "reg_weight", "beta_start", "beta_end", "warmup"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
        setattr(config, name, float(value))
    if config.reg_weight < 0:
        raise ValueError(f"`reg_weight` must be >= 0 (0 turns the regulariser off), got {config.reg_weight!r}.")
    if config.beta_end <= 0 or config.beta_start < config.beta_end:
        raise ValueError(
            f"`beta_start` and `beta_end` must satisfy `beta_start >= beta_end > 0` (beta is annealed down), "
            f"got beta_start={config.beta_start!r}, beta_end={config.beta_end!r}; the papers use 20 and 2."
        )
    if not 0 <= config.warmup < 1:
        raise ValueError(f"`warmup` is a fraction of `iters` and must be in [0, 1), got {config.warmup!r}; e.g. 0.2.")


# --------------------------------------------------------------------------------------------------------------
# the rounding function and the weight grid
# --------------------------------------------------------------------------------------------------------------


def rectified_sigmoid(v: Tensor) -> Tensor:
    """`h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)`."""
    return torch.clamp(torch.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA, 0, 1)


def inverse_rectified_sigmoid(h: Tensor) -> Tensor:
    """`V` with `h(V) = h` for `h` in `[0, 1)` (inside the stretched sigmoid's range, so always finite)."""
    return -torch.log((_ZETA - _GAMMA) / (h - _GAMMA) - 1)


def annealed_beta(config: Any, step: int) -> float | None:
    """The regulariser's exponent at `step`, or `None` during the warm-up (cosine from `beta_start` to `beta_end`);
    `config` is any config with `iters`, `warmup`, `beta_start` and `beta_end` (AdaRound's, block reconstruction's)."""
    start = int(config.warmup * config.iters)
    if step < start:
        return None
    rel = (step - start) / max(1, config.iters - 1 - start)
    return config.beta_end + 0.5 * (config.beta_start - config.beta_end) * (1 + math.cos(math.pi * min(rel, 1.0)))


def weight_qparams(module: nn.Module) -> tuple[Tensor, Tensor, int, int]:
    """`(scale, zero_point, quant_min, quant_max)` of `module.weight_quantizer`, detached, with the scale and zero
    point shaped to broadcast against the weight (a quantizer may store them flat: `(C,)` or `(1,)`) and the scale
    taken as `|scale|` (as `FakeQuantizer` uses it)."""
    quantizer = module.weight_quantizer
    missing = [a for a in ("scale", "zero_point", "bits") if not hasattr(quantizer, a)]
    if missing:
        raise ValueError(
            f"`weight_quantizer` of {type(module).__name__} lacks {missing}: AdaRound needs a quantizer with `scale`, "
            "`zero_point` and `bits` (as `hf_r2.quant.layers.FakeQuantizer` has)."
        )
    weight = module.weight
    scale = torch.as_tensor(quantizer.scale).detach().abs()
    zero_point = torch.as_tensor(quantizer.zero_point).detach().to(scale.dtype)

    def shaped(t: Tensor) -> Tensor:
        if t.dim() == weight.dim():
            return t
        if t.numel() == 1:
            return t.reshape([1] * weight.dim())
        if t.numel() == weight.shape[0]:
            return t.reshape(-1, *([1] * (weight.dim() - 1)))
        raise ValueError(
            f"The weight quantizer of {type(module).__name__} has qparams of shape {tuple(t.shape)}, which fit "
            f"neither per tensor nor per output channel of a weight of shape {tuple(weight.shape)}."
        )

    quant_min = int(getattr(quantizer, "quant_min", 0))
    quant_max = int(getattr(quantizer, "quant_max", 2 ** int(quantizer.bits) - 1))
    return shaped(scale), shaped(zero_point), quant_min, quant_max


# --------------------------------------------------------------------------------------------------------------
# one layer
# --------------------------------------------------------------------------------------------------------------


def _optimize_rounding(
    module: nn.Module, inputs: Tensor, targets: Tensor, config: AdaRoundConfig, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Learn the rounding of `module.weight` on cached rows; returns `(codes, h)`: the integer codes of the rounded
    weight (`floor(W / s + z)` plus 0 or 1, clamped to the grid) and the final soft `h(V)`."""
    scale, zero_point, quant_min, quant_max = weight_qparams(module)
    weight = module.weight.detach().to(scale.dtype)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    x = weight / safe + zero_point
    floor = torch.floor(x)
    v = inverse_rectified_sigmoid(x - floor).requires_grad_(True)
    optimizer = torch.optim.Adam([v], lr=config.lr)
    inputs, targets = inputs.to(scale.dtype), targets.to(scale.dtype)
    num_rows = inputs.shape[0]
    with torch.enable_grad():
        for step in range(config.iters):
            idx = torch.randint(num_rows, (config.batch_size,), generator=generator).to(inputs.device)
            h = rectified_sigmoid(v)
            soft = scale * (torch.clamp(floor + h, quant_min, quant_max) - zero_point)
            out = apply_weight(inputs[idx], grouped_weight(module, soft))
            loss = (out - targets[idx]).square().sum((1, 2)).mean()
            beta = annealed_beta(config, step)
            if beta is not None and config.reg_weight > 0:
                loss = loss + config.reg_weight * (1 - (2 * h - 1).abs().pow(beta)).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    h = rectified_sigmoid(v.detach())
    codes = torch.clamp(floor + (h >= 0.5).to(floor.dtype), quant_min, quant_max)
    return codes, h


def _reconstruction_error(module: nn.Module, weight: Tensor, inputs: Tensor, targets: Tensor) -> float:
    """`mean_rows || W x_q - W_f x_f ||^2` of a weight on the cached rows."""
    err = apply_weight(inputs, grouped_weight(module, weight.to(inputs.dtype))) - targets
    return err.double().square().sum((1, 2)).mean().item()


def _round_layer(
    model: nn.Module,
    float_model: nn.Module,
    name: str,
    batches: Iterable[Tensor],
    config: AdaRoundConfig,
    generator: torch.Generator,
) -> dict[str, float]:
    """AdaRound one layer of `model` in place; returns its reconstruction errors (AdaRound's, round-to-nearest's),
    the share of weights rounded the other way than to nearest, and the number of cached rows."""
    module = model.get_submodule(name)
    cache = cache_rows(model, float_model, name, batches, config.num_samples, generator)
    codes, _ = _optimize_rounding(module, cache.inputs, cache.targets, config, generator)
    scale, zero_point, quant_min, quant_max = weight_qparams(module)
    with torch.no_grad():
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        x = module.weight.detach().to(scale.dtype) / safe + zero_point
        nearest = torch.clamp(torch.round(x), quant_min, quant_max)
        # `(q - z) * s`: the very expression fake_quantize_affine ends with, so the weight quantizer returns it as is
        errors = {
            key: _reconstruction_error(module, (q - zero_point) * scale, cache.inputs, cache.targets)
            for key, q in (("adaround_error", codes), ("nearest_error", nearest))
        }
        stats = {**errors, "flipped": (codes != nearest).double().mean().item(), "rows": float(cache.inputs.shape[0])}
        if not errors["adaround_error"] <= errors["nearest_error"]:  # a NaN error (diverged) counts as worse
            # too few steps (or rows) to beat rounding to nearest on its own objective: keep that instead
            codes, stats["flipped"] = nearest, 0.0
        module.weight.copy_(((codes - zero_point) * scale).to(module.weight.dtype))
    return stats


# --------------------------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------------------------


def _has_quantizer(module: nn.Module) -> bool:
    quantizer = getattr(module, "weight_quantizer", None)
    return quantizer is not None and getattr(quantizer, "enabled", True)


def _select_layers(model: nn.Module, layers: Sequence[str] | None) -> list[str]:
    if layers is None:
        return [n for n, m in model.named_modules() if isinstance(m, TARGET_LAYER_TYPES) and _has_quantizer(m)]
    if isinstance(layers, str):
        layers = [layers]
    names = list(layers)
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"`layers` names {name!r}, which is not a submodule of the model.") from None
        if not isinstance(module, TARGET_LAYER_TYPES) or not _has_quantizer(module):
            raise ValueError(
                f"`layers` names {name!r}, a {type(module).__name__} without an enabled `weight_quantizer`: AdaRound "
                "rounds Conv1d/2d/3d and Linear layers that carry one (quantize the model first)."
            )
    return names


def _forward_order(model: nn.Module, names: list[str], pixel_values: Tensor) -> list[str]:
    """`names` in the order their modules first run in a forward pass (modules that do not run are dropped)."""
    order: list[str] = []
    handles = []
    for name in names:
        module = model.get_submodule(name)

        def hook(mod: nn.Module, args: Any, name: str = name) -> None:
            if name not in order:
                order.append(name)

        handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            forward_logits(model, pixel_values)
    finally:
        for handle in handles:
            handle.remove()
    missing = [n for n in names if n not in order]
    if missing:
        logger.warning("AdaRound skips %d layers that do not run in a forward pass: %s", len(missing), missing)
    return order


def adaround_(
    model: nn.Module,
    calibration_data: Iterable[Any],
    config: AdaRoundConfig | None = None,
    layers: Sequence[str] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Round the weights of `model`'s quantized layers with AdaRound, in place, and return `model`.

    The layers are the Conv1d/2d/3d (depthwise included) and Linear modules with an enabled `weight_quantizer`, as
    [`hf_r2.quant.layers`] builds them: an object with `scale` and `zero_point` (float tensors, per output channel
    or per tensor: flat `(C,)` / `(1,)` or shaped to broadcast against the weight; `|scale|` is used), `bits`, and
    optionally `quant_min` / `quant_max` (default `0` and `2^bits - 1`). A layer's
    optional `input_quantizer` is applied to its cached inputs, as its forward applies it. The layers are rounded
    one at a time in the order they run: each learns its rounding (see the module docstring) on its inputs in the
    model whose earlier layers are already rounded, against the outputs of a float copy of the model (a deep copy,
    taken first, with every weight and input quantizer removed). Each weight then holds its dequantized grid value
    `(q - z) * s`, with `q` its code rounded down or up, so the layer's `weight_quantizer` returns it unchanged;
    scales and zero points are not changed. Where the learnt rounding does worse on the cached rows than rounding
    to nearest (too few iterations), the layer is rounded to nearest instead. A layer whose output is not the
    convolution / matrix product of its weight and input (a custom forward, such as timm's weight-standardised
    `StdConv2d`; timm's `Conv2dSame` is handled) is detected on the first batch and skipped with a warning.
    Each layer ends with one progress line (what it gave, `layer 3/52`, time spent and left): an INFO record where
    hf-r2's are shown, else on stderr (`HF_R2_DISABLE_PROGRESS_BARS=1` turns that off; see `ptq/_progress.py`).

    Args:
        model (`torch.nn.Module`):
            A timm or transformers model (run through [`~hf_r2.models.forward_logits`]) with quantized layers. It
            runs in eval mode (the train/eval mode of every module is restored at the end).
        calibration_data (iterable of batches):
            Batches as dicts with `"pixel_values"` (the hf-r2 convention), `(images, labels)` pairs or image tensors,
            moved to the model's device. It is read once per layer (an iterator is first read into a list).
        config ([`AdaRoundConfig`], *optional*):
            The settings; keyword arguments build one if omitted, or override its fields if given
            (`adaround_(model, data, iters=200)`).
        layers (`list[str]`, *optional*):
            Names of the layers to round; `None` rounds every quantized layer.

    Returns:
        `torch.nn.Module`: `model` itself.

    ```python
    >>> from hf_r2.quant import AdaRoundConfig, adaround_
    >>> calibration = [next(iter(train_loader)) for _ in range(8)]
    >>> adaround_(qmodel, calibration, AdaRoundConfig(iters=1000))
    ```
    """
    config = AdaRoundConfig.resolve(config, kwargs)
    names = _select_layers(model, layers)
    if not names:
        logger.warning(
            "AdaRound found no layer with a `weight_quantizer` in %s: nothing to round", type(model).__name__
        )
        return model
    device = model_device(model)
    batches, first = image_batches(calibration_data, config.num_batches, device)
    modes = [(m, m.training) for m in model.modules()]
    generator = torch.Generator().manual_seed(config.seed)
    try:
        model.eval()
        float_model = copy.deepcopy(model)
        for module in float_model.modules():
            for attr in ("weight_quantizer", "input_quantizer"):
                if getattr(module, attr, None) is not None:
                    setattr(module, attr, None)
        names = _forward_order(model, names, first)
        with UnitProgress(logger, "AdaRound", len(names)) as progress:
            for name in names:
                try:
                    stats = _round_layer(model, float_model, name, batches, config, generator)
                except UnsupportedLayer as err:
                    logger.warning("AdaRound skips %s (%s): %s", name, type(model.get_submodule(name)).__name__, err)
                    progress.step()
                    continue
                kept = ", kept" if not stats["adaround_error"] <= stats["nearest_error"] else ""
                progress.step(
                    f"AdaRound {name}: reconstruction error {stats['adaround_error']:.4g} (round to nearest: "
                    f"{stats['nearest_error']:.4g}{kept}), {100 * stats['flipped']:.1f}% of the weights flipped, "
                    f"{stats['rows']:.0f} rows"
                )
    finally:
        for module, training in modes:
            module.training = training
    return model


@register_quantize_handler(AdaRoundConfig)
def _adaround_handler(model: nn.Module, config: AdaRoundConfig, calibration_data: Iterable[Any] | None) -> nn.Module:
    """`quantize_(model, AdaRoundConfig(...), calibration_data)`: [`adaround_`] on a model already quantized."""
    if calibration_data is None:
        raise ValueError("AdaRound learns each layer's rounding on `calibration_data`: pass it (an iterable of "
                         "batches, e.g. a DataLoader of training images) to `quantize_`.")
    return adaround_(model, calibration_data, config)


def adaround(
    model: nn.Module,
    calibration_data: Iterable[Any],
    config: AdaRoundConfig | None = None,
    layers: Sequence[str] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """A deep copy of `model` whose quantized layers are rounded with AdaRound (see [`adaround_`]); `model` is left
    untouched."""
    return adaround_(copy.deepcopy(model), calibration_data, config, layers, **kwargs)
