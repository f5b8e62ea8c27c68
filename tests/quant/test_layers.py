"""`hf_r2.quant.layers`: the quantized Conv/Linear layers against `F.conv*` / `F.linear` on weights and inputs
fake-quantized by a float64 formula written out here, LSQ's step-size gradient against the paper's formula, and
the in-place class swap (parameter identity, `isinstance`, `Conv2dSame` padding, R2-Loss, undo)."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_timm
from torch import nn

from hf_r2 import R2Config, R2Regularizer
from hf_r2.models import forward_logits
from hf_r2.quant.layers import (
    FakeQuantizer,
    QuantConv1d,
    QuantConv2d,
    QuantConv3d,
    QuantLayerMixin,
    QuantLinear,
    dequantize_layers_,
    quantize_layer_,
    quantized_layers,
)
from hf_r2.regularizer import find_target_modules

# ---- references (float64) ---------------------------------------------------------------------------------------


def ref_weight_grid(w: torch.Tensor, bits: int, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Max-abs symmetric grid: `c = max|w|` (`mean|w|` at 1 bit), `s = 2c / n`, `z = n / 2`, shaped like `w`."""
    n = 2**bits - 1
    rows = w.double().reshape(w.shape[0], -1) if per_channel else w.double().reshape(1, -1)
    c = rows.abs().mean(1) if bits == 1 else rows.abs().amax(1)
    shape = [-1] + [1] * (w.dim() - 1)
    return (2 * c / n).reshape(shape), torch.full_like(c, n / 2).reshape(shape)


def ref_act_grid(x: torch.Tensor, bits: int) -> tuple[float, float]:
    """Min-max asymmetric grid over `[min(x_min, 0), max(x_max, 0)]`."""
    lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    s = (hi - lo) / (2**bits - 1)
    return s, float(round(-lo / s))


def ref_fake(v: torch.Tensor, s, z, bits: int) -> torch.Tensor:
    v = v.double()
    return (torch.clamp(torch.round(v / s + z), 0, 2**bits - 1) - z) * s


def ref_inputs(x: torch.Tensor, a_bits):
    if a_bits is None:
        return x.double()
    s, z = ref_act_grid(x, a_bits)
    return ref_fake(x, s, z, a_bits)


def quantize(layer: nn.Module, x: torch.Tensor, w_bits, a_bits, per_channel: bool, calibrate: bool = True):
    """Quantize `layer` with a max-abs weight grid and a min-max input grid calibrated on `x`."""
    wq = None
    if w_bits is not None:
        wq = FakeQuantizer(w_bits, per_channel=per_channel, channels=layer.weight.shape[0])
        wq.init_from(layer.weight, "maxabs")
    iq = None
    if a_bits is not None:
        iq = FakeQuantizer(a_bits, symmetric=False, activation=True, observer="minmax")
        if calibrate:
            iq.observe()
            assert torch.equal(iq(x), x)  # observed values pass unchanged
            assert iq.calibrate()
    return quantize_layer_(layer, wq, iq)


LAYERS = {
    "conv2d": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1), (2, 4, 9, 9), QuantConv2d),
    "depthwise": (lambda: nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False), (2, 6, 7, 7), QuantConv2d),
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, padding=2, dilation=2), (2, 4, 11), QuantConv1d),
    "conv3d": (lambda: nn.Conv3d(2, 4, 3, padding=1), (1, 2, 5, 5, 5), QuantConv3d),
    "linear": (lambda: nn.Linear(12, 5), (3, 7, 12), QuantLinear),
}


def functional(layer: nn.Module, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The layer's op in float64 on `x` with weight `w`, written with `torch.nn.functional`."""
    b = None if layer.bias is None else layer.bias.detach().double()
    if isinstance(layer, nn.Linear):
        return F.linear(x, w, b)
    op = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}[layer._hf_r2_float_class]
    return op(x, w, b, layer.stride, layer.padding, layer.dilation, layer.groups)


# ---- the layers against the functional ops ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize(
    "w_bits,a_bits,per_channel", [(2, 4, True), (4, 8, False), (1, None, True), (3, 2, True), (None, 3, True)]
)
def test_layer_equals_functional_on_fake_quantized_weight_and_input(kind, w_bits, a_bits, per_channel):
    make, shape, cls = LAYERS[kind]
    layer = make()
    x = torch.randn(shape) + 0.3
    w_float = layer.weight.detach().clone()
    quantize(layer, x, w_bits, a_bits, per_channel)
    assert type(layer) is cls

    w_ref = (
        w_float.double()
        if w_bits is None
        else ref_fake(w_float, *ref_weight_grid(w_float, w_bits, per_channel), w_bits)
    )
    ref = functional(layer, ref_inputs(x, a_bits), w_ref)
    out = layer(x)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    # the quantization is visible: the float layer gives something else
    float_out = functional(layer, x.double(), w_float.double())
    assert (out.double() - float_out).abs().max() > 1e-3 * float_out.abs().max()
    # at most 2^bits distinct weight values per channel (or per tensor), as the layer uses them
    if w_bits is not None:
        wq = layer.quantized_weight().detach()
        rows = wq.reshape(wq.shape[0], -1) if per_channel else wq.reshape(1, -1)
        assert max(r.unique().numel() for r in rows) <= 2**w_bits
        assert layer.weight.detach().equal(w_float)  # the float weight itself is untouched


def test_uncalibrated_input_quantizer_initialises_from_the_first_batch():
    layer = nn.Linear(12, 5)
    x = torch.randn(3, 12) * 2 - 0.5
    quantize(layer, x, 4, 3, True, calibrate=False)
    assert not bool(layer.input_quantizer.initialized)
    out = layer(x)
    assert bool(layer.input_quantizer.initialized)
    s, z = ref_act_grid(x, 3)
    assert layer.input_quantizer.scale.item() == pytest.approx(s, rel=1e-6)
    assert layer.input_quantizer.zero_point.item() == z
    w = layer.weight.detach()
    ref = functional(layer, ref_fake(x, s, z, 3), ref_fake(w, *ref_weight_grid(w, 4, True), 4))
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    # a second, wider batch does not move the grid
    layer(x * 10)
    assert layer.input_quantizer.scale.item() == pytest.approx(s, rel=1e-6)


def test_disabled_quantizers_pass_values_through():
    layer = nn.Conv2d(3, 4, 3)
    ref = nn.Conv2d(3, 4, 3)
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(2, 3, 6, 6)
    quantize(layer, x, 2, 2, True)
    assert not torch.allclose(layer(x), ref(x))
    layer.weight_quantizer.enabled = False
    layer.input_quantizer.enabled = False
    torch.testing.assert_close(layer(x), ref(x), rtol=0, atol=0)


def test_conv2d_same_keeps_its_padding():
    from timm.layers import Conv2dSame

    layer = Conv2dSame(3, 8, 3, stride=2)
    x = torch.randn(2, 3, 16, 16)
    w_float = layer.weight.detach().clone()
    quantize(layer, x, 2, 4, True)
    assert type(layer).__name__ == "QuantConv2dSame"
    assert isinstance(layer, Conv2dSame) and isinstance(layer, nn.Conv2d) and isinstance(layer, QuantLayerMixin)
    # "same" padding written out: total = max((ceil(16 / 2) - 1) * 2 + 3 - 16, 0) = 1, all of it on the right/bottom
    x_hat = F.pad(ref_inputs(x, 4), (0, 1, 0, 1))
    w_hat = ref_fake(w_float, *ref_weight_grid(w_float, 2, True), 2)
    ref = F.conv2d(x_hat, w_hat, layer.bias.detach().double(), stride=2)
    out = layer(x)
    assert out.shape == (2, 8, 8, 8)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    # symmetric padding would give another answer: the test can tell them apart
    other = F.conv2d(ref_inputs(x, 4), w_hat, layer.bias.detach().double(), stride=2, padding=1)
    assert (other - ref).abs().max() > 1e-2
    dequantize_layers_(layer)
    assert type(layer) is Conv2dSame


# ---- the class swap -------------------------------------------------------------------------------------------------


def test_parameters_keep_identity_and_an_earlier_optimizer_updates_them():
    layer = nn.Conv2d(3, 4, 3)
    weight, bias = layer.weight, layer.bias
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    x = torch.randn(2, 3, 6, 6)
    quantize(layer, x, 2, 4, True)
    assert layer.weight is weight and layer.bias is bias
    assert isinstance(layer.weight, nn.Parameter)
    names = dict(layer.named_parameters())
    assert names["weight"] is weight and names["bias"] is bias and "weight_quantizer.scale" in names
    before = weight.detach().clone()
    layer(x).square().sum().backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(layer.weight.detach(), before)
    assert layer.weight is weight  # restored after the forward pass, also when it raises
    with pytest.raises(RuntimeError, match="expected input.* to have 3 channels"):
        layer(torch.randn(2, 5, 6, 6))
    assert layer.weight is weight and layer._parameters["weight"] is weight


def test_quantize_layer_rejects_other_modules_and_replaces_quantizers():
    with pytest.raises(TypeError, match="Only Conv1d/2d/3d and Linear"):
        quantize_layer_(nn.BatchNorm2d(3), None, None)
    layer = nn.Linear(6, 4)
    x = torch.randn(5, 6)
    quantize(layer, x, 2, None, True)
    quantize(layer, x, 8, 8, False)  # again: new quantizers, same float class
    assert type(layer) is QuantLinear and layer.weight_quantizer.bits == 8 and layer.input_quantizer.bits == 8
    dequantize_layers_(layer)
    assert type(layer) is nn.Linear


def test_dequantize_layers_restores_classes_state_and_outputs():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Identity(), nn.Flatten(), nn.Linear(64, 5))
    keys = set(model.state_dict())
    x = torch.randn(2, 3, 6, 6)
    y_float = model(x)
    for m in (model[0], model[4]):
        quantize(m, x if m is model[0] else model[:4](x), 2, 4, True)
    assert len(quantized_layers(model)) == 2
    assert {"0.weight_quantizer.scale", "4.input_quantizer.zero_point"} <= set(model.state_dict())
    assert not torch.allclose(model(x), y_float)
    assert dequantize_layers_(model) is model
    assert type(model[0]) is nn.Conv2d and type(model[4]) is nn.Linear
    for m in (model[0], model[4]):
        assert not hasattr(m, "weight_quantizer") and not hasattr(m, "input_quantizer")
        assert not hasattr(m, "_hf_r2_float_class")
    assert set(model.state_dict()) == keys
    torch.testing.assert_close(model(x), y_float, rtol=0, atol=0)
    assert quantized_layers(model) == []


def test_quantized_layers_stay_targets_of_r2_loss(timm_cnn):
    model = timm_cnn
    reg_before = R2Regularizer(model, R2Config(loss="linf"))
    value_before = reg_before().item()
    x = torch.randn(2, 3, 32, 32)
    for _, m in find_target_modules(model):
        wq = FakeQuantizer(2, per_channel=True, channels=m.weight.shape[0]).init_from(m.weight)
        quantize_layer_(m, wq, FakeQuantizer(4, symmetric=False, activation=True))
    quantized = dict(quantized_layers(model))
    assert list(quantized) == reg_before.names
    for m in quantized.values():
        assert isinstance(m, (nn.Conv2d, nn.Linear))
    reg = R2Regularizer(model, R2Config(loss="linf"))
    assert reg.names == reg_before.names
    assert all(a is b for a, b in zip(reg.weights(), reg_before.weights()))
    value = reg()
    assert value.item() == pytest.approx(value_before, rel=1e-6)  # R2 sees the float weights
    loss = forward_logits(model, x).square().mean() + value
    loss.backward()
    for m in quantized.values():
        assert m.weight.grad is not None and m.weight.grad.abs().sum() > 0


# ---- LSQ ------------------------------------------------------------------------------------------------------------


def lsq_reference(v, scale, z, bits, g_out, n_per_step, q_p, per_channel):
    """The step's gradient `g * sum(dL/dv_hat * dv_hat/ds)` and the input's gradient, in float64."""
    n = 2**bits - 1
    v = v.double()
    s = scale.abs()
    r = torch.round(v / s + z)
    inside = (r >= 0) & (r <= n)
    d = torch.where(inside, r - z - v / s, torch.clamp(r, 0, n) - z)
    g = 1.0 / math.sqrt(n_per_step * q_p)
    contrib = g_out * d * g
    grad_s = contrib.reshape(v.shape[0], -1).sum(1) if per_channel else contrib.sum().reshape(1)
    return grad_s * torch.sign(scale.reshape(-1)), g_out * inside


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("case", ["weight_per_channel", "weight_per_tensor", "activation_4d", "activation_3d"])
@pytest.mark.parametrize("negative_scale", [False, True])
def test_lsq_gradients_match_the_paper(bits, case, negative_scale):
    g = torch.Generator().manual_seed(bits)
    if case.startswith("weight"):
        per_channel = case == "weight_per_channel"
        v = torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64)
        fq = FakeQuantizer(bits, per_channel=per_channel, channels=6, learnable=True).double()
        fq.init_from(v, "maxabs")
        n_per_step = 36 if per_channel else v.numel()
        q_p = (2**bits - 1) / 2
    else:
        per_channel = False
        shape = (4, 3, 5, 5) if case == "activation_4d" else (2, 7, 12)
        v = torch.randn(shape, generator=g, dtype=torch.float64) + 0.5
        fq = FakeQuantizer(bits, symmetric=False, activation=True, learnable=True, observer="minmax").double()
        fq.observe()
        fq(v)
        fq.calibrate()
        n_per_step = v[0].numel()  # features per sample
        q_p = 2**bits - 1
    with torch.no_grad():
        fq.scale.mul_(0.7)  # a narrower grid: values fall on both sides of the clipping range
        if negative_scale:
            fq.scale.neg_()
    z = fq.zero_point.reshape(fq._view(fq.zero_point, v).shape)
    scale_view = fq.scale.detach().reshape(z.shape).clone()
    v.requires_grad_(True)
    g_out = torch.randn(v.shape, generator=g, dtype=torch.float64)
    out = fq(v)
    torch.testing.assert_close(out, ref_fake(v.detach(), scale_view.abs(), z, bits), rtol=0, atol=1e-12)
    (out * g_out).sum().backward()

    grad_s, grad_v = lsq_reference(v.detach(), scale_view, z, bits, g_out, n_per_step, q_p, per_channel)
    n = 2**bits - 1
    r = torch.round(v.detach() / scale_view.abs() + z)
    assert ((r < 0) | (r > n)).any() and ((r >= 0) & (r <= n)).any()  # both regions are exercised
    torch.testing.assert_close(fq.scale.grad, grad_s, rtol=1e-9, atol=1e-12)
    # 1 inside (up to the rounding of `s * (1 / s)`), exactly 0 outside
    torch.testing.assert_close(v.grad, grad_v, rtol=1e-12, atol=0)
    assert torch.equal(v.grad == 0, (r < 0) | (r > n))


def test_frozen_quantizer_has_no_step_gradient():
    fq = FakeQuantizer(2, per_channel=True, channels=4).init_from(torch.randn(4, 8))
    assert not fq.scale.requires_grad
    w = torch.randn(4, 8, requires_grad=True)
    fq(w).sum().backward()
    assert fq.scale.grad is None and w.grad is not None


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_training_forward_equals_eval_forward_exactly(bits):
    # the LSQ gradient scaling must not change the forward value (else training, eval and export disagree)
    w = torch.randn(64, 27)
    fq = FakeQuantizer(bits, per_channel=True, channels=64, learnable=True).init_from(w, "mse")
    a = fq(w)
    assert a.requires_grad
    with torch.no_grad():
        b = fq(w)
    assert torch.equal(a, b)
    act = FakeQuantizer(bits, symmetric=False, activation=True, learnable=True)
    x = torch.randn(8, 16, 5, 5)
    act(x)  # initialises from the batch
    a = act(x)
    with torch.no_grad():
        b = act(x)
    assert torch.equal(a, b)


def test_calibrate_rejects_weight_grids_and_reports_no_data():
    fq = FakeQuantizer(4, symmetric=True)
    fq.observe()
    fq(torch.randn(10))
    with pytest.raises(ValueError, match="per-tensor asymmetric"):
        fq.calibrate()
    act = FakeQuantizer(4, symmetric=False, activation=True)
    act.observe()
    assert act.calibrate() is False and not bool(act.initialized)
    with pytest.raises(ValueError, match="`bits` must be an integer from 1 to 8"):
        FakeQuantizer(9)
    with pytest.raises(ValueError, match="symmetric only"):
        FakeQuantizer(1, symmetric=False)


def test_whole_timm_model_state_dict_round_trip():
    # quantizer state (scales, zero points, `initialized`) is saved and restored with the model
    model = make_timm("test_resnet").eval()
    x = torch.randn(2, 3, 32, 32)
    for _, m in find_target_modules(model):
        wq = FakeQuantizer(3, per_channel=True, channels=m.weight.shape[0]).init_from(m.weight)
        quantize_layer_(m, wq, FakeQuantizer(4, symmetric=False, activation=True))
    y = model(x)  # activation grids initialise from this batch
    state = model.state_dict()
    other = make_timm("test_resnet").eval()
    for _, m in find_target_modules(other):
        quantize_layer_(
            m,
            FakeQuantizer(3, per_channel=True, channels=m.weight.shape[0]),
            FakeQuantizer(4, symmetric=False, activation=True),
        )
    other.load_state_dict(state)
    torch.testing.assert_close(other(x * 3), model(x * 3), rtol=0, atol=0)
    torch.testing.assert_close(other(x), y, rtol=0, atol=0)
