"""`quantize_weights` / `WeightQuantConfig` (hf_r2.quant.api) and `reestimate_bn_stats` (hf_r2.quant.bn)."""

import json

import pytest
import torch
from torch import nn

from hf_r2 import find_target_modules
from hf_r2.quant import WeightQuantConfig, fake_quantize, quantize_weights, quantize_weights_, reestimate_bn_stats
from hf_r2.quant.uniform import ScaleMethod


def _conv_net() -> nn.Module:
    """Conv, depthwise conv, Conv1d-free 2d net with a Linear head (and BN, which must stay untouched)."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),  # depthwise
        nn.Conv2d(8, 6, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 5),
    )


def _distinct_per_channel(w: torch.Tensor) -> int:
    return max(row.unique().numel() for row in w.reshape(w.shape[0], -1))


# ---- quantize_weights --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_quantize_weights_copy(bits):
    model = _conv_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qmodel = quantize_weights(model, WeightQuantConfig(bits=bits))
    assert qmodel is not model
    for k, v in model.state_dict().items():  # the original is untouched
        assert torch.equal(v, before[k]), k
    targets = {f"{name}.weight" for name, _ in find_target_modules(model)}
    assert targets == {"0.weight", "3.weight", "4.weight", "7.weight"}
    for k, v in qmodel.state_dict().items():
        if k in targets:
            assert _distinct_per_channel(v) <= 2**bits, k
            torch.testing.assert_close(v, fake_quantize(before[k], bits), rtol=0, atol=0)
        else:  # biases, BN affine and running stats stay in float
            assert torch.equal(v, before[k]), k
    assert torch.isfinite(qmodel(torch.randn(2, 3, 8, 8))).all()


def test_quantize_weights_in_place_and_kwargs():
    model = _conv_net()
    ref = quantize_weights(model, WeightQuantConfig(bits=3, symmetric=False, scale_method="mse"))
    via_kwargs = quantize_weights(model, bits=3, symmetric=False, scale_method="mse")
    via_override = quantize_weights(model, WeightQuantConfig(bits=8), bits=3, symmetric=False, scale_method="mse")
    same = quantize_weights_(model, bits=3, symmetric=False, scale_method="mse")
    assert same is model
    for other in (via_kwargs, via_override, model):
        for (k, a), b in zip(ref.state_dict().items(), other.state_dict().values()):
            assert torch.equal(a, b), k
    with pytest.raises(ValueError, match=r"Unknown `WeightQuantConfig` field\(s\) \['bitz'\]"):
        quantize_weights(model, bitz=2)
    with pytest.raises(TypeError, match="`config` must be a `WeightQuantConfig`"):
        quantize_weights(model, {"bits": 2})


def test_layer_selection():
    model = _conv_net()
    first_last = quantize_weights(model, skip_first_last=True)
    assert torch.equal(first_last[0].weight, model[0].weight)
    assert torch.equal(first_last[7].weight, model[7].weight)
    assert not torch.equal(first_last[3].weight, model[3].weight)
    assert _distinct_per_channel(first_last[4].weight) <= 4
    only_dw = quantize_weights(model, include=[r"^3$"])
    changed = [i for i in (0, 3, 4, 7) if not torch.equal(only_dw[i].weight, model[i].weight)]
    assert changed == [3]
    no_head = quantize_weights(model, exclude=["7"])
    assert torch.equal(no_head[7].weight, model[7].weight)
    assert not torch.equal(no_head[0].weight, model[0].weight)
    with pytest.raises(ValueError, match="No target layer left"):
        quantize_weights(model, include=["nothing_matches"])


def test_timm_and_transformers_models(timm_cnn, hf_convnext):
    for model in (timm_cnn, hf_convnext):
        qmodel = quantize_weights(model, bits=2, per_channel=False)
        n = 0
        for name, module in find_target_modules(qmodel):
            assert module.weight.unique().numel() <= 4, name
            n += 1
        assert n >= 4
        for (k, a), b in zip(model.named_parameters(), qmodel.parameters()):
            if k.endswith("bias") or "norm" in k or ".bn" in k:
                assert torch.equal(a, b), k


# ---- WeightQuantConfig -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        WeightQuantConfig(),
        WeightQuantConfig(bits=1, per_channel=False, skip_first_last=True),
        WeightQuantConfig(bits=4, symmetric=False, scale_method=ScaleMethod.MSE, include=["layer"], exclude="fc"),
    ],
)
def test_config_round_trip(config, tmp_path):
    data = config.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert "hf_r2_version" in data and data["version"] == 1
    assert WeightQuantConfig.from_dict(data) == config
    path = config.save_pretrained(tmp_path)
    assert path.endswith("quantization_config.json")
    loaded = WeightQuantConfig.from_pretrained(tmp_path)
    assert loaded == config and loaded.to_dict() == data
    assert WeightQuantConfig.from_pretrained(path) == config


def test_config_normalises():
    config = WeightQuantConfig(scale_method=ScaleMethod.MSE, include="conv", exclude=("head",))
    assert config.scale_method == "mse" and config.include == ["conv"] and config.exclude == ["head"]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"bits": 0}, r"`bits` must be an integer from 1 to 8, got 0"),
        ({"bits": 9}, r"`bits` must be an integer from 1 to 8, got 9"),
        ({"bits": 2.0}, r"`bits` must be an integer from 1 to 8, got 2.0"),
        ({"bits": True}, r"`bits` must be an integer from 1 to 8, got True"),
        ({"bits": 1, "symmetric": False}, r"`bits=1` is binary.*WeightQuantConfig\(bits=1, symmetric=True\)"),
        ({"symmetric": "yes"}, r"`symmetric` must be `True` or `False`, got 'yes'"),
        ({"per_channel": 1}, r"`per_channel` must be `True` or `False`"),
        ({"scale_method": "percentile"}, r"`scale_method` must be one of \['maxabs', 'mse'\], got 'percentile'\.$"),
        ({"scale_method": "max_abs"}, r"Did you mean `scale_method='maxabs'`\?"),
        ({"scale_method": "MSE"}, r"Did you mean `scale_method='mse'`\?"),
        ({"include": ["conv("]}, r"`include` holds an invalid regular expression 'conv\('"),
        ({"exclude": 3}, r"`exclude` must be a list of regular expressions or `None`, got 3"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WeightQuantConfig(**kwargs)


def test_config_from_dict_unknown_key(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown `WeightQuantConfig` field\(s\) \['bit'\]"):
        WeightQuantConfig.from_dict({"bit": 2})
    with pytest.raises(FileNotFoundError, match="No quantization_config.json"):
        WeightQuantConfig.from_pretrained(tmp_path)


# ---- reestimate_bn_stats -----------------------------------------------------------------------------------------


class _BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        from timm.layers import BatchNormAct2d

        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4, momentum=0.3)
        self.drop = nn.Dropout(0.5)
        self.conv2 = nn.Conv2d(4, 6, 3)
        self.bn2 = BatchNormAct2d(6)  # timm's fused BN + act (a BatchNorm2d subclass)
        self.fc = nn.Linear(6, 5)
        self.bn3 = nn.BatchNorm1d(5)

    def forward(self, x):
        x = self.drop(torch.relu(self.bn1(self.conv1(x))))
        x = self.bn2(self.conv2(x)).mean((2, 3))
        return self.bn3(self.fc(x))


def _batches(n, offset=0.0):
    g = torch.Generator().manual_seed(1)
    return [
        {"pixel_values": torch.randn(8, 3, 6, 6, generator=g) * (1 + i) + i + offset, "labels": torch.zeros(8)}
        for i in range(n)
    ]


def test_reestimate_matches_hooked_statistics():
    model = _BNNet()
    model.train()
    model.bn2.eval()  # a mixed mode that must come back as it was
    bns = [model.bn1, model.bn2, model.bn3]
    for bn in bns:  # stale statistics that must not leak into the new ones
        bn.running_mean.fill_(5.0)
        bn.running_var.fill_(7.0)
    momenta = [bn.momentum for bn in bns]
    inputs = {bn: [] for bn in bns}
    modes = []
    hooks = [bn.register_forward_pre_hook(lambda m, a: inputs[m].append(a[0].detach().double())) for bn in bns]
    hooks.append(model.drop.register_forward_pre_hook(lambda m, a: modes.append((m.training, model.bn1.training))))
    loader = _batches(3) + _batches(2, offset=100.0)  # the last two must not be used
    out = reestimate_bn_stats(model, loader, num_batches=3)
    for h in hooks:
        h.remove()
    assert out is model
    assert modes == [(False, True)] * 3  # dropout off, BN in train mode, during the pass
    for bn, momentum in zip(bns, momenta):
        assert len(inputs[bn]) == 3
        # reference: per batch, per channel mean and unbiased variance over (N, *spatial), averaged over batches
        per_batch = [x.transpose(0, 1).reshape(x.shape[1], -1) for x in inputs[bn]]
        mean = torch.stack([x.mean(1) for x in per_batch]).mean(0)
        var = torch.stack([x.var(1, unbiased=True) for x in per_batch]).mean(0)
        torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-5, atol=1e-6)
        assert int(bn.num_batches_tracked) == 3
        assert bn.momentum == momentum
    assert model.training and model.drop.training and model.bn1.training and not model.bn2.training


def test_reestimate_one_batch_is_exact_batch_statistics():
    model = _BNNet().eval()
    seen = []
    hook = model.bn1.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().double()))
    reestimate_bn_stats(model, _batches(1), num_batches=None)
    hook.remove()
    x = seen[0].transpose(0, 1).reshape(4, -1)
    torch.testing.assert_close(model.bn1.running_mean.double(), x.mean(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.bn1.running_var.double(), x.var(1), rtol=1e-5, atol=1e-6)
    assert not model.training


def test_reestimate_on_timm_and_transformers(timm_cnn, hf_resnet):
    for model in (timm_cnn, hf_resnet):
        model.eval()
        bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert bns
        before = [bn.running_mean.clone() for bn in bns]
        loader = [{"pixel_values": torch.randn(4, 3, 32, 32)} for _ in range(2)]
        reestimate_bn_stats(model, loader, num_batches=2)
        assert all(int(bn.num_batches_tracked) == 2 for bn in bns)
        assert all(torch.isfinite(bn.running_var).all() for bn in bns)
        assert any(not torch.equal(b, bn.running_mean) for b, bn in zip(before, bns))
        assert not model.training


def test_reestimate_edge_cases():
    model = _BNNet()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="`dataloader` gave no batch"):
        reestimate_bn_stats(model, [], num_batches=3)
    for k, v in model.state_dict().items():  # statistics restored after the error
        assert torch.equal(v, state[k]), k
    assert model.bn1.momentum == 0.3
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="`num_batches` must be a positive integer or `None`"):
            reestimate_bn_stats(model, _batches(1), num_batches=bad)
    with pytest.raises(ValueError, match="must hold `pixel_values`"):
        reestimate_bn_stats(model, [{"images": torch.randn(2, 3, 6, 6)}])
    no_bn = nn.Sequential(nn.Conv2d(3, 2, 1))
    assert reestimate_bn_stats(no_bn, []) is no_bn
    # (images, labels) pairs work too
    reestimate_bn_stats(model, [(b["pixel_values"], b["labels"]) for b in _batches(2)], num_batches=2)
    assert int(model.bn1.num_batches_tracked) == 2
