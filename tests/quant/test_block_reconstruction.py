"""Block reconstruction (BRECQ / QDrop): on a tiny two-layer block the loss decreases, the result is never worse
than round-to-nearest on the calibration images (errors computed here with the block's float copy), the rounding
variables end at 0 / 1, the weights end on their grids; `drop_prob=0` equals a BRECQ loop written out here with the
same draws, and dropping changes the result; end-to-end runs on timm and transformers models through `quantize_`.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_timm
from torch import nn

from hf_r2.quant import quantize_
from hf_r2.quant.layers import quantized_layers
from hf_r2.quant.ptq import PTQConfig, post_training_quantize_
from hf_r2.quant.ptq.block_reconstruction import BlockReconstructionConfig, reconstruct_block, reconstruct_blocks_


class _TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)

    def forward(self, x):
        return self.conv2(F.relu(self.conv1(x)))


def _setup(a_bits=4, w_bits=2, n=32, seed=0):
    """A one-block model, quantized to nearest, its float copy, and the block's cached inputs / float outputs."""
    torch.manual_seed(seed)
    model = nn.Sequential(_TwoLayer()).eval()
    float_block = copy.deepcopy(model[0])
    images = torch.randn(n, 3, 8, 8)
    post_training_quantize_(model, PTQConfig(w_bits=w_bits, a_bits=a_bits, first_last_bits=None, bn="keep"),
                            [images[: n // 2], images[n // 2 :]])
    with torch.no_grad():
        targets = float_block(images)
    return model, float_block, images, targets


def _mse(block, images, targets):
    with torch.no_grad():
        return (block(images).double() - targets.double()).square().sum(1).mean().item()


def _codes(layer):
    q, w = layer.weight_quantizer, layer.weight.detach().double()
    view = (-1,) + (1,) * (w.dim() - 1)
    return w / q.scale.detach().abs().double().reshape(view) + q.zero_point.double().reshape(view)


def _assert_on_grid(model):
    for _, layer in quantized_layers(model):
        codes = _codes(layer)
        torch.testing.assert_close(codes, codes.round(), atol=1e-4, rtol=0)
        assert codes.min() >= -1e-4 and codes.max() <= 2 ** layer.weight_quantizer.bits - 1 + 1e-4
        torch.testing.assert_close(layer.weight_quantizer(layer.weight), layer.weight)  # idempotent


@pytest.mark.parametrize("a_bits", [None, 4])
def test_two_layer_block_loss_decreases_beats_nearest_and_binarises(a_bits):
    model, _, images, targets = _setup(a_bits=a_bits)
    nearest = copy.deepcopy(model)
    config = BlockReconstructionConfig(iters=400, batch_size=8, lr=2e-2, a_bits=a_bits)
    stats = reconstruct_block(model[0], images, targets, config, torch.Generator().manual_seed(0))
    # the hard rounding starts at round-to-nearest (h(V) = x - floor(x)); its error goes down from there
    learnt_error, nearest_error = _mse(model[0], images, targets), _mse(nearest[0], images, targets)
    assert learnt_error <= nearest_error
    assert learnt_error == pytest.approx(stats["error"], rel=1e-6)
    assert nearest_error == pytest.approx(stats["nearest_error"], rel=1e-6)
    assert stats["kept"] == "learnt" and learnt_error < 0.95 * nearest_error  # it actually learnt something
    assert stats["soft"] < 0.01  # h(V) ends at 0 or 1
    _assert_on_grid(model)
    # every weight is its nearest level or the one next to it
    for (_, layer), (_, near) in zip(quantized_layers(model), quantized_layers(nearest)):
        assert (_codes(layer) - _codes(near)).abs().max() <= 1 + 1e-4
    if a_bits is not None:  # the activation step of the second layer was learnt
        assert model[0].conv2.input_quantizer.scale.item() != nearest[0].conv2.input_quantizer.scale.item()
        assert not model[0].conv2.input_quantizer.scale.requires_grad
    assert all(p.requires_grad for p in (model[0].conv1.weight, model[0].conv2.bias))  # flags restored


def _reference_brecq(block, images, targets, config, generator):
    """BRECQ on `_TwoLayer` written out with F.conv2d, weight-only: the codes it ends with."""
    params = []
    for layer in (block.conv1, block.conv2):
        q = layer.weight_quantizer
        s, z = q.scale.detach().abs().reshape(-1, 1, 1, 1), q.zero_point.reshape(-1, 1, 1, 1)
        x = layer.weight.detach() / s + z
        fl = torch.floor(x)
        frac = x - fl
        v = (-torch.log(1.2 / (frac + 0.1) - 1)).requires_grad_(True)  # h(v) = frac
        params.append((s, z, fl, v, layer.bias.detach(), 2**q.bits - 1))
    opt = torch.optim.Adam([p[3] for p in params], lr=config.lr)

    def h(v):
        return torch.clamp(torch.sigmoid(v) * 1.2 - 0.1, 0, 1)

    start = int(config.warmup * config.iters)
    for step in range(config.iters):
        idx = torch.randint(images.shape[0], (config.batch_size,), generator=generator)
        w = [s * (torch.clamp(fl + h(v), 0, n) - z) for s, z, fl, v, _, n in params]
        out = F.conv2d(F.relu(F.conv2d(images[idx], w[0], params[0][4], padding=1)), w[1], params[1][4], padding=1)
        loss = (out - targets[idx]).square().sum(1).mean()
        if step >= start:
            rel = min((step - start) / max(1, config.iters - 1 - start), 1.0)
            beta = config.beta_end + 0.5 * (config.beta_start - config.beta_end) * (1 + math.cos(math.pi * rel))
            loss = loss + config.reg_weight * sum((1 - (2 * h(p[3]) - 1).abs().pow(beta)).sum() for p in params)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return [torch.clamp(fl + (h(v.detach()) >= 0.5).float(), 0, n) for _, _, fl, v, _, n in params]


def test_drop_prob_zero_is_plain_brecq():
    model, _, images, targets = _setup(a_bits=None)
    reference_model = copy.deepcopy(model)
    config = BlockReconstructionConfig(iters=150, batch_size=8, a_bits=None, drop_prob=0.0)
    reconstruct_block(model[0], images, targets, config, torch.Generator().manual_seed(3))
    expected = _reference_brecq(reference_model[0], images, targets, config, torch.Generator().manual_seed(3))
    for layer, codes in zip((model[0].conv1, model[0].conv2), expected):
        torch.testing.assert_close(_codes(layer), codes.double(), atol=1e-4, rtol=0)


def _run(model, data, **overrides):
    config = BlockReconstructionConfig(**{"iters": 30, "batch_size": 4, "calibration_batches": 2, **overrides})
    return quantize_(model, config, data)


def test_same_seed_same_result_and_dropping_changes_it():
    float_model = make_timm("test_resnet").eval()
    data = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    runs = {key: _run(copy.deepcopy(float_model), data, a_bits=4, drop_prob=p).state_dict()
            for key, p in (("a", 0.0), ("b", 0.0), ("drop", 0.5))}
    assert all(torch.equal(runs["a"][k], runs["b"][k]) for k in runs["a"])
    assert any(not torch.equal(runs["a"][k], runs["drop"][k]) for k in runs["a"])


def test_timm_end_to_end_on_grid_and_through_quantize_():
    float_model = make_timm("test_resnet").eval()
    data = [{"pixel_values": torch.randn(4, 3, 32, 32)} for _ in range(2)]
    model = _run(copy.deepcopy(float_model), data, a_bits=4, drop_prob=0.5)
    _assert_on_grid(model)
    assert len(quantized_layers(model)) == sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in float_model.modules())
    direct = reconstruct_blocks_(copy.deepcopy(float_model), BlockReconstructionConfig(
        iters=30, batch_size=4, calibration_batches=2, a_bits=4, drop_prob=0.5), data)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), direct(x))
        assert torch.isfinite(model(x)).all()


def test_transformers_end_to_end(hf_resnet):
    model = _run(hf_resnet.eval(), [torch.randn(4, 3, 32, 32) for _ in range(2)], w_bits=3, a_bits=None)
    _assert_on_grid(model)


def test_config_validation_and_errors():
    for kwargs, match in [
        ({"drop_prob": 1.0}, "`drop_prob` must be in"),
        ({"drop_prob": -0.1}, "`drop_prob` must be in"),
        ({"lr": 0}, "`lr` and `act_lr` must be positive"),
        ({"beta_start": 1.0, "beta_end": 2.0}, "beta_start >= beta_end"),
        ({"warmup": 1.0}, "`warmup` is a fraction"),
        ({"iters": 0}, "iters"),
        ({"weight_range": "max"}, "weight_range"),
        ({"reg_weight": -1.0}, "`reg_weight` must be >= 0"),
    ]:
        with pytest.raises(ValueError, match=match):
            BlockReconstructionConfig(**kwargs)
    with pytest.raises(ValueError, match="needs `calibration_data`"):
        quantize_(make_timm("test_resnet"), BlockReconstructionConfig())
    with pytest.raises(TypeError, match="BlockReconstructionConfig"):
        reconstruct_blocks_(make_timm("test_resnet"), PTQConfig(), [torch.randn(2, 3, 32, 32)])
    model, _, images, targets = _setup()
    with pytest.raises(ValueError, match="NaN / inf"):
        reconstruct_block(model[0], images, targets * float("nan"), BlockReconstructionConfig(iters=2))
    with pytest.raises(ValueError, match="no layer with a `weight_quantizer`"):
        reconstruct_block(_TwoLayer(), images, targets, BlockReconstructionConfig(iters=2))
