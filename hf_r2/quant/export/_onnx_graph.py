"""The ONNX side of [`hf_r2.quant.export.onnx_export`]: a layer's low-bit form as plain arrays ([`encode_uniform`],
[`encode_palette`], [`encode_input`]: codes, scales, zero points, palettes, in the forms tabled there), and
[`rewrite_markers`], which turns the placeholder nodes the TorchScript exporter leaves in the graph (`hf_r2::Weight`,
`hf_r2::Input`) into standard QuantizeLinear / DequantizeLinear / Gather nodes with those arrays as initializers.
Imports `onnx` inside the functions only, so this module loads without it (the version checks are
[`~hf_r2.quant.export._optional.require_module`]); [`ort_session`] opens a file in ONNX Runtime (CPU),
[`bits_per_weight`] counts a file's stored bits per weight.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..._targets import TARGET_LAYER_TYPES
from ..cluster.palettize import palette_indices
from ..layers import FakeQuantizer
from ..uniform import quantize_tensor
from ._optional import require_module

__all__ = [
    "MARKER_DOMAIN",
    "UniformWeight",
    "PaletteWeight",
    "InputGrid",
    "encode_uniform",
    "encode_palette",
    "encode_input",
    "rewrite_markers",
    "prune_initializers",
    "count_ops",
    "bits_per_weight",
    "ort_session",
]

#: The domain of the placeholder nodes; none is left in the saved file.
MARKER_DOMAIN = "hf_r2"

#: The oldest `onnx` / `onnxruntime` hf-r2 supports (setup.cfg's `onnx` extra).
_TYPE_BITS = {"INT4": 4, "UINT4": 4, "INT8": 8, "UINT8": 8}
_NUMPY_TYPES = {"INT8": np.int8, "UINT8": np.uint8}


@dataclass
class UniformWeight:
    """A weight as ONNX dequantizes it: `W = (codes - zero_point) * scale (+ half_step)`.

    `codes` has the weight's shape (integers in the range of `onnx_type`); `scale` / `zero_point` are 1-D `(C,)`
    per output channel (DequantizeLinear `axis=0`) or 0-D per tensor; `half_step` (float32, broadcasting against
    the weight) is added after the DequantizeLinear when the grid's levels are odd multiples of half a step that
    do not fit the integer type (see [`hf_r2.quant.export.onnx_export`]); `bits` is hf-r2's bit width.
    """

    codes: np.ndarray
    onnx_type: str
    scale: np.ndarray
    zero_point: np.ndarray
    half_step: np.ndarray | None
    bits: int

    def stored_bits(self) -> int:
        """Bits in the file: the codes and zero points at the type's width, scales and half steps in float32."""
        width = _TYPE_BITS[self.onnx_type]
        side = 32 * (self.scale.size + (0 if self.half_step is None else self.half_step.size))
        return width * (self.codes.size + self.zero_point.size) + side


@dataclass
class PaletteWeight:
    """A palettized weight: `W = palette[g, indices[g]]` for each group `g`, reshaped to `shape`.

    `indices` is `(G, M)` (integers below `K`, stored as `onnx_type`), `palette` is `(G, K)` float32.
    """

    indices: np.ndarray
    onnx_type: str
    palette: np.ndarray
    shape: tuple[int, ...]
    bits: int

    def stored_bits(self) -> int:
        """Bits in the file: the indices at the type's width and the palette in float32 (and the 1-D shape)."""
        return _TYPE_BITS[self.onnx_type] * self.indices.size + 32 * self.palette.size + 64 * len(self.shape)


@dataclass
class InputGrid:
    """The `bits`-bit asymmetric grid of a layer's input: QuantizeLinear / DequantizeLinear with `scale` and the
    uint8 `zero_point`, after a Clip to the grid's range when it is narrower than uint8's (`bits < 8`)."""

    scale: float
    zero_point: int
    bits: int


# ---- from a layer to arrays ---------------------------------------------------------------------------------------


def _check_ready(name: str, role: str, quantizer: FakeQuantizer) -> None:
    if getattr(quantizer, "_observer", None) is not None:
        raise ValueError(f"The {role} quantizer of layer {name!r} is still observing (calibration not finished): "
                         "call `calibrate()` (or `calibrate_activations_`) before exporting.")
    if not bool(quantizer.initialized):
        raise ValueError(f"The {role} quantizer of layer {name!r} has no grid yet: calibrate it (e.g. "
                         "`calibrate_activations_(model, batches)`) or run a forward pass before exporting.")


@torch.no_grad()
def encode_uniform(name: str, module: nn.Module, opset: int, int4: bool = True) -> UniformWeight:
    """The weight of quantized layer `name` as ONNX stores it for `opset`: hf-r2's codes (computed with the
    quantizer's own operations) in one of the forms tabled in [`hf_r2.quant.export.onnx_export`]; `int4=False` keeps
    1- to 4-bit codes in INT8 at any opset (the int8 storage)."""
    wq = module.weight_quantizer
    _check_ready(name, "weight", wq)
    weight = module.weight.detach()
    bits, top = wq.bits, 2**wq.bits - 1
    scale = wq.scale.detach().abs().float().reshape(-1)
    zero_point = wq.zero_point.detach().float().reshape(-1)
    per_channel = wq.per_channel and scale.numel() == weight.shape[0] and weight.dim() >= 1
    view = [-1] + [1] * (weight.dim() - 1) if per_channel else [1] * weight.dim()
    # the same operations as FakeQuantizer's forward, so the codes are the ones hf-r2 uses
    q = quantize_tensor(weight, scale.reshape(view), zero_point.reshape(view), bits).to(torch.int32)
    narrow = int4 and opset >= 21 and bits <= 4
    half = None
    if bool(torch.all(2 * zero_point == top)):  # mid-rise: (q - n/2) s
        width = 4 if narrow else 8
        if bits <= width - 1:
            codes, scale = 2 * q - top, scale / 2
        else:
            codes, half = q - 2 ** (bits - 1), (scale / 2).reshape(view if per_channel else [])
        onnx_type = f"INT{width}"
        zero_point = torch.zeros_like(zero_point)
    elif bool(torch.all(zero_point == zero_point.round())):
        codes, onnx_type = q, "UINT4" if narrow else "UINT8"
    else:
        raise ValueError(f"The weight grid of layer {name!r} has zero points {zero_point.tolist()[:4]}, neither "
                         f"integers nor the mid-rise {top / 2}: it has no ONNX form.")
    shape = [-1] if per_channel else []
    return UniformWeight(
        codes=codes.cpu().numpy(),
        onnx_type=onnx_type,
        scale=scale.reshape(shape).cpu().numpy(),
        zero_point=zero_point.reshape(shape).round().to(torch.int32).cpu().numpy(),
        half_step=None if half is None else half.cpu().numpy(),
        bits=bits,
    )


@torch.no_grad()
def encode_palette(module: nn.Module, opset: int) -> PaletteWeight:
    """The palette and indices of a palettized layer; the indices are UINT4 from opset 21 up to 16 entries."""
    palette = module.weight_palette.detach().float()
    groups, size = palette.shape
    bits = max(1, math.ceil(math.log2(size)))
    indices = palette_indices(module).reshape(groups, -1)  # raises if the weight left its palette
    return PaletteWeight(
        indices=indices.cpu().numpy(),
        onnx_type="UINT4" if opset >= 21 and bits <= 4 else "UINT8",
        palette=palette.cpu().numpy(),
        shape=tuple(module.weight.shape),
        bits=bits,
    )


def encode_input(name: str, quantizer: FakeQuantizer) -> InputGrid:
    """The input grid of layer `name`: per tensor, with an integer zero point (hf-r2's activation grids)."""
    _check_ready(name, "input", quantizer)
    scale, zero_point = quantizer.scale.detach().abs().float(), quantizer.zero_point.detach().float()
    top = 2**quantizer.bits - 1
    if scale.numel() != 1 or float(zero_point) != round(float(zero_point)) or not 0 <= float(zero_point) <= top:
        raise ValueError(f"The input grid of layer {name!r} is not per tensor with an integer zero point in "
                         f"[0, {top}] (scale {scale.tolist()[:4]}, zero point {zero_point.tolist()[:4]}).")
    return InputGrid(scale=float(scale), zero_point=int(zero_point), bits=quantizer.bits)


def _tensor(name: str, values: np.ndarray, onnx_type: str | None = None) -> Any:
    """An initializer; 4-bit types are packed two to a byte, the first value in the low nibble (ONNX's layout)."""
    from onnx import TensorProto, helper, numpy_helper

    if onnx_type in ("INT4", "UINT4"):
        flat = np.asarray(values).astype(np.int16).reshape(-1) & 0xF
        if flat.size % 2:
            flat = np.append(flat, 0)
        packed = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)
        onnx_type_id = getattr(TensorProto, onnx_type)
        return helper.make_tensor(name, onnx_type_id, list(values.shape), packed.tobytes(), raw=True)
    if onnx_type is not None:
        values = np.asarray(values).astype(_NUMPY_TYPES[onnx_type])
    return numpy_helper.from_array(np.asarray(values, order="C"), name)  # (ascontiguousarray makes 0-d 1-d)


class _Builder:
    """Collects the nodes and (once per name) the initializers of the rewrite."""

    def __init__(self) -> None:
        self.nodes: list[Any] = []
        self.initializers: dict[str, Any] = {}
        self._names: Counter[str] = Counter()

    def init(self, name: str, values: np.ndarray, onnx_type: str | None = None) -> str:
        if name not in self.initializers:
            self.initializers[name] = _tensor(name, values, onnx_type)
        return name

    def node(self, op: str, inputs: list[str], output: str | None, prefix: str, **attrs: Any) -> str:
        from onnx import helper

        self._names[f"{prefix}/{op}"] += 1
        count = self._names[f"{prefix}/{op}"]
        name = f"{prefix}/{op}" + (f"_{count - 1}" if count > 1 else "")
        output = output or f"{name}_output"
        self.nodes.append(helper.make_node(op, inputs, [output], name=name, **attrs))
        return output


def _weight_nodes(b: _Builder, key: str, weight: UniformWeight | PaletteWeight, output: str) -> None:
    from onnx import TensorProto

    prefix = f"{key}/weight"
    if isinstance(weight, PaletteWeight):
        indices = b.init(f"{key}.weight_indices", weight.indices, weight.onnx_type)
        palette = b.init(f"{key}.weight_palette", weight.palette.astype(np.float32))
        shape = b.init(f"{key}.weight_shape", np.array(weight.shape, dtype=np.int64))
        wide = b.node("Cast", [indices], None, prefix, to=TensorProto.INT64)  # Gather* take int32 / int64 indices
        rows = b.node("GatherElements", [palette, wide], None, prefix, axis=1)
        b.node("Reshape", [rows, shape], output, prefix)
        return
    inputs = [
        b.init(f"{key}.weight_codes", weight.codes, weight.onnx_type),
        b.init(f"{key}.weight_scale", weight.scale.astype(np.float32)),
        b.init(f"{key}.weight_zero_point", weight.zero_point, weight.onnx_type),
    ]
    axis = {"axis": 0} if weight.scale.ndim == 1 else {}
    if weight.half_step is None:
        b.node("DequantizeLinear", inputs, output, prefix, **axis)
        return
    dequantized = b.node("DequantizeLinear", inputs, None, prefix, **axis)
    half = b.init(f"{key}.weight_half_step", weight.half_step.astype(np.float32))
    b.node("Add", [dequantized, half], output, prefix)


def _input_nodes(b: _Builder, key: str, grid: InputGrid, x: str, output: str) -> None:
    prefix = f"{key}/input"
    scale = np.float32(grid.scale)
    if scale == 0:  # a range that saw only one value: hf-r2 dequantizes everything to 0
        b.node("Mul", [x, b.init(f"{key}.input_scale", np.array(scale))], output, prefix)
        return
    top = 2**grid.bits - 1
    if top < 255:
        # uint8 saturates at 0 / 255: clip to the grid's own range first, in float. The bounds divided by the
        # scale are within float rounding of the integers -z and top - z, so they quantize to exactly 0 / top.
        low = np.float32(-grid.zero_point) * scale
        high = np.float32(top - grid.zero_point) * scale
        x = b.node("Clip", [x, b.init(f"{key}.input_min", np.array(low)), b.init(f"{key}.input_max", np.array(high))],
                   None, prefix)
    qparams = [b.init(f"{key}.input_scale", np.array(scale)), b.init(f"{key}.input_zero_point",
                                                                      np.array(grid.zero_point), "UINT8")]
    codes = b.node("QuantizeLinear", [x, *qparams], None, prefix)
    b.node("DequantizeLinear", [codes, *qparams], output, prefix)


def rewrite_markers(
    model: Any, weights: dict[str, UniformWeight | PaletteWeight], inputs: dict[str, InputGrid]
) -> None:
    """Replace, in the `onnx.ModelProto` `model` (in place), every `hf_r2::Weight` node (attribute `key`) by the
    nodes that compute `weights[key]` and every `hf_r2::Input` node by the Q/DQ pair of `inputs[key]`, keeping the
    placeholder's output name, and drop the `hf_r2` opset import."""
    b = _Builder()
    graph = model.graph
    for node in graph.node:
        if node.domain != MARKER_DOMAIN:
            b.nodes.append(node)
            continue
        key = next(a.s.decode() for a in node.attribute if a.name == "key")
        if node.op_type == "Weight":
            _weight_nodes(b, key, weights[key], node.output[0])
        elif node.op_type == "Input":
            _input_nodes(b, key, inputs[key], node.input[0], node.output[0])
        else:  # pragma: no cover - only the two kinds are emitted
            raise AssertionError(f"unknown placeholder {node.op_type}")
    graph.ClearField("node")
    graph.node.extend(b.nodes)
    graph.initializer.extend(b.initializers.values())
    kept = [o for o in model.opset_import if o.domain != MARKER_DOMAIN]
    model.ClearField("opset_import")
    model.opset_import.extend(kept)


def _used_names(graph: Any, used: set[str]) -> None:
    from onnx import AttributeProto

    for node in graph.node:
        used.update(node.input)
        for attr in node.attribute:
            if attr.type == AttributeProto.GRAPH:
                _used_names(attr.g, used)
            elif attr.type == AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    _used_names(sub, used)
    used.update(o.name for o in graph.output)


def prune_initializers(model: Any) -> int:
    """Remove the initializers no node reads (the float weights the placeholders replaced); returns how many."""
    used: set[str] = set()
    _used_names(model.graph, used)
    keep = [t for t in model.graph.initializer if t.name in used]
    removed = len(model.graph.initializer) - len(keep)
    model.graph.ClearField("initializer")
    model.graph.initializer.extend(keep)
    return removed


def count_ops(model: Any) -> Counter[str]:
    """`op_type -> number of nodes` in the main graph."""
    return Counter(node.op_type for node in model.graph.node)



def bits_per_weight(model: nn.Module, weights: dict[str, UniformWeight | PaletteWeight]) -> float:
    """Stored bits per Conv/Linear weight in the file (float weights at their dtype's width)."""
    bits, count = 0, 0
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, TARGET_LAYER_TYPES) or not isinstance(weight, torch.Tensor):
            continue
        count += weight.numel()
        bits += weights[name].stored_bits() if name in weights else 8 * weight.element_size() * weight.numel()
    return bits / max(1, count)


def ort_session(path: str | os.PathLike, session_config: dict[str, str] | None, what: str) -> Any:
    """An ONNX Runtime session (CPU) of the file `path`, with the session config entries `session_config`."""
    ort = require_module("onnxruntime", what)
    options = ort.SessionOptions()
    for key, value in (session_config or {}).items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
