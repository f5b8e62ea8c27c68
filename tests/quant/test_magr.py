"""`hf_r2.quant.ptq.magr`: the L1-ball projection against a bisection reference, the L-inf prox against its clipping
form and Moreau's identity (float64), the Gram matrices against `unfold`, and `magr_`: smaller per-channel maxima
within the proven bound on the output change, grouped / depthwise convs per group, layers it must leave alone, and a
lower W2A8 per-channel PTQ error on a net with heavy-tailed weights."""

import copy
import logging

import pytest
import torch
from torch import nn

from hf_r2.quant import MagRConfig, PTQConfig, magr_, post_training_quantize_
from hf_r2.quant.ptq.magr import layer_grams, project_l1_ball, prox_linf


def _bisect(f, lo: float, hi: float, steps: int = 200) -> float:
    """The root of the decreasing `f` in `[lo, hi]`."""
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) > 0 else (lo, mid)
    return (lo + hi) / 2


def _project_reference(v: torch.Tensor, radius: float) -> torch.Tensor:
    """Projection onto the L1 ball, one row at a time: `sign(v) max(|v| - theta, 0)` with `theta` found by bisection
    on `sum max(|v| - theta, 0) = radius` (no sort)."""
    out = v.clone()
    for i, row in enumerate(v):
        if row.abs().sum() <= radius:
            continue
        theta = _bisect(lambda th: float((row.abs() - th).clamp_min(0).sum()) - radius, 0.0, float(row.abs().max()))
        out[i] = row.sign() * (row.abs() - theta).clamp_min(0)
    return out


def _prox_reference(v: torch.Tensor, t: float) -> torch.Tensor:
    """`prox_{t ||.||_inf}(v)` as clipping at `+-tau`, `sum max(|v| - tau, 0) = t` by bisection (0 if
    `||v||_1 <= t`)."""
    out = torch.zeros_like(v)
    for i, row in enumerate(v):
        if row.abs().sum() > t:
            tau = _bisect(lambda ta: float((row.abs() - ta).clamp_min(0).sum()) - t, 0.0, float(row.abs().max()))
            out[i] = row.clamp(-tau, tau)
    return out


def _rows() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    v = torch.randn(12, 9, generator=g, dtype=torch.float64) * torch.logspace(-2, 1, 12, dtype=torch.float64)[:, None]
    v[0] = 0  # the zero row
    v[1] = torch.tensor([3.0, -3.0, 3.0, 0.5, 0, 0, 0, 0, -1.0], dtype=torch.float64)  # ties
    v[2] = 0.05 / 9  # on the sphere of radius 0.05
    return v


@pytest.mark.parametrize("radius", [0.05, 1.0, 4.0])
def test_project_l1_ball_against_bisection(radius):
    v = _rows()
    p = project_l1_ball(v, radius)
    torch.testing.assert_close(p, _project_reference(v, radius), rtol=0, atol=1e-12)
    outside = v.abs().sum(-1) > radius
    torch.testing.assert_close(p[outside].abs().sum(-1), torch.full((int(outside.sum()),), radius,
                                                                    dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(p[~outside], v[~outside], rtol=0, atol=0)
    # one radius per row broadcasts like the scalar
    radii = torch.linspace(0.1, 3, v.shape[0], dtype=torch.float64)[:, None]
    torch.testing.assert_close(project_l1_ball(v, radii),
                               torch.stack([project_l1_ball(v[i : i + 1], float(r))[0] for i, r in enumerate(radii)]))


@pytest.mark.parametrize("t", [1e-3, 0.3, 2.0, 50.0])
def test_prox_linf_against_clipping_and_moreau(t):
    v = _rows()
    p = prox_linf(v, t)
    reference = _prox_reference(v, t)
    torch.testing.assert_close(p, reference, rtol=0, atol=1e-12)
    # Moreau: v = prox_{t f}(v) + t prox_{f* / t}(v / t), f* the indicator of the L1 unit ball
    torch.testing.assert_close(reference + t * _project_reference(v / t, 1.0), v, rtol=0, atol=1e-12)

    def objective(u):
        return 0.5 * ((u - v) ** 2).sum(-1) + t * u.abs().amax(-1)

    g = torch.Generator().manual_seed(1)
    for _ in range(20):  # no nearby point does better
        assert (objective(p) <= objective(p + 1e-3 * torch.randn(v.shape, generator=g, dtype=v.dtype)) + 1e-15).all()
    torch.testing.assert_close(prox_linf(v, torch.zeros(v.shape[0], 1, dtype=v.dtype)), v)  # t = 0: unchanged


def test_layer_grams_match_unfold():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2).double()
    x = torch.randn(3, 4, 9, 9, dtype=torch.float64)
    grams = layer_grams(nn.Sequential(conv), {"0": conv}, [x])
    cols = nn.functional.unfold(x, 3, padding=1, stride=2)  # (N, C * 9, L), channel-major
    cols = cols.reshape(3, 2, 18, -1).permute(1, 0, 3, 2).reshape(2, -1, 18)  # (groups, rows, 2 * 9)
    torch.testing.assert_close(grams["0"], cols.transpose(1, 2) @ cols)
    linear = nn.Linear(5, 2).double()
    tokens = torch.randn(2, 7, 5, dtype=torch.float64)
    grams = layer_grams(nn.Sequential(linear), {"0": linear}, [tokens])
    flat = tokens.reshape(-1, 5)
    torch.testing.assert_close(grams["0"], (flat.T @ flat)[None])


def _heavy_tailed_(layer: nn.Module, seed: int = 0) -> nn.Module:
    """Student-t weights with 3 degrees of freedom (a few large entries per row, as trained weights have)."""
    g = torch.Generator().manual_seed(seed)
    shape = layer.weight.shape
    t = torch.randn(shape, generator=g) / ((torch.randn(3, *shape, generator=g) ** 2).sum(0) / 3).sqrt()
    with torch.no_grad():
        layer.weight.copy_(0.1 * t)
    return layer


def test_magr_logs_the_reduction_it_made(caplog):
    """The logged drop of the mean per-channel max |w| is the one measured on the weights (float32 weights, whose
    grouped view is overwritten in place, once made it log 0.0 % whatever MagR did)."""
    torch.manual_seed(0)
    layer = _heavy_tailed_(nn.Linear(32, 16))
    data = [torch.randn(64, 32) for _ in range(4)]
    w0 = layer.weight.detach().clone()
    with caplog.at_level(logging.INFO, logger="hf_r2.quant.ptq.magr"):
        magr_(nn.Sequential(layer), MagRConfig(alpha=0.02, iterations=100), data)
    drop = 100 * (1 - float(layer.weight.detach().abs().amax(1).sum() / w0.abs().amax(1).sum()))
    assert drop > 1
    assert f"went down by {drop:.1f}%" in caplog.text


def test_magr_linear_reduces_maxima_within_the_bound():
    """With `H' = X^T X + damping mean(diag) I`, descent from `w0` proves
    `||X (W* - W0)||_F^2 <= 2 lambda_max(H') alpha sum_r max|w0_r|^2`; checked on the calibration rows."""
    torch.manual_seed(0)
    layer = _heavy_tailed_(nn.Linear(32, 16)).double()
    mix = torch.randn(32, 32, dtype=torch.float64) * torch.logspace(0, -3, 32, dtype=torch.float64)  # correlated
    data = [torch.randn(64, 32, dtype=torch.float64) @ mix for _ in range(4)]
    w0 = layer.weight.detach().clone()
    config = MagRConfig(alpha=0.02, damping=0.01, iterations=300)
    magr_(nn.Sequential(layer), config, data)
    w = layer.weight.detach()
    assert (w.abs().amax(1) < w0.abs().amax(1)).all()
    assert float(w.abs().amax(1).mean() / w0.abs().amax(1).mean()) < 0.8
    x = torch.cat(data)
    h = x.T @ x
    h = h + config.damping * h.diagonal().mean() * torch.eye(32, dtype=h.dtype)
    bound = 2 * torch.linalg.eigvalsh(h).max() * config.alpha * (w0.abs().amax(1) ** 2).sum()
    error = ((x @ (w - w0).T) ** 2).sum()
    assert error <= bound
    # relative to the output: sqrt(bound) / ||X W0||_F = 0.56 here; the solver stays well inside (0.17)
    assert float(error.sqrt() / (x @ w0.T).norm()) <= float(bound.sqrt() / (x @ w0.T).norm()) < 0.6


def test_magr_conv_per_group_and_depthwise():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                          nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2)).double()
    for layer in (model[0], model[2], model[4]):
        _heavy_tailed_(layer)
    data = [torch.randn(4, 3, 12, 12, dtype=torch.float64) for _ in range(2)]
    grams = layer_grams(model, {"2": model[2], "4": model[4]}, data)
    assert grams["2"].shape == (8, 9, 9) and grams["4"].shape == (2, 36, 36)
    before = copy.deepcopy(model)
    magr_(model, MagRConfig(alpha=0.05), data)
    for i in (0, 2, 4):
        new, old = model[i].weight.flatten(1).abs().amax(1), before[i].weight.flatten(1).abs().amax(1)
        assert (new <= old + 1e-12).all() and new.sum() < old.sum()
    # the depthwise layer, filter by filter (group g: its 9 weights, H_g its 9 x 9 Gram matrix), within the bound of
    # the module docstring: sum_g (w_g - w0_g)^T H_g (w_g - w0_g) <= 2 alpha sum_g lambda_max(H'_g) max|w0_g|^2
    h, w0, w = grams["2"], before[2].weight.detach().reshape(8, 9), model[2].weight.detach().reshape(8, 9)
    damped = h + 0.01 * h.diagonal(dim1=1, dim2=2).mean(1)[:, None, None] * torch.eye(9, dtype=h.dtype)
    delta = w - w0
    error = torch.einsum("gk,gkl,gl->", delta, h, delta)
    bound = 2 * 0.05 * (torch.linalg.eigvalsh(damped).amax(1) * w0.abs().amax(1) ** 2).sum()
    assert error <= bound
    assert float((error / torch.einsum("gk,gkl,gl->", w0, h, w0)).sqrt()) < 0.25


def test_magr_leaves_alone_what_it_cannot_handle(caplog):
    from timm.layers import StdConv2d

    model = nn.Sequential(StdConv2d(3, 4, 3), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 2, 1))
    post_training_quantize_(model, PTQConfig(w_bits=4, a_bits=None, bn="keep", include=["^2$"]))
    before = [m.weight.detach().clone() for m in model]
    with caplog.at_level(logging.INFO, logger="hf_r2.quant.ptq.magr"):
        magr_(model, calibration_data=[torch.randn(2, 3, 8, 8)], exclude=["^1$"])
    assert "skips 0: its output is not the convolution" in caplog.text
    assert "skips 2: it is already quantized" in caplog.text
    for layer, weight in zip(model, before):
        assert torch.equal(layer.weight, weight)
    with pytest.raises(ValueError, match="MagR needs `calibration_data`"):
        magr_(model)


def test_w2a8_per_channel_error_drops():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(32, 10)).eval()
    for i in (0, 2, 4, 8):
        _heavy_tailed_(model[i], seed=i)
    data = [torch.randn(8, 3, 16, 16) for _ in range(2)]

    def ptq_error(m):
        m = copy.deepcopy(m)
        post_training_quantize_(m, PTQConfig(w_bits=2, a_bits=8, first_last_bits=None, bn="keep"), data)
        with torch.no_grad():
            ref, out = torch.cat([model(x) for x in data]), torch.cat([m(x) for x in data])
        return float((out - ref).norm() / ref.norm())

    reduced = magr_(copy.deepcopy(model), calibration_data=data)
    for i in (2, 4):
        assert reduced[i].weight.abs().amax((1, 2, 3)).mean() < 0.9 * model[i].weight.abs().amax((1, 2, 3)).mean()
    before, after = ptq_error(model), ptq_error(reduced)
    assert after < before, (before, after)


def test_config_round_trip_and_errors(tmp_path):
    config = MagRConfig(alpha=0.1, damping=0.0, iterations=7, calibration_batches=2, include=["conv"], exclude=["fc"])
    config.save_pretrained(tmp_path)
    assert MagRConfig.from_pretrained(tmp_path).to_dict() == config.to_dict()
    for kwargs, match in ((dict(alpha=-1), "`alpha`"), (dict(damping=float("nan")), "`damping`"),
                          (dict(iterations=0), "`iterations`"), (dict(exclude=["["]), "invalid regular")):
        with pytest.raises(ValueError, match=match):
            MagRConfig(**kwargs)
