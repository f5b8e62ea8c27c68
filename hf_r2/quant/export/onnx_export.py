"""ONNX export: [`export_onnx`] writes an hf-r2 model as a file ONNX Runtime (or any ONNX backend) runs, computing
what hf-r2 measured, [`compare_onnx`] checks that it does, and [`onnx_accuracy`] counts the file's top-1 in ONNX
Runtime on labelled images (the one place hf-r2 does: `hf-r2 export --dataset` and `hf-r2 reproduce` both call it).

- A PTQ / QAT model ([`~hf_r2.quant.layers`], BN folded or not) becomes a standard QDQ graph: each quantized
  layer's weight is a `DequantizeLinear` of integer codes with hf-r2's scales, and its input passes through
  `QuantizeLinear` / `DequantizeLinear` with the calibrated (or learnt) scale and zero point.
- A palettized model ([`~hf_r2.quant.palettize_`]) stores each weight as its palette (float32) and `b`-bit indices,
  rebuilt by `Cast` + `GatherElements` + `Reshape` (`palette_lookup=False` stores the float weights instead).
- A float model is exported as it is (the control).

The graph is traced by PyTorch's TorchScript exporter (`torch.onnx.export(..., dynamo=False)`, opsets up to 20;
the dynamo exporter would need `onnxscript` and cannot take the placeholders below). Each low-bit tensor first
enters the trace as a placeholder node (`hf_r2::Weight` / `hf_r2::Input`, an autograd function whose forward is
hf-r2's own computation); after the export the graph is converted to the requested opset (`onnx.version_converter`)
and each placeholder is rewritten into standard nodes whose initializers are the exact integers and scales.

Weights. hf-r2's weight grids are mid-rise, `W = (q - z) s` with codes `q in [0, 2^b - 1]` and the half-integer
zero point `z = (2^b - 1) / 2` (see [`hf_r2.quant.uniform`]); ONNX zero points are integers, so the same values
are written as signed codes with zero point 0, in the narrowest type that holds `b`-bit codes (INT4 from opset 21,
else INT8):

| bits `b` | opset 21+ | opset 13-20 | codes, scale | exact? |
|---|---|---|---|---|
| 1-3 | INT4 | INT8 | `2q - (2^b - 1)` (odd), `s / 2` | yes, bit for bit |
| 4 | INT4 + Add | INT8 | INT4: `q - 2^(b-1)`, `s`, then `+ s/2` per channel | to 2 float32 ulps |
| 5-7 | INT8 | INT8 | `2q - (2^b - 1)`, `s / 2` | yes |
| 8 | INT8 + Add | INT8 + Add | `q - 128`, `s`, then `+ s/2` | to 2 float32 ulps |

(`2q - n` needs `b + 1` bits; where the type has no spare bit, `b`-bit codes plus a per-channel half step keep
the file at `b` bits a weight.) Asymmetric weight grids (integer zero point) are stored as unsigned codes (UINT4 /
UINT8) with their zero point. Per-channel scales use `axis=0`.

Activations. hf-r2's input grids are asymmetric with integer zero points: `x_hat = (clamp(round(x / s + z), 0,
2^b - 1) - z) s`. They become `QuantizeLinear` / `DequantizeLinear` with the same `s` and `z` (uint8), after a
`Clip` to `[-z s, (2^b - 1 - z) s]` when `b < 8` (uint8 saturates at 255, not at `2^b - 1`). Both round half to
even, but ONNX rounds `x / s` and then adds `z`, where hf-r2 rounds `x / s + z` in float32: the codes differ (by
one) only where `x / s` lies within a float32 rounding of a half-integer (an exact tie and an odd `z` go opposite
ways): 7 in a million Gaussian inputs, none of the 400,000 activations `tests/quant/test_onnx_export.py` checks.

Storage. `storage="int8"` (the default): 1- to 7-bit codes as INT8 at any opset, in the layout ONNX Runtime runs
fast ([`hf_r2.quant.export._onnx_int8`]: a Conv whose output only feeds the next 8-bit input grid, and a Linear, become
`QLinearConv` / `QGemm` with hf-r2's codes, BN folded and an int32 bias; the other layers' INT8 codes are folded
into float weights when the session starts). `storage="int4"`: the table above as it is, the smallest file, but
dequantized on every run (many times slower than float; the figures in docs/results.md).

Running it. ONNX Runtime executes the graph as written, except that by default it fuses an INT4
`DequantizeLinear` feeding a `MatMul` (a transformers Linear layer without quantized input) into `MatMulNBits`,
which quantizes the MatMul's input to int8 on the fly (logits move by up to 1% of the largest); the session config
entry `session.qdq_matmulnbits_accuracy_level = "1"` keeps it in float32 ([`compare_onnx`] takes it). Where
activations are quantized, a code that rounds the other way (float sums differ between runtimes at 1e-7) moves a
whole step and later layers amplify it: logits then agree to within 1% of their mean size (with the same top-1 in
the tests), not to float precision.

```python
>>> from hf_r2.quant import PTQConfig, export_onnx, post_training_quantize_
>>> post_training_quantize_(model, PTQConfig(w_bits=2, a_bits=8), calibration_data=train_loader)
>>> export_onnx(model, "resnet18-w2a8.onnx", input_size=224)["bits_per_weight"]
```
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ..._finite import check_finite_model
from ...models import LogitsModule, forward_logits, input_shape
from ...output_folder import check_export_file, replace_file
from ...version import __version__
from ..cluster._palette import learned_palette_modules, set_palette
from ..layers import FakeQuantizer, QuantLayerMixin, quantize_layer_
from ._onnx_graph import (
    MARKER_DOMAIN,
    InputGrid,
    PaletteWeight,
    UniformWeight,
    bits_per_weight,
    count_ops,
    encode_input,
    encode_palette,
    encode_uniform,
    ort_session,
    prune_initializers,
    rewrite_markers,
)
from ._onnx_int8 import int8_layout
from ._optional import is_onnx_available, require_module, require_onnx
from .low_bit import LOW_BIT_CONFIG_NAME, LOW_BIT_WEIGHTS_NAME

__all__ = [
    "DEFAULT_ONNX_OPSET",
    "MIN_ONNX_OPSET",
    "MAX_ONNX_OPSET",
    "ONNX_CHECK_TOLERANCE",
    "ONNX_STORAGES",
    "DEFAULT_ONNX_STORAGE",
    "is_onnx_available",
    "require_onnx",
    "export_onnx",
    "compare_onnx",
    "onnx_accuracy",
    "restore_low_bit_weights_",
]

DEFAULT_ONNX_OPSET = 21  # the first opset with INT4 (and UINT4) Q/DQ
#: [`compare_onnx`] passes a file whose logits differ from hf-r2's by at most this fraction of the largest logit.
ONNX_CHECK_TOLERANCE = 0.5
MIN_ONNX_OPSET = 13  # per-channel (axis) DequantizeLinear
MAX_ONNX_OPSET = 23
#: How uniform weight grids are stored: `"int8"` (the layout ONNX Runtime fuses into integer kernels) or `"int4"`.
ONNX_STORAGES = ("int8", "int4")
DEFAULT_ONNX_STORAGE = "int8"
_TRACE_MAX_OPSET = 20  # the TorchScript exporter's newest opset; later ones come from onnx.version_converter


# ---- placeholders in the trace ------------------------------------------------------------------------------------


class _Marked(torch.autograd.Function):
    """Forward: `fn(x)`, what hf-r2 computes. In the ONNX trace: the placeholder node `hf_r2::<kind>(x)` carrying
    `key`, with `x`'s type, which [`~hf_r2.quant.export._onnx_graph.rewrite_markers`] replaces."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, kind: str, key: str, fn: Callable[[Tensor], Tensor]) -> Tensor:
        return fn(x)

    @staticmethod
    def symbolic(g: Any, x: Any, kind: str, key: str, fn: Any) -> Any:
        out = g.op(f"{MARKER_DOMAIN}::{kind}", x, key_s=key)
        out.setType(x.type())
        return out


class _InputMark(nn.Module):
    """Stands in for a layer's input quantizer during the export."""

    def __init__(self, key: str, quantizer: FakeQuantizer) -> None:
        super().__init__()
        self.key = key
        self.fns = (quantizer,)  # a tuple: not registered as a sub-module

    def forward(self, x: Tensor) -> Tensor:
        return _Marked.apply(x, "Input", self.key, self.fns[0])


def _frozen(quantizer: FakeQuantizer) -> FakeQuantizer:
    """A copy whose step size needs no grad: the trace records the placeholder's forward, and a tensor that
    requires grad cannot become a constant of it (QAT's learnt steps do)."""
    return copy.deepcopy(quantizer).requires_grad_(False)


def _mark_weight(module: nn.Module, key: str, fn: Callable[[Tensor], Tensor]) -> Callable[[], None]:
    """Make `module`'s forward read its weight through a placeholder; returns the undo."""
    weight = module._parameters["weight"]

    def pre(mod: nn.Module, args: Any) -> None:
        mod._parameters["weight"] = _Marked.apply(weight, "Weight", key, fn)

    def post(mod: nn.Module, args: Any, output: Any) -> None:
        mod._parameters["weight"] = weight

    handles = [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def undo() -> None:
        for handle in handles:
            handle.remove()
        module._parameters["weight"] = weight

    return undo


@contextlib.contextmanager
def _placeholders(model: nn.Module, opset: int, palette_lookup: bool, int4: bool) -> Iterator[tuple[dict, dict]]:
    """Put the placeholders in `model` for the trace; yields `(weights, inputs)` by layer name; undoes it all."""
    if learned_palette_modules(model):
        raise ValueError("`model` is still prepared for DKM (its palettes are being learnt): call "
                         "`finalize_dkm(model)` (or `palettize_(model, method='dkm')`) before exporting.")
    weights: dict[str, UniformWeight | PaletteWeight] = {}
    inputs: dict[str, InputGrid] = {}
    undo: list[Callable[[], None]] = []
    try:
        for name, module in model.named_modules():
            if isinstance(module, QuantLayerMixin):
                wq, iq = module.weight_quantizer, module.input_quantizer
                if wq is not None and wq.enabled:
                    weights[name] = encode_uniform(name, module, opset, int4)
                    undo.append(_mark_weight(module, name, _frozen(wq)))
                    module.weight_quantizer = None
                    undo.append(lambda m=module, q=wq: setattr(m, "weight_quantizer", q))
                if iq is not None and iq.enabled:
                    inputs[name] = encode_input(name, iq)
                    module.input_quantizer = _InputMark(name, _frozen(iq))
                    undo.append(lambda m=module, q=iq: setattr(m, "input_quantizer", q))
            elif palette_lookup and isinstance(getattr(module, "weight_palette", None), Tensor):
                weights[name] = encode_palette(module, opset)
                undo.append(_mark_weight(module, name, torch.clone))
        yield weights, inputs
    finally:
        for step in reversed(undo):
            step()


# ---- public entry points ------------------------------------------------------------------------------------------


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    input_size: int | tuple[int, ...] | None = None,
    opset: int = DEFAULT_ONNX_OPSET,
    palette_lookup: bool = True,
    storage: str = DEFAULT_ONNX_STORAGE,
) -> dict[str, Any]:
    """Write `model` (quantized, palettized or float) to the ONNX file `path` (see the module docstring).

    The graph takes `pixel_values` `(batch, C, H, W)` (float32, any batch size) and returns `logits`
    `(batch, num_classes)`, computed as hf-r2 computes them in eval mode. `model` is traced on the device it is on
    and left as it was (its mode and layers are restored).

    Args:
        model (`torch.nn.Module`):
            A timm or transformers classifier (or a module taking one image tensor), after
            [`~hf_r2.quant.post_training_quantize_`], [`~hf_r2.quant.prepare_qat`] (+ training),
            [`~hf_r2.quant.palettize_`], or none of them.
        path (`str` or `os.PathLike`):
            The `.onnx` file to write (its folder is created). An existing file is replaced only once the new one is
            complete, and keeps its mode; a link is followed (it stays a link); a folder is refused.
        input_size (`int` or `tuple`, *optional*):
            The side of the (square) example input, `(H, W)` or `(C, H, W)`; defaults to the model's config.
        opset (`int`, *optional*, defaults to `21`):
            The ONNX opset, 13 to 23. From 21 on, 1- to 4-bit weights and palette indices are stored as INT4 /
            UINT4; before it as INT8 / UINT8.
        palette_lookup (`bool`, *optional*, defaults to `True`):
            Store palettized weights as palette + indices, rebuilt in the graph by a gather; `False` stores them as
            float32 weights (larger file, no gather).
        storage (`str`, *optional*, defaults to `"int8"`):
            `"int8"` (integer kernels in ONNX Runtime where exact, float speed elsewhere) or `"int4"` (the smallest
            file, slow); see the module docstring.

    Returns:
        `dict`: `path`, `opset`, `weights` (`"quantized"`, `"palettized"`, both joined by `+`, or `"float"`),
        `file_bytes`, `low_bit_layers`, `bits_per_weight` (stored bits per Conv/Linear weight, side data included,
        float weights at 32), `code_types` (layers per integer type), `quantize_linear` / `dequantize_linear`
        (node counts), `input_size`, `storage`, `integer_layers` (the layers in the QDQ pattern ONNX Runtime runs as
        `QLinearConv` / `QGemm`; 0 with `"int4"`) and `float_layers` (`name -> why` for the quantized layers that
        compute in float with the int8 storage).
    """
    check_finite_model(model, "the model to export")
    onnx = require_module("onnx", "`export_onnx`")
    from onnx import version_converter

    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_ONNX_OPSET <= opset <= MAX_ONNX_OPSET:
        raise ValueError(f"`opset` must be an integer from {MIN_ONNX_OPSET} to {MAX_ONNX_OPSET}, got {opset!r}.")
    if storage not in ONNX_STORAGES:
        raise ValueError(f"`storage` must be one of {', '.join(map(repr, ONNX_STORAGES))}, got {storage!r}.")
    target = check_export_file(os.fspath(path), "an ONNX file", "path", "model.onnx")  # before any work
    shape = input_shape(model, input_size)
    parameter = next(model.parameters(), None)
    # a fixed example (the trace does not depend on its values), leaving the global random state alone
    example = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0))
    example = example.to(None if parameter is None else parameter.device)
    buffer = io.BytesIO()
    was_training = model.training
    model.eval()
    try:
        with _placeholders(model, opset, palette_lookup, storage == "int4") as (weights, inputs), torch.no_grad(), \
                warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=".*(TorchScript-based ONNX export|will be removed).*")
            torch.onnx.export(
                LogitsModule(model), (example,), buffer, dynamo=False, opset_version=min(opset, _TRACE_MAX_OPSET),
                input_names=["pixel_values"], output_names=["logits"],
                custom_opsets={MARKER_DOMAIN: 1} if weights or inputs else None,
                dynamic_axes={"pixel_values": {0: "batch_size"}, "logits": {0: "batch_size"}},
            )
    finally:
        model.train(was_training)
    proto = onnx.load_from_string(buffer.getvalue())
    if opset > _TRACE_MAX_OPSET:
        proto = version_converter.convert_version(proto, opset)
    rewrite_markers(proto, weights, inputs)
    prune_initializers(proto)
    layout = {"fused": [], "float": {}}
    if storage == "int8" and any(isinstance(w, UniformWeight) for w in weights.values()):
        layout = int8_layout(proto)
    kinds = ["quantized"] * bool(inputs or any(isinstance(w, UniformWeight) for w in weights.values()))
    kinds += ["palettized"] * any(isinstance(w, PaletteWeight) for w in weights.values())
    onnx.helper.set_model_props(proto, {"hf_r2_version": __version__, "hf_r2_weights": "+".join(kinds) or "float"})
    onnx.checker.check_model(proto, full_check=True)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    partial = f"{target}.tmp{os.getpid()}"  # beside the file a link points to: a rename, never a copy
    try:
        onnx.save_model(proto, partial)
        replace_file(partial, target)  # an existing file is replaced by a complete one only, and keeps its mode
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    ops = count_ops(proto)
    types = Counter(weight.onnx_type for weight in weights.values())
    return {
        "path": os.path.abspath(path),
        "opset": opset,
        "weights": "+".join(kinds) or "float",
        "file_bytes": os.path.getsize(path),
        "low_bit_layers": len(weights),
        "bits_per_weight": bits_per_weight(model, weights),
        "code_types": dict(sorted(types.items())),
        "quantize_linear": ops.get("QuantizeLinear", 0),
        "dequantize_linear": ops.get("DequantizeLinear", 0),
        "input_size": list(shape),
        "storage": storage,
        "integer_layers": len(layout["fused"]),
        "float_layers": dict(layout["float"]),
    }


@torch.no_grad()
def compare_onnx(
    model: nn.Module, path: str | os.PathLike, pixel_values: Tensor, *, session_config: dict[str, str] | None = None
) -> dict[str, float]:
    """Run the ONNX file `path` with ONNX Runtime (CPU) and `model` with PyTorch (eval mode) on `pixel_values`
    `(B, C, H, W)`, and compare the logits.

    Args:
        model (`torch.nn.Module`):
            The model that was exported.
        path (`str` or `os.PathLike`):
            Its ONNX file.
        pixel_values (`torch.Tensor`):
            The images, `(B, C, H, W)`.
        session_config (`dict[str, str]`, *optional*):
            ONNX Runtime session config entries; the defaults otherwise. By default ONNX Runtime runs an INT4
            `DequantizeLinear` + `MatMul` (a transformers Linear layer) as `MatMulNBits` with its input quantized to
            int8 on the fly; `{"session.qdq_matmulnbits_accuracy_level": "1"}` keeps it in float32.

    Returns:
        `dict`: `max_abs_diff` and `mean_abs_diff` of the logits, `max_abs_logit` (PyTorch's, for scale),
        `top1_agreement` (the fraction of images with the same argmax and finite logits in both), `num_images`,
        `nonfinite_logits` (NaN / inf logits of either runtime) and `passed`: every logit finite and
        `max_abs_diff <= ONNX_CHECK_TOLERANCE * max_abs_logit` (a QDQ graph's rounding flips move logits by about 1% of
        their mean size; a file that computes something else, by far more). NaN fails the check, never passes it.
    """
    session = ort_session(path, session_config, "`compare_onnx`")
    was_training = model.training
    model.eval()
    try:
        parameter = next(model.parameters(), None)
        device = pixel_values.device if parameter is None else parameter.device
        expected = forward_logits(model, pixel_values.to(device)).float().cpu()
    finally:
        model.train(was_training)
    got = torch.from_numpy(session.run(None, {"pixel_values": pixel_values.float().cpu().numpy()})[0])
    diff = (got - expected).abs()
    finite_rows = torch.isfinite(got).all(-1) & torch.isfinite(expected).all(-1)  # argmax takes NaN as the largest
    check = {
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "max_abs_logit": float(expected.abs().max()),
        "top1_agreement": float(((got.argmax(-1) == expected.argmax(-1)) & finite_rows).float().mean()),
        "num_images": int(pixel_values.shape[0]),
        "nonfinite_logits": int((~torch.isfinite(got)).sum() + (~torch.isfinite(expected)).sum()),
    }
    tolerance = ONNX_CHECK_TOLERANCE * check["max_abs_logit"]
    check["passed"] = check["nonfinite_logits"] == 0 and check["max_abs_diff"] <= tolerance
    return check


def onnx_accuracy(
    path: str | os.PathLike, batches: Iterable[dict[str, Any]], *, session_config: dict[str, str] | None = None
) -> dict[str, Any]:
    """Top-1 accuracy of the ONNX file `path` run by ONNX Runtime (CPU) on labelled `batches`:
    `accuracy = #(argmax logits == label) / N` over all `N` images.

    Args:
        path (`str` or `os.PathLike`):
            An ONNX file written by [`export_onnx`] (input `pixel_values`, output `logits`).
        batches (iterable of `dict`):
            `{"pixel_values": (B, C, H, W), "labels": (B,)}` batches in the model's own preprocessing, e.g. a
            `DataLoader` with [`hf_r2.data.collate_fn`] or a list of such dicts (what
            [`~hf_r2.metrics.evaluate_accuracy`] takes, so both can count on the very same images).
        session_config (`dict[str, str]`, *optional*):
            ONNX Runtime session config entries (see [`compare_onnx`]); the defaults otherwise.

    Returns:
        `dict`: `accuracy` (a fraction, `0.0` without images), `correct` and `num_images`.
    """
    session = ort_session(path, session_config, "`onnx_accuracy`")
    correct = total = 0
    for batch in batches:
        logits = session.run(None, {"pixel_values": batch["pixel_values"].float().cpu().numpy()})[0]
        labels = batch["labels"].cpu().numpy()
        correct += int((logits.argmax(-1) == labels).sum())
        total += int(labels.size)
    return {"accuracy": correct / max(total, 1), "correct": correct, "num_images": total}


@torch.no_grad()
def restore_low_bit_weights_(model: nn.Module, folder: str | os.PathLike) -> nn.Module:
    """Give a model loaded by [`~hf_r2.quant.load_low_bit`] from `folder` its weight grids and palettes back, in
    place, so that [`export_onnx`] writes integer codes / indices rather than the decoded float weights.

    Each uniform layer gets a frozen weight quantizer with the saved scales and zero points (its decoded weight
    holds grid values, so the codes come back exactly) beside its input quantizer; each palettized layer gets its
    `weight_palette`. Returns `model`.
    """
    import json

    import safetensors.torch

    folder = os.fspath(folder)
    with open(os.path.join(folder, LOW_BIT_CONFIG_NAME)) as f:
        description = json.load(f)
    tensors = safetensors.torch.load_file(os.path.join(folder, LOW_BIT_WEIGHTS_NAME))
    for name, info in description["layers"].items():
        module, key = model.get_submodule(name), f"{name}.weight"
        if info["scheme"] == "palette":
            set_palette(module, tensors[f"{key}.palette"].to(module.weight))
            continue
        scale, zero_point = tensors[f"{key}.scale"].float().reshape(-1), tensors[f"{key}.zero_point"].float()
        bits = info["bits"]
        quantizer = FakeQuantizer(
            bits,
            symmetric=bool(torch.all(2 * zero_point == 2**bits - 1)),
            per_channel=bool(info.get("per_channel", scale.numel() > 1)),
            channels=scale.numel(),
        )
        quantizer.scale.copy_(scale)
        quantizer.zero_point.copy_(zero_point.reshape(-1))
        quantizer.initialized.fill_(True)
        quantize_layer_(module, quantizer, getattr(module, "input_quantizer", None))
    return model
