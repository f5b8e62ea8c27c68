"""`hf_r2.quant.ptq`: `post_training_quantize_` against `fake_quantize` of each weight (data-free), the grids its
activations take, the accuracy ordering W8A8 < W4A8 < W2A8, config validation and JSON, and timm / transformers models
end to end. (AdaRound and BN folding are tested with their own modules.)"""

import copy
import json

import pytest
import torch
from conftest import make_timm
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from hf_r2.models import forward_logits
from hf_r2.quant import ScaleMethod, fake_quantize
from hf_r2.quant.layers import QuantLayerMixin, quantized_layers
from hf_r2.quant.observers import ObserverType
from hf_r2.quant.ptq import PTQ_CONFIG_NAME, PTQConfig, calibrate_activations_, post_training_quantize_
from hf_r2.quant.qat import QATConfig
from hf_r2.regularizer import find_target_modules


def images(n_batches: int, batch: int = 4, seed: int = 1, size: int = 32) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [
        {"pixel_values": torch.randn(batch, 3, size, size, generator=g), "labels": torch.randint(0, 10, (batch,))}
        for _ in range(n_batches)
    ]


def layer_bits(i: int, count: int, bits, first_last=8):
    return first_last if (first_last is not None and i in (0, count - 1)) else bits


def capture_quantized_inputs(model: nn.Module) -> tuple[dict, list]:
    """Forward hooks on every input quantizer, recording what the layer receives."""
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for name, m in quantized_layers(model):
        if m.input_quantizer is not None:
            hooks.append(
                m.input_quantizer.register_forward_hook(lambda mod, args, out, n=name: seen.__setitem__(n, out))
            )
    return seen, hooks


# ---- data-free weights ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weight_range", ["maxabs", "mse"])
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("w_bits,first_last_bits", [(2, 8), (1, 8), (4, None), (3, 4)])
def test_data_free_weights_equal_fake_quantize(timm_cnn, weight_range, per_channel, w_bits, first_last_bits):
    model = timm_cnn.eval()
    float_model = copy.deepcopy(model)
    targets = find_target_modules(model)
    originals = [m.weight.detach().clone() for _, m in targets]
    config = PTQConfig(
        w_bits=w_bits,
        a_bits=None,
        bn="keep",
        weight_range=weight_range,
        per_channel=per_channel,
        first_last_bits=first_last_bits,
    )
    assert not config.needs_data
    assert post_training_quantize_(model, config) is model  # no calibration data needed
    assert [n for n, _ in quantized_layers(model)] == [n for n, _ in targets]
    expected_weights = []
    for i, ((name, m), w) in enumerate(zip(targets, originals)):
        bits = layer_bits(i, len(targets), w_bits, first_last_bits)
        assert m.weight_quantizer.bits == bits and m.input_quantizer is None
        expected = fake_quantize(w, bits, symmetric=True, per_channel=per_channel, scale_method=weight_range)
        with torch.no_grad():
            got = m.quantized_weight()
        assert torch.equal(got, expected), name
        assert torch.equal(m.weight.detach(), w)  # the float weight is kept
        rows = got.reshape(got.shape[0], -1) if per_channel else got.reshape(1, -1)
        assert max(r.unique().numel() for r in rows) <= 2**bits, name
        expected_weights.append(expected)
    # the whole model computes what a float model holding the fake-quantized weights computes
    with torch.no_grad():
        for (_, m), w in zip(find_target_modules(float_model), expected_weights):
            m.weight.copy_(w)
        x = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(model(x), float_model(x), rtol=0, atol=0)


def test_include_exclude_and_first_last_follow_the_targets(timm_cnn):
    model = timm_cnn
    post_training_quantize_(model, PTQConfig(w_bits=2, a_bits=None, bn="keep", exclude=["^fc$"]))
    assert type(model.fc) is nn.Linear  # left in float
    layers = quantized_layers(model)
    assert "fc" not in dict(layers)
    # the last quantized layer is now the one before `fc`, and gets `first_last_bits`
    bits = [m.weight_quantizer.bits for _, m in layers]
    assert bits[0] == 8 and bits[-1] == 8 and set(bits[1:-1]) == {2}


# ---- activations ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("a_bits", [2, 4])
@pytest.mark.parametrize("act_observer", ["minmax", "percentile", "mse"])
def test_activation_inputs_are_on_an_a_bits_grid(timm_cnn, a_bits, act_observer):
    model = timm_cnn
    cal = images(3)
    config = PTQConfig(w_bits=4, a_bits=a_bits, act_observer=act_observer, bn="reestimate", calibration_batches=2)
    post_training_quantize_(model, config, cal)
    layers = quantized_layers(model)
    seen, hooks = capture_quantized_inputs(model)
    model.eval()
    with torch.no_grad():
        model(images(1, seed=7)[0]["pixel_values"] * 1.5)  # wider than the calibration data: some values clip
    for h in hooks:
        h.remove()
    assert list(seen) == [n for n, _ in layers]
    for i, (name, m) in enumerate(layers):
        bits = layer_bits(i, len(layers), a_bits)
        iq = m.input_quantizer
        assert iq.enabled and bool(iq.initialized) and iq.bits == bits and not iq.symmetric
        values = seen[name].unique()
        assert values.numel() <= 2**bits, name
        codes = values.double() / iq.scale.abs().double() + iq.zero_point.double()
        assert (codes - codes.round()).abs().max() < 1e-3, name  # on the grid
        assert codes.min() > -1e-3 and codes.max() < 2**bits - 1 + 1e-3, name
    if act_observer == "minmax":
        # the stem sees the images: its grid is the min-max grid of the calibration batches used (2 of 3)
        pixels = torch.cat([b["pixel_values"].flatten() for b in cal[:2]]).double()
        lo, hi = min(pixels.min().item(), 0.0), max(pixels.max().item(), 0.0)
        s = (hi - lo) / 255
        iq = layers[0][1].input_quantizer
        assert iq.scale.item() == pytest.approx(s, rel=1e-6)
        assert iq.zero_point.item() == round(-lo / s)


def test_relu_inputs_get_unsigned_grids(timm_cnn):
    model = timm_cnn
    post_training_quantize_(model, PTQConfig(w_bits=4, a_bits=4, act_observer="minmax", bn="keep"), images(2))
    seen, hooks = capture_quantized_inputs(model)
    with torch.no_grad():
        model.eval()(images(1, seed=3)[0]["pixel_values"])
    for h in hooks:
        h.remove()
    after_relu = [(n, m) for n, m in quantized_layers(model) if n.endswith(("conv2", "fc"))]
    assert len(after_relu) >= 3
    for name, m in after_relu:  # conv2 of a basic block, and the head after ReLU + pooling
        assert m.input_quantizer.zero_point.item() == 0.0, name
        assert seen[name].min() >= 0, name
    # the stem sees signed images: a zero point inside the codes
    assert 0 < quantized_layers(model)[0][1].input_quantizer.zero_point.item() < 255


def test_quantization_error_shrinks_with_bits(timm_cnn):
    base = timm_cnn.eval()
    cal, x = images(4, batch=8), images(1, batch=8, seed=9)[0]["pixel_values"]
    with torch.no_grad():
        y = base(x)
    errors = {}
    for w_bits in (8, 4, 2):
        model = copy.deepcopy(base)
        post_training_quantize_(model, PTQConfig(w_bits=w_bits, a_bits=8, bn="keep"), cal)
        with torch.no_grad():
            errors[w_bits] = ((model.eval()(x) - y).norm() / y.norm()).item()
    assert errors[8] < 0.03, errors  # W8A8 is close to float
    assert errors[2] > 0.3, errors  # W2A8 is far
    assert errors[8] < errors[4] < errors[2], errors


def test_unused_layer_cannot_be_calibrated():
    class WithSpare(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.spare = nn.Linear(4, 4)  # never called
            self.head = nn.Linear(4, 10)

        def forward(self, x):
            return self.head(self.conv(x).mean((2, 3)))

    with pytest.raises(ValueError, match=r"No calibration value reached the inputs of \['spare'\]"):
        post_training_quantize_(WithSpare(), PTQConfig(a_bits=8, bn="keep"), images(1))
    # excluding it works, and a plain tensor works as a batch
    model = WithSpare()
    post_training_quantize_(model, PTQConfig(a_bits=8, bn="keep", exclude=["spare"]), [torch.randn(2, 3, 8, 8)])
    assert type(model.spare) is nn.Linear
    assert calibrate_activations_(model, [torch.randn(2, 3, 8, 8)]) == ["conv", "head"]


def test_bn_reestimate_uses_the_quantized_weights(timm_cnn):
    model = timm_cnn
    cal = images(2)
    post_training_quantize_(model, PTQConfig(w_bits=2, a_bits=None, bn="reestimate", calibration_batches=2), cal)
    bn = model.bn1
    assert bn.num_batches_tracked.item() == 2
    # the stem's output statistics, computed here from the quantized stem (inputs in float: a_bits=None)
    with torch.no_grad():
        out = torch.stack([model.conv1(b["pixel_values"]) for b in cal])
    mean = out.mean(dim=(1, 3, 4)).mean(0)  # average over batches of per-batch means
    torch.testing.assert_close(bn.running_mean, mean, rtol=1e-4, atol=1e-5)


# ---- errors ---------------------------------------------------------------------------------------------------------


def test_missing_or_empty_calibration_data(timm_cnn):
    with pytest.raises(ValueError, match=r"PTQ with `a_bits=8` needs `calibration_data`"):
        post_training_quantize_(timm_cnn, PTQConfig(w_bits=2, a_bits=8))
    with pytest.raises(ValueError, match=r"PTQ with `bn='reestimate'` needs `calibration_data`"):
        post_training_quantize_(timm_cnn, PTQConfig(w_bits=2, a_bits=None))
    with pytest.raises(ValueError, match="gave no batch"):
        post_training_quantize_(timm_cnn, PTQConfig(w_bits=2, a_bits=8), calibration_data=[])
    with pytest.raises(TypeError, match="`config` must be a `PTQConfig`, got QATConfig"):
        post_training_quantize_(timm_cnn, QATConfig())
    assert quantized_layers(timm_cnn) == []  # nothing happened


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(w_bits=0), "`w_bits` must be an integer from 1 to 8, got 0"),
        (dict(w_bits=9), "`w_bits` must be an integer from 1 to 8, got 9"),
        (dict(w_bits=True), "`w_bits` must be an integer from 1 to 8, got True"),
        (dict(w_bits=None), "`w_bits` must be an integer from 1 to 8, got None"),
        (dict(a_bits=1), r"`a_bits` must be an integer from 2 to 8 or `None`, got 1"),
        (dict(a_bits=8.0), r"`a_bits` must be an integer from 2 to 8 or `None`, got 8.0"),
        (dict(first_last_bits="8"), "`first_last_bits` must be an integer from 1 to 8 or `None`"),
        (dict(per_channel="yes"), "`per_channel` must be `True` or `False`"),
        (dict(weight_range="max"), "`weight_range` must be one of 'maxabs', 'mse', got 'max'"),
        (dict(act_observer="min-max"), "Did you mean `act_observer='minmax'`"),
        (dict(rounding="ada"), "`rounding` must be one of 'nearest', 'adaround'"),
        (dict(bn="folded"), "`bn` must be one of 'fold', 'reestimate', 'keep', got 'folded'"),
        (dict(act_percentile=50), r"`act_percentile` must be in \(50, 100\], got 50"),
        (dict(calibration_batches=0), "`calibration_batches` must be a positive integer, got 0"),
        (dict(include=["("]), "`include` holds an invalid regular expression"),
        (dict(exclude=3), "`exclude` must be a list of regular expressions"),
    ],
)
def test_bad_config_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PTQConfig(**kwargs)


def test_no_target_left_raises(timm_cnn):
    with pytest.raises(ValueError, match="No target layer left"):
        post_training_quantize_(timm_cnn, PTQConfig(a_bits=None, bn="keep", include=["nothing_matches"]))


@pytest.mark.parametrize(
    "config",
    [
        PTQConfig(),
        PTQConfig(
            w_bits=4,
            a_bits=None,
            per_channel=False,
            weight_range=ScaleMethod.MAXABS,
            act_observer=ObserverType.PERCENTILE,
            act_percentile=99.9,
            first_last_bits=None,
            bn="keep",
            calibration_batches=3,
            include=["layer"],
            exclude="fc",
        ),
        QATConfig(),
        QATConfig(
            w_bits=1,
            a_bits=None,
            weight_init="maxabs",
            act_observer="minmax",
            learn_scales=False,
            first_last_bits=4,
            calibration_batches=2,
            exclude=["fc"],
        ),
    ],
)
def test_config_json_round_trip(tmp_path, config):
    cls = type(config)
    # enums and a lone pattern are normalised to plain JSON data
    data = config.to_dict()
    assert data["hf_r2_version"] and data["version"] == 1
    json.dumps(data)
    assert all(not isinstance(v, ScaleMethod | ObserverType) for v in data.values())
    path = config.save_pretrained(tmp_path)
    assert path.endswith(cls.config_name)
    assert cls.config_name == (PTQ_CONFIG_NAME if cls is PTQConfig else "qat_config.json")
    assert cls.from_pretrained(tmp_path) == config
    assert cls.from_pretrained(path) == config
    assert cls.from_dict(data) == config
    with pytest.raises(ValueError, match=r"Unknown `\w+Config` field\(s\) \['w_bit'\]"):
        cls.from_dict({**data, "w_bit": 2})
    bad = {**data, "w_bits": 12}
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / cls.config_name).write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="`w_bits` must be an integer from 1 to 8, got 12"):
        cls.from_pretrained(tmp_path / "bad")


# ---- whole models ---------------------------------------------------------------------------------------------------


def _mobilenet():
    return make_timm("mobilenetv3_small_050")


@pytest.mark.parametrize("fixture", ["timm_cnn", "timm_vit", "mobilenet", "hf_resnet", "hf_convnext"])
def test_models_end_to_end(request, fixture):
    model = _mobilenet() if fixture == "mobilenet" else request.getfixturevalue(fixture)
    model.eval()
    float_model = copy.deepcopy(model)
    targets = [n for n, _ in find_target_modules(model)]
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    cal = images(2)
    # default: MSE ranges, BN re-estimated
    post_training_quantize_(model, PTQConfig(w_bits=2, a_bits=8, calibration_batches=2), cal)
    layers = quantized_layers(model)
    assert [n for n, _ in layers] == targets
    if fixture == "mobilenet":
        assert any(m.groups > 1 and m.groups == m.in_channels for _, m in layers)  # depthwise convs quantized
    for i, (name, m) in enumerate(layers):
        assert isinstance(m, QuantLayerMixin) and isinstance(m, (nn.Conv2d, nn.Linear))
        assert m.weight_quantizer.bits == layer_bits(i, len(layers), 2), name
        assert bool(m.weight_quantizer.initialized) and bool(m.input_quantizer.initialized)
        assert m.input_quantizer.enabled and m.input_quantizer.scale.item() > 0
    for bn in bns:
        assert bn.num_batches_tracked.item() == 2  # re-estimated on the 2 batches
    x = images(1, seed=5)[0]["pixel_values"][:2]
    with torch.no_grad():
        y = forward_logits(model, x)
        y_float = forward_logits(float_model, x)
    assert y.shape == (2, 10) and torch.isfinite(y).all()
    assert not torch.allclose(y, y_float, atol=1e-4)
    # an independent reference of what the quantized model computes: the float architecture with the re-estimated
    # BN statistics, each target layer's weight replaced by its grid values and its input rounded, by hand, to the
    # input quantizer's grid: q = clamp(round(x / s + z), 0, 2^b - 1), x_hat = (q - z) * s
    ref = copy.deepcopy(float_model)
    ref.load_state_dict(model.state_dict(), strict=False)
    for name, m in layers:
        target = ref.get_submodule(name)
        with torch.no_grad():
            target.weight.copy_(m.quantized_weight())
        iq = m.input_quantizer

        def round_input(module, args, iq=iq):
            s, z, top = iq.scale.detach(), iq.zero_point.detach(), 2**iq.bits - 1
            return ((torch.clamp(torch.round(args[0] / s + z), 0, top) - z) * s,) + tuple(args[1:])

        target.register_forward_pre_hook(round_input)
    with torch.no_grad():
        y_ref = forward_logits(ref.eval(), x)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)


def test_fold_and_adaround_end_to_end(timm_cnn):
    # the other PTQ steps together (each is tested with its own module): BN folding, AdaRound, then activations
    model = timm_cnn.eval()
    config = PTQConfig(
        w_bits=2,
        a_bits=8,
        bn="fold",
        rounding="adaround",
        adaround={"iters": 5},
        weight_range="maxabs",
        calibration_batches=2,
    )
    post_training_quantize_(model, config, images(2))
    assert not any(isinstance(m, _BatchNorm) for m in model.modules())
    layers = quantized_layers(model)
    assert len(layers) == len(find_target_modules(model))
    for name, m in layers:
        wq = m.weight_quantizer
        with torch.no_grad():
            w_hat = m.quantized_weight().double()
        w = m.weight.detach().double()
        s = wq.scale.abs().double().reshape(-1, 1, 1, 1) if w.dim() == 4 else wq.scale.abs().double().reshape(-1, 1)
        z = wq.zero_point.double().reshape(s.shape)
        zero = (s == 0).expand_as(w)  # a zero-initialised last BN (timm's zero_init_last) folds to a zero channel
        assert (w_hat[zero] == 0).all() and (w[zero] == 0).all(), name
        codes = w_hat / torch.where(s > 0, s, 1.0) + z
        assert ((codes - codes.round())[~zero].abs() < 1e-4).all(), name  # on the grid
        # rounded up or down: within one step of the (folded) float weight; nothing clipped with max-abs ranges
        assert ((w_hat - w).abs() <= s * (1 + 1e-5)).all(), name
        assert bool(m.input_quantizer.initialized) and m.input_quantizer.enabled
    with torch.no_grad():
        y = model(images(1, seed=4)[0]["pixel_values"])
    assert y.shape == (4, 10) and torch.isfinite(y).all()
