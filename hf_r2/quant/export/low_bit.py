"""Low-bit export: integer codes + scales (uniform PTQ / QAT) or palette + indices (k-means / DKM), saved as
safetensors with a small JSON of the scheme, and a loader that rebuilds the model.

[`low_bit_layers`] reads the low-bit form out of a prepared model:

- a quantized layer ([`~hf_r2.quant.layers`]): `codes = clamp(round(W / s + z), 0, 2^b - 1)` (uint8), the step
  sizes `s` and zero points `z` (per output channel or per tensor), and the input grid if the layer quantizes its
  input; `W = (codes - z) s`;
- a palettized layer ([`~hf_r2.quant.palettize_`], buffer `weight_palette` of shape `(G, K)`): each weight's index
  in its group's palette; `W = palette[group, index]`.

[`save_low_bit`] writes a folder:

- `config.json` (+ the transformers / timm files needed to build the architecture, no float weights);
- `low_bit.safetensors`: per low-bit layer `<name>.weight.codes` (the codes, bit-packed: `bits` bits per weight)
  with `.scale` / `.zero_point` or `.palette`, `<name>.input.scale` / `.input.zero_point` if any; every other
  tensor of the model's state dict (biases, norms, float layers) as it is;
- `low_bit_config.json`: the format version, the method and its config, per layer the scheme / bits / shape, and
  the size report ([`size_report`]).

[`load_low_bit`] creates the architecture from `config.json`, loads the float tensors, decodes the weights, and
puts the input quantizers back, so the loaded model computes what the exported one did.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

import safetensors.torch
import torch
from torch import Tensor, nn

from ..._finite import check_finite_model
from ..._utils import give_default_mode, give_default_modes, write_json_atomic
from ...models import create_model, is_transformers_model
from ...output_folder import check_export_folder, exported_entries, replace_folder
from ...saving import is_timm_model, write_timm_config
from ..cluster.palettize import palette_indices
from ..layers import FakeQuantizer, QuantLayerMixin, quantize_layer_
from ..ptq.bn import folded_pairs, refold_structure_
from ..uniform import dequantize_tensor, quantize_tensor

__all__ = [
    "LOW_BIT_CONFIG_NAME",
    "LOW_BIT_WEIGHTS_NAME",
    "LowBitLayer",
    "low_bit_layers",
    "pack_bits",
    "unpack_bits",
    "size_report",
    "save_low_bit",
    "load_low_bit",
    "is_low_bit_folder",
    "check_low_bit_folder",
]

LOW_BIT_CONFIG_NAME = "low_bit_config.json"
LOW_BIT_WEIGHTS_NAME = "low_bit.safetensors"
FORMAT_VERSION = 1


@dataclass
class LowBitLayer:
    """The low-bit form of one layer's weight (and input grid).

    `scheme` is `"uniform"` (`codes` are integer codes, `W = (codes - zero_point) * scale`, `scale` / `zero_point`
    of shape `(C,)` per channel or `(1,)`) or `"palette"` (`codes` are indices, `W = palette[g, codes]` for the
    rows of group `g`, `palette` of shape `(G, K)`). `codes` is uint8 with the weight's shape.
    """

    scheme: str
    bits: int
    codes: Tensor
    scale: Tensor | None = None
    zero_point: Tensor | None = None
    palette: Tensor | None = None
    input_bits: int | None = None
    input_scale: Tensor | None = None
    input_zero_point: Tensor | None = None

    def dequantize(self) -> Tensor:
        """The float32 weight."""
        if self.scheme == "uniform":
            shape = [-1] + [1] * (self.codes.dim() - 1)
            scale, zero_point = self.scale.float().reshape(shape), self.zero_point.float().reshape(shape)
            return dequantize_tensor(self.codes, scale, zero_point)
        groups = self.palette.shape[0]
        rows = self.codes.reshape(groups, -1).long()
        return torch.gather(self.palette.float(), 1, rows).reshape(self.codes.shape)

    def overhead_bits(self) -> int:
        """Bits stored beside the codes: scales and zero points, or the palette (float32 each)."""
        extra = [self.scale, self.zero_point, self.palette]
        return 32 * sum(t.numel() for t in extra if t is not None)


@torch.no_grad()
def low_bit_layers(model: nn.Module) -> dict[str, LowBitLayer]:
    """The integer codes + scales (quantized layers) and palette indices (palettized layers) of `model`.

    Raises a `ValueError` if `model` has neither (nothing was quantized or palettized).
    """
    layers: dict[str, LowBitLayer] = {}
    for name, module in model.named_modules():
        palette = getattr(module, "weight_palette", None)
        if isinstance(module, QuantLayerMixin) and module.weight_quantizer is not None:
            wq = module.weight_quantizer
            view = [-1] + [1] * (module.weight.dim() - 1) if wq.per_channel else [1] * module.weight.dim()
            scale = wq.scale.detach().abs().float()
            zero_point = wq.zero_point.detach().float()
            codes = quantize_tensor(module.weight.detach(), scale.reshape(view), zero_point.reshape(view), wq.bits)
            layer = LowBitLayer("uniform", wq.bits, codes, scale.clone(), zero_point.clone())
        elif isinstance(palette, Tensor):
            bits = max(1, math.ceil(math.log2(palette.shape[1])))
            layer = LowBitLayer("palette", bits, palette_indices(module).to(torch.uint8), palette=palette.float())
        else:
            continue
        iq = getattr(module, "input_quantizer", None)
        if isinstance(iq, FakeQuantizer):
            layer.input_bits = iq.bits
            layer.input_scale = iq.scale.detach().abs().float().clone()
            layer.input_zero_point = iq.zero_point.detach().float().clone()
        layers[name] = layer
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no quantized or palettized layer: run `quantize_`, `prepare_qat` or "
            "`palettize_` first."
        )
    return layers


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Pack uint8 codes `< 2^bits` into a flat uint8 tensor of `ceil(n * bits / 8)` bytes (little-endian bits)."""
    flat = codes.reshape(-1).to(torch.uint8)
    if bits == 8:
        return flat.clone()
    shifts = torch.arange(bits, dtype=torch.uint8)
    stream = ((flat[:, None] >> shifts) & 1).reshape(-1)  # bit j of code i at position i * bits + j
    stream = torch.cat([stream, stream.new_zeros((-stream.numel()) % 8)])
    weights = (1 << torch.arange(8, dtype=torch.int32)).to(torch.int32)
    return (stream.reshape(-1, 8).to(torch.int32) * weights).sum(1).to(torch.uint8)


def unpack_bits(packed: Tensor, bits: int, numel: int) -> Tensor:
    """The `numel` codes that [`pack_bits`] packed, as a flat uint8 tensor."""
    if bits == 8:
        return packed.reshape(-1)[:numel].clone()
    stream = ((packed.reshape(-1)[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1)
    stream = stream[: numel * bits].reshape(numel, bits).to(torch.int32)
    return (stream << torch.arange(bits, dtype=torch.int32)).sum(1).to(torch.uint8)


def size_report(layers: dict[str, LowBitLayer], model: nn.Module | None = None) -> dict[str, Any]:
    """Bits per weight of the low-bit layers (codes plus their scales / palettes) and the model's size in bytes.

    `low_bit_bytes` counts the packed codes and their float32 side data (and input grids) plus every other tensor
    of `model`'s state dict in its own dtype: the tensors [`save_low_bit`] writes; `float_bytes` is the state dict
    of the float architecture in its own dtypes (float32 for a float model). The quantizers' own tensors count once,
    as side data, in neither total's "other tensors".
    """
    weights = sum(layer.codes.numel() for layer in layers.values())
    code_bits = sum(layer.codes.numel() * layer.bits for layer in layers.values())
    side_bits = sum(layer.overhead_bits() for layer in layers.values())
    report: dict[str, Any] = {
        "low_bit_layers": len(layers),
        "low_bit_weights": weights,
        "code_bits_per_weight": code_bits / max(1, weights),
        "bits_per_weight": (code_bits + side_bits) / max(1, weights),
    }
    if model is not None:
        other = sum(t.numel() * t.element_size() for t in _float_state(model, layers).values())
        weight_bytes = sum(
            model.get_submodule(name).weight.numel() * model.get_submodule(name).weight.element_size()
            for name in layers
        )
        float_bytes = other + weight_bytes
        low_bytes = other + sum(math.ceil(layer.codes.numel() * layer.bits / 8) for layer in layers.values())
        low_bytes += side_bits // 8
        low_bytes += sum(
            4 * (layer.input_scale.numel() + layer.input_zero_point.numel())
            for layer in layers.values()
            if layer.input_bits is not None
        )
        report.update(float_bytes=float_bytes, low_bit_bytes=low_bytes, compression=float_bytes / max(1, low_bytes))
    return report


def _float_state(model: nn.Module, layers: dict[str, LowBitLayer]) -> dict[str, Tensor]:
    """The state dict of the float architecture, minus the low-bit weights and the quantizers' own tensors."""
    low_keys = {f"{name}.weight" for name in layers}
    quantizer_parts = (".weight_quantizer.", ".input_quantizer.")
    return {
        k: v.detach().contiguous()
        for k, v in model.state_dict().items()
        if k not in low_keys and not any(p in f".{k}" for p in quantizer_parts)
    }


def _save_architecture(model: nn.Module, folder: str) -> None:
    if is_transformers_model(model):
        model.config.save_pretrained(folder)
        return
    if is_timm_model(model):
        write_timm_config(model, folder)
        return
    raise ValueError(
        f"Cannot export {type(model).__name__}: `save_low_bit` needs a timm or transformers model, whose config "
        "lets the loader rebuild the architecture."
    )


def save_low_bit(
    model: nn.Module,
    save_directory: str | os.PathLike,
    *,
    method: str | None = None,
    method_config: dict[str, Any] | None = None,
    base_model: str | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Save the low-bit form of `model` (see the module docstring) into `save_directory`, atomically.

    The folder is written under a temporary name beside `save_directory` and renamed into place, so an existing
    export is replaced only by a complete one. Only an export is replaced ([`check_low_bit_folder`]): it keeps its
    mode, and the entries added beside it (card, results, the user's links) are moved over unchanged, except the
    files `hf-r2 export` made from the old weights (`model.onnx`, a Core ML package and their
    `export_results.json`), which go with the old export: they no longer describe the folder's weights. A link to a
    folder is followed (the export goes where it points; the link stays).

    Args:
        model (`torch.nn.Module`):
            A timm or transformers model after `quantize_`, `prepare_qat` (+ training) or `palettize_`.
        save_directory (`str` or `os.PathLike`):
            The export folder.
        method (`str`, *optional*):
            What produced it (`"ptq"`, `"qat"`, `"kmeans"`, `"dkm"`), recorded in the JSON.
        method_config (`dict`, *optional*):
            The method's config (`PTQConfig.to_dict()`, ...), recorded in the JSON.
        base_model (`str`, *optional*):
            The full-precision model it came from (a Hub id or a path), recorded in the JSON.
        extra (`dict`, *optional*):
            More JSON-serialisable entries to record (e.g. measured accuracies).

    Returns:
        `dict`: the contents of `low_bit_config.json`.
    """
    check_finite_model(model, "the model to export")  # a NaN / inf model is no result to publish
    save_directory = check_low_bit_folder(save_directory)
    layers = low_bit_layers(model)
    tensors = dict(_float_state(model, layers))
    layer_info: dict[str, Any] = {}
    for name, layer in layers.items():
        key = f"{name}.weight"
        tensors[f"{key}.codes"] = pack_bits(layer.codes, layer.bits)
        info: dict[str, Any] = {"scheme": layer.scheme, "bits": layer.bits, "shape": list(layer.codes.shape)}
        if layer.scheme == "uniform":
            tensors[f"{key}.scale"] = layer.scale
            tensors[f"{key}.zero_point"] = layer.zero_point
            info["per_channel"] = layer.scale.numel() > 1 or layer.codes.shape[0] == 1
        else:
            tensors[f"{key}.palette"] = layer.palette
            info["groups"] = layer.palette.shape[0]
        if layer.input_bits is not None:
            tensors[f"{name}.input.scale"] = layer.input_scale
            tensors[f"{name}.input.zero_point"] = layer.input_zero_point
            info["input_bits"] = layer.input_bits
        layer_info[name] = info
    description = {
        "format_version": FORMAT_VERSION,
        "method": method,
        "method_config": method_config,
        "base_model": base_model,
        "library": "transformers" if is_transformers_model(model) else "timm",
        "size": size_report(layers, model),
        "folded_bn": [list(pair) for pair in folded_pairs(model)],
        "layers": layer_info,
        **(extra or {}),
    }
    parent = os.path.dirname(save_directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-low-bit-", dir=parent)
    try:
        give_default_mode(tmp)  # 0755 under the usual umask, not mkdtemp's 0700
        _save_architecture(model, tmp)
        safetensors.torch.save_file(
            {k: v.contiguous() for k, v in tensors.items()},
            os.path.join(tmp, LOW_BIT_WEIGHTS_NAME),
            metadata={"format": "pt", "hf_r2": "low_bit"},
        )
        give_default_modes(tmp)  # safetensors writes 0600
        write_json_atomic(os.path.join(tmp, LOW_BIT_CONFIG_NAME), description)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_folder(tmp, save_directory, keep_entries=True, leave=exported_entries(save_directory))
    return description


def is_low_bit_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder written by [`save_low_bit`]."""
    return os.path.isfile(os.path.join(os.fspath(path), LOW_BIT_CONFIG_NAME))


def check_low_bit_folder(path: str | os.PathLike, option: str = "save_directory") -> str:
    """The folder [`save_low_bit`] would write for `path` (a link is followed); a `ValueError` naming the fix if
    `path` exists and is a file, or a folder that is neither empty nor a low-bit export (the user's files, e.g. a
    float model's `config.json`, are never overwritten). `option` names the path in the message (`--output-dir`
    for the command line, which checks before quantizing)."""
    return check_export_folder(os.fspath(path), is_low_bit_folder, "a low-bit export", option)


def load_low_bit(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model saved by [`save_low_bit`]: `(model, low_bit_config)`.

    The weights of the low-bit layers are decoded to float32 (they hold exactly the `2^bits` values of their
    grid or palette); layers that quantized their input get a frozen input quantizer with the saved grid, so the
    model computes what the exported one did. Everything else loads as saved; a missing or unexpected tensor
    raises a `ValueError` naming it.
    """
    path = os.fspath(path)
    if not is_low_bit_folder(path):
        raise FileNotFoundError(f"{path!r} has no {LOW_BIT_CONFIG_NAME}: not a low-bit export (see `save_low_bit`).")
    with open(os.path.join(path, LOW_BIT_CONFIG_NAME)) as f:
        description = json.load(f)
    version = description.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{path!r} holds low-bit format version {version!r}; this hf-r2 reads version {FORMAT_VERSION}. "
            "Upgrade hf-r2."
        )
    tensors = safetensors.torch.load_file(os.path.join(path, LOW_BIT_WEIGHTS_NAME))
    model = create_model(path, pretrained=False)
    if description.get("folded_bn"):
        refold_structure_(model, [tuple(pair) for pair in description["folded_bn"]])
    modules = dict(model.named_modules())
    state: dict[str, Tensor] = {}
    input_grids: dict[str, tuple[int, Tensor, Tensor]] = {}
    used: set[str] = set()
    for name, info in description["layers"].items():
        key = f"{name}.weight"
        if name not in modules:
            raise ValueError(f"The export names layer {name!r}, which the architecture in {path!r} does not have.")
        shape = info["shape"]
        codes = unpack_bits(tensors[f"{key}.codes"], info["bits"], math.prod(shape)).reshape(shape)
        used.add(f"{key}.codes")
        if info["scheme"] == "uniform":
            layer = LowBitLayer("uniform", info["bits"], codes, tensors[f"{key}.scale"], tensors[f"{key}.zero_point"])
            used.update({f"{key}.scale", f"{key}.zero_point"})
        else:
            layer = LowBitLayer("palette", info["bits"], codes, palette=tensors[f"{key}.palette"])
            used.add(f"{key}.palette")
        state[key] = layer.dequantize()
        if info.get("input_bits") is not None:
            input_grids[name] = (
                info["input_bits"],
                tensors[f"{name}.input.scale"],
                tensors[f"{name}.input.zero_point"],
            )
            used.update({f"{name}.input.scale", f"{name}.input.zero_point"})
    for key, value in tensors.items():
        if key not in used:
            state[key] = value
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"The low-bit export in {path!r} does not match its architecture: missing {sorted(missing)[:8]}, "
            f"unexpected {sorted(unexpected)[:8]}."
        )
    for name, (bits, scale, zero_point) in input_grids.items():
        quantizer = FakeQuantizer(bits, symmetric=False, activation=True)
        with torch.no_grad():
            quantizer.scale.copy_(scale.reshape(-1))
            quantizer.zero_point.copy_(zero_point.reshape(-1))
            quantizer.initialized.fill_(True)
        quantize_layer_(modules[name], None, quantizer)
    model.eval()
    return model, description
