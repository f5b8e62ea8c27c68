"""`quant.export.onnx_export`: PTQ / QAT models as QDQ graphs, palettized models as palette + indices and float models,
run by ONNX Runtime against hf-r2's own (fake-quantized) PyTorch forward. The QDQ graphs here are the INT4 storage
(`storage="int4"`, the table of the module docstring as it is); tests/quant/test_onnx_int8.py has the int8 storage.

What is checked, from the parts to the whole:

- weights: ONNX Runtime's dequantized weights equal hf-r2's fake-quantized ones bit for bit (odd codes, palettes),
  or to one float32 ulp (the `+ s/2` forms of 4- and 8-bit grids), for every bit width and both integer layouts;
- activations, layer by layer on the real activations of the graph: ONNX's Q/DQ gives hf-r2's values except where
  `x / s` is within 1e-4 of a half-integer (the two rounding orders), and then by exactly one step;
- logits: float, palettized and weight-only models agree to float precision (`max |d| <= 1e-4 max(1, max |logit|)`)
  when ONNX Runtime keeps its MatMuls in float32. Under its defaults (an INT4 MatMul's input is quantized to int8
  on the fly) and for models with quantized activations, top-1 agrees on every one of 64 images and
  `mean |d| <= 2% mean |logit|`: a rounding flip (float sums differ between the runtimes at 1e-7) moves one
  activation a whole step and later layers amplify it, so the agreement is that of two runtimes, not of float
  precision.
"""

import sys

import numpy as np
import pytest
import torch
from conftest import conv_net, make_timm

onnx = pytest.importorskip("onnx", reason="ONNX export tests need `pip install 'hf-r2[onnx]'` (onnx)")
ort = pytest.importorskip("onnxruntime", reason="ONNX export tests need `pip install 'hf-r2[onnx]'` (onnxruntime)")

from hf_r2.models import forward_logits  # noqa: E402
from hf_r2.quant import PalettizeConfig, PTQConfig, QATConfig, palettize_, post_training_quantize_, prepare_qat  # noqa: E402
from hf_r2.quant.cluster.dkm import prepare_dkm  # noqa: E402
from hf_r2.quant.export.onnx_export import compare_onnx, export_onnx, is_onnx_available, require_onnx  # noqa: E402
from hf_r2.quant.layers import FakeQuantizer, QuantLayerMixin, quantize_layer_, quantized_layers  # noqa: E402

SIZE = 32
NUM_IMAGES = 64
# ONNX Runtime runs INT4 DequantizeLinear + MatMul as MatMulNBits with int8 inputs unless told to keep float32
FLOAT32_MATMUL = {"session.qdq_matmulnbits_accuracy_level": "1"}


def _vit():
    """A 2-layer ViT from a small transformers config (no download)."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=SIZE, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, num_labels=10)
    return ViTForImageClassification(config)


MODELS = {
    "efficientnet": lambda: make_timm("test_efficientnet"),  # timm CNN: BN, depthwise convs, squeeze-excite
    "vit": _vit,  # transformers: Linear layers as MatMul, LayerNorm, attention
}


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _calibration():
    return [{"pixel_values": _images(16, seed)} for seed in (1, 2)]


def _quantize(model, setting: str):
    """`W8A8`, `W2A8-fold`, `W2` (weight-only), `QAT-W2A8`, `P2` (2-bit palettes), `FP`."""
    if setting == "FP":
        return model
    if setting.startswith("P"):
        return palettize_(model, PalettizeConfig(bits=int(setting[1])))
    if setting.startswith("QAT"):
        return prepare_qat(model, QATConfig(w_bits=2, a_bits=8), _calibration())
    w_bits, _, rest = setting[1:].partition("A")
    a_bits = int(rest.split("-")[0]) if rest else None
    bn = "fold" if setting.endswith("-fold") else "reestimate"
    return post_training_quantize_(model, PTQConfig(w_bits=int(w_bits.split("-")[0]), a_bits=a_bits, bn=bn,
                                                    calibration_batches=2), _calibration())


def _with_outputs(path, names: list[str]):
    """An ONNX Runtime session on `path` that also returns the tensors `names`."""
    proto = onnx.load(path)
    proto.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def _nodes(path) -> dict:
    return {node.name: node for node in onnx.load(path).graph.node}


# ---- logits ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, setting",
    [(m, s) for m in MODELS for s in ("W8A8", "W4A8", "W2A8", "W2", "QAT-W2A8", "P2", "P1", "FP")]
    + [("efficientnet", "W2A8-fold")],
)
def test_onnxruntime_computes_what_hf_r2_computes(name, setting, tmp_path):
    torch.manual_seed(0)
    model = _quantize(MODELS[name]().eval(), setting)
    report = export_onnx(model, tmp_path / "model.onnx", input_size=SIZE, storage="int4")
    check = compare_onnx(model, report["path"], _images(NUM_IMAGES, seed=3))
    print(f"\n{name} {setting}: {report['file_bytes']} bytes, {report['bits_per_weight']:.2f} bits/weight, "
          f"{report['code_types']}, Q/DQ {report['quantize_linear']}/{report['dequantize_linear']}; max |d| "
          f"{check['max_abs_diff']:.2e} of max |logit| {check['max_abs_logit']:.2e}, mean |d| "
          f"{check['mean_abs_diff']:.2e}, top-1 agreement {check['top1_agreement']:.4f}")
    ops = {node.op_type for node in onnx.load(report["path"]).graph.node}
    assert {o.domain for o in onnx.load(report["path"]).opset_import} == {""}  # no placeholder left
    quantized = [m for _, m in quantized_layers(model)]
    assert report["opset"] == 21 and report["input_size"] == [3, SIZE, SIZE]
    palettized = [m for m in model.modules() if hasattr(m, "weight_palette")]
    assert report["low_bit_layers"] == len(quantized) + len(palettized)
    if setting.startswith(("W", "QAT")):
        inputs = sum(m.input_quantizer is not None for m in quantized)
        assert report["weights"] == "quantized" and {"DequantizeLinear"} <= ops
        assert report["quantize_linear"] == inputs and report["dequantize_linear"] == len(quantized) + inputs
        assert ("QuantizeLinear" in ops) == (inputs > 0)
        assert report["code_types"].get("INT4", 0) == (0 if setting.startswith("W8") else len(quantized) - 2)
        assert report["code_types"]["INT8"] == (len(quantized) if setting.startswith("W8") else 2)  # 8-bit ends
    else:
        assert not {"QuantizeLinear", "DequantizeLinear"} & ops
    if setting.startswith("P"):
        assert report["weights"] == "palettized" and "GatherElements" in ops
        assert set(report["code_types"]) == {"UINT4"}
        assert 4 < report["bits_per_weight"] < 5  # 4-bit indices + the palettes
    if setting == "FP":
        assert report["weights"] == "float" and report["bits_per_weight"] == 32 and report["code_types"] == {}
    if name == "efficientnet" and setting.startswith(("W", "QAT")):  # BN stays a node unless PTQ folded it
        assert ("BatchNormalization" in ops) == (not setting.endswith("-fold"))
    with torch.no_grad():
        mean_logit = float(forward_logits(model, _images(NUM_IMAGES, seed=3)).abs().mean())
    assert check["mean_abs_diff"] <= 0.02 * mean_logit and check["top1_agreement"] == 1.0
    if setting in ("FP", "P2", "P1", "W2"):  # no rounding of activations: float precision, with float kernels
        exact = compare_onnx(model, report["path"], _images(NUM_IMAGES, seed=3), session_config=FLOAT32_MATMUL)
        assert exact["max_abs_diff"] <= 1e-4 * max(1.0, exact["max_abs_logit"])


def test_files_get_smaller_with_fewer_bits(tmp_path):
    sizes = {}
    for setting in ("FP", "W8A8", "W4A8", "W2A8", "P2"):
        torch.manual_seed(0)
        model = _quantize(MODELS["efficientnet"]().eval(), setting)
        report = export_onnx(model, tmp_path / f"{setting}.onnx", input_size=SIZE, storage="int4")
        sizes[setting] = report["file_bytes"]
    print(f"\nefficientnet file sizes: {sizes}")
    # the file also holds biases, BN parameters, per-channel scales and the graph: tiny layers here
    assert sizes["FP"] > 2 * sizes["W8A8"] and sizes["W8A8"] > sizes["W4A8"] > sizes["W2A8"]
    assert sizes["FP"] > 3 * sizes["P2"]
    # palettes as float32 weights: the float file's size
    torch.manual_seed(0)
    model = _quantize(MODELS["efficientnet"]().eval(), "P2")
    report = export_onnx(model, tmp_path / "float-palettes.onnx", input_size=SIZE, palette_lookup=False)
    assert report["weights"] == "float" and report["file_bytes"] >= 0.95 * sizes["FP"] > 3 * sizes["P2"]
    check = compare_onnx(model, report["path"], _images(8, seed=3))
    assert check["max_abs_diff"] <= 1e-4 * max(1.0, check["max_abs_logit"])


# ---- weights and activations, one by one ----------------------------------------------------------------------------


@pytest.mark.parametrize("w_bits, opset, onnx_type, exact, per_channel", [
    (1, 21, "INT4", True, True), (2, 21, "INT4", True, True), (3, 21, "INT4", True, True),
    (4, 21, "INT4", False, True), (6, 21, "INT8", True, True), (8, 21, "INT8", False, True),
    (2, 17, "INT8", True, True), (4, 13, "INT8", True, True), (8, 23, "INT8", False, True),
    (2, 21, "INT4", True, False), (8, 21, "INT8", False, False),
])
def test_weights_dequantize_to_hf_r2_weights(w_bits, opset, onnx_type, exact, per_channel, tmp_path):
    config = PTQConfig(w_bits=w_bits, a_bits=8, per_channel=per_channel, first_last_bits=None, bn="keep",
                       calibration_batches=2)
    model = post_training_quantize_(conv_net().eval(), config, _calibration())
    report = export_onnx(model, tmp_path / "m.onnx", input_size=SIZE, opset=opset, storage="int4")
    assert report["opset"] == opset and report["code_types"] == {onnx_type: 4}
    nodes = _nodes(report["path"])
    layers = dict(quantized_layers(model))
    outputs = {n: [node for key, node in nodes.items() if key.startswith(f"{n}/weight/")][-1].output[0]
               for n in layers}
    assert all(any(k == f"{n}/weight/Add" for k in nodes) == (not exact) for n in layers)
    session = _with_outputs(report["path"], list(outputs.values()))
    got = session.run(None, {"pixel_values": _images(2, seed=3).numpy()})[1:]
    for (name, module), value in zip(layers.items(), got):
        with torch.no_grad():
            expected = module.quantized_weight().numpy()
        if exact:
            np.testing.assert_array_equal(value, expected, err_msg=name)
        else:
            assert np.all(np.abs(value - expected) <= 2 * np.spacing(np.abs(expected))), name  # two roundings
    initializers = {t.name: t for t in onnx.load(report["path"]).graph.initializer}
    code_type = getattr(onnx.TensorProto, onnx_type)
    assert all(initializers[f"{n}.weight_codes"].data_type == code_type for n in layers)
    # one scale per output channel (DequantizeLinear axis 0) or one for the tensor
    assert all(list(initializers[f"{n}.weight_scale"].dims) == ([m.weight.shape[0]] if per_channel else [])
               for n, m in layers.items())


@pytest.mark.parametrize("opset, onnx_type", [(21, "UINT4"), (17, "UINT8")])
def test_asymmetric_weight_grids_keep_their_zero_points(opset, onnx_type, tmp_path):
    """A weight grid with an integer zero point (not what PTQ / QAT make, but a FakeQuantizer can hold one) is stored
    as unsigned codes with that zero point, exactly."""
    model = conv_net().eval()
    for module in (model[0], model[4]):
        quantize_layer_(module, FakeQuantizer(4, symmetric=False, per_channel=True, channels=module.weight.shape[0])
                        .init_from(module.weight, "maxabs"), None)
    report = export_onnx(model, tmp_path / "m.onnx", input_size=SIZE, opset=opset, storage="int4")
    assert report["code_types"] == {onnx_type: 2}
    initializers = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(report["path"]).graph.initializer}
    assert initializers["0.weight_zero_point"].astype(int).max() > 0  # the grid's own zero points
    assert not any(name.endswith("/weight/Add") for name in _nodes(report["path"]))
    check = compare_onnx(model, report["path"], _images(8, seed=3))
    assert check["max_abs_diff"] <= 1e-4 * max(1.0, check["max_abs_logit"])


def test_an_input_grid_of_zero_step_gives_zeros(tmp_path):
    """A layer whose calibration saw a single value (step 0) gets 0 inputs in hf-r2; the graph multiplies by 0."""
    model = _quantize(conv_net().eval(), "W4A8")
    model[4].input_quantizer.scale.data.zero_()
    report = export_onnx(model, tmp_path / "m.onnx", input_size=SIZE, storage="int4")
    assert "4/input/Mul" in _nodes(report["path"]) and report["quantize_linear"] == 3
    check = compare_onnx(model, report["path"], _images(8, seed=3))
    assert check["max_abs_diff"] <= 1e-4 * max(1.0, check["max_abs_logit"])


def test_palette_weights_are_exact(tmp_path):
    model = palettize_(conv_net().eval(), PalettizeConfig(bits=2, group_size=1))
    report = export_onnx(model, tmp_path / "m.onnx", input_size=SIZE, opset=17, storage="int4")
    assert report["code_types"] == {"UINT8": 4}  # before opset 21: one byte per index
    nodes = _nodes(report["path"])
    names = [n for n, m in model.named_modules() if hasattr(m, "weight_palette")]
    outputs = [nodes[f"{n}/weight/Reshape"].output[0] for n in names]
    got = _with_outputs(report["path"], outputs).run(None, {"pixel_values": _images(2, seed=3).numpy()})[1:]
    for name, value in zip(names, got):
        np.testing.assert_array_equal(value, model.get_submodule(name).weight.detach().numpy(), err_msg=name)


@pytest.mark.parametrize("a_bits", [8, 4])
def test_input_qdq_matches_fake_quantizer_layer_by_layer(a_bits, tmp_path):
    torch.manual_seed(0)
    model = _quantize(MODELS["efficientnet"]().eval(), f"W2A{a_bits}")
    report = export_onnx(model, tmp_path / "m.onnx", input_size=SIZE, storage="int4")
    nodes = _nodes(report["path"])
    layers = [(n, m) for n, m in quantized_layers(model) if m.input_quantizer is not None]
    names = []
    for name, module in layers:
        clip = nodes.get(f"{name}/input/Clip")
        assert (clip is not None) == (module.input_quantizer.bits < 8)  # uint8 saturates at 255 only
        raw = (clip or nodes[f"{name}/input/QuantizeLinear"]).input[0]
        names += [raw, nodes[f"{name}/input/DequantizeLinear"].output[0]]
    got = _with_outputs(report["path"], names).run(None, {"pixel_values": _images(16, seed=3).numpy()})[1:]
    flips = total = 0
    for i, (name, module) in enumerate(layers):
        x, onnx_values = got[2 * i], got[2 * i + 1]
        with torch.no_grad():
            expected = module.input_quantizer(torch.from_numpy(x)).numpy()
        step = float(module.input_quantizer.scale.abs())
        differ = onnx_values != expected
        ratio = x[differ] / np.float32(step)
        assert np.allclose(np.abs(onnx_values - expected)[differ], step, rtol=1e-5), name  # one step
        assert np.all(np.abs(ratio - np.floor(ratio) - 0.5) < 1e-4), name  # only at (near) ties
        flips, total = flips + int(differ.sum()), total + differ.size
    print(f"\nA{a_bits}: {flips} of {total} activation codes differ (rounding order at ties)")
    assert flips <= 1e-4 * total


# ---- the model is left as it was, errors --------------------------------------------------------------------------


def test_export_leaves_the_model_as_it_was(tmp_path):
    model = _quantize(conv_net(), "QAT-W2A8").train()
    images = _images(4, seed=3)
    layers = dict(quantized_layers(model))
    before = {n: (m.weight, m.weight_quantizer, m.input_quantizer) for n, m in layers.items()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    export_onnx(model, tmp_path / "m.onnx", input_size=SIZE)
    assert model.training
    assert all((m.weight, m.weight_quantizer, m.input_quantizer) == before[n] for n, m in layers.items())
    assert all(isinstance(m, QuantLayerMixin) and not m._forward_pre_hooks for m in layers.values())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert list(model.state_dict()) == list(state)
    model.eval()
    check = compare_onnx(model, tmp_path / "m.onnx", images)  # QAT's learnable steps export as they are
    assert check["top1_agreement"] == 1.0 and not model.training


def test_export_errors(tmp_path, monkeypatch):
    model = conv_net().eval()
    with pytest.raises(ValueError, match="`opset` must be an integer from 13 to 23, got 12"):
        export_onnx(model, tmp_path / "m.onnx", input_size=SIZE, opset=12)
    with pytest.raises(ValueError, match="`input_size` must be a positive int"):
        export_onnx(model, tmp_path / "m.onnx")  # a plain nn.Sequential has no config to take it from
    quantized = post_training_quantize_(conv_net(), PTQConfig(w_bits=2, a_bits=None, bn="keep"))
    fresh = FakeQuantizer(8, symmetric=False, activation=True)
    quantized.get_submodule("0").input_quantizer = fresh
    with pytest.raises(ValueError, match="The input quantizer of layer '0' has no grid yet"):
        export_onnx(quantized, tmp_path / "m.onnx", input_size=SIZE)
    assert quantized.get_submodule("0").input_quantizer is fresh  # restored after the error
    fresh.observe()
    with pytest.raises(ValueError, match="The input quantizer of layer '0' is still observing"):
        export_onnx(quantized, tmp_path / "m.onnx", input_size=SIZE)
    fresh.initialized.fill_(True)
    fresh._observer, fresh.scale.data = None, torch.ones(2)
    with pytest.raises(ValueError, match="The input grid of layer '0' is not per tensor with an integer zero point"):
        export_onnx(quantized, tmp_path / "m.onnx", input_size=SIZE)
    quantized.get_submodule("0").input_quantizer = None
    quantized.get_submodule("3").weight_quantizer.zero_point.fill_(0.25)
    with pytest.raises(ValueError, match="The weight grid of layer '3' has zero points .* no ONNX form"):
        export_onnx(quantized, tmp_path / "m.onnx", input_size=SIZE)
    prepared = prepare_dkm(conv_net(), PalettizeConfig(bits=2, method="dkm"))
    with pytest.raises(ValueError, match="still prepared for DKM"):
        export_onnx(prepared, tmp_path / "m.onnx", input_size=SIZE)
    assert is_onnx_available()
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'hf-r2\[onnx\]'"):
        export_onnx(model, tmp_path / "m.onnx", input_size=SIZE)
    with pytest.raises(ImportError, match=r"pip install 'hf-r2\[onnx\]'"):
        require_onnx()
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match=r"`onnxruntime>=1\.20`.*pip install 'hf-r2\[onnx\]'"):
        compare_onnx(model, tmp_path / "m.onnx", _images(1, seed=0))


def test_import_needs_no_onnx():
    """`import hf_r2.quant` works without onnx / onnxruntime (a fresh process where both fail to import)."""
    import subprocess

    code = ("import sys; sys.modules['onnx'] = sys.modules['onnxruntime'] = None\n"
            "import hf_r2.quant, hf_r2.quant.export.onnx_export as e; print(e.is_onnx_available())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
