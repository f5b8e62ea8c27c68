"""`hf_r2.quant.ptq.bn`: `reestimate_bn_stats` against statistics hooked from the BN inputs (float64); batch-norm
folding against the float64 formula on one Conv+BN, exact model outputs on timm / transformers models, and the cases
that must not be folded."""

import logging

import pytest
import torch
from conftest import make_timm
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from hf_r2.models import forward_logits
from hf_r2.quant import fold_bn, fold_bn_, reestimate_bn_stats

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


# ---- fold_bn ---------------------------------------------------------------------------------------------------


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random running statistics and affine parameters (a fresh model has mean 0, var 1, gamma 1, beta 0, which
    would make folding a no-op)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.1)
                if m.weight is not None:
                    m.weight.copy_(torch.randn(n, generator=g))
                    m.bias.copy_(torch.randn(n, generator=g) * 0.3)
    return model


def _bns(model):
    return [name for name, m in model.named_modules() if isinstance(m, _BatchNorm)]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("groups", [1, 4])
def test_single_conv_bn_matches_float64_formula(bias, groups):
    conv = nn.Conv2d(4, 8, 3, padding=1, groups=groups, bias=bias)
    bn = nn.BatchNorm2d(8, eps=1e-3)
    model = _randomize_bn(nn.Sequential(conv, bn)).eval()
    w, b = conv.weight.detach().double().clone(), (conv.bias.detach().double().clone() if bias else None)
    mean, var = bn.running_mean.double().clone(), bn.running_var.double().clone()
    gamma, beta = bn.weight.detach().double().clone(), bn.bias.detach().double().clone()
    x = torch.randn(2, 4, 6, 6)
    ref_out = model(x)

    assert fold_bn_(model, x) == [("0", "1")]

    # the formula written out, per output channel, in float64
    for c in range(8):
        k = gamma[c] / (var[c] + 1e-3).sqrt()
        torch.testing.assert_close(model[0].weight[c].double(), w[c] * k, rtol=1e-6, atol=1e-7)
        b_c = (b[c] if bias else 0.0) - mean[c]
        torch.testing.assert_close(model[0].bias[c].double(), b_c * k + beta[c], rtol=1e-6, atol=1e-7)
    assert isinstance(model[1], nn.Identity)
    assert isinstance(model[0].bias, nn.Parameter)
    torch.testing.assert_close(model(x), ref_out, rtol=1e-5, atol=1e-5)


def test_linear_bn1d_and_affine_false():
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6, affine=False), nn.ReLU(), nn.Linear(6, 3))
    _randomize_bn(model).eval()
    x = torch.randn(4, 5)
    ref = model(x)
    assert fold_bn_(model, x) == [("0", "1")]
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


def _check_model_equal(model, x, expected_min_pairs):
    _randomize_bn(model)
    model.eval()
    with torch.no_grad():
        ref = forward_logits(model, x)
    folded = fold_bn(model, x)
    assert len(_bns(model)) > 0  # the original is untouched
    pairs = fold_bn_(model, x)
    assert len(pairs) >= expected_min_pairs
    assert [n for n in _bns(model)] == [n for n in _bns(folded)]  # same result on the copy
    folded_bns = {bn for _, bn in pairs}
    assert not folded_bns & set(_bns(model))  # every folded BN is gone
    with torch.no_grad():
        out = forward_logits(model, x)
        out_copy = forward_logits(folded, x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    torch.testing.assert_close(out_copy, out)
    return pairs


def test_timm_resnet_outputs_unchanged():
    model = make_timm("test_resnet")
    x = torch.randn(2, 3, 32, 32)
    pairs = _check_model_equal(model, x, expected_min_pairs=15)
    assert ("conv1.0", "conv1.1") in pairs and ("layer1.0.conv1", "layer1.0.bn1") in pairs
    assert not _bns(model)  # every BN of test_resnet follows a conv


def test_timm_efficientnet_depthwise_and_bn_act():
    model = make_timm("test_efficientnet")
    x = torch.randn(2, 3, 32, 32)
    pairs = _check_model_equal(model, x, expected_min_pairs=13)
    assert ("blocks.3.0.conv_dw", "blocks.3.0.bn2") in pairs  # depthwise conv
    # BatchNormAct2d: the BN part is gone, the activation stays (SiLU after bn1, identity after the projection)
    assert isinstance(model.blocks[3][0].bn2.act, nn.SiLU)
    assert isinstance(model.blocks[3][0].bn3.act, nn.Identity)
    assert not any(isinstance(m, _BatchNorm) for m in model.modules())


def test_transformers_resnet(hf_resnet):
    x = torch.randn(2, 3, 32, 32)
    pairs = _check_model_equal(hf_resnet, x, expected_min_pairs=5)
    assert all(bn.endswith("normalization") for _, bn in pairs)
    # the batch dict form is accepted too
    assert fold_bn_(hf_resnet, {"pixel_values": x}) == []


class _SharedConsumer(nn.Module):
    """conv -> bn, and the conv output also feeds a residual: folding would change the residual."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class _InplaceBetween(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.act = nn.ReLU(inplace=True)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.act(self.conv(x)))


class _SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x)


class _LinearOnTokens(nn.Module):
    """A BatchNorm1d over dim 1 of a (B, L, C) Linear output normalises positions, not features."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(self.fc(x.reshape(x.shape[0], -1, 4)[:, :4]))


@pytest.mark.parametrize(
    "cls, reason",
    [
        (_SharedConsumer, "used by more than the BN"),
        (_InplaceBetween, "modified in place"),
        (_SharedConv, "more than once"),
        (_LinearOnTokens, "not over its features"),
    ],
)
def test_unsafe_pairs_are_not_folded(cls, reason, caplog):
    model = _randomize_bn(cls()).eval()
    x = torch.randn(2, 3, 4, 4)
    ref = model(x)
    with caplog.at_level(logging.INFO, logger="hf_r2.quant.ptq.bn"):
        assert fold_bn_(model, x) == []
    assert reason in caplog.text
    assert isinstance(model.bn, nn.BatchNorm2d | nn.BatchNorm1d)
    torch.testing.assert_close(model(x), ref)


def test_training_mode_is_restored_and_no_stats_bn_skipped():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False), nn.Conv2d(4, 2, 1))
    model.train()
    assert fold_bn_(model, torch.randn(2, 3, 4, 4)) == []
    assert all(m.training for m in model.modules())


def test_quantized_layer_is_not_folded(caplog):
    from hf_r2.quant.layers import FakeQuantizer, quantize_layer_

    model = _randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))).eval()
    quantize_layer_(model[0], FakeQuantizer(4, per_channel=True, channels=4).init_from(model[0].weight), None)
    with caplog.at_level(logging.INFO, logger="hf_r2.quant.ptq.bn"):
        assert fold_bn_(model, torch.randn(2, 3, 4, 4)) == []
    assert "fold before quantizing" in caplog.text
