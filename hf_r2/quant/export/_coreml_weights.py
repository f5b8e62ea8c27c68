"""The Core ML side of [`hf_r2.quant.export.coreml_export`]: a layer's low-bit weight as the arrays of one Core ML
compression op ([`palette_weight`]: a palettized layer's own palette and indices; [`uniform_weight`]: a PTQ / QAT
grid, as linear codes or, at 1 to 3 bits, as the palette of its levels), [`replace_weight_consts`], which puts
those ops in place of the float weight constants of a MIL program, and [`read_weights`], which reads them back
from a saved `.mlpackage`. Imports `coremltools` inside the functions only, so this module loads without it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..cluster.palettize import palette_indices
from ..layers import QuantLayerMixin
from ..uniform import dequantize_tensor, quantize_tensor

__all__ = [
    "LUT_OP",
    "LINEAR_OP",
    "CoreMLWeight",
    "palette_weight",
    "uniform_weight",
    "op_name",
    "replace_weight_consts",
    "final_op_names",
    "read_weights",
    "package_bytes",
]

LUT_OP = "constexpr_lut_to_dense"
LINEAR_OP = "constexpr_blockwise_shift_scale"
# index types of iOS18's constexpr_lut_to_dense: the palette is padded to 2^width entries of the narrowest one
_INDEX_WIDTHS = (1, 2, 3, 4, 6, 8)
_LUT_MAX_GRID_BITS = 3  # uniform grids up to 3 bits are stored as palettes: Core ML has no 1- to 3-bit linear type


@dataclass
class CoreMLWeight:
    """A weight as one Core ML op decodes it.

    `kind` is `"palette"` (hf-r2's palette), `"grid-palette"` (a uniform grid stored as the palette of its `2^b`
    levels per channel) or `"linear"` (a uniform grid as codes, scale and offset). For the two palette kinds,
    `values` holds the indices (the weight's shape, uint8) and `table` the palette `(G, 1, ..., 1, 2^w, 1)` (float32,
    padded to `2^w` entries for `w`-bit indices), decoded as `W = table[g, values]` with `g` the group of the
    weight's output channel; for `"linear"`, `values` holds the codes and `table` the scale, `offset` the zero point
    (both float32, `(C, 1, ..., 1)` per channel or all ones per tensor), decoded as
    `W = scale (values - offset)`.
    `storage` is the Core ML element type of `values` (`"uint1"` ... `"uint8"`), `bits` hf-r2's bit width.
    """

    kind: str
    bits: int
    storage: str
    values: np.ndarray
    table: np.ndarray
    offset: np.ndarray | None = None

    @property
    def op_type(self) -> str:
        return LINEAR_OP if self.kind == "linear" else LUT_OP

    def stored_bits(self, float_bits: int) -> int:
        """Bits in the file: `values` at the storage width, the palette / scales / offsets at `float_bits`."""
        side = self.table.size + (0 if self.offset is None else self.offset.size)
        return int(self.storage[4:]) * self.values.size + float_bits * side

    def decode(self) -> np.ndarray:
        """The weight as Core ML rebuilds it (in float32, as coremltools' own `decompress`)."""
        if self.kind == "linear":
            return self.table * (self.values.astype(self.table.dtype) - self.offset)
        groups, size = self.table.shape[0], self.table.shape[-2]
        rows = self.values.reshape(groups, -1).astype(np.int64)
        return np.take_along_axis(self.table.reshape(groups, size), rows, axis=1).reshape(self.values.shape)


def _lut(palette: torch.Tensor, rank: int) -> tuple[np.ndarray, str]:
    """`(G, K)` palette -> iOS18 LUT `(G, 1, ..., 1, 2^w, 1)` and its index type, padded with the last entry."""
    groups, size = palette.shape
    width = next(w for w in _INDEX_WIDTHS if 2**w >= size)
    table = palette.detach().float().cpu()
    if 2**width > size:
        table = torch.cat([table, table[:, -1:].expand(groups, 2**width - size)], dim=1)
    return table.numpy().reshape((groups,) + (1,) * (rank - 1) + (2**width, 1)), f"uint{width}"


@torch.no_grad()
def palette_weight(module: nn.Module) -> CoreMLWeight:
    """A palettized layer's `weight_palette` and hf-r2's own indices ([`~hf_r2.quant.palette_indices`])."""
    palette = module.weight_palette
    indices = palette_indices(module)  # raises if the weight left its palette
    table, storage = _lut(palette, indices.dim())
    bits = max(1, (palette.shape[1] - 1).bit_length())
    return CoreMLWeight("palette", bits, storage, indices.cpu().numpy(), table)


@torch.no_grad()
def uniform_weight(name: str, module: QuantLayerMixin) -> CoreMLWeight:
    """The weight grid of quantized layer `name`: the codes hf-r2 computes (with its own operations) and its scales
    and zero points; at 1 to 3 bits the grid's levels `(k - z) s`, `k = 0 .. 2^b - 1`, as a palette per channel."""
    wq = module.weight_quantizer
    if getattr(wq, "_observer", None) is not None or not bool(wq.initialized):
        raise ValueError(f"The weight quantizer of layer {name!r} has no grid yet (still observing, or never "
                         "initialised): run a forward pass or finish calibration before exporting.")
    weight = module.weight.detach().float()
    bits = wq.bits
    scale = wq.scale.detach().abs().float().reshape(-1)  # the forward uses |s|
    zero_point = wq.zero_point.detach().float().reshape(-1)
    per_channel = wq.per_channel and scale.numel() == weight.shape[0] and weight.dim() >= 1
    view = [-1] + [1] * (weight.dim() - 1) if per_channel else [1] * weight.dim()
    scale, zero_point = scale.reshape(view), zero_point.reshape(view)
    codes = quantize_tensor(weight, scale, zero_point, bits)  # as FakeQuantizer's forward rounds
    if bits <= _LUT_MAX_GRID_BITS:
        levels = torch.arange(2**bits, dtype=scale.dtype, device=scale.device)
        palette = dequantize_tensor(levels, scale.reshape(-1, 1), zero_point.reshape(-1, 1))  # (C or 1, 2^b)
        table, storage = _lut(palette, weight.dim())
        return CoreMLWeight("grid-palette", bits, storage, codes.cpu().numpy(), table)
    return CoreMLWeight("linear", bits, "uint4" if bits == 4 else "uint8", codes.cpu().numpy(),
                        scale.cpu().numpy(), zero_point.cpu().numpy())


def op_name(layer: str) -> str:
    """The name of the op that holds `layer`'s weight in the Core ML program (a MIL identifier)."""
    return re.sub(r"\W", "_", layer) + "_weight"


def _typed(values: np.ndarray, storage: str) -> np.ndarray:
    """`values` marked with the Core ML element type `storage` (sub-byte types are uint8 arrays with a tag)."""
    from coremltools.converters.mil.mil import types

    return values.astype(np.uint8).astype(types.nptype_from_builtin(types.string_to_builtin(storage)))


def _add_op(weight: CoreMLWeight, name: str, before: Any) -> Any:
    from coremltools.converters.mil import Builder as mb

    if weight.kind == "linear":
        return mb.constexpr_blockwise_shift_scale(data=_typed(weight.values, weight.storage), scale=weight.table,
                                                  offset=weight.offset, before_op=before, name=name)
    return mb.constexpr_lut_to_dense(indices=_typed(weight.values, weight.storage), lut=weight.table,
                                     before_op=before, name=name)


def replace_weight_consts(program: Any, weights: dict[str, CoreMLWeight], prefix: str = "") -> dict[str, str]:
    """In the MIL `program` straight from the PyTorch frontend (no passes run, so its constants still carry the
    parameter names `<prefix><layer>.weight`), replace each layer's weight constant by the op of `weights[layer]`,
    in place; returns `layer -> op name`. Raises `RuntimeError` when a layer's constant is not in the program."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil.scope import ScopeInfo

    function = program.functions["main"]
    wanted = {f"{prefix}{layer}.weight": layer for layer in weights}
    names: dict[str, str] = {}
    with function:
        for op in list(function.operations):
            layer = wanted.get(op.name) if op.op_type == "const" else None
            if layer is None:
                continue
            name = op_name(layer)
            if name in names.values():
                name = f"{name}_{len(names)}"
            # the frontend's graph checks that every op knows the PyTorch module it came from: the constant's scopes
            with mb.scope(*(ScopeInfo(source=source, data=data) for source, data in op.scopes.items())):
                new = _add_op(weights[layer], name, op)
            function.replace_uses_of_var_after_op(anchor_op=op, old_var=op.outputs[0], new_var=new)
            function.remove_ops([op])
            names[layer] = name
    missing = sorted(set(weights) - set(names))
    if missing:
        raise RuntimeError(f"The weights of layers {missing[:8]} are not constants of the converted program (shared "
                           "with another layer, or computed in the graph): they cannot be stored compressed.")
    return names


def final_op_names(mlmodel: Any, names: dict[str, str]) -> dict[str, str]:
    """`layer -> op name` in the converted `mlmodel`: the passes keep the names [`replace_weight_consts`] gave,
    except that float16 conversion replaces each op by one with float16 tables, named `<name>_cast_fp16`."""
    final = {op.name for op in mlmodel._mil_program.functions["main"].operations if op.op_type in (LUT_OP, LINEAR_OP)}
    out = {}
    for layer, name in names.items():
        found = [name] if name in final else sorted(n for n in final if n.startswith(f"{name}_cast"))
        if len(found) != 1:
            raise RuntimeError(f"The converted program has {len(found)} ops for the weight of layer {layer!r} "
                               f"(named {name!r}); expected one.")
        out[layer] = found[0]
    return out


def read_weights(path: str | os.PathLike) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Read a saved `.mlpackage` back: `(ops, metadata)`. `ops` maps the name of each `constexpr_*` op to its
    `op_type`, `storage` (element type of the indices / codes), `values` (the indices / codes, uint8), `dtype` (of
    the palette or scale: `"fp32"` / `"fp16"`) and `decoded` (the weight as coremltools decompresses it);
    `metadata` is the model's user-defined metadata."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load
    from coremltools.converters.mil.mil import types

    mlmodel = ct.models.MLModel(os.fspath(path), skip_model_load=True)
    spec = mlmodel.get_spec()
    program = load(spec, spec.specificationVersion, mlmodel.weights_dir)
    ops: dict[str, dict[str, Any]] = {}
    for op in program.functions["main"].operations:
        if op.op_type not in (LUT_OP, LINEAR_OP):
            continue
        values, table = (op.indices, op.lut) if op.op_type == LUT_OP else (op.data, op.scale)
        ops[op.name] = {
            "op_type": op.op_type,
            "storage": types.builtin_to_string(values.dtype),
            "values": np.asarray(values.val).astype(np.uint8),
            "dtype": types.builtin_to_string(table.dtype),
            "decoded": np.asarray(op.materialized_val_inference()),
        }
    return ops, dict(spec.description.metadata.userDefined)


def package_bytes(path: str | os.PathLike) -> int:
    """The size of a `.mlpackage` folder: the bytes of all its files."""
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)
