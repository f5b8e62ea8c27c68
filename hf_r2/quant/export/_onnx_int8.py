"""The int8-storage layout of [`onnx_export`]: [`int8_layout`] rewrites a QDQ graph whose weights are
INT8 codes into the form ONNX Runtime's CPU provider executes with integer kernels where that computes what hf-r2
computes, and with float kernels at float speed elsewhere. Imports `onnx` inside the functions only.

What ONNX Runtime does with a QDQ graph (1.32, CPU provider, default level `ORT_ENABLE_ALL`; read from
`onnxruntime/core/optimizer/qdq_transformer/selectors_actions/qdq_selectors.cc` and checked on the optimized graphs
that `SessionOptions.optimized_model_filepath` saves, `benchmarks/onnx_latency.py --ops`):

- `DQ(x) , DQ(w) [, DQ(bias)] -> Conv [-> Relu | Clip] -> Q` becomes one `QLinearConv` (NHWC, with `Transpose`s
  at the edges of a run of them) when: `x` is uint8 (or int8 with int8 weights), the weight is INT8 (or UINT8)
  with per-tensor or per-output-channel (`axis=0`) scales, the bias (if any) is an INT32 `DequantizeLinear` (a float
  bias disqualifies the group: every input must come from a DQ), the Conv's output has exactly one consumer, which is
  the `QuantizeLinear` (or a `Relu` / `Clip` whose only consumer is it), of the input's type, and the `Relu` / `Clip`
  is redundant given the Q: `Relu` when the zero point is the type's minimum (0 for uint8), `Clip(lo, hi)` when
  `rint(lo / s) + z <= 0` and `rint(hi / s) + z >= 255`. INT4 weights are not accepted for Conv. ORT takes the
  bias codes as they are (the bias DQ's scale must be `s_x * s_w`).
- `DQ(x) , DQ(w) -> MatMul` without a Q becomes `MatMulIntegerToFloat`, `-> Q` `QLinearMatMul`; a Gemm with DQ
  inputs (and an INT32 DQ bias) becomes `QGemm`, with a float output when no Q follows: so a Linear layer (`x W^T +
  b`, per-output-channel scales on `axis=0`) runs in integers whatever follows it. An INT4 / INT8 DQ feeding a
  MatMul alone becomes `MatMulNBits`.
- `WeightBiasQuantization` (level 1) gives a Conv / Gemm whose input is a DQ and whose output reaches a Q (through
  BatchNormalization / Relu / Clip) but whose weight is a float constant a weight Q / DQ of its own: symmetric int8
  *per tensor*, other values than hf-r2's per-channel grid. So a weight is never left as a float constant there.
- A `DequantizeLinear` of a constant is never constant-folded (the QDQ transformers want to see it), so a weight
  that stays a DQ -> float Conv is dequantized again on every run and keeps the Conv out of the NCHWc layout:
  that, not the convolutions, made the INT4 file of a ResNet-18 24x slower than float at 32 px (35.5 ms against
  1.46 ms an image, batch 1, one thread). A `Cast` + `Mul` of the same integer initializer is folded once, when the
  session starts, into the float weight the float file has (bit for bit what the DQ computes: `float(q) * s`), and
  the Conv + BatchNormalization pair then fuses as in the float file.
- `ConvInteger` (uint8 x int8 -> int32, then Cast / Mul / Add in float) is exact but 3x slower than the float Conv
  here (17 ms against 6.2 ms for a 64-channel 3x3 conv at 56 px), 70x on a depthwise conv; not used.

hf-r2's quantized layers quantize their *inputs*: the output of a Conv is float, as are the residual Adds. So a
layer can run as `QLinearConv` exactly (its output rounded to the grid hf-r2 rounds it to anyway) only where its
output (through its BatchNormalization, folded here into the per-channel weight scales and the bias, and its
`Relu` / `Relu6`) goes to exactly one consumer: the next quantized layer's 8-bit input quantizer. That holds for
ResNet's first conv of each block and MobileNetV2's expansion and depthwise convs; not for a conv whose output joins
a residual Add, feeds a pooling or the logits, or for an input grid narrower than 8 bits (its `Clip` to the grid
is not redundant given a uint8 Q). Those layers keep float outputs: their weights are stored as INT8 codes and
rebuilt by `Cast` + `Mul` (folded at session start), their inputs keep their Q / DQ pair.

Exactness. Folding the BatchNormalization (`s_w' = s_w |a|`, codes negated where `a < 0`, `b' = a b + c`) and
rounding the bias to int32 codes of `s_x s_w'` (an error of at most half of `s_x s_w'`, a small fraction of the
output step) change the float sum below the output grid's step, so a fused layer gives hf-r2's output codes
except where its float output lies within that error of a rounding boundary: a code differs by one there, as the
module docstring of `onnx_export` already says of two runtimes' float sums.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np

__all__ = ["int8_layout", "LAYER_OPS", "INTEGER_OPS"]

#: The ops of quantized layers.
LAYER_OPS = ("Conv", "Gemm", "MatMul")
#: The integer ops ONNX Runtime's CPU provider turns fusable QDQ groups into.
INTEGER_OPS = ("QLinearConv", "QLinearMatMul", "MatMulIntegerToFloat", "QGemm", "ConvInteger", "MatMulInteger")

_INT32_LIMIT = 2**31 - 2**24
# x86 without VNNI multiplies uint8 x int8 pairs into int16 with saturation (vpmaddubsw): 255 * 63 * 2 < 2^15
_CODE_LIMIT = 63  # bias codes beyond this are left in float (QLinearConv sums them into int32)


class _Graph:
    """Producers, consumers and constants of an `onnx.GraphProto`."""

    def __init__(self, graph: Any) -> None:
        from onnx import numpy_helper

        self.graph = graph
        self.initializers = {t.name: t for t in graph.initializer}
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, list[Any]] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.outputs = {o.name for o in graph.output}
        self._to_array = numpy_helper.to_array

    def const(self, name: str) -> np.ndarray | None:
        """The value of `name` if it is a constant (an initializer, through `Identity` / `Constant` nodes)."""
        from onnx import helper

        for _ in range(8):
            if name in self.initializers:
                return self._to_array(self.initializers[name])
            node = self.producer.get(name)
            if node is None:
                return None
            if node.op_type == "Identity":
                name = node.input[0]
                continue
            if node.op_type == "Constant":
                attr = next((a for a in node.attribute if a.name == "value"), None)
                return None if attr is None else self._to_array(helper.get_attribute_value(attr))
            return None
        return None

    def elem_type(self, name: str) -> int | None:
        if name in self.initializers:
            return self.initializers[name].data_type
        return None

    def only_consumer(self, name: str) -> Any | None:
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and name not in self.outputs else None


def _attr(node: Any, name: str, default: Any = None) -> Any:
    from onnx import helper

    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


class _Weight:
    """A weight `DequantizeLinear(codes, scale, zero_point)` of constants (and the `+ half_step` Add after it)."""

    def __init__(self, g: _Graph, layer: Any) -> None:
        self.ok = False
        node = g.producer.get(layer.input[1])
        self.half = None
        if node is not None and node.op_type == "Add":
            half = g.const(node.input[1])
            dq = g.producer.get(node.input[0])
            if half is None or dq is None or g.only_consumer(dq.output[0]) is not node:
                return
            self.half, self.half_node, node = half, node, dq
        if node is None or node.op_type != "DequantizeLinear" or node.input[0] not in g.initializers:
            return
        if g.only_consumer(node.output[0]) is None:
            return
        self.dq = node
        self.codes_name = node.input[0]
        self.codes_type = g.elem_type(node.input[0])
        self.codes = g.const(node.input[0])
        self.scale = g.const(node.input[1])
        self.zero_point = g.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        self.axis = _attr(node, "axis", 1)
        self.ok = self.scale is not None and (len(node.input) < 3 or not node.input[2] or self.zero_point is not None)


class _Input:
    """A layer input `DequantizeLinear(x, scale, zero_point)` with a scalar uint8 grid."""

    def __init__(self, g: _Graph, layer: Any) -> None:
        from onnx import TensorProto

        self.ok = False
        node = g.producer.get(layer.input[0])
        if node is None or node.op_type != "DequantizeLinear" or len(node.input) < 3:
            return
        scale, zero_point = g.const(node.input[1]), g.const(node.input[2])
        if scale is None or zero_point is None or scale.size != 1 or zero_point.size != 1:
            return
        if g.elem_type(node.input[2]) != TensorProto.UINT8 or not float(scale) > 0:
            return
        self.scale, self.zero_point, self.ok = np.float32(scale.reshape(())), int(zero_point), True


def _reaches_quantize(g: _Graph, layer: Any) -> bool:
    """Whether `layer`'s output goes, through single-consumer BatchNormalization / Relu / Clip nodes, to a
    QuantizeLinear only: then ONNX Runtime's `WeightBiasQuantization` would re-quantize a float weight of it to
    per-tensor int8 (other values than hf-r2's), so such a layer that is not fused keeps its weight DQ."""
    node = g.only_consumer(layer.output[0])
    for _ in range(4):
        if node is None:
            return False
        if node.op_type == "QuantizeLinear":
            return True
        if node.op_type not in ("BatchNormalization", "Relu", "Clip"):
            return False
        node = g.only_consumer(node.output[0])
    return False


def _output_chain(g: _Graph, layer: Any) -> tuple[Any | None, Any | None, Any | None]:
    """`(batch_norm, activation, quantize)` after `layer` if its output reaches exactly one QuantizeLinear through
    an optional BatchNormalization and an optional Relu / Clip that the Q makes redundant, each the only consumer
    of the one before; `(None, None, None)` otherwise."""
    from onnx import TensorProto

    none = (None, None, None)
    bn = act = None
    node = g.only_consumer(layer.output[0])
    if node is not None and node.op_type == "BatchNormalization":
        if any(g.const(name) is None for name in node.input[1:5]) or len(node.output) != 1:
            return none
        bn, node = node, g.only_consumer(node.output[0])
    if node is not None and node.op_type in ("Relu", "Clip"):
        act, node = node, g.only_consumer(node.output[0])
    if node is None or node.op_type != "QuantizeLinear" or len(node.input) < 3:
        return none
    scale, zero_point = g.const(node.input[1]), g.const(node.input[2])
    if scale is None or zero_point is None or scale.size != 1 or zero_point.size != 1 or not float(scale) > 0:
        return none
    if g.elem_type(node.input[2]) != TensorProto.UINT8:
        return none
    if act is not None:  # ONNX Runtime's IsClipMadeRedundantByQ, which is also when it is exact to drop it
        s, z = float(scale.reshape(())), int(zero_point)
        if act.op_type == "Relu":
            if z != 0:
                return none
        else:
            low = g.const(act.input[1]) if len(act.input) > 1 and act.input[1] else np.array(-np.inf)
            high = g.const(act.input[2]) if len(act.input) > 2 and act.input[2] else np.array(np.inf)
            if low is None or high is None:
                return none
            q_low = -math.inf if np.isinf(low) else round(float(low) / s) + z
            q_high = math.inf if np.isinf(high) else round(float(high) / s) + z
            if not (q_low <= 0 and q_high >= 255):
                return none
    return bn, act, node


class _Rewrite:
    """Initializers to add, nodes to insert before a node and nodes to drop; applied in one pass."""

    def __init__(self, g: _Graph) -> None:
        self.g = g
        self.initializers: dict[str, Any] = {}
        self.before: dict[int, list[Any]] = {}
        self.drop: set[int] = set()
        self.replace: dict[int, Any] = {}

    def init(self, name: str, values: np.ndarray) -> str:
        from onnx import numpy_helper

        self.initializers[name] = numpy_helper.from_array(np.asarray(values), name)
        return name

    def apply(self) -> None:
        graph = self.g.graph
        nodes = []
        for node in graph.node:
            nodes.extend(self.before.get(id(node), []))
            if id(node) in self.drop:
                continue
            nodes.append(self.replace.get(id(node), node))
        graph.ClearField("node")
        graph.node.extend(nodes)
        kept = [t for t in graph.initializer if t.name not in self.initializers]
        graph.ClearField("initializer")
        graph.initializer.extend(kept + list(self.initializers.values()))


def _gemm_fits(g: _Graph, layer: Any) -> bool:
    """A Gemm that is `x W^T + b` (a Linear layer as the TorchScript exporter writes it), what QGemm takes."""
    return (_attr(layer, "transB", 0) == 1 and _attr(layer, "transA", 0) == 0 and _attr(layer, "alpha", 1.0) == 1.0
            and _attr(layer, "beta", 1.0) == 1.0)


def _fuse(r: _Rewrite, layer: Any, w: _Weight, x: _Input, bn: Any | None) -> bool:
    """Rewrite the Conv or Gemm `layer` (and fold `bn` into a Conv) into the QDQ group ONNX Runtime fuses into
    `QLinearConv` / `QGemm`; False if the weight does not fit it (then nothing is changed)."""
    from onnx import TensorProto, helper

    g = r.g
    if w.half is not None or w.codes_type != TensorProto.INT8 or w.codes is None:
        return False
    if w.zero_point is not None and np.any(w.zero_point != 0):
        return False
    out_channels = w.codes.shape[0]
    scale = w.scale.astype(np.float32).reshape(-1)
    if scale.size == 1:
        scale = np.full(out_channels, scale[0], np.float32)
    elif scale.size != out_channels or w.axis != 0:
        return False
    bias = g.const(layer.input[2]) if len(layer.input) > 2 and layer.input[2] else None
    if len(layer.input) > 2 and layer.input[2] and bias is None:
        return False
    codes = w.codes.astype(np.int8)
    if bn is not None:
        gamma, beta, mean, var = (g.const(name).astype(np.float32) for name in bn.input[1:5])
        a = (gamma / np.sqrt(var + np.float32(_attr(bn, "epsilon", 1e-5)))).astype(np.float32)
        c = (beta - a * mean).astype(np.float32)
        bias = c if bias is None else (a * bias.astype(np.float32) + c).astype(np.float32)
        if np.any(np.abs(codes.astype(np.int16)) > 127):
            return False
        sign = np.where(a < 0, -1, 1).astype(np.int8).reshape(-1, *[1] * (codes.ndim - 1))
        codes = (codes * sign).astype(np.int8)
        scale = (scale * np.abs(a)).astype(np.float32)
    if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
        return False
    # spread the codes over int8's 7-bit range (|code| <= 63): the weights keep their values (`(c k) (s / k)`), and
    # the bias's int32 codes, in units of `s_x s_w / k`, round k times more finely
    peak = int(np.abs(codes.astype(np.int16)).max(initial=0))
    k = max(1, _CODE_LIMIT // peak) if peak else 1
    codes = (codes.astype(np.int16) * k).astype(np.int8)
    scale = (scale / np.float32(k)).astype(np.float32)
    name = layer.name or layer.output[0]
    inputs = [layer.input[0]]
    new_nodes = []
    w_inputs = [r.init(f"{name}.int8_codes", codes), r.init(f"{name}.int8_scale", scale),
                r.init(f"{name}.int8_zero_point", np.zeros(out_channels, np.int8))]
    new_nodes.append(helper.make_node("DequantizeLinear", w_inputs, [f"{name}.int8_weight"], name=f"{name}/weight/DQ",
                                      axis=0))
    inputs.append(f"{name}.int8_weight")
    if bias is not None:
        bias_scale = (x.scale * scale).astype(np.float32)
        bias_codes = np.rint(bias.astype(np.float64) / bias_scale.astype(np.float64))
        if not np.all(np.isfinite(bias_codes)) or np.any(np.abs(bias_codes) > _INT32_LIMIT):
            return False
        b_inputs = [r.init(f"{name}.int8_bias_codes", bias_codes.astype(np.int32)),
                    r.init(f"{name}.int8_bias_scale", bias_scale),
                    r.init(f"{name}.int8_bias_zero_point", np.zeros(out_channels, np.int32))]
        new_nodes.append(helper.make_node("DequantizeLinear", b_inputs, [f"{name}.int8_bias"],
                                          name=f"{name}/bias/DQ", axis=0))
        inputs.append(f"{name}.int8_bias")
    output = bn.output[0] if bn is not None else layer.output[0]
    conv = helper.make_node(layer.op_type, inputs, [output], name=layer.name)
    conv.attribute.extend(layer.attribute)
    r.before.setdefault(id(layer), []).extend(new_nodes)
    r.replace[id(layer)] = conv
    r.drop.add(id(w.dq))
    if bn is not None:
        r.drop.add(id(bn))
    return True


def _cast_weight(r: _Rewrite, w: _Weight, layer: Any) -> None:
    """Replace the weight's DequantizeLinear by `Cast` (+ `Sub` of the zero point) + `Mul` of the same constants,
    which ONNX Runtime folds into a float initializer when the session starts."""
    from onnx import TensorProto, helper

    dq = w.dq
    prefix = dq.name or dq.output[0]
    rank = w.codes.ndim if w.codes is not None else len(_shape(r.g, w.codes_name))
    view = [-1] + [1] * (rank - 1) if w.scale.ndim == 1 and w.axis in (0, -rank) else None
    if w.scale.ndim == 1 and view is None:  # per-channel on another axis
        view = [1] * rank
        view[w.axis % rank] = -1
    nodes = [helper.make_node("Cast", [w.codes_name], [f"{prefix}/Cast_output"], name=f"{prefix}/Cast",
                              to=TensorProto.FLOAT)]
    value = f"{prefix}/Cast_output"
    if w.zero_point is not None and np.any(w.zero_point != 0):
        zero = w.zero_point.astype(np.float32)
        zero = zero.reshape(view) if view is not None and zero.ndim == 1 else zero
        nodes.append(helper.make_node("Sub", [value, r.init(f"{prefix}.zero_point_float", zero)],
                                      [f"{prefix}/Sub_output"], name=f"{prefix}/Sub"))
        value = f"{prefix}/Sub_output"
    scale = w.scale.astype(np.float32)
    scale = scale.reshape(view) if view is not None else scale
    nodes.append(helper.make_node("Mul", [value, r.init(f"{prefix}.scale_broadcast", scale)], [dq.output[0]],
                                  name=f"{prefix}/Mul"))
    r.before.setdefault(id(dq), []).extend(nodes)
    r.drop.add(id(dq))


def _shape(g: _Graph, name: str) -> list[int]:
    return list(g.initializers[name].dims)


def int8_layout(model: Any) -> dict[str, Any]:
    """Rewrite the `onnx.ModelProto` `model` in place (see the module docstring): quantized Conv layers whose
    output goes only to the next layer's 8-bit input quantizer become the QDQ group ONNX Runtime runs as
    `QLinearConv` (BatchNormalization folded, int32 bias), quantized Linear layers (Gemm) with an 8-bit input the
    group it runs as `QGemm` (float output); every other quantized layer's weight `DequantizeLinear` becomes `Cast` +
    `Mul` (folded when the session starts), except where its output still reaches a QuantizeLinear (then ONNX
    Runtime would re-quantize a float weight per tensor: the DQ stays).

    Returns:
        `dict`: `fused` (the layers, by module name, now in a pattern ONNX Runtime fuses), `float` (`name -> why`,
        the quantized layers computing in float) and `ops` (op type counts of the rewritten graph).
    """
    g = _Graph(model.graph)
    r = _Rewrite(g)
    fused: list[str] = []
    floats: dict[str, str] = {}
    for layer in list(model.graph.node):
        if layer.op_type not in LAYER_OPS or len(layer.input) < 2:
            continue
        w = _Weight(g, layer)
        if not w.ok:
            continue  # a float layer (or a palette lookup): left as it is
        # the exporter names a weight's nodes `<module name>/weight/...`
        name = w.dq.name.rpartition("/weight/")[0] or layer.name or layer.output[0]
        x = _Input(g, layer)
        reason = None
        if layer.op_type == "MatMul":
            reason = "a MatMul (only Conv and Gemm layers are fused)"
        elif not x.ok:
            reason = "its input is not quantized to uint8"
        elif layer.op_type == "Gemm":
            if not _gemm_fits(g, layer):
                reason = "a Gemm that is not x W^T + b"
            elif not _fuse(r, layer, w, x, None):
                reason = "its weight grid has no int8 codes with zero point 0 (an 8-bit or asymmetric grid)"
        else:
            bn, act, q = _output_chain(g, layer)
            if q is None:
                reason = "its output is not only the next layer's 8-bit input (a residual Add, pooling or logits)"
            elif not _fuse(r, layer, w, x, bn):
                reason = "its weight grid has no int8 codes with zero point 0 (an 8-bit or asymmetric grid)"
        if reason is None:
            fused.append(name)
            continue
        if _reaches_quantize(g, layer):
            floats[name] = reason + "; weight kept as DequantizeLinear (dequantized on every run)"
        else:
            floats[name] = reason
            _cast_weight(r, w, layer)
    r.apply()
    # drop initializers that nothing reads any more (the folded BatchNormalizations, the replaced codes)
    used = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
    kept = [t for t in model.graph.initializer if t.name in used]
    model.graph.ClearField("initializer")
    model.graph.initializer.extend(kept)
    return {"fused": fused, "float": floats, "ops": Counter(n.op_type for n in model.graph.node)}
