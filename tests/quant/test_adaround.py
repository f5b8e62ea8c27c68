"""AdaRound: rows of a layer against the convolution itself, the rounding function, the grid and floor/ceil
invariants, reconstruction error against round-to-nearest (computed independently with F.conv2d / F.linear), the
regulariser's binarisation, and end-to-end runs on timm and transformers models.

The quantized layers are small stand-ins for `hf_r2.quant.layers` (a Conv2d / Linear subclass with a
`weight_quantizer` holding `scale`, `zero_point`, `bits`), so AdaRound is tested against that duck-typed contract.
"""

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import make_timm
from timm.layers import Conv2dSame, StdConv2d
from torch import nn

from hf_r2.models import forward_logits
from hf_r2.quant.ptq._layer_rows import RowCache, apply_weight, cache_rows, grouped_weight, row_source
from hf_r2.quant.ptq.adaround import (
    AdaRoundConfig,
    _optimize_rounding,
    adaround,
    adaround_,
    annealed_beta,
    inverse_rectified_sigmoid,
    rectified_sigmoid,
)
from hf_r2.quant.uniform import compute_qparams, fake_quantize_affine

# --------------------------------------------------------------------------------------------------------------
# stand-in quantized layers
# --------------------------------------------------------------------------------------------------------------


class _Quantizer(nn.Module):
    """Fixed-grid fake quantizer with the attributes AdaRound reads."""

    def __init__(self, w, bits, symmetric=True, per_channel=True):
        super().__init__()
        self.bits, self.quant_min, self.quant_max, self.enabled = bits, 0, 2**bits - 1, True
        scale, zero_point = compute_qparams(w, bits, symmetric=symmetric, per_channel=per_channel)
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point)

    def forward(self, w):
        return fake_quantize_affine(w, self.scale, self.zero_point, self.bits)


class _QConv2d(nn.Conv2d):
    def forward(self, x):
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        w = self.weight if self.weight_quantizer is None else self.weight_quantizer(self.weight)
        return self._conv_forward(x, w, self.bias)


class _QLinear(nn.Linear):
    def forward(self, x):
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        w = self.weight if self.weight_quantizer is None else self.weight_quantizer(self.weight)
        return F.linear(x, w, self.bias)


def _quantize(model, bits, **kw):
    """Turn every plain Conv2d / Linear of `model` into a stand-in quantized layer (round to nearest), in place."""
    for m in model.modules():
        if type(m) is nn.Conv2d:
            m.__class__ = _QConv2d
        elif type(m) is nn.Linear:
            m.__class__ = _QLinear
        else:
            continue
        m.input_quantizer = None
        m.weight_quantizer = _Quantizer(m.weight.detach(), bits, **kw)
    return model


def _quantized_layers(model):
    return [(n, m) for n, m in model.named_modules() if getattr(m, "weight_quantizer", None) is not None]


def _quantize_real(model, bits, scale_method="mse"):
    """Quantize every Conv/Linear with the library's own layers (`hf_r2.quant.layers`), as PTQ does."""
    from hf_r2.quant.layers import FakeQuantizer, quantize_layer_

    for m in list(model.modules()):
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            q = FakeQuantizer(bits, symmetric=True, per_channel=True, channels=m.weight.shape[0])
            quantize_layer_(m, q.init_from(m.weight, scale_method), None)
    return model


def _grid(q, w):
    """`(|scale|, zero_point)` of a quantizer, shaped to broadcast against `w` (the library stores them flat)."""
    s, z = q.scale.detach().abs(), q.zero_point.detach()
    if s.dim() != w.dim():
        shape = [-1] + [1] * (w.dim() - 1) if s.numel() > 1 else [1] * w.dim()
        s, z = s.reshape(shape), z.reshape(shape)
    return s, z


def _rtn(layer, w0):
    s, z = _grid(layer.weight_quantizer, w0)
    return fake_quantize_affine(w0, s, z, layer.weight_quantizer.bits)


def _assert_on_grid_floor_or_ceil(layer, w0):
    """The weight is a grid value (idempotent under the layer's quantizer) whose code is floor or ceil of
    `w0 / s + z` (clamped to the grid)."""
    q = layer.weight_quantizer
    w = layer.weight.detach()
    s, z = _grid(q, w)
    assert torch.equal(fake_quantize_affine(w, s, z, q.bits), w)
    assert torch.equal(q(w), w)  # the layer's own quantizer returns it unchanged
    codes = w / s + z
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    codes = codes.round()
    x0 = w0 / s + z
    lo, hi = x0.floor().clamp(0, q.quant_max), x0.ceil().clamp(0, q.quant_max)
    assert bool(((codes == lo) | (codes == hi)).all())
    assert codes.min() >= 0 and codes.max() <= q.quant_max


# --------------------------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=2, padding_mode="reflect", bias=False), (2, 4, 11)),
        (lambda: nn.Conv2d(4, 6, 3, padding="same", dilation=2, groups=2, bias=False), (2, 4, 7, 6)),
        (lambda: nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=6, bias=False), (2, 6, 9, 8)),  # depthwise
        (
            lambda: nn.Conv2d(3, 5, (2, 3), stride=(1, 2), padding=(0, 1), padding_mode="circular", bias=False),
            (1, 3, 5, 7),
        ),
        (lambda: nn.Conv3d(2, 4, 3, stride=(1, 2, 2), padding=1, bias=False), (2, 2, 4, 5, 5)),
        (lambda: nn.Linear(5, 3, bias=False), (2, 7, 5)),
        (lambda: Conv2dSame(3, 4, 3, stride=2, bias=False), (2, 3, 8, 7)),  # timm: TF "SAME" padding in forward
    ],
)
def test_rows_reproduce_the_layer(make, shape):
    layer = make().double()
    x = torch.randn(shape, dtype=torch.float64)
    out = layer(x)
    expected = (
        out.reshape(-1, out.shape[-1])
        if isinstance(layer, nn.Linear)
        else out.movedim(1, -1).reshape(-1, out.shape[1])
    )
    num_rows, gather = row_source(layer, x)
    assert num_rows == expected.shape[0]
    rows = gather(torch.arange(num_rows))
    got = apply_weight(rows, grouped_weight(layer, layer.weight)).reshape(num_rows, -1)
    torch.testing.assert_close(got, expected)
    # a subset of rows, in any order
    idx = torch.randperm(num_rows)[: num_rows // 2]
    torch.testing.assert_close(
        apply_weight(gather(idx), grouped_weight(layer, layer.weight)).reshape(len(idx), -1), expected[idx]
    )


def test_rectified_sigmoid_and_its_inverse():
    frac = torch.rand(1000, dtype=torch.float64)
    torch.testing.assert_close(rectified_sigmoid(inverse_rectified_sigmoid(frac)), frac)
    v = torch.linspace(-20, 20, 101, dtype=torch.float64)
    h = rectified_sigmoid(v)
    torch.testing.assert_close(h, (torch.sigmoid(v) * 1.2 - 0.1).clamp(0, 1))
    assert h[0] == 0 and h[-1] == 1  # exactly 0 / 1 in the tails: what lets the regulariser binarise


def test_beta_schedule():
    cfg = AdaRoundConfig(iters=100, warmup=0.2, beta_start=20, beta_end=2)
    assert all(annealed_beta(cfg, s) is None for s in range(20))
    betas = [annealed_beta(cfg, s) for s in range(20, 100)]
    assert betas[0] == pytest.approx(20) and betas[-1] == pytest.approx(2)
    assert all(a >= b for a, b in zip(betas, betas[1:]))
    assert betas[len(betas) // 2] == pytest.approx(11, abs=0.5)  # cosine: halfway at the midpoint


def test_row_cache_is_a_uniform_sample():
    cache = RowCache(100)
    g = torch.Generator().manual_seed(0)
    for b in range(10):
        idx = cache.candidates(100, g)
        cache.add(torch.full((len(idx), 1, 1), float(b)), torch.full((len(idx), 1, 1), float(b)))
    assert cache.inputs.shape[0] == 100
    assert torch.equal(cache.inputs, cache.targets)  # inputs and targets stay paired
    counts = torch.bincount(cache.inputs.flatten().long(), minlength=10)
    assert counts.min() >= 2 and counts.max() <= 25  # ~10 each (hypergeometric sd ~3), early and late batches alike


# --------------------------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------------------------


def test_config_roundtrip_and_validation(tmp_path):
    cfg = AdaRoundConfig(iters=10, reg_weight=0.1, num_batches=3)
    cfg.save_pretrained(tmp_path)
    assert (tmp_path / "adaround_config.json").is_file()
    assert AdaRoundConfig.from_pretrained(tmp_path) == cfg
    bad = [
        ({"iters": 0}, "`iters`"),
        ({"batch_size": 1.5}, "`batch_size`"),
        ({"num_samples": True}, "`num_samples`"),
        ({"num_batches": 0}, "`num_batches`"),
        ({"lr": 0.0}, "`lr`"),
        ({"reg_weight": -1.0}, "`reg_weight`"),
        ({"beta_start": 2.0, "beta_end": 20.0}, "beta_start"),
        ({"beta_end": 0.0}, "beta_end"),
        ({"warmup": 1.0}, "`warmup`"),
        ({"lr": float("nan")}, "`lr`"),
        ({"seed": "0"}, "`seed`"),
    ]
    for kwargs, match in bad:
        with pytest.raises(ValueError, match=match):
            AdaRoundConfig(**kwargs)


# --------------------------------------------------------------------------------------------------------------
# one layer
# --------------------------------------------------------------------------------------------------------------


def _errors(layer, w0, inputs):
    """Summed squared output error of the layer's current weight and of round-to-nearest, against `w0`, on all
    `inputs` (computed with the layer's own functional op, not with AdaRound's rows)."""
    rtn = _rtn(layer, w0)
    op = (
        (lambda x, w: F.linear(x, w))
        if isinstance(layer, nn.Linear)
        else (lambda x, w: layer._conv_forward(x, w, None))
    )
    err = lambda w: sum((op(x, w) - op(x, w0)).double().square().sum().item() for x in inputs)  # noqa: E731
    return err(layer.weight.detach()), err(rtn)


@pytest.mark.parametrize(
    "make, shape, bits, ratio",
    [
        (lambda: nn.Conv2d(8, 16, 3, padding=1), (4, 8, 8, 8), 3, 0.9),
        (lambda: nn.Conv2d(8, 8, 3, padding=1, groups=8), (4, 8, 8, 8), 2, 0.95),  # depthwise: 9 weights a row
        (lambda: nn.Linear(32, 16), (4, 6, 32), 2, 0.9),
        # binary: codes 0 / 1 with scale 2 mean|w|, so a flip is a sign change (a coarse move: smaller gain)
        (lambda: nn.Linear(24, 8), (16, 24), 1, 1.0),
    ],
)
def test_single_layer_beats_round_to_nearest(make, shape, bits, ratio):
    layer = make()
    model = _quantize(nn.Sequential(layer), bits)
    w0 = layer.weight.detach().clone()
    # post-ReLU-like inputs (non-zero mean, correlated): on white inputs round-to-nearest is already optimal
    data = [torch.randn(shape).relu() + 0.1 * torch.randn(shape) for _ in range(3)]
    cfg = AdaRoundConfig(iters=300, num_samples=4096, batch_size=128)
    assert adaround_(model, data, cfg) is model
    _assert_on_grid_floor_or_ceil(layer, w0)
    err_ada, err_rtn = _errors(layer, w0, data)
    assert err_ada < ratio * err_rtn, (err_ada, err_rtn)
    # the weight quantizer returns the rounded weight unchanged, so the model computes with it
    with torch.no_grad():
        x = data[0]
        ref = F.linear(x, layer.weight, layer.bias) if isinstance(layer, nn.Linear) else nn.Conv2d.forward(layer, x)
        torch.testing.assert_close(model(x), ref, rtol=0, atol=0)


def test_regulariser_drives_h_to_binary():
    layer = _quantize(nn.Sequential(nn.Linear(16, 8)), 2)[0]
    x = torch.randn(256, 16).relu().unsqueeze(1)
    t = apply_weight(x, grouped_weight(layer, layer.weight.detach()))
    binary = {}
    for reg_weight in (0.0, 1.0):
        cfg = AdaRoundConfig(iters=100, reg_weight=reg_weight, lr=0.1, warmup=0.0, batch_size=64)
        codes, h = _optimize_rounding(layer, x, t, cfg, torch.Generator().manual_seed(0))
        binary[reg_weight] = ((h == 0) | (h == 1)).double().mean().item()
    assert binary[1.0] == 1.0  # every h exactly 0 or 1
    assert binary[0.0] < 0.9  # and that is the regulariser's doing


def test_cached_rows_use_quantized_inputs_and_float_targets():
    """Layer 2's cached inputs go through the rounded layer 1 and layer 2's input quantizer; its targets are the
    float model's `W2 x_f` (asymmetric reconstruction)."""
    model = _quantize(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)), 2)
    data = [torch.randn(5, 6) for _ in range(2)]
    with torch.no_grad():
        acts = torch.cat([model[1](model[0](x)) for x in data])
    model[2].input_quantizer = _Quantizer(acts, 2, symmetric=False, per_channel=False)
    float_model = copy.deepcopy(model)
    for m in float_model:
        if hasattr(m, "weight_quantizer"):
            m.weight_quantizer = m.input_quantizer = None
    adaround_(model, data, AdaRoundConfig(iters=20), layers=["0"])
    cfg = AdaRoundConfig(num_samples=1000)
    cache = cache_rows(model, float_model, "2", data, cfg.num_samples, torch.Generator().manual_seed(0))
    with torch.no_grad():
        xq = torch.cat([model[2].input_quantizer(model[1](model[0](x))) for x in data])  # model[0] is rounded
        xf = torch.cat([float_model[1](float_model[0](x)) for x in data])
        tf = F.linear(xf, float_model[2].weight)
    assert cache.inputs.shape[0] == 10
    # match every cached row to a data row by its (continuous, so distinct) target: the cache shuffles them
    match = torch.cdist(cache.targets[:, 0], tf).argmin(1)
    assert sorted(match.tolist()) == list(range(10))
    torch.testing.assert_close(cache.inputs[:, 0], xq[match])
    torch.testing.assert_close(cache.targets[:, 0], tf[match])
    assert not torch.allclose(xq, xf, atol=1e-3)  # the inputs really are the quantized ones


# --------------------------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------------------------


def _capture_inputs(model, name, data):
    out = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda m, a: out.append(a[0].detach()))
    with torch.no_grad():
        for x in data:
            forward_logits(model, x)
    handle.remove()
    return out


def test_timm_layer_beats_round_to_nearest():
    float_model = make_timm("test_resnet").eval()
    model = _quantize(copy.deepcopy(float_model), 3)
    data = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    name = "layer1.0.conv2"
    layer = model.get_submodule(name)
    w0 = layer.weight.detach().clone()
    x_q, x_f = _capture_inputs(model, name, data), _capture_inputs(float_model, name, data)
    adaround_(model, data, AdaRoundConfig(iters=300, num_samples=4096, batch_size=128), layers=[name])
    _assert_on_grid_floor_or_ceil(layer, w0)
    # || W x_q - W0 x_f ||^2 summed over all calibration positions, by F.conv2d
    target = [F.conv2d(x, w0, None, layer.stride, layer.padding) for x in x_f]

    def err(w):
        return sum(
            (F.conv2d(x, w, None, layer.stride, layer.padding) - t).square().sum().item() for x, t in zip(x_q, target)
        )

    assert err(layer.weight.detach()) < 0.9 * err(_rtn(layer, w0))
    # only the named layer changed
    other = model.get_submodule("layer1.0.conv1")
    assert torch.equal(other.weight, float_model.get_submodule("layer1.0.conv1").weight)


def _run_end_to_end(float_model, data, bits=3, quantize=_quantize):
    model = quantize(copy.deepcopy(float_model), bits)
    float_model.eval()
    originals = {n: m.weight.detach().clone() for n, m in _quantized_layers(model)}
    with torch.no_grad():
        ref = forward_logits(float_model, data[0])
        rtn = forward_logits(model, data[0])
    model.train()
    batches = [{"pixel_values": x, "labels": torch.zeros(len(x), dtype=torch.long)} for x in data]
    out = adaround(model, batches, iters=60, batch_size=64)
    assert all(m.training for m in model.modules()) and all(m.training for m in out.modules())
    for n, m in _quantized_layers(model):
        assert torch.equal(m.weight, originals[n])  # `adaround` works on a copy
    flipped = 0
    for n, m in _quantized_layers(out):
        _assert_on_grid_floor_or_ceil(m, originals[n])  # every layer was rounded
        flipped += (m.weight != _rtn(m, originals[n])).sum().item()
    assert flipped > 0
    out.eval()
    with torch.no_grad():
        ada = forward_logits(out, data[0])
    assert torch.isfinite(ada).all()
    return (rtn - ref).square().mean().item(), (ada - ref).square().mean().item()


def test_timm_end_to_end(caplog):
    with caplog.at_level(logging.INFO, logger="hf_r2.quant.ptq.adaround"):
        err_rtn, err_ada = _run_end_to_end(make_timm("test_resnet"), [torch.randn(4, 3, 32, 32) for _ in range(2)])
    assert err_ada < err_rtn
    messages = [r.getMessage() for r in caplog.records]
    order = [m.split()[1].rstrip(":") for m in messages if m.startswith("AdaRound ")]
    assert order.index("conv1.0") < order.index("layer1.0.conv1") < order.index("fc")  # forward order


def test_timm_end_to_end_with_library_layers():
    """`hf_r2.quant.layers` quantizers (flat per-channel scales, MSE clipping: some codes clamp) on a depthwise
    EfficientNet with squeeze-excite convs."""
    model = make_timm("test_efficientnet")
    err_rtn, err_ada = _run_end_to_end(model, [torch.randn(4, 3, 32, 32) for _ in range(2)], quantize=_quantize_real)
    assert err_ada < err_rtn


def test_transformers_end_to_end(hf_resnet):
    err_rtn, err_ada = _run_end_to_end(hf_resnet, [torch.randn(4, 3, 32, 32) for _ in range(2)])
    assert err_ada < err_rtn


def test_iterator_is_read_once_and_seed_is_deterministic():
    model = _quantize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)), 2)
    data = [torch.randn(2, 3, 6, 6) for _ in range(3)]
    a = adaround(model, data, iters=20)
    b = adaround(model, iter(data), iters=20)  # an iterator: read into a list once, then reused per layer
    c = adaround(model, data[:2], iters=20)
    d = adaround(model, data, iters=20, num_batches=2)
    for i in (0, 2):
        assert torch.equal(a[i].weight, b[i].weight)
        assert torch.equal(c[i].weight, d[i].weight)


def test_layer_with_a_custom_forward_is_skipped(caplog):
    """timm's StdConv2d standardises its weight in forward: its output is not `W x`, so AdaRound leaves it alone
    (its rounding would be fitted to the wrong target) and rounds the other layers."""
    model = _quantize_real(nn.Sequential(StdConv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)), 2)
    w0, w2 = model[0].weight.detach().clone(), model[2].weight.detach().clone()
    with caplog.at_level(logging.WARNING, logger="hf_r2.quant.ptq.adaround"):
        adaround_(model, [torch.randn(2, 3, 6, 6)], iters=10)
    assert "skips 0 (QuantStdConv2d)" in caplog.text
    assert torch.equal(model[0].weight, w0)
    _assert_on_grid_floor_or_ceil(model[2], w2)


def test_errors():
    model = _quantize(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), 2)
    data = [torch.randn(3, 4)]
    with pytest.raises(ValueError, match="no batch"):
        adaround_(model, [], iters=2)
    with pytest.raises(ValueError, match="not a submodule"):
        adaround_(model, data, iters=2, layers=["nope"])
    with pytest.raises(ValueError, match="without an enabled `weight_quantizer`"):
        adaround_(model, data, iters=2, layers=["1"])
    with pytest.raises(ValueError, match="Unknown `AdaRoundConfig`"):
        adaround_(model, data, iterations=2)
    with pytest.raises(TypeError, match="AdaRoundConfig"):
        adaround_(model, data, {"iters": 2})
    # a model without quantized layers is returned unchanged
    plain = nn.Sequential(nn.Linear(4, 2))
    w = plain[0].weight.detach().clone()
    assert adaround_(plain, data, iters=2) is plain and torch.equal(plain[0].weight, w)


def test_config_resolve_follows_the_verbs_convention():
    """`adaround_(model, data, config=None, **overrides)`: overrides build or replace fields; bad input is named."""
    base = AdaRoundConfig(iters=7)
    assert AdaRoundConfig.resolve(None, {"iters": 3}) == AdaRoundConfig(iters=3)
    assert AdaRoundConfig.resolve(base, {}) is base
    replaced = AdaRoundConfig.resolve(base, {"iters": 5})
    assert replaced == AdaRoundConfig(iters=5) and base.iters == 7
    with pytest.raises(ValueError, match=r"Unknown `AdaRoundConfig` field\(s\) \['iter'\]"):
        AdaRoundConfig.resolve(base, {"iter": 5})
    with pytest.raises(TypeError, match="`config` must be an `AdaRoundConfig` or `None`, got dict"):
        AdaRoundConfig.resolve({"iters": 5}, {})
