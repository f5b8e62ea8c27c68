"""hf_r2.losses against independent float64 references (numpy, formulas written out), values and gradients."""

import math

import numpy as np
import pytest
import torch

from hf_r2.losses import kurtosis_r2, linf_r2, margin_r2, soft_min_max_init_alpha, soft_min_max_r2


def _weight(shape=(6, 3, 3, 3), seed=0, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).requires_grad_()


def _rows(w: torch.Tensor, per_channel: bool) -> np.ndarray:
    a = w.detach().double().numpy()
    return a.reshape(a.shape[0], -1) if per_channel else a.reshape(1, -1)


@pytest.mark.parametrize("per_channel", [False, True])
def test_linf_value_and_gradient(per_channel):
    w = _weight()
    value = linf_r2(w, per_channel)
    value.backward()
    rows = _rows(w, per_channel)
    expected = np.mean([np.max(np.abs(r)) for r in rows])
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(expected, rel=1e-6)
    # subgradient: sign(w) at each row's argmax |w|, divided by the number of rows averaged
    grad = np.zeros_like(rows)
    for i, r in enumerate(rows):
        j = np.argmax(np.abs(r))
        grad[i, j] = np.sign(r[j]) / len(rows)
    np.testing.assert_allclose(w.grad.double().numpy().reshape(grad.shape), grad, atol=1e-7)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("penalty", [1.0, 0.3])
def test_margin_value_and_gradients(per_channel, penalty):
    w = _weight()
    rows = _rows(w, per_channel)
    m0 = 0.7 * np.abs(rows).max(axis=1)  # inside the range: some weights exceed it
    m0[0] = -m0[0]  # |m| is what counts; a negative margin must behave like its absolute value
    margin = torch.tensor(m0 if per_channel else m0[:1].reshape(()), dtype=torch.float32, requires_grad=True)
    value = margin_r2(w, margin, penalty)
    value.backward()

    m = np.abs(m0)[:, None]
    excess = np.maximum(np.abs(rows) - m, 0.0)
    expected = (excess**2).sum() + penalty * (m0**2).sum()
    assert value.item() == pytest.approx(expected, rel=1e-5)
    grad_w = 2 * excess * np.sign(rows)
    np.testing.assert_allclose(w.grad.double().numpy().reshape(grad_w.shape), grad_w, rtol=1e-4, atol=1e-7)
    grad_m = -2 * np.sign(m0) * excess.sum(axis=1) + 2 * penalty * m0
    np.testing.assert_allclose(margin.grad.double().numpy().reshape(-1), grad_m, rtol=1e-4, atol=1e-6)


def test_margin_at_max_has_no_excess():
    w = _weight()
    margin = w.detach().abs().max().clone().requires_grad_()
    value = margin_r2(w, margin, penalty=0.5)
    value.backward()
    assert value.item() == pytest.approx(0.5 * margin.item() ** 2, rel=1e-6)
    assert torch.count_nonzero(w.grad) == 0


def test_margin_rejects_wrong_size():
    w = _weight()
    with pytest.raises(ValueError, match="one entry per output channel"):
        margin_r2(w, torch.ones(4), 1.0)


def _smm_reference(rows: np.ndarray, alpha: np.ndarray, penalty: float):
    """float64 Soft-Min-Max: value and analytic gradients, one row at a time, averaged over rows."""
    values, grads, galpha = [], [], []
    n = rows.shape[1]
    for r, a in zip(rows, alpha):
        p = np.exp(a * r - np.max(a * r))
        p /= p.sum()
        q = np.exp(-a * r - np.max(-a * r))
        q /= q.sum()
        smax, smin = (p * r).sum(), (q * r).sum()
        values.append(smax - smin + penalty * 2 * math.log(n) / a)
        grads.append(p * (1 + a * (r - smax)) - q * (1 - a * (r - smin)))
        var_p, var_q = (p * r * r).sum() - smax**2, (q * r * r).sum() - smin**2
        galpha.append(var_p + var_q - penalty * 2 * math.log(n) / a**2)
    k = len(rows)
    return np.mean(values), np.stack(grads) / k, np.array(galpha) / k


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("alpha_scale", [0.3, 1.0])
def test_soft_min_max_value_and_gradients(per_channel, alpha_scale):
    w = _weight()
    alpha0 = soft_min_max_init_alpha(w, per_channel) * alpha_scale
    alpha = alpha0.clone().requires_grad_()
    value = soft_min_max_r2(w, alpha, penalty=0.7)
    value.backward()
    rows = _rows(w, per_channel)
    a = np.atleast_1d(alpha0.double().numpy())
    expected, grad_w, grad_a = _smm_reference(rows, a, 0.7)
    assert value.item() == pytest.approx(expected, rel=1e-5)
    np.testing.assert_allclose(w.grad.double().numpy().reshape(grad_w.shape), grad_w, rtol=2e-3, atol=2e-6)
    np.testing.assert_allclose(np.atleast_1d(alpha.grad.double().numpy()), grad_a, rtol=2e-3, atol=1e-7)


@pytest.mark.parametrize("per_channel", [False, True])
def test_soft_min_max_init_within_ten_percent(per_channel):
    for shape, scale in [((64, 32, 3, 3), 0.05), ((32, 1, 3, 3), 0.5), ((10, 128), 0.01), ((16, 16, 1, 1), 2.0)]:
        w = _weight(shape, scale=scale)
        alpha = soft_min_max_init_alpha(w, per_channel)
        rows = _rows(w, per_channel)
        true_range = rows.max(axis=1) - rows.min(axis=1)
        soft = soft_min_max_r2(w, alpha, penalty=0.0).item()
        full = soft_min_max_r2(w, alpha, penalty=1.0).item()
        assert 0.9 * true_range.mean() <= soft <= true_range.mean() * (1 + 1e-6)
        assert true_range.mean() * (1 - 1e-6) <= full <= 1.1 * true_range.mean()


def test_soft_min_max_is_upper_bound_for_any_alpha():
    w = _weight((8, 4, 3, 3))
    rows = _rows(w, False)
    true_range = rows.max() - rows.min()
    for alpha in [0.01, 1.0, 10.0, 100.0, 1e4]:
        value = soft_min_max_r2(w, torch.tensor(alpha), penalty=1.0).item()
        assert value >= true_range * (1 - 1e-5)
        assert value <= true_range + 2 * math.log(rows.size) / alpha + 1e-5


def test_soft_min_max_stable_for_huge_alpha():
    w = _weight()
    value = soft_min_max_r2(w, torch.tensor(1e8), penalty=0.0)
    rows = _rows(w, False)
    assert torch.isfinite(value)
    assert value.item() == pytest.approx(rows.max() - rows.min(), rel=1e-5)


@pytest.mark.parametrize("per_channel", [False, True])
def test_kurtosis_value_and_gradient(per_channel):
    w = _weight()
    value = kurtosis_r2(w, target=1.8, per_channel=per_channel)
    value.backward()
    rows = _rows(w, per_channel)
    n = rows.shape[1]
    vals, grads = [], []
    for r in rows:
        c = r - r.mean()
        m2, m3, m4 = (c**2).mean(), (c**3).mean(), (c**4).mean()
        k = m4 / m2**2
        vals.append((k - 1.8) ** 2)
        dk = 4 * (c**3 - m3) / (n * m2**2) - 4 * m4 * c / (n * m2**3)
        grads.append(2 * (k - 1.8) * dk)
    assert value.item() == pytest.approx(np.mean(vals), rel=1e-4)
    np.testing.assert_allclose(
        w.grad.double().numpy().reshape(rows.shape), np.stack(grads) / len(rows), rtol=1e-3, atol=1e-6
    )


@pytest.mark.parametrize("fn", ["linf", "margin", "soft_min_max", "kurtosis"])
def test_float32_under_autocast_and_low_precision_weights(fn):
    w32 = _weight().detach()
    w16 = w32.to(torch.bfloat16)

    def call(w):
        if fn == "linf":
            return linf_r2(w)
        if fn == "margin":
            return margin_r2(w, torch.tensor(0.1), 1.0)
        if fn == "soft_min_max":
            return soft_min_max_r2(w, torch.tensor(50.0))
        return kurtosis_r2(w)

    ref = call(w16.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = call(w16)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(ref.item(), rel=1e-6)
