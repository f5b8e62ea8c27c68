"""`quant.export.coreml_export`: palettized, PTQ / QAT and float models written as Core ML packages, then read back
from disk with coremltools' own MIL loader (Core ML itself runs on Apple systems only, so nothing here predicts).

What is checked, for each compressed layer of the file, against the model in memory:

- the op: `constexpr_lut_to_dense` for palettes and 1- to 3-bit grids, `constexpr_blockwise_shift_scale` for 4- to
  8-bit grids, with the sub-byte element type of the bit width (`uint1` ... `uint4`, `uint8`), feeding the layer's
  Conv / Linear op;
- the arrays: the indices are hf-r2's ([`palette_indices`]) and the palette is hf-r2's `weight_palette`, bit for bit;
  the codes are hf-r2's and the scales / zero points are the quantizer's;
- the weight coremltools decodes from them equals hf-r2's weight bit for bit in float32 (every kind), and in float16
  equals it rounded to float16 (palettes) or to within float16 precision (linear grids);
- sizes: the package holds the weights at their bit width (against the float conversion of the same model).
"""

import os
import sys

import numpy as np
import pytest
import torch
from conftest import make_timm

ct = pytest.importorskip("coremltools", reason="Core ML export tests need `pip install 'hf-r2[coreml]'` (coremltools)")

from hf_r2.quant import (  # noqa: E402
    PalettizeConfig,
    PTQConfig,
    QATConfig,
    palette_indices,
    palettize_,
    post_training_quantize_,
    prepare_qat,
)
from hf_r2.quant.cluster.dkm import prepare_dkm  # noqa: E402
from hf_r2.quant.export.coreml_export import (  # noqa: E402
    compare_coreml_weights,
    export_coreml,
    is_coremltools_available,
    require_coremltools,
)
from hf_r2.quant.layers import QuantLayerMixin, quantized_layers  # noqa: E402
from hf_r2.quant.uniform import quantize_tensor  # noqa: E402

SIZE = 32
LUT, LINEAR = "constexpr_lut_to_dense", "constexpr_blockwise_shift_scale"


def _calibration():
    return [{"pixel_values": torch.randn(8, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(s))}
            for s in (1, 2)]


def _model(setting: str, name: str = "test_resnet"):
    """`P<b>` (palettes), `P<b>-g<n>` (groups of n channels), `W<b>` (weight-only PTQ, 8-bit first / last layer),
    `QAT-W2A8`, `FP`."""
    torch.manual_seed(0)
    model = make_timm(name).eval()
    if setting.startswith("P"):
        bits, _, group = setting[1:].partition("-g")
        return palettize_(model, PalettizeConfig(bits=int(bits), group_size=int(group) if group else None))
    if setting.startswith("QAT"):
        return prepare_qat(model, QATConfig(w_bits=2, a_bits=8), _calibration())
    if setting.startswith("W"):
        return post_training_quantize_(model, PTQConfig(w_bits=int(setting[1:]), a_bits=None, calibration_batches=2),
                                       _calibration())
    return model


def _read(path):
    """The package's program as coremltools loads it from disk: `(ops by name, user metadata)`."""
    from coremltools.converters.mil.frontend.milproto.load import load

    mlmodel = ct.models.MLModel(str(path), skip_model_load=True)
    spec = mlmodel.get_spec()
    program = load(spec, spec.specificationVersion, mlmodel.weights_dir)
    return {op.name: op for op in program.functions["main"].operations}, dict(spec.description.metadata.userDefined)


def _type(var) -> str:
    from coremltools.converters.mil.mil import types

    return types.builtin_to_string(var.dtype)


def _low_bit(model) -> dict:
    layers = {name: m for name, m in quantized_layers(model) if m.weight_quantizer is not None}
    layers.update({name: m for name, m in model.named_modules() if hasattr(m, "weight_palette")})
    return layers


def _check_op(op, module) -> str:
    """Asserts that `op` holds `module`'s weight as hf-r2 has it; returns its kind."""
    assert {child.op_type for child in op.outputs[0].child_ops} <= {"conv", "linear", "matmul"}
    decoded = op.materialized_val_inference()
    if not isinstance(module, QuantLayerMixin):  # a palettized layer: its palette and indices
        palette = module.weight_palette.float().numpy()
        groups, size = palette.shape
        assert op.op_type == LUT and _type(op.indices) == f"uint{(size - 1).bit_length()}"
        lut = op.lut.val.reshape(groups, -1)
        assert np.array_equal(lut[:, :size].view(np.uint32), palette.view(np.uint32))  # bit for bit
        assert np.array_equal(op.indices.val.astype(np.uint8), palette_indices(module).numpy())
        expected = module.weight.detach().numpy()
        assert decoded.dtype == np.float32 and np.array_equal(decoded.view(np.uint32), expected.view(np.uint32))
        return "palette"
    wq = module.weight_quantizer
    bits, weight = wq.bits, module.weight.detach()
    view = [-1] + [1] * (weight.dim() - 1) if wq.per_channel else [1] * weight.dim()
    scale, zero_point = wq.scale.detach().abs().reshape(view), wq.zero_point.reshape(view)
    codes = quantize_tensor(weight, scale, zero_point, bits).numpy()  # hf-r2's codes
    with torch.no_grad():
        expected = module.quantized_weight().numpy()  # hf-r2's fake-quantized weight
    if bits <= 3:  # the grid as a palette of its 2^b levels per channel
        assert op.op_type == LUT and _type(op.indices) == f"uint{bits}"
        assert np.array_equal(op.indices.val.astype(np.uint8), codes)
        kind = "grid-palette"
    else:
        assert op.op_type == LINEAR and _type(op.data) == ("uint4" if bits == 4 else "uint8")
        assert np.array_equal(op.data.val.astype(np.uint8), codes)
        assert np.array_equal(op.scale.val, scale.numpy()) and np.array_equal(op.offset.val, zero_point.numpy())
        kind = "linear"
    assert decoded.dtype == np.float32 and np.array_equal(decoded.view(np.uint32), expected.view(np.uint32))
    return kind


@pytest.mark.parametrize("setting", ["P1", "P2-g2", "W8", "W4", "W2", "QAT-W2A8"])
def test_weights_in_the_package_are_hf_r2s(setting, tmp_path):
    model = _model(setting)
    baseline = setting in ("P1", "W4")  # the float conversion costs a second conversion: measured twice here
    report = export_coreml(model, tmp_path / "model.mlpackage", input_size=SIZE, float_baseline=baseline)
    low_bit = _low_bit(model)
    print(f"\n{setting}: {report['file_bytes']} bytes (float conversion {report['float_file_bytes']}), "
          f"{report['bits_per_weight']:.2f} bits/weight, {report['ops']}")
    assert report["deployment_target"] == "iOS18" and report["precision"] == "float32"
    assert report["input_size"] == [3, SIZE, SIZE] and report["activations"] == "float"
    assert report["low_bit_layers"] == len(low_bit) == sum(report["ops"].values()) > 0
    assert report["weights"] == ("palettized" if setting.startswith("P") else "quantized")
    inputs = sum(m.input_quantizer is not None for _, m in quantized_layers(model))
    assert report["input_quantizers_dropped"] == inputs == (len(low_bit) if setting.startswith("QAT") else 0)
    ops, metadata = _read(report["path"])
    assert metadata["hf_r2_weights"] == report["weights"]
    kinds = {name: _check_op(ops[report["layers"][name]["op"]], module) for name, module in low_bit.items()}
    assert kinds == {name: report["layers"][name]["kind"] for name in low_bit}
    assert sum(op.op_type in (LUT, LINEAR) for op in ops.values()) == len(low_bit)
    assert any(op.op_type == "batch_norm" for op in ops.values())  # not folded into the compressed convs
    check = compare_coreml_weights(model, report["path"])
    assert check["num_layers"] == check["exact_layers"] == len(low_bit) and check["values_match"]
    assert check["max_abs_diff"] == 0.0 and check["missing"] == [] and check["precision"] == "float32"
    # the weights are stored at their bit width: everything else (BatchNorm, biases, the program) is small
    weights = sum(m.weight.numel() for name, m in model.named_modules() if name in report["layers"])
    stored = report["bits_per_weight"] * weights / 8
    assert stored <= report["file_bytes"] <= stored + 64 * 1024
    if baseline:  # the float conversion holds every weight in float32
        assert 4 * weights <= report["float_file_bytes"] <= 4 * weights + 64 * 1024
        assert report["file_bytes"] < report["float_file_bytes"] * (report["bits_per_weight"] + 2) / 32
    else:
        assert report["float_file_bytes"] is None


def test_float_model_and_transformers_model(tmp_path):
    model = _model("FP")
    report = export_coreml(model, tmp_path / "fp.mlpackage", input_size=(SIZE, SIZE), float_baseline=False)
    assert report["weights"] == "float" and report["ops"] == {} and report["float_file_bytes"] is None
    assert report["bits_per_weight"] == 32 and {info["kind"] for info in report["layers"].values()} == {"float"}
    assert report["file_bytes"] >= 4 * sum(p.numel() for p in model.parameters() if p.dim() > 1)
    assert compare_coreml_weights(model, report["path"])["num_layers"] == 0
    # a transformers ViT: its Linear layers become `linear` ops reading the compressed weights
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    vit = ViTForImageClassification(ViTConfig(image_size=SIZE, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                              num_attention_heads=2, intermediate_size=64, num_labels=10)).eval()
    palettize_(vit, PalettizeConfig(bits=2, skip_first_last=True))
    report = export_coreml(vit, tmp_path / "vit.mlpackage", float_baseline=False)  # 32x32 from its config
    assert report["input_size"] == [3, SIZE, SIZE] and report["weights"] == "palettized"
    ops, _ = _read(report["path"])
    for name, module in _low_bit(vit).items():
        assert _check_op(ops[report["layers"][name]["op"]], module) == "palette"
    assert {info["kind"] for info in report["layers"].values()} == {"palette", "float"}  # first and last: float


@pytest.mark.parametrize("setting", ["P2", "W4"])
def test_float16_packages(setting, tmp_path):
    model = _model(setting)
    path = tmp_path / "model.mlpackage"
    (path / "Data" / "stale").mkdir(parents=True)  # an older package there: replaced whole
    (path / "Manifest.json").write_text("{}")
    report = export_coreml(model, path, input_size=SIZE, precision="float16")
    assert sorted(os.listdir(tmp_path)) == ["model.mlpackage"] and not (path / "Data" / "stale").exists()
    weights = sum(m.weight.numel() for name, m in model.named_modules() if name in report["layers"])
    stored = report["bits_per_weight"] * weights / 8  # palettes, scales and offsets at 16 bits
    assert stored <= report["file_bytes"] <= stored + 64 * 1024 and report["bits_per_weight"] < 4.2
    assert 2 * weights <= report["float_file_bytes"] <= 2 * weights + 64 * 1024  # the float conversion: float16
    ops, _ = _read(path)
    check = compare_coreml_weights(model, path)
    assert check["precision"] == "float16" and check["values_match"] and check["missing"] == []
    for name, info in check["layers"].items():
        op = ops[info["op"]]
        assert _type(op.lut if op.op_type == LUT else op.scale) == "fp16"
        if info["kind"] == "palette":  # each palette entry rounded to float16, so each weight too
            assert info["exact"] and info["max_abs_diff"] == 0.0
        else:  # s (q - z) computed in float16
            assert info["max_abs_diff"] <= 2e-3 * info["max_abs_weight"]


def test_errors(tmp_path, monkeypatch):
    model = _model("P2")
    with pytest.raises(ValueError, match=r"`path` must be a `\.mlpackage` folder.*did you mean '.*m\.mlpackage'"):
        export_coreml(model, tmp_path / "m", input_size=SIZE)
    with pytest.raises(ValueError, match="`precision` must be one of"):
        export_coreml(model, tmp_path / "m.mlpackage", input_size=SIZE, precision="int8")
    with pytest.raises(ValueError, match="`input_size` must be"):
        export_coreml(model, tmp_path / "m.mlpackage", input_size=0)
    dkm = make_timm("test_resnet")
    prepare_dkm(dkm, PalettizeConfig(bits=2, method="dkm"))
    with pytest.raises(ValueError, match="finalize_dkm"):
        export_coreml(dkm, tmp_path / "m.mlpackage", input_size=SIZE)
    assert not os.path.exists(tmp_path / "m.mlpackage")
    assert is_coremltools_available() and require_coremltools() is ct
    monkeypatch.setitem(sys.modules, "coremltools", None)  # as if the extra were not installed
    assert not is_coremltools_available()
    for call in (lambda: export_coreml(model, tmp_path / "m.mlpackage"), lambda: compare_coreml_weights(model, ".")):
        with pytest.raises(ImportError, match=r"pip install 'hf-r2\[coreml\]'"):
            call()


def test_package_imports_without_coremltools():
    """No module of hf_r2.quant imports coremltools when it loads (only inside functions), so `import hf_r2.quant`
    works without the extra; test_errors checks the ImportError that the functions raise then."""
    import ast
    from pathlib import Path

    import hf_r2.quant

    for path in Path(hf_r2.quant.__file__).parent.rglob("*.py"):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:  # module level only
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [
                node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] == "coremltools" for n in names), f"{path.name}:{node.lineno}"
