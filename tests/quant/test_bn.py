"""reestimate_bn_stats against statistics hooked from the BN inputs (float64)."""


import pytest
import torch
from torch import nn

from hf_r2.quant import reestimate_bn_stats

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
