"""`hf_r2.quant.ptq.cle`: cross-layer equalization keeps the float64 output of tiny nets and of timm / transformers
models, equalizes each pair's ranges exactly as the written-out formula says (depthwise convs included), finds only
the pairs it may rescale, and lowers W2A8 per-tensor PTQ error on a net with an outlier channel (bias correction:
tests/quant/test_bias_correction.py)."""

import copy
import logging

import pytest
import torch
from conftest import make_timm
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from hf_r2.models import forward_logits
from hf_r2.quant import EqualizeConfig, PTQConfig, equalize_, post_training_quantize_
from hf_r2.quant.ptq.cle import find_equalization_pairs


def _randomize_bn_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Batch norms with channel ranges far apart (random statistics and affine parameters), so that folding
    leaves per-channel ranges for CLE to equalize."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 4 + 0.1)
            m.weight.data.copy_(torch.rand(n, generator=g) * 3 + 0.1)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.5)
    return model


class _Chain(nn.Module):
    """conv -> BN -> ReLU -> depthwise -> BN -> ReLU6 -> pointwise -> ReLU -> pool -> Linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.pw = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv(x)))
        x = nn.functional.relu6(self.bn2(self.dw(x)))
        x = torch.relu(self.pw(x))
        return self.fc(nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))


def _out_range(layer: nn.Module) -> torch.Tensor:
    return torch.stack([layer.weight[i].abs().max() for i in range(layer.weight.shape[0])])


def _in_range(layer: nn.Module) -> torch.Tensor:
    """max |W[:, i]| written out: for a depthwise conv, input channel i is filter i."""
    w = layer.weight
    if isinstance(layer, nn.Conv2d) and layer.groups == layer.in_channels:
        return torch.stack([w[i].abs().max() for i in range(w.shape[0])])
    return torch.stack([w[:, i].abs().max() for i in range(w.shape[1])])


def _images(n: int = 8, side: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_config_round_trip_and_errors(tmp_path):
    config = EqualizeConfig(iterations=3, tolerance=1e-3, fold_bn=False, relu6="skip", calibration_batches=2,
                            include=["conv"], exclude=["fc"])
    config.save_pretrained(tmp_path)
    assert EqualizeConfig.from_pretrained(tmp_path).to_dict() == config.to_dict()
    for kwargs, match in ((dict(iterations=0), "`iterations`"), (dict(tolerance=0), "`tolerance`"),
                          (dict(relu6="relu"), "`relu6` must be one of 'bounded', 'skip'"),
                          (dict(include=["("]), "invalid regular")):
        with pytest.raises(ValueError, match=match):
            EqualizeConfig(**kwargs)


def test_pairs_of_a_chain_with_depthwise_relu6_and_pooling():
    model = _Chain().double().eval()
    equalize_(model, calibration_data=[_images()], iterations=1)  # folds the BNs
    pairs = find_equalization_pairs(model, _images(2))
    assert [(p.first, p.second, p.via, p.clip) for p in pairs] == [
        ("conv", "dw", "Relu", None), ("dw", "pw", "Hardtanh", 6.0), ("pw", "fc", "Relu-Mean-View", None)
    ]
    assert [p.second for p in find_equalization_pairs(model, _images(2), relu6="skip")] == ["dw", "fc"]
    assert [p.second for p in find_equalization_pairs(model, _images(2), exclude=["^pw$"])] == ["dw"]


def test_output_unchanged_float64_and_ranges_equal_at_convergence():
    model = _randomize_bn_(_Chain()).double().eval()
    data = [_images(seed=s) for s in range(3)]
    with torch.no_grad():
        ref = [model(x) for x in data]
    equalize_(model, EqualizeConfig(iterations=200, tolerance=1e-12), data)
    with torch.no_grad():
        for x, r in zip(data, ref):
            torch.testing.assert_close(model(x), r, rtol=1e-10, atol=1e-12)
    # conv -> depthwise -> (within the ReLU6 clip) pointwise -> fc: every pair's ranges agree
    torch.testing.assert_close(_out_range(model.conv), _in_range(model.dw), rtol=1e-8, atol=0)
    torch.testing.assert_close(_out_range(model.pw), _in_range(model.fc), rtol=1e-8, atol=0)


def test_one_sweep_is_the_written_out_formula():
    """One sweep on conv -> ReLU -> depthwise -> pointwise: s_i = sqrt(r1_i r2_i) / r2_i per pair, in order, and
    r1_i / s_i == r2_i * s_i after it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 2, 1)).double()
    with torch.no_grad():
        model[0].weight[1] *= 20  # an outlier channel
        model[2].weight[3] *= 0.05
    w0, b0, dw0, pw0 = (t.detach().clone() for t in (model[0].weight, model[0].bias, model[2].weight, model[3].weight))
    equalize_(model, calibration_data=[_images(2)], iterations=1)
    r1, r2 = w0.abs().amax((1, 2, 3)), dw0.abs().amax((1, 2, 3))
    s1 = torch.sqrt(r1 * r2) / r2
    torch.testing.assert_close(model[0].weight, w0 / s1[:, None, None, None], rtol=1e-12, atol=0)
    torch.testing.assert_close(model[0].bias, b0 / s1, rtol=1e-12, atol=0)
    torch.testing.assert_close(r1 / s1, r2 * s1, rtol=1e-12, atol=0)
    dw1 = dw0 * s1[:, None, None, None]  # the depthwise filter i carries s_i through
    r1, r2 = dw1.abs().amax((1, 2, 3)), pw0.abs().amax((0, 2, 3))
    s2 = torch.sqrt(r1 * r2) / r2
    torch.testing.assert_close(model[2].weight, dw1 / s2[:, None, None, None], rtol=1e-12, atol=0)
    torch.testing.assert_close(model[3].weight, pw0 * s2[None, :, None, None], rtol=1e-12, atol=0)
    torch.testing.assert_close(r1 / s2, r2 * s2, rtol=1e-12, atol=0)
    torch.testing.assert_close(_out_range(model[2]), _in_range(model[3]), rtol=1e-12, atol=0)


class _NotPairs(nn.Module):
    """A residual block, a GELU, a batch norm left unfolded and a shared layer: no pair but (a, b)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.c = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.d = nn.Conv2d(4, 4, 1)
        self.shared = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.b(torch.relu(self.a(x)))  # stem's output also feeds the sum: not rescalable; (a, b) is
        x = self.c(nn.functional.gelu(x))
        x = self.d(torch.relu(self.bn(x)))
        x = self.shared(torch.relu(self.shared(x)))
        return x.mean((2, 3))


def test_what_is_not_a_pair(caplog):
    model = _NotPairs().eval()
    with caplog.at_level(logging.DEBUG, logger="hf_r2.quant.ptq.cle"):
        pairs = find_equalization_pairs(model, torch.randn(1, 3, 8, 8))
    assert [(p.first, p.second) for p in pairs] == [("a", "b")]
    for why in ("ends at stem: its input is the model input", "ends at a: the tensor between them is used elsewhere",
                "ends at c: GeluBackward0 between them is not positive-homogeneous",
                "ends at d: NativeBatchNormBackward0 between them is not positive-homogeneous",
                "shared -> shared: a layer runs more than once"):
        assert why in caplog.text


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv2_100"])
def test_timm_models_keep_their_output(name):
    model = _randomize_bn_(make_timm(name)).double().eval()
    x = _images(2, side=32)
    with torch.no_grad():
        ref = model(x)
    folded, data_free = copy.deepcopy(model), copy.deepcopy(model)
    equalize_(model, calibration_data=[x])
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-9, atol=1e-9 * float(ref.abs().max()))
    from hf_r2.quant import fold_bn_

    fold_bn_(folded, x)
    pairs = find_equalization_pairs(folded, x)
    assert len(pairs) >= (8 if name == "resnet18" else 30)
    if name == "mobilenetv2_100":  # pointwise -> depthwise -> pointwise through ReLU6s, bounded by the data
        assert ("blocks.1.0.conv_pw", "blocks.1.0.conv_dw", "Hardtanh", 6.0) in pairs
        # data-free: no calibration maxima, so pairs through a ReLU6 are left alone (and the output is kept)
        equalize_(data_free, example_inputs=x)
        with torch.no_grad():
            torch.testing.assert_close(data_free(x), ref, rtol=1e-9, atol=1e-9 * float(ref.abs().max()))


def test_transformers_models_keep_their_output(hf_resnet):
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    mobilenet = MobileNetV2ForImageClassification(MobileNetV2Config(num_labels=10, depth_multiplier=0.35,
                                                                    image_size=32))
    for model in (hf_resnet, mobilenet):
        model = _randomize_bn_(model).double().eval()
        x = _images(2, side=32)
        with torch.no_grad():
            ref = forward_logits(model, x)
        equalize_(model, calibration_data=[{"pixel_values": x}])
        with torch.no_grad():
            torch.testing.assert_close(forward_logits(model, x), ref, rtol=1e-9, atol=1e-9 * float(ref.abs().max()))
    assert len(find_equalization_pairs(mobilenet, x)) > 20  # through tf-padding and ReLU6


def test_data_free_needs_an_input_size():
    with pytest.raises(ValueError, match="example_inputs"):
        equalize_(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)))


def _outlier_net() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    with torch.no_grad():  # the same function, but channel 0 of the first conv spans 30x the others
        model[0].weight[0] *= 30
        model[0].bias[0] *= 30
        model[2].weight[:, 0] /= 30
    return model.eval()


def _ptq_error(model: nn.Module, data: list[torch.Tensor], reference: nn.Module) -> float:
    model = copy.deepcopy(model)
    post_training_quantize_(model, PTQConfig(w_bits=2, a_bits=8, per_channel=False, first_last_bits=None,
                                             bn="keep"), data)
    with torch.no_grad():
        ref = torch.cat([reference(x) for x in data])
        out = torch.cat([model(x) for x in data])
    return float((out - ref).norm() / ref.norm())


def test_outlier_channel_w2a8_per_tensor_error_drops():
    model = _outlier_net()
    data = [_images(8, seed=s).float() for s in range(2)]
    before = _ptq_error(model, data, model)
    equalized = equalize_(copy.deepcopy(model), calibration_data=data)
    after = _ptq_error(equalized, data, model)
    assert after < 0.7 * before, (before, after)
