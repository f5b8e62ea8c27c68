"""Core ML export: [`export_coreml`] writes an hf-r2 model as an ML Program (`.mlpackage`, iOS 18 / macOS 15 or
later) whose compressed weights are hf-r2's own, and [`compare_coreml_weights`] reads the file back and checks that
every low-bit weight decodes to the weight hf-r2 computes with (Core ML runs models on Apple systems only; reading
the weights back works anywhere).

What each layer becomes (the iOS 18 compression ops; the op decodes at load time into the weight the Conv / Linear
uses, so the graph is otherwise the float one):

| hf-r2 layer, bits `b` | Core ML op | stored | decodes to |
|---|---|---|---|
| palettized, 1-8 | `constexpr_lut_to_dense` | hf-r2's palettes `(G, 2^b)`, its indices (`uint{b}`) | `palette[g, i]` |
| PTQ / QAT grid, 1-3 | `constexpr_lut_to_dense` | levels `(k - z) s` a channel, codes `q` (`uint{b}`) | `(q - z) s` |
| PTQ / QAT grid, 4 | `constexpr_blockwise_shift_scale` | codes `q` (`uint4`), float `s`, `z` a channel | `s (q - z)` |
| PTQ / QAT grid, 5-8 | `constexpr_blockwise_shift_scale` | codes `q` (`uint8`), float `s`, `z` | `s (q - z)` |
| float | `const` | the float weight | itself |

(Palettized: k-means [`~hf_r2.quant.palettize_`] or finalized DKM, `G` groups of output channels, indices from
[`~hf_r2.quant.palette_indices`]. Every row decodes to hf-r2's weight bit for bit in float32: `s (q - z)` is the
same float32 product as hf-r2's `(q - z) s`.)

Why a palette below 4 bits: Core ML's linear quantization stores 4- or 8-bit integers only, and a uniform grid *is*
a lookup table of `2^b` values, so a 1- to 3-bit grid costs `b` bits a weight (plus `2^b` floats per channel instead
of two) and decodes exactly. Palettes of 5 and 7 bits are padded (with their last entry, never indexed) to 64 and
256 entries, the next index types Core ML has (`uint6`, `uint8`). hf-r2's mid-rise zero point `z = (2^b - 1) / 2`
is a half-integer: Core ML takes a float offset, so it is stored as it is. Palettes, scales and offsets are float32
(`precision="float32"`, the default: the file's weights are hf-r2's bit for bit) or float16 (`precision="float16"`,
Core ML's usual precision and what the Neural Engine computes in: the indices and codes are unchanged, each palette
entry, scale and float weight is rounded to float16, and the network computes in float16).

What is not exported: activation quantization. PTQ's and QAT's input grids (`a_bits`) have no counterpart among
Core ML's weight-compression ops, so the file quantizes weights only and computes activations in float (the
report counts the input quantizers left out). BatchNorm stays a separate op after a compressed Conv (Core ML folds
it only into float weights), as hf-r2 computes it unless PTQ folded it (`bn="fold"`).

Conversion route. coremltools (>= 8.0, tested with 9.0) converts on Linux; it has not been tested with torch 2.14
but converts its TorchScript fine: the model (wrapped so that it maps `pixel_values`
`(1, C, H, W)` to `logits`) is traced by `torch.jit.trace` with its quantizers switched off, converted to a MIL
program with no optimisation pass (so the weight constants still carry their parameter names), each low-bit weight
constant is replaced by the op above built from hf-r2's arrays, and the program is then converted to an ML Program
with coremltools' default passes. Core ML's own compression (`coremltools.optimize`) is not used: it would
re-cluster or re-round the weights instead of keeping hf-r2's palettes, indices and codes. What coremltools logs on
import (its native libraries missing on Linux, needed only to run a model; the untested torch) is dropped
([`require_coremltools`]); what it says while converting is kept.

Sizes, for timm's `test_resnet` (372k Conv/Linear weights; PTQ keeps its first and last layer at 8 bits by
default), float32 packages: float 1,517 kB; 8-bit grids 444 kB (3.4x smaller); 4-bit 259 kB (5.9x); 2-bit grids
174 kB (8.7x); 2-bit palettes 150 kB (10.1x); 1-bit palettes 104 kB (14.6x). About 40 kB of each is the program
and the float BatchNorm parameters; `precision="float16"` halves the float parts (float 775 kB, 2-bit palettes
149 kB).

```python
>>> from hf_r2.quant import PalettizeConfig, compare_coreml_weights, export_coreml, palettize_
>>> palettize_(model, PalettizeConfig(bits=2))
>>> report = export_coreml(model, "resnet18-p2.mlpackage", input_size=224)
>>> report["file_bytes"], report["float_file_bytes"]
>>> compare_coreml_weights(model, report["path"])["exact_layers"]
```
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..._finite import check_finite_model
from ..._targets import TARGET_LAYER_TYPES
from ...models import LogitsModule, input_shape
from ...output_folder import check_export_folder, replace_folder
from ...version import __version__
from ..cluster._palette import learned_palette_modules
from ..layers import QuantLayerMixin
from ._coreml_weights import (
    CoreMLWeight,
    final_op_names,
    package_bytes,
    palette_weight,
    read_weights,
    replace_weight_consts,
    uniform_weight,
)
from ._optional import is_coremltools_available
from ._optional import require_coremltools as _require_coremltools

__all__ = [
    "COREML_DEPLOYMENT_TARGET",
    "COREML_PRECISIONS",
    "is_coremltools_available",
    "require_coremltools",
    "check_coreml_path",
    "export_coreml",
    "compare_coreml_weights",
]

COREML_DEPLOYMENT_TARGET = "iOS18"  # per-group palettes, 4-bit codes and float offsets need the iOS 18 ops
COREML_PRECISIONS = ("float32", "float16")
_LAYERS_KEY = "hf_r2_layers"  # the user-defined metadata entry mapping layers to their ops
_PREFIX = "model."  # the traced wrapper's attribute holding the model


class _ImportNotices(logging.Filter):
    """Drops what coremltools logs below ERROR while it is imported: notices about the environment that no hf-r2
    user can act on. On Linux, eight lines say its native libraries are missing (they run a model, which hf-r2
    never does); one says torch is newer than coremltools was tested with (hf-r2 tests its own route with this
    torch, and [`compare_coreml_weights`] checks each export); others name scikit-learn / TensorFlow / XGBoost
    versions, which hf-r2 does not convert from. What coremltools logs or warns while converting is kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


def require_coremltools() -> Any:
    """`coremltools` (or the `ImportError` with the install line), imported without the notices it logs then
    ([`_ImportNotices`])."""
    logger, noise = logging.getLogger("coremltools"), _ImportNotices()
    logger.addFilter(noise)
    try:
        return _require_coremltools()
    finally:
        logger.removeFilter(noise)


def _low_bit_weights(model: nn.Module) -> dict[str, CoreMLWeight]:
    """Every low-bit weight of `model` as its Core ML arrays, by layer name (float32 tables)."""
    if learned_palette_modules(model):
        raise ValueError("`model` is still prepared for DKM (its palettes are being learnt): call "
                         "`finalize_dkm(model)` (or `palettize_(model, method='dkm')`) before exporting.")
    weights: dict[str, CoreMLWeight] = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantLayerMixin):
            if module.weight_quantizer is not None and module.weight_quantizer.enabled:
                weights[name] = uniform_weight(name, module)
        elif isinstance(getattr(module, "weight_palette", None), Tensor):
            weights[name] = palette_weight(module)
    return weights


@contextlib.contextmanager
def _quantizers_off(model: nn.Module) -> Iterator[int]:
    """Switch every weight and input quantizer of `model` off for the trace (the weights come back as ops, the
    activations stay float); yields how many enabled input quantizers were left out; puts them all back."""
    dropped, undo = 0, []
    try:
        for module in model.modules():
            if isinstance(module, QuantLayerMixin):
                wq, iq = module.weight_quantizer, module.input_quantizer
                dropped += iq is not None and iq.enabled
                module.weight_quantizer = module.input_quantizer = None
                undo.append(lambda m=module, w=wq, i=iq: (setattr(m, "weight_quantizer", w),
                                                          setattr(m, "input_quantizer", i)))
        yield dropped
    finally:
        for step in reversed(undo):
            step()


def _layer_table(
    model: nn.Module, weights: dict[str, CoreMLWeight], ops: dict[str, str], float_bits: int
) -> tuple[dict[str, dict[str, Any]], float]:
    """`(layers, bits per Conv/Linear weight)`: each target layer's kind, bits, storage and op name."""
    layers: dict[str, dict[str, Any]] = {}
    bits, count = 0, 0
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, TARGET_LAYER_TYPES) or not isinstance(weight, Tensor):
            continue
        count += weight.numel()
        if name in weights:
            w = weights[name]
            layers[name] = {"kind": w.kind, "bits": w.bits, "storage": w.storage, "op": ops[name]}
            bits += w.stored_bits(float_bits)
        else:
            layers[name] = {"kind": "float", "bits": float_bits, "storage": f"fp{float_bits}", "op": None}
            bits += float_bits * weight.numel()
    return layers, bits / max(1, count)


def _is_mlpackage(path: str) -> bool:
    """Whether the folder `path` is a Core ML package (its `Manifest.json` and `Data/`), as [`export_coreml`]
    writes."""
    return os.path.isfile(os.path.join(path, "Manifest.json")) and os.path.isdir(os.path.join(path, "Data"))


def check_coreml_path(path: str | os.PathLike, option: str = "path") -> str:
    """The package folder [`export_coreml`] would write for `path` (a link is followed, and stays); a `ValueError`
    naming the fix if `path` does not end in `.mlpackage`, is a file, or is a folder that is neither empty nor a
    Core ML package (it would be replaced). `option` names the path in the message (`--output` on the command line).
    Needs no coremltools."""
    path = os.fspath(path).rstrip("/")
    if not path.endswith(".mlpackage"):
        raise ValueError(f"`{option}` must be a `.mlpackage` folder, got {path!r}; did you mean "
                         f"{os.path.splitext(path)[0] + '.mlpackage'!r}?")
    return check_export_folder(path, _is_mlpackage, "a Core ML package", option)


def _save(mlmodel: Any, path: str) -> None:
    """Save the package to `path` (checked by [`check_coreml_path`]), replacing an existing one only once the new
    one is complete; the folder keeps its mode."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = f"{path[: -len('.mlpackage')]}.tmp{os.getpid()}.mlpackage"
    try:
        mlmodel.save(partial)
        replace_folder(partial, path)
    finally:
        if os.path.exists(partial):
            shutil.rmtree(partial)


# ---- public entry points ------------------------------------------------------------------------------------------


def export_coreml(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    input_size: int | tuple[int, ...] | None = None,
    precision: str = "float32",
    float_baseline: bool = True,
) -> dict[str, Any]:
    """Write `model` (palettized, quantized or float) as the Core ML package `path` (see the module docstring).

    The program takes `pixel_values` `(1, C, H, W)` (float32) and returns `logits` `(1, num_classes)` (float32),
    computed as hf-r2 computes them in eval mode with float activations. `model` must be on the CPU; it is left as
    it was (its mode and quantizers are restored).

    Args:
        model (`torch.nn.Module`):
            A timm or transformers classifier (or a module taking one image tensor), after
            [`~hf_r2.quant.palettize_`], [`~hf_r2.quant.post_training_quantize_`], [`~hf_r2.quant.prepare_qat`]
            (+ training), or none of them.
        path (`str` or `os.PathLike`):
            The `.mlpackage` folder to write (its parent is created). An existing package is replaced and keeps its
            mode; an existing folder that is not one is refused ([`check_coreml_path`]); a link is followed.
        input_size (`int` or `tuple`, *optional*):
            The side of the (square) input, `(H, W)` or `(C, H, W)`; defaults to the model's config.
        precision (`str`, *optional*, defaults to `"float32"`):
            `"float32"`: palettes, scales and float weights stored (and the network computed) in float32, so the
            decoded weights are hf-r2's bit for bit; `"float16"`: all of them in float16 (Core ML's usual choice;
            the indices and codes are the same).
        float_baseline (`bool`, *optional*, defaults to `True`):
            Also convert the float model (the same graph, every weight in `precision`) into a temporary folder and
            report its size as `float_file_bytes`.

    Returns:
        `dict`: `path`, `file_bytes` (the package's files), `float_file_bytes` (`None` without `float_baseline`),
        `precision`, `deployment_target`, `weights` (`"quantized"`, `"palettized"`, both joined by `+`, or
        `"float"`), `low_bit_layers`, `layers` (per Conv/Linear layer: `kind` (`"palette"`, `"grid-palette"`,
        `"linear"` or `"float"`), `bits`, `storage` and `op`), `ops` (`constexpr_*` op counts), `bits_per_weight`
        (stored bits per Conv/Linear weight, palettes and scales included), `activations` (`"float"`),
        `input_quantizers_dropped` and `input_size`.
    """
    check_finite_model(model, "the model to export")
    ct = require_coremltools()
    path = check_coreml_path(path)
    if precision not in COREML_PRECISIONS:
        raise ValueError(f"`precision` must be one of {list(COREML_PRECISIONS)}, got {precision!r}.")
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ValueError("`model` must be on the CPU for the Core ML conversion: call `model.cpu()` first.")
    shape = input_shape(model, input_size)
    example = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0))  # the trace ignores its values
    weights = _low_bit_weights(model)
    was_training = model.training
    model.eval()
    try:
        with _quantizers_off(model) as dropped, torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=".*torch.jit.trace.*deprecated", category=FutureWarning)
            traced = torch.jit.trace(LogitsModule(model).eval(), example, check_trace=False)
    finally:
        model.train(was_training)
    target = getattr(ct.target, COREML_DEPLOYMENT_TARGET)
    compute = ct.precision.FLOAT16 if precision == "float16" else ct.precision.FLOAT32
    io = {"inputs": [ct.TensorType(name="pixel_values", shape=(1, *shape), dtype=np.float32)],
          "outputs": [ct.TensorType(name="logits", dtype=np.float32)]}
    # frontend only: the constants keep their parameter names until the passes run
    program = ct.convert(traced, convert_to="milinternal", minimum_deployment_target=target,
                         pass_pipeline=ct.PassPipeline.EMPTY, **io)
    op_names = replace_weight_consts(program, weights, _PREFIX)
    mlmodel = ct.convert(program, convert_to="mlprogram", minimum_deployment_target=target,
                         compute_precision=compute)
    op_names = final_op_names(mlmodel, op_names)
    kinds = ["quantized"] * bool(dropped or any(w.kind != "palette" for w in weights.values()))
    kinds += ["palettized"] * any(w.kind == "palette" for w in weights.values())
    float_bits = 16 if precision == "float16" else 32
    layers, bits_per_weight = _layer_table(model, weights, op_names, float_bits)
    mlmodel.short_description = f"hf-r2 {'+'.join(kinds) or 'float'} model (weights as hf-r2 stores them)"
    mlmodel.user_defined_metadata.update({
        "hf_r2_version": __version__,
        "hf_r2_weights": "+".join(kinds) or "float",
        _LAYERS_KEY: json.dumps({name: info for name, info in layers.items() if info["op"] is not None}),
    })
    _save(mlmodel, path)
    float_bytes = None
    if float_baseline:
        baseline = ct.convert(traced, convert_to="mlprogram", minimum_deployment_target=target,
                              compute_precision=compute, **io)
        with tempfile.TemporaryDirectory() as folder:
            baseline.save(os.path.join(folder, "float.mlpackage"))
            float_bytes = package_bytes(os.path.join(folder, "float.mlpackage"))
    return {
        "path": os.path.abspath(path),
        "file_bytes": package_bytes(path),
        "float_file_bytes": float_bytes,
        "precision": precision,
        "deployment_target": COREML_DEPLOYMENT_TARGET,
        "weights": "+".join(kinds) or "float",
        "low_bit_layers": len(weights),
        "layers": layers,
        "ops": dict(sorted(Counter(w.op_type for w in weights.values()).items())),
        "bits_per_weight": bits_per_weight,
        "activations": "float",
        "input_quantizers_dropped": int(dropped),
        "input_size": list(shape),
    }


@torch.no_grad()
def compare_coreml_weights(model: nn.Module, path: str | os.PathLike) -> dict[str, Any]:
    """Read the package `path` written by [`export_coreml`] back from disk (its MIL program and weight file) and
    compare each compressed weight, as coremltools decodes it, with the weight `model` computes with.

    For every low-bit layer of `model`: its indices or codes in the file must equal hf-r2's (`values_match`), and
    the decoded weight is compared with hf-r2's (the palettized weight, or the quantizer's output), rounded to the
    file's float type: `exact` when equal bit for bit (every palette, and every grid in float32), else
    `max_abs_diff`.

    Args:
        model (`torch.nn.Module`):
            The model that was exported (or the same model loaded again).
        path (`str` or `os.PathLike`):
            Its `.mlpackage`.

    Returns:
        `dict`: `layers` (per low-bit layer: `kind`, `op`, `storage`, `values_match`, `exact`, `max_abs_diff`,
        `max_abs_weight`), `num_layers`, `exact_layers`, `values_match` (all layers), `max_abs_diff`, `max_rel_diff`
        (the largest `max_abs_diff / max_abs_weight`), `missing` (low-bit layers of `model` not in the file) and
        `precision` (of the stored palettes / scales).
    """
    require_coremltools()
    ops, metadata = read_weights(path)
    recorded = json.loads(metadata.get(_LAYERS_KEY, "{}"))
    layers: dict[str, dict[str, Any]] = {}
    missing, dtypes = [], set()
    weights = _low_bit_weights(model)
    expected = {name: module.quantized_weight() if isinstance(module, QuantLayerMixin) else module.weight
                for name, module in model.named_modules() if name in weights}
    for name, weight in weights.items():
        stored = ops.get(recorded.get(name, {}).get("op"))
        if stored is None or stored["op_type"] != weight.op_type:
            missing.append(name)
            continue
        dtypes.add(stored["dtype"])
        target = expected[name].detach().cpu().float().numpy()
        target = target.astype(np.float16) if stored["dtype"] == "fp16" else target
        decoded = stored["decoded"].astype(target.dtype)
        diff = float(np.abs(decoded.astype(np.float64) - target.astype(np.float64)).max(initial=0.0))
        layers[name] = {
            "kind": weight.kind,
            "op": recorded[name]["op"],
            "storage": stored["storage"],
            "values_match": stored["storage"] == weight.storage and np.array_equal(stored["values"], weight.values),
            "exact": bool(np.array_equal(decoded, target)),
            "max_abs_diff": diff,
            "max_abs_weight": float(np.abs(target.astype(np.float64)).max(initial=0.0)),
        }
    return {
        "layers": layers,
        "num_layers": len(layers),
        "exact_layers": sum(info["exact"] for info in layers.values()),
        "values_match": all(info["values_match"] for info in layers.values()),
        # np.max keeps a NaN (Python's max drops it when it is not first)
        "max_abs_diff": float(np.max([info["max_abs_diff"] for info in layers.values()], initial=0.0)),
        "max_rel_diff": float(np.max([info["max_abs_diff"] / np.maximum(info["max_abs_weight"], 1e-30)
                                      for info in layers.values()], initial=0.0)),
        "missing": missing,
        "precision": "float16" if dtypes == {"fp16"} else "float32" if dtypes <= {"fp32"} else "mixed",
    }

