"""Cross-layer equalization (CLE): `EqualizeConfig` and `equalize_` (its companion, bias correction, is in
`hf_r2.quant.ptq.bias_correction`).

"Data-Free Quantization Through Weight Equalization and Bias Correction", Nagel et al., 2019,
https://huggingface.co/papers/1906.04721 (sections 4.1, 4.2); AIMET and Brevitas (`brevitas.graph.equalize`) ship it.

Equalization. Two layers `y = W2 f(W1 x + b1) + b2` joined by a positive-homogeneous `f` (`f(x / s) = f(x) / s`
for `s > 0`: ReLU, LeakyReLU, PReLU, identity, pooling) compute the same function after

    W1[i] /= s_i,    b1[i] /= s_i,    W2[:, i] *= s_i        (i: output channel of W1 = input channel of W2)

and `s_i = sqrt(r1_i * r2_i) / r2_i`, with `r1_i = max |W1[i]|` and `r2_i = max |W2[:, i]|`, makes both ranges
`sqrt(r1_i * r2_i)` (section 4.1), so one channel with an outlier range no longer sets the per-tensor grid of either
layer. A depthwise conv takes part on both sides (its filter `i` is input and output channel `i`); chains
(pointwise -> depthwise -> pointwise) are equalized pair after pair until every `s_i` is within `tolerance` of 1.

ReLU6 is homogeneous only below its clip: `relu6(y / s) * s` clips at `6 s`. AIMET replaces every ReLU6 by a ReLU
first, which changes the model (and would not survive the low-bit export, which rebuilds the architecture). With
`relu6="bounded"`, a channel is rescaled only as far as its pre-activation maximum on the calibration data, `m_i`,
stays in the linear range: `s_i = 1` where `m_i > 6`, else `s_i >= m_i / 6`. The model is then unchanged on that
data (and wherever channels stay below the clip); with `relu6="skip"`, or without data, such pairs are left alone.
"""

from __future__ import annotations

import enum
import logging
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..._targets import TARGET_LAYER_TYPES
from ..._utils import JsonConfigMixin, check_choice, check_patterns, check_positive_int
from .._batches import first_batches, model_device, output_channels, pixel_values, run_logits
from ..api import register_quantize_handler
from .bn import fold_bn_

__all__ = ["EQUALIZE_CONFIG_NAME", "ReLU6Handling", "EqualizeConfig", "EqualizationPair", "find_equalization_pairs",
           "equalize_"]

logger = logging.getLogger(__name__)

EQUALIZE_CONFIG_NAME = "equalize_config.json"


class ReLU6Handling(str, enum.Enum):
    """Pairs joined by a ReLU6: equalized within the clip seen on calibration data, or left alone."""

    BOUNDED = "bounded"
    SKIP = "skip"


@dataclass
class EqualizeConfig(JsonConfigMixin):
    """Cross-layer equalization settings (see [`equalize_`]).

    > The equalization

    iterations (`int`, *optional*, defaults to `20`):
        Most sweeps over all pairs (a chain needs several; the paper iterates until the scales settle).
    tolerance (`float`, *optional*, defaults to `1e-4`):
        Stop once a sweep changes no scale by more than this factor (`|s_i - 1| <= tolerance`).
    fold_bn (`bool`, *optional*, defaults to `True`):
        Fold batch norms into the layers before them first ([`~hf_r2.quant.ptq.bn.fold_bn_`]; a BN joins no pair).
    relu6 (`str`, *optional*, defaults to `"bounded"`):
        `"bounded"`: equalize pairs through a ReLU6 within the clip seen on calibration data; `"skip"`: don't.

    > The data and the layers

    calibration_batches (`int`, *optional*, defaults to `4`):
        Batches of the calibration data that measure the pre-activation maxima for `relu6="bounded"`.
    include (`list[str]`, *optional*):
        Regular expressions over module names; only matching layers take part.
    exclude (`list[str]`, *optional*):
        Regular expressions over module names of layers to leave alone.
    """

    config_name: ClassVar[str] = EQUALIZE_CONFIG_NAME

    # the equalization
    iterations: int = field(default=20, metadata={"help": "Most sweeps over all pairs."})
    tolerance: float = field(default=1e-4, metadata={"help": "Stop once no scale changes by more than this."})
    fold_bn: bool = field(default=True, metadata={"help": "Fold batch norms into the layers before them first."})
    relu6: str = field(default="bounded", metadata={"help": "'bounded' (within the clip seen on data) or 'skip'."})
    # the data and the layers
    calibration_batches: int = field(default=4, metadata={"help": "Batches that measure pre-activation maxima."})
    include: list[str] | None = field(default=None, metadata={"help": "Regexes of the layers that take part."})
    exclude: list[str] | None = field(default=None, metadata={"help": "Regexes of layers to leave alone."})
    version: int = field(default=1, metadata={"help": "Format version of this config."})

    def __post_init__(self) -> None:
        for name in ("iterations", "calibration_batches"):
            check_positive_int(name, getattr(self, name))
        if isinstance(self.tolerance, bool) or not isinstance(self.tolerance, (int, float)) or self.tolerance <= 0:
            raise ValueError(f"`tolerance` must be a positive number, got {self.tolerance!r}.")
        self.relu6 = check_choice("relu6", self.relu6, ReLU6Handling)
        self.include = check_patterns("include", self.include)
        self.exclude = check_patterns("exclude", self.exclude)


class EqualizationPair(NamedTuple):
    """Two layers joined by positive-homogeneous operations (`via`, autograd node names joined by `-`, `""` for
    none): `first`'s output channel `i` is `second`'s input channel `i`; `clip` is a ReLU6's clip on the way."""

    first: str
    second: str
    via: str
    clip: float | None


# ---- running the model --------------------------------------------------------------------------------------------


# ---- finding the pairs --------------------------------------------------------------------------------------------

# autograd nodes `f` with `f(x / s) = f(x) / s` per channel (s > 0), by name without the `Backward<n>` suffix
_ELEMENTWISE = {"Relu", "LeakyRelu", "PreluKernel", "Clone", "Hardtanh"}  # Hardtanh: ReLU6, checked below
_SPATIAL = {  # reduce or pad the dims after the channel dim of a convolution's output, channel by channel
    "MaxPool1DWithIndices", "MaxPool2DWithIndices", "MaxPool3DWithIndices", "AvgPool2D", "AvgPool3D", "Mean",
    "AdaptiveAvgPool2D", "AdaptiveAvgPool3D", "AdaptiveMaxPool2D", "AdaptiveMaxPool3D", "ConstantPadNd",
}  # fmt: skip
_VIEWS = {"View", "UnsafeView", "ReshapeAlias", "Squeeze"}  # (N, C, 1, 1) -> (N, C)


def _kind(node: Any) -> str:
    return re.sub(r"Backward\d*$", "", node.name())


def _plain_forward(module: nn.Module) -> bool:
    """`module` computes `W x + b` by torch's (or timm's `Conv2dSame`) forward with a plain weight: weight
    standardisation, a parametrization or a quantizer would not follow a rescaled weight."""
    from timm.layers import Conv2dSame

    known = {nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward, nn.Linear.forward, Conv2dSame.forward}
    quantizer = getattr(module, "weight_quantizer", None)
    return type(module).forward in known and not parametrize.is_parametrized(module) and quantizer is None


def _consumers(output: Tensor) -> dict[tuple[Any, int], int]:
    """How many edges of the autograd graph behind `output` use each node output `(node, index)`."""
    counts: dict[tuple[Any, int], int] = {}
    seen, stack = {output.grad_fn}, [output.grad_fn] if output.grad_fn is not None else []
    while stack:
        for child, index in stack.pop().next_functions:
            if child is not None:
                counts[(child, index)] = counts.get((child, index), 0) + 1
                if child not in seen:
                    seen.add(child)
                    stack.append(child)
    return counts


def _between(node: Any, index: int, first_of: dict, counts: dict, relu6: str) -> tuple[Any, list, str, Any]:
    """Walk back from a layer's input to the layer output it comes from: `(layer, path, why not, ReLU6 clip)`."""
    path = []
    while True:
        if node is None:
            return None, path, "its input is the model input", None
        if counts.get((node, index), 0) != 1:
            return None, path, "the tensor between them is used elsewhere too (a residual or a branch)", None
        if node in first_of:
            break
        if _kind(node) not in _ELEMENTWISE | _SPATIAL | _VIEWS:
            return None, path, f"{node.name()} between them is not positive-homogeneous", None
        path.insert(0, node)
        node, index = node.next_functions[0]
    first, clip, flat = first_of[node], None, False
    conv = not isinstance(first, nn.Linear)
    for node in path:
        kind, why = _kind(node), ""
        if kind == "Hardtanh":
            low, clip = float(node._saved_min_val), min(float(node._saved_max_val), clip or math.inf)
            if low != 0 or clip <= 0:
                why = f"Hardtanh({low}, {clip}) is not positive-homogeneous"
            elif relu6 == ReLU6Handling.SKIP.value:
                why = "a ReLU6 joins them (relu6='skip')"
        elif kind in _SPATIAL:
            if not conv or flat:
                why = f"{node.name()} on a Linear output may mix channels"
            elif kind == "Mean":
                rank = len(node._saved_self_sym_sizes)
                if {(d if d < 2**63 else d - 2**64) % rank for d in node._saved_dim} & {0, 1}:
                    why = "a mean over the channels joins them"
                flat = not node._saved_keepdim
        elif kind in _VIEWS:
            if not conv or any(int(size) != 1 for size in node._saved_self_sym_sizes[2:]):
                why = f"{node.name()} reshapes the channels"
            flat = True
        if why:
            return first, path, why, None
    return first, path, "", clip


def find_equalization_pairs(
    model: nn.Module,
    example_inputs: Tensor | Any,
    relu6: str = "bounded",
    include: list[str] | None = None,
    exclude: list[str] | None = None,
) -> list[EqualizationPair]:
    """The pairs of Conv/Linear layers of `model` that [`equalize_`] can rescale, in forward order.

    One forward pass on `example_inputs` (eval mode, restored after) with a gradient-tracking input: the autograd
    graph shows what lies between a layer's output and another layer's input. This works on every model that runs,
    where `torch.fx` tracing fails on many timm and transformers models and the module order misses residual
    branches. `(first, second)` is a pair when every node between them is positive-homogeneous per channel (ReLU,
    LeakyReLU, PReLU, ReLU6 as `relu6` says; on a conv output also pooling, zero padding, a flatten of
    `(N, C, 1, 1)`), nothing else uses the tensors on the way, both layers run once with a plain Conv/Linear forward
    and no quantizer, and the channel counts match. The reasons for the others are logged at DEBUG level.

    Args:
        model (`torch.nn.Module`):
            A timm or transformers model (run through [`~hf_r2.models.forward_logits`]).
        example_inputs (`torch.Tensor` or batch):
            Images for the detection forward (a batch dict or `(images, labels)` pair works too).
        relu6 (`str`, *optional*, defaults to `"bounded"`):
            `"skip"` leaves out pairs joined by a ReLU6.
        include (`list[str]`, *optional*):
            Regular expressions; both layers of a pair must match one.
        exclude (`list[str]`, *optional*):
            Regular expressions; a pair with a matching layer is left out.

    Returns:
        `list[EqualizationPair]`: `(first, second, via, clip)` per pair.
    """
    relu6 = check_choice("relu6", relu6, ReLU6Handling)
    names = {m: n for n, m in model.named_modules() if isinstance(m, TARGET_LAYER_TYPES)}
    calls: dict[nn.Module, int] = {}
    first_of: dict[Any, nn.Module] = {}  # the autograd node of a layer's output -> the layer
    inputs: dict[nn.Module, tuple[Any, int]] = {}

    def pre_hook(module: nn.Module, args: Any) -> None:
        calls[module] = calls.get(module, 0) + 1
        if args and isinstance(args[0], Tensor):
            inputs[module] = (args[0].grad_fn, args[0].output_nr)

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, Tensor) and output.grad_fn is not None:
            first_of[output.grad_fn] = module

    x = pixel_values(example_inputs).to(model_device(model)).detach().clone().requires_grad_(True)
    logits = run_logits(model, [x], dict.fromkeys(names, hook), dict.fromkeys(names, pre_hook), grad=True)[0]
    counts = _consumers(logits)

    def selected(module: nn.Module) -> bool:
        name = names[module]
        return not any(re.search(p, name) for p in exclude or []) and any(re.search(p, name) for p in include or [""])

    pairs = []
    for second, (node, index) in inputs.items():
        first, path, why, clip = _between(node, index, first_of, counts, relu6)
        if first is None:
            logger.debug("No equalization pair ends at %s: %s", names[second], why)
            continue
        checks = [
            (calls.get(first) == 1 and calls.get(second) == 1, "a layer runs more than once per forward (shared)"),
            (_plain_forward(first) and _plain_forward(second), "a layer has its own forward or a quantizer"),
            (first.weight.shape[0] == second.weight.shape[1] * getattr(second, "groups", 1), "channel counts differ"),
            (selected(first) and selected(second), "not selected by include / exclude"),
        ]
        why = why or next((message for ok, message in checks if not ok), "")
        if why:
            logger.debug("Not equalizing %s -> %s: %s", names[first], names[second], why)
        else:
            pairs.append(EqualizationPair(names[first], names[second], "-".join(_kind(n) for n in path), clip))
    return pairs


# ---- rescaling ----------------------------------------------------------------------------------------------------


def _grouped(layer: nn.Module, weight: Tensor) -> Tensor:
    """The weight as `(groups, out / groups, in / groups, -1)`: input channel `i` is `[i // k, :, i % k]`."""
    groups = 1 if isinstance(layer, nn.Linear) else layer.groups
    return weight.reshape(groups, weight.shape[0] // groups, weight.shape[1], -1)


def _scales(first: nn.Module, second: nn.Module) -> Tensor:
    """`s_i = sqrt(r1_i * r2_i) / r2_i` (1 where a range is 0), `r1_i = max |W1[i]|`, `r2_i = max |W2[:, i]|`."""
    r1 = first.weight.detach().double().abs().flatten(1).amax(1)
    r2 = _grouped(second, second.weight.detach().double()).abs().amax(dim=(1, 3)).reshape(-1)
    return torch.where((r1 > 0) & (r2 > 0), (r1 / r2.clamp_min(1e-300)).sqrt(), torch.ones_like(r1))


@torch.no_grad()
def _rescale_(first: nn.Module, second: nn.Module, s: Tensor) -> None:
    """`W1[i] /= s_i`, `b1[i] /= s_i`, `W2[:, i] *= s_i` (computed in float64)."""
    w1, w2 = first.weight, second.weight
    w1.copy_(w1.double() / s.reshape(-1, *[1] * (w1.dim() - 1)))
    if first.bias is not None:
        first.bias.copy_(first.bias.double() / s)
    grouped = _grouped(second, w2.double())
    w2.copy_((grouped * s.reshape(grouped.shape[0], 1, -1, 1)).reshape(w2.shape))


@register_quantize_handler(EqualizeConfig)
def equalize_(
    model: nn.Module,
    config: EqualizeConfig | None = None,
    calibration_data: Iterable[Any] | None = None,
    *,
    example_inputs: Tensor | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Cross-layer equalization of `model`, in place: batch norms folded, then the pairs of
    [`find_equalization_pairs`] rescaled with `s_i = sqrt(r1_i * r2_i) / r2_i`, sweep after sweep, until the
    ranges agree. In eval mode the model computes the same function up to float rounding (through a ReLU6: on the
    calibration data, see the module docstring); the change of the output on the example images is logged, as a
    warning above `1e-3` (relative). Run it before quantizing.

    ```python
    >>> from hf_r2.quant import EqualizeConfig, PTQConfig, equalize_, post_training_quantize_
    >>> equalize_(model, EqualizeConfig(), calibration_data=train_loader)
    >>> post_training_quantize_(model, PTQConfig(w_bits=4, per_channel=False), train_loader)
    ```

    Args:
        model (`torch.nn.Module`):
            A timm or transformers model (or any module taking one image tensor).
        config ([`EqualizeConfig`], *optional*):
            Defaults to `EqualizeConfig()`; keyword arguments replace its fields.
        calibration_data (iterable of batches, *optional*):
            Batches as dicts with `"pixel_values"` (or `(images, labels)` pairs); the first `calibration_batches`
            bound the ReLU6 pairs (left alone without data).
        example_inputs (`torch.Tensor`, *optional*):
            Images for the detection forward (random ones do), by default the first calibration batch.

    Returns:
        `torch.nn.Module`: `model`.
    """
    config = EqualizeConfig.resolve(config, kwargs)
    batches = [] if calibration_data is None else first_batches(calibration_data, config.calibration_batches, "CLE")
    if example_inputs is None and not batches:
        raise ValueError("`equalize_` finds the layer pairs with one forward pass: pass `calibration_data` or, "
                         "data-free, `example_inputs` (e.g. `example_inputs=torch.randn(1, 3, 224, 224)`).")
    images = pixel_values(batches[0] if example_inputs is None else example_inputs).to(model_device(model))
    if config.fold_bn:
        fold_bn_(model, images[:2])
    pairs = find_equalization_pairs(model, images, config.relu6, config.include, config.exclude)
    if not batches and any(p.clip is not None for p in pairs):
        logger.info("No calibration data: pairs through a ReLU6 are left alone")
        pairs = [p for p in pairs if p.clip is None]
    layers = {name: model.get_submodule(name) for p in pairs for name in (p.first, p.second)}
    maxima: dict[nn.Module, Tensor] = {}  # per output channel of a layer before a ReLU6, over the batches

    def keep_max(module: nn.Module, args: Any, output: Tensor) -> None:
        top = output_channels(module, output).amax(1)
        maxima[module] = torch.maximum(maxima[module], top) if module in maxima else top

    before = run_logits(model, [images], {})[0].double()
    run_logits(model, batches, {layers[p.first]: keep_max for p in pairs if p.clip is not None})
    for sweeps in range(1, config.iterations + 1):
        change = 0.0
        for pair in pairs:
            first, second = layers[pair.first], layers[pair.second]
            s = _scales(first, second)
            if pair.clip is not None:  # stay in ReLU6's linear range on the data: m_i / s_i <= clip, or s_i = 1
                m = maxima[first]
                s = torch.where(m > pair.clip, torch.ones_like(s), torch.maximum(s, m / pair.clip))
                maxima[first] = m / s
            _rescale_(first, second, s)
            change = max(change, float((s - 1).abs().max()))
        if change <= config.tolerance:
            break
    deviation = float((run_logits(model, [images], {})[0].double() - before).norm() / before.norm().clamp_min(1e-30))
    log = logger.warning if not deviation <= 1e-3 else logger.info  # NaN (a NaN output) warns too
    log("Equalized %d layer pairs in %d sweeps; the output changed by %.1e (relative)", len(pairs), sweeps, deviation)
    return model
