"""The int8 storage of `export_onnx` (`quant.export._onnx_int8`): what ONNX Runtime makes of the file, read from the
graph it optimizes (`SessionOptions.optimized_model_filepath`), and what it computes against hf-r2.

- a chain of convs (the smallest net with a conv, BN, ReLU, a depthwise conv, a pointwise conv, pooling and a
  Linear head): each conv whose output goes only to the next layer's 8-bit input and the Linear become integer ops
  (`QLinearConv`, `QGemm`) holding hf-r2's codes (not a per-tensor grid of ONNX Runtime's own); the pointwise conv
  before the pooling computes in float, from a weight folded at session start (no DequantizeLinear left on it);
- a timm ResNet: the first conv of each block is integer, the convs that end in the residual Add are float;
- top-1 equals hf-r2's on the checked images that are not near-ties (`compare_onnx`, whose tolerance logic and NaN
  rule are the file's check, passes too); a weight-only model (no integer op possible) gives hf-r2's logits to float
  precision.
"""

import numpy as np
import pytest
import torch
from conftest import conv_net, make_timm

onnx = pytest.importorskip("onnx", reason="ONNX export tests need `pip install 'hf-r2[onnx]'` (onnx)")
ort = pytest.importorskip("onnxruntime", reason="ONNX export tests need `pip install 'hf-r2[onnx]'` (onnxruntime)")

from hf_r2.models import forward_logits  # noqa: E402
from hf_r2.quant import PTQConfig, post_training_quantize_  # noqa: E402
from hf_r2.quant.export.onnx_export import compare_onnx, export_onnx  # noqa: E402
from hf_r2.quant.layers import quantized_layers  # noqa: E402

SIZE = 32
INTEGER_OPS = {"QLinearConv", "QGemm", "QLinearMatMul", "MatMulIntegerToFloat", "ConvInteger", "MatMulInteger"}


def _images(n: int, seed: int) -> torch.Tensor:
    """Noise around a colour of its own per image: a random net's pooled features (and top-1) then differ between
    images instead of all being the mean of the noise."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, SIZE, SIZE, generator=generator) + 2 * torch.randn(n, 3, 1, 1, generator=generator)


def _ptq(model, **config):
    config = {"w_bits": 2, "a_bits": 8, "calibration_batches": 2, **config}
    return post_training_quantize_(model.eval(), PTQConfig(**config),
                                   [{"pixel_values": _images(16, seed)} for seed in (1, 2)])


def _optimized(path, tmp_path):
    """The graph ONNX Runtime runs (CPU, all optimizations, one thread), as it saves it."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return onnx.load(options.optimized_model_filepath).graph


def _weights_of(graph) -> dict[str, list[str]]:
    """`op type -> [weight input name]` of the Conv / Gemm / QLinearConv / QGemm nodes."""
    weight_input = {"QLinearConv": 3, "QGemm": 3, "Conv": 1, "Gemm": 1, "FusedConv": 1}
    found: dict[str, list[str]] = {}
    for node in graph.node:
        if node.op_type in weight_input:
            found.setdefault(node.op_type, []).append(node.input[weight_input[node.op_type]])
    return found


def _check(model, path, n=64):
    """`compare_onnx` passes (its tolerance, no NaN), and the file's top-1 is hf-r2's on every image whose top two
    hf-r2 logits are more than 1% of the largest logit apart (a random net has near-ties, where a bias rounded to
    int32 may flip top-1), at least 3 in 4 of them; returns the check."""
    images = _images(n, seed=3)
    check = compare_onnx(model, path, images)
    print(f"max |d| {check['max_abs_diff']:.2e} of max |logit| {check['max_abs_logit']:.2e}, top-1 agreement "
          f"{check['top1_agreement']:.4f}")
    assert check["passed"] and check["nonfinite_logits"] == 0
    with torch.no_grad():
        expected = forward_logits(model, images)
    got = torch.from_numpy(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"pixel_values": images.numpy()})[0])
    top2 = expected.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.01 * float(expected.abs().max())
    print(f"top-1 of {int(clear.sum())} of {n} images not within 1% of a tie: "
          f"{int((got.argmax(-1) == expected.argmax(-1))[clear].sum())} equal")
    assert int(clear.sum()) >= 0.75 * n
    assert torch.equal(got.argmax(-1)[clear], expected.argmax(-1)[clear])
    return check


@pytest.mark.parametrize("w_bits", [2, 4])
def test_a_conv_chain_runs_in_integer_kernels(w_bits, tmp_path):
    torch.manual_seed(0)
    model = conv_net()
    with torch.no_grad():  # a BN scale < 0 on half the channels: folded, those channels' codes are negated
        model[1].weight[::2] *= -1
    model = _ptq(model, w_bits=w_bits, first_last_bits=None)
    report = export_onnx(model, tmp_path / "m.onnx", input_size=SIZE)
    assert report["storage"] == "int8" and report["code_types"] == {"INT8": 4}
    # conv 0 (-> BN -> ReLU -> the depthwise conv's input), the depthwise conv 3 (-> conv 4's input), the Linear 7
    assert report["integer_layers"] == 3 and list(report["float_layers"]) == ["4"]
    assert "pooling" in report["float_layers"]["4"]
    graph = _optimized(report["path"], tmp_path)
    ops = [node.op_type for node in graph.node]
    weights = _weights_of(graph)
    print(f"\nW{w_bits}A8 conv chain, optimized: {sorted(set(ops))}")
    assert ops.count("QLinearConv") == 2 and ops.count("QGemm") == 1
    assert sum(op in INTEGER_OPS for op in ops) == report["integer_layers"]
    # the integer kernels hold hf-r2's codes and per-channel scales, not ONNX Runtime's per-tensor re-quantization
    assert all(name.endswith(".int8_codes") for name in weights["QLinearConv"] + weights["QGemm"])
    assert not any(t.name.endswith("_weight_q") for t in graph.initializer)
    # the float layer's weight is a constant (the int8 codes' Cast + Mul, folded at session start): no DQ per run
    initializers = {t.name: t for t in graph.initializer}
    float_convs = [name for op in ("Conv", "FusedConv") for name in weights.get(op, [])]
    assert len(float_convs) == 1 and initializers[float_convs[0]].data_type == onnx.TensorProto.FLOAT
    assert ops.count("DequantizeLinear") <= 1  # at most the float layer's input
    _check(model, report["path"])


def test_a_resnet_runs_its_block_convs_in_integer_kernels(tmp_path):
    torch.manual_seed(0)
    model = _ptq(make_timm("test_resnet"))  # first and last layer at 8 bits: no int8 codes for their grids
    report = export_onnx(model, tmp_path / "m.onnx", input_size=SIZE)
    names = [name for name, _ in quantized_layers(model)]
    # the convs whose output (through BN and ReLU) is only the next conv's input: the deep stem's middle conv, each
    # block's first (and a Bottleneck's second); the others end in a residual Add or the max pooling, or are 8-bit
    integer = {"conv1.3", "layer1.0.conv1", "layer2.0.conv1", "layer3.0.conv1", "layer3.0.conv2", "layer4.0.conv1"}
    assert report["integer_layers"] == len(integer) and set(report["float_layers"]) == set(names) - integer
    reasons = report["float_layers"]
    assert all("residual Add" in reasons[n] for n in names if n.endswith(("conv2", "conv3", "downsample.1"))
               and n not in integer)
    assert "8-bit" in reasons["conv1.0"] and "8-bit" in reasons["fc"]  # an 8-bit grid's odd codes need 9 bits
    graph = _optimized(report["path"], tmp_path)
    ops = [node.op_type for node in graph.node]
    print(f"\ntest_resnet W2A8, optimized: { {op: ops.count(op) for op in sorted(set(ops))} }")
    assert ops.count("QLinearConv") == len(integer) and sum(op in INTEGER_OPS for op in ops) == len(integer)
    assert not any(t.name.endswith("_weight_q") for t in graph.initializer)
    _check(model, report["path"])


def test_narrow_input_grids_and_weight_only_models_stay_in_float(tmp_path):
    torch.manual_seed(0)
    model = _ptq(conv_net(), a_bits=4, first_last_bits=None)  # a Clip to the 4-bit grid before each Q
    report = export_onnx(model, tmp_path / "a4.onnx", input_size=SIZE)
    assert report["integer_layers"] == 1  # the Linear: QGemm has a float output, nothing to clip
    graph = _optimized(report["path"], tmp_path)
    assert not any(t.name.endswith("_weight_q") for t in graph.initializer)  # the DQ stays where a Q follows
    _check(model, report["path"])
    torch.manual_seed(0)
    model = _ptq(conv_net(), a_bits=None, bn="keep")  # weight-only: every weight a folded constant, exact
    report = export_onnx(model, tmp_path / "w2.onnx", input_size=SIZE)
    assert report["integer_layers"] == 0 and len(report["float_layers"]) == 4
    graph = _optimized(report["path"], tmp_path)
    assert "DequantizeLinear" not in {node.op_type for node in graph.node}
    check = _check(model, report["path"])
    assert check["max_abs_diff"] <= 1e-5 * max(1.0, check["max_abs_logit"])


def test_int4_storage_is_the_small_file(tmp_path):
    torch.manual_seed(0)
    model = _ptq(make_timm("test_resnet"), first_last_bits=None)
    int8 = export_onnx(model, tmp_path / "int8.onnx", input_size=SIZE)
    int4 = export_onnx(model, tmp_path / "int4.onnx", input_size=SIZE, storage="int4")
    assert int4["storage"] == "int4" and int4["code_types"] == {"INT4": len(quantized_layers(model))}
    assert int4["integer_layers"] == 0 and int4["float_layers"] == {}
    assert int4["file_bytes"] < int8["file_bytes"] and int4["bits_per_weight"] < int8["bits_per_weight"]
    # before opset 21 there is no INT4: both storages hold INT8 codes
    assert export_onnx(model, tmp_path / "o17.onnx", input_size=SIZE, opset=17, storage="int4")["code_types"] == {
        "INT8": len(quantized_layers(model))}
    with pytest.raises(ValueError, match="`storage` must be one of 'int8', 'int4', got 'int2'"):
        export_onnx(model, tmp_path / "x.onnx", input_size=SIZE, storage="int2")
    np.testing.assert_array_equal(  # the same top-1 from both files
        *(compare_onnx(model, r["path"], _images(16, 3))["top1_agreement"] for r in (int8, int4)))
