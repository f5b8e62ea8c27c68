"""`hf_r2.quant.uniform` against a brute-force float64 reference: enumerate each channel's grid levels, pick the
nearest level for every weight."""

import pytest
import torch

from hf_r2.quant import compute_qparams, dequantize_tensor, fake_quantize, fake_quantize_affine, quantize_tensor
from hf_r2.quant.uniform import _RoundSTE

CASES = [(b, sym) for b in (1, 2, 3, 4, 8) for sym in (True, False) if not (b == 1 and not sym)]
RATIOS = torch.linspace(1.0, 0.2, 100, dtype=torch.float64)


# ---- the reference, written out independently in float64 --------------------------------------------------------


def ref_levels(row: torch.Tensor, bits: int, symmetric: bool, ratio: float = 1.0) -> torch.Tensor:
    """All grid levels of one channel (the grids of the module docstring's table)."""
    row = row.double()
    n = 2**bits - 1
    if bits == 1:
        c = row.abs().mean()
        return torch.stack([-c, c])
    if symmetric:
        c = row.abs().max() * ratio
        return c * torch.arange(-n, n + 1, 2, dtype=torch.float64) / n  # c * (2k + 1) / n
    lo, hi = min(row.min().item(), 0.0) * ratio, max(row.max().item(), 0.0) * ratio
    s = (hi - lo) / n
    z = round(-lo / s) if s > 0 else 0
    return (torch.arange(0, n + 1, dtype=torch.float64) - z) * s


def ref_nearest(row: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    row = row.double()
    return levels[(row[:, None] - levels[None, :]).abs().argmin(1)]


def rows(w: torch.Tensor, per_channel: bool) -> torch.Tensor:
    return w.reshape(w.shape[0], -1) if per_channel else w.reshape(1, -1)


def weights(shape=(6, 4, 3, 3), seed=0, kind="normal") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    if kind == "laplace":
        w = torch.sign(w) * torch.empty(shape).exponential_(generator=g)
    if kind == "outliers":
        w = w.reshape(shape[0], -1)
        w[torch.arange(shape[0]), torch.randint(0, w.shape[1], (shape[0],), generator=g)] *= 8
        w = w.reshape(shape)
    # uneven channel ranges, one channel all positive
    w = w * torch.linspace(0.1, 2.0, shape[0]).reshape(-1, *[1] * (len(shape) - 1))
    w[1] = w[1].abs()
    return w


def assert_nearest_levels(out: torch.Tensor, w: torch.Tensor, levels: torch.Tensor, tol: float) -> None:
    """`out` holds levels of the grid, and each is a nearest level of its weight (robust to exact ties)."""
    out, w = out.double(), w.double()
    dist_to_grid = (out[:, None] - levels[None, :]).abs().min(1).values
    assert dist_to_grid.max() <= tol, f"a value is off the grid by {dist_to_grid.max()}"
    best = (w - ref_nearest(w, levels)).abs()
    assert ((w - out).abs() <= best + tol).all(), "a weight was not rounded to its nearest level"


# ---- round to nearest on the reference grid ------------------------------------------------------------------------


@pytest.mark.parametrize("bits,symmetric", CASES)
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_maxabs_matches_bruteforce(bits, symmetric, per_channel, dtype):
    w = weights().to(dtype)
    out = fake_quantize(w, bits, symmetric=symmetric, per_channel=per_channel)
    assert out.shape == w.shape and out.dtype == dtype
    for w_row, out_row in zip(rows(w, per_channel), rows(out, per_channel)):
        levels = ref_levels(w_row, bits, symmetric)
        tol = (1e-6 if dtype == torch.float32 else 1e-12) * levels.abs().max().item()
        assert_nearest_levels(out_row, w_row, levels, tol)


@pytest.mark.parametrize("bits,symmetric", [(2, True), (2, False), (3, True), (4, False)])
@pytest.mark.parametrize("per_channel", [True, False])
def test_mse_matches_bruteforce_search(bits, symmetric, per_channel):
    w = weights(kind="outliers").double()
    out = fake_quantize(w, bits, symmetric=symmetric, per_channel=per_channel, scale_method="mse")
    for w_row, out_row in zip(rows(w, per_channel), rows(out, per_channel)):
        errors = []
        for r in RATIOS.tolist():
            errors.append(((ref_nearest(w_row, ref_levels(w_row, bits, symmetric, r)) - w_row) ** 2).sum().item())
        ref_err = min(errors)
        err = ((out_row - w_row) ** 2).sum().item()
        assert err == pytest.approx(ref_err, rel=1e-9, abs=1e-12)
        # and the output is the nearest-level rounding on one of the candidate grids
        best_r = RATIOS[errors.index(ref_err)].item()
        levels = ref_levels(w_row, bits, symmetric, best_r)
        assert_nearest_levels(out_row, w_row, levels, 1e-9 * levels.abs().max().item())


def test_binary_is_sign_times_mean_abs():
    w = weights()
    out = fake_quantize(w, 1)
    a = w.abs().reshape(w.shape[0], -1).mean(1).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(out, torch.where(w >= 0, a, -a))
    # mse changes nothing for one bit: mean|w| is already the least-squares scale for fixed signs
    torch.testing.assert_close(fake_quantize(w, 1, scale_method="mse"), out)
    out_t = fake_quantize(w, 1, per_channel=False)
    torch.testing.assert_close(out_t, torch.where(w >= 0, w.abs().mean(), -w.abs().mean()))


def test_two_bit_symmetric_grid_is_four_levels_without_zero():
    w = torch.tensor([[-1.0, -0.5, -0.2, 0.0, 0.1, 0.6, 0.7, 1.0]])
    out = fake_quantize(w, 2)
    third = 1.0 / 3.0
    expected = torch.tensor([[-1.0, -third, -third, 0.0, third, third, 1.0, 1.0]])
    expected[0, 3] = out[0, 3]  # 0 lies midway between -1/3 and 1/3: either is nearest
    torch.testing.assert_close(out, expected)
    assert out[0, 3].abs().item() == pytest.approx(third)


# ---- invariants ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits,symmetric", CASES)
@pytest.mark.parametrize("scale_method", ["maxabs", "mse"])
@pytest.mark.parametrize("per_channel", [True, False])
def test_levels_count_and_idempotence(bits, symmetric, scale_method, per_channel):
    w = weights(shape=(5, 40), kind="laplace")
    kw = dict(symmetric=symmetric, per_channel=per_channel, scale_method=scale_method)
    out = fake_quantize(w, bits, **kw)
    for row in rows(out, per_channel):
        assert row.unique().numel() <= 2**bits
    again = fake_quantize(out, bits, **kw)
    scale, _ = compute_qparams(w, bits, **kw)
    torch.testing.assert_close(again, out, rtol=0, atol=1e-5 * scale.max().item())


@pytest.mark.parametrize("kind", ["normal", "laplace", "outliers"])
@pytest.mark.parametrize("bits,symmetric", [(2, True), (2, False), (3, True), (4, True), (8, False)])
def test_mse_never_worse_than_maxabs(kind, bits, symmetric):
    for seed in range(3):
        w = weights(shape=(16, 64), seed=seed, kind=kind)
        err = {}
        for method in ("maxabs", "mse"):
            out = fake_quantize(w, bits, symmetric=symmetric, scale_method=method)
            err[method] = ((out.double() - w.double()) ** 2).sum(1)
        assert (err["mse"] <= err["maxabs"] * (1 + 1e-6)).all()
    # float64 weights: exactly never worse
    w = weights(shape=(16, 64), kind=kind).double()
    e = [((fake_quantize(w, bits, symmetric=symmetric, scale_method=m) - w) ** 2).sum(1) for m in ("maxabs", "mse")]
    assert (e[1] <= e[0] * (1 + 1e-12)).all()
    if kind == "outliers" and bits <= 4:
        assert (e[1] < 0.9 * e[0]).any()  # the search does clip outliers


@pytest.mark.parametrize("bits,symmetric", CASES)
@pytest.mark.parametrize("scale_method", ["maxabs", "mse"])
@pytest.mark.parametrize("per_channel", [True, False])
def test_zero_and_constant_tensors(bits, symmetric, scale_method, per_channel):
    kw = dict(symmetric=symmetric, per_channel=per_channel, scale_method=scale_method)
    zeros = torch.zeros(3, 2, 2)
    out = fake_quantize(zeros, bits, **kw)
    assert torch.equal(out, zeros)
    for c in (0.7, -1.3):
        const = torch.full((3, 5), c)
        out = fake_quantize(const, bits, **kw)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, const)  # c is a level of every grid built on a constant
    mixed = torch.randn(3, 6)
    mixed[1] = 0.0
    out = fake_quantize(mixed, bits, **kw)
    assert torch.isfinite(out).all()
    if per_channel:
        assert torch.equal(out[1], torch.zeros(6))
    scale, zero_point = compute_qparams(zeros, bits, **kw)
    assert torch.isfinite(scale).all() and torch.isfinite(zero_point).all()


def test_half_precision_and_empty():
    w = weights().half()
    out = fake_quantize(w, 2)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    torch.testing.assert_close(out, fake_quantize(w.float(), 2).half())
    empty = torch.zeros(0, 3)
    assert fake_quantize(empty, 2).shape == (0, 3)


# ---- qparams, codes, STE -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits,symmetric", CASES)
def test_qparams_codes_and_dequantize(bits, symmetric):
    w = weights()
    scale, zero_point = compute_qparams(w, bits, symmetric=symmetric)
    assert scale.shape == (w.shape[0], 1, 1, 1) == zero_point.shape
    codes = quantize_tensor(w, scale, zero_point, bits)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**bits - 1
    expected = fake_quantize(w, bits, symmetric=symmetric)
    torch.testing.assert_close(dequantize_tensor(codes, scale, zero_point), expected)
    if symmetric:
        assert torch.all(zero_point == (2**bits - 1) / 2)
    else:
        assert torch.equal(zero_point, zero_point.round())
        assert torch.all(dequantize_tensor(zero_point.to(torch.uint8), scale, zero_point) == 0)  # 0 is a level
    s_t, z_t = compute_qparams(w, bits, symmetric=symmetric, per_channel=False)
    assert s_t.shape == (1, 1, 1, 1) == z_t.shape


def test_round_ste_gradient_is_identity():
    x = torch.randn(50, requires_grad=True)
    g = torch.randn(50)
    y = _RoundSTE.apply(x * 3.0)
    assert torch.equal(y, torch.round(x.detach() * 3.0))
    y.backward(g)
    torch.testing.assert_close(x.grad, 3.0 * g)


@pytest.mark.parametrize("bits,symmetric", CASES)
def test_fake_quantize_gradient(bits, symmetric):
    w = weights(kind="outliers").requires_grad_(True)
    fake_quantize(w, bits, symmetric=symmetric).sum().backward()
    if bits > 1:  # max-abs clips nothing: the gradient is exactly 1 everywhere
        assert torch.equal(w.grad, torch.ones_like(w))
    else:  # binary, levels +-a: 1 within half a step (a) of the levels, i.e. for -2a <= w < 2a; 0 beyond (clipped)
        a = w.detach().abs().reshape(w.shape[0], -1).mean(1).reshape(-1, 1, 1, 1)
        expected = ((w.detach() >= -2 * a) & (w.detach() < 2 * a)).float()
        assert (expected == 0).any()
        torch.testing.assert_close(w.grad, expected)
    # with clipping (mse on outliers), the clipped weights get 0 and the others 1
    w.grad = None
    out = fake_quantize(w, 2, symmetric=symmetric, scale_method="mse")
    out.sum().backward()
    scale, zero_point = compute_qparams(w, 2, symmetric=symmetric, scale_method="mse")
    v = w.detach() / scale + zero_point
    inside = (v.round() >= 0) & (v.round() <= 3)
    assert (~inside).any()
    torch.testing.assert_close(w.grad, inside.float())


def test_learnable_scale_gets_lsq_gradient():
    w = weights(shape=(4, 30), kind="outliers").double()
    scale, zero_point = compute_qparams(w, 2, scale_method="mse")
    scale = scale.clone().requires_grad_(True)
    fake_quantize_affine(w, scale, zero_point, 2).sum().backward()
    v = (w / scale + zero_point).detach()
    q = v.round().clamp(0, 3)
    inside = (v.round() >= 0) & (v.round() <= 3)
    # LSQ: d w_hat / d s = (q - z) - w / s inside the range, (q - z) where clipped
    expected = torch.where(inside, (q - zero_point) - w / scale.detach(), q - zero_point).sum(1, keepdim=True)
    torch.testing.assert_close(scale.grad, expected)


# ---- errors --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [0, 9, 2.0, True, "2"])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match="`bits` must be an integer from 1 to 8"):
        fake_quantize(torch.randn(3, 3), bits)


def test_bad_arguments():
    w = torch.randn(3, 3)
    with pytest.raises(ValueError, match="`bits=1` is binary.*symmetric=True"):
        fake_quantize(w, 1, symmetric=False)
    with pytest.raises(ValueError, match="`scale_method` must be one of"):
        fake_quantize(w, 2, scale_method="percentile")
    with pytest.raises(ValueError, match="`mse_ratios` must be a positive integer"):
        fake_quantize(w, 2, scale_method="mse", mse_ratios=0)
    with pytest.raises(ValueError, match=r"`mse_min_ratio` must be in \(0, 1\]"):
        fake_quantize(w, 2, scale_method="mse", mse_min_ratio=1.5)
    with pytest.raises(TypeError, match="floating-point"):
        fake_quantize(torch.ones(3, 3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="`bits` must be an integer"):
        quantize_tensor(w, torch.ones(3, 1), torch.zeros(3, 1), 9)
