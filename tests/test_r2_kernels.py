"""The batched R2 kernels' edge paths: KURE against float64, Soft-Min-Max's truncated blocks against the full softmax,
and the reused buffers (never aliased to a `.grad`, beside a task gradient over steps, never shared between two live
graphs, a second backward, copies)."""

import copy

import pytest
import torch
from torch import nn

from hf_r2 import R2Config, R2Regularizer
from hf_r2.losses import soft_min_max_r2

DENSE_CASES = [("linf", True), ("margin", True), ("margin", False), ("soft_min_max", True), ("kurtosis", False),
               ("kurtosis", True)]


def _kure64(w: torch.Tensor, target: float, per_channel: bool) -> torch.Tensor:
    """KURE written out in float64: (mean(d^4) / max(mean(d^2)^2, tiny32) - target)^2, d = w - mean(w)."""
    rows = w.reshape(w.shape[0], -1) if per_channel else w.reshape(1, -1)
    d = rows - rows.mean(1, keepdim=True)
    m2, m4 = (d**2).mean(1), (d**4).mean(1)
    kurt = m4 / (m2**2).clamp_min(torch.finfo(torch.float32).tiny)
    return ((kurt - target) ** 2).mean()


def _model() -> nn.Module:
    # a layer of 2^18+ weights (reduced in place), two grouped layers with the same row length, a constant layer
    model = nn.Sequential(nn.Linear(512, 600, bias=False), nn.Conv2d(8, 16, 3), nn.Conv2d(8, 4, 3), nn.Linear(5, 3))
    with torch.no_grad():
        model[0].weight.mul_(3).add_(0.01)  # a mean away from zero
        model[1].weight[2].fill_(0.25)  # a constant row
        model[3].weight.fill_(-0.5)  # a constant layer: kurt = 0, no gradient through m2
    return model


@pytest.mark.parametrize("per_channel", [False, True])
def test_kure_matches_float64(per_channel):
    model = _model()
    reg = R2Regularizer(model, R2Config(loss="kurtosis", per_channel=per_channel, kurtosis_target=1.8))
    refs = [w.detach().double().requires_grad_() for w in reg.weights()]
    expected = sum(_kure64(w, 1.8, per_channel) for w in refs)
    expected.backward()
    value = reg()
    value.backward()
    assert value.item() == pytest.approx(expected.item(), rel=1e-4)
    for w, ref in zip(reg.weights(), refs):
        scale = ref.grad.abs().max().item()
        torch.testing.assert_close(w.grad.double(), ref.grad, rtol=1e-3, atol=1e-4 * scale + 1e-12)
    assert torch.count_nonzero(model[3].weight.grad) == 0


def _reg(loss: str, per_channel: bool, model: nn.Module) -> R2Regularizer:
    reg = R2Regularizer(model, R2Config(loss=loss, per_channel=per_channel))
    with torch.no_grad():  # margins with excess on every row: the dense paths
        if loss == "margin":
            reg.margin.mul_(0.5)
        if loss == "soft_min_max":
            reg.log_alpha.sub_(0.5)
    return reg


def _grads(reg: R2Regularizer) -> list[torch.Tensor]:
    for w in reg.weights():
        w.grad = None
    reg().backward()
    grads = [w.grad for w in reg.weights()]
    assert all(g.layout == torch.strided for g in grads)  # deep copies and reassigned weights get the hook too
    return grads


@pytest.mark.parametrize("loss,per_channel", DENSE_CASES)
def test_a_gradient_is_never_the_reused_buffer(loss, per_channel):
    reg = _reg(loss, per_channel, _model())
    first = _grads(reg)
    kept = [g.clone() for g in first]
    with torch.no_grad():
        for w in reg.weights():
            w.mul_(1.5)
    second = _grads(reg)
    for g, k, g2 in zip(first, kept, second):
        torch.testing.assert_close(g, k, rtol=0, atol=0)  # the next step did not write into the last .grad
        assert g.data_ptr() != g2.data_ptr()


@pytest.mark.parametrize("loss,per_channel", DENSE_CASES)
def test_with_a_task_gradient_over_steps(loss, per_channel):
    """R2 and a task loss on the same weights, two steps with `.grad` reset and one accumulated: each `.grad` is the
    task's gradient plus R2's reference gradient, and a later step never writes into an earlier `.grad`."""
    reg = _reg(loss, per_channel, _model())
    weights = reg.weights()
    slopes = [torch.randn_like(w) for w in weights]

    def step():
        task = sum((w * k).sum() for w, k in zip(reg.weights(), slopes))
        (task + reg()).backward()

    expected = [k + r for k, r in zip(slopes, _grads(copy.deepcopy(reg)))]
    for w in weights:
        w.grad = None
    step()
    first = [w.grad for w in weights]
    for g, e in zip(first, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    step()  # accumulates into the same .grad
    for w, e in zip(weights, expected):
        torch.testing.assert_close(w.grad, 2 * e, rtol=1e-5, atol=1e-6)
    kept = [g.clone() for g in first]
    for w in weights:
        w.grad = None
    with torch.no_grad():
        for w in weights:
            w.mul_(1.3)
    step()  # a fresh .grad, on other weights: the earlier ones stay as they were
    for g, k in zip(first, kept):
        torch.testing.assert_close(g, k, rtol=0, atol=0)
    assert all(w.grad.data_ptr() != g.data_ptr() for w in weights for g in first)


@pytest.mark.parametrize("loss,per_channel", DENSE_CASES)
def test_two_live_graphs_and_a_second_backward(loss, per_channel):
    model = _model()
    reg = _reg(loss, per_channel, model)
    expected_old = _grads(copy.deepcopy(reg))  # references on copies, which share nothing with `reg`
    old_weights = reg.weights()
    value_old = reg()  # its graph holds the buffers while new weights come in and a second graph is built
    for layer in model:
        if hasattr(layer, "weight"):
            layer.weight = nn.Parameter(layer.weight.detach() * 0.7 + 0.01)
    expected_new = _grads(copy.deepcopy(reg))
    value_new = reg()
    value_new.backward(retain_graph=True)
    value_new.backward()  # the second backward must rebuild what the first gave back
    for w, e in zip(reg.weights(), expected_new):
        torch.testing.assert_close(w.grad, 2 * e, rtol=1e-5, atol=1e-7)
    value_old.backward()
    for w, e in zip(old_weights, expected_old):
        torch.testing.assert_close(w.grad, e, rtol=1e-5, atol=1e-7)


def test_a_copy_gets_its_own_buffers():
    reg = _reg("kurtosis", False, _model())
    _grads(reg)
    plan = reg._plan(reg.weights(), False)
    assert plan._scratch
    clone = copy.deepcopy(reg)
    assert clone._plan(clone.weights(), False)._scratch == {}


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("shift", [0.0, 0.7, 3.0])
def test_soft_min_max_blocks_match_the_reference(per_channel, shift):
    """The truncated softmax (only blocks within reach of the extreme) against the full one, on layers big enough
    for the block paths: per tensor every layer, per channel rows of 16384+ weights."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16384, 6), nn.Linear(512, 600), nn.Conv2d(8, 16, 3))
    with torch.no_grad():
        model[0].weight[1, 5] = 0.5  # an outlier, and a row with a tie at its extreme
        model[0].weight[2, :2] = -0.4
    reg = R2Regularizer(model, R2Config(loss="soft_min_max", per_channel=per_channel))
    with torch.no_grad():
        reg.log_alpha.sub_(shift)  # from the initial temperature (few blocks in reach) to a soft one (many)
    log_alpha = reg.log_alpha.detach().clone().requires_grad_()
    refs = [w.detach().clone().requires_grad_() for w in reg.weights()]
    expected, offset = 0.0, 0
    for w in refs:
        k = w.shape[0] if per_channel else 1
        a = log_alpha[offset : offset + k].exp()
        expected = expected + soft_min_max_r2(w, a if per_channel else a.reshape(()))
        offset += k
    expected.backward()
    value = reg()
    value.backward()
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    for w, ref in zip(reg.weights(), refs):
        torch.testing.assert_close(w.grad, ref.grad, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(reg.log_alpha.grad, log_alpha.grad, rtol=1e-3, atol=1e-6)


def _linf64(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor L-inf written out in float64: |t| with t the max, or the min when -min is larger; its gradient
    sign(t) / (number of weights equal to t) on those weights."""
    x = w.detach().double()
    t = x.max() if x.max() >= -x.min() else x.min()
    hit = x == t
    return t.abs(), torch.where(hit, torch.sign(t) / hit.sum(), torch.zeros_like(x))


@pytest.mark.parametrize("loss", ["linf", "margin"])
def test_per_tensor_blocks_match_float64(loss):
    """Per tensor, L-inf and Margin cut the small layers into zero-padded rows of ROW_BLOCK weights in one float32
    buffer (big layers keep their channel rows): a layer smaller than a row, one not a multiple of it, an
    all-negative and an all-zero layer, a bf16 layer beside float32 ones, a tie in a padded row; values and
    gradients against float64, over two steps (the buffer is reused)."""
    from hf_r2._r2_plan import ROW_BLOCK

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 520, bias=False), nn.Conv2d(8, 16, 3), nn.Linear(5, 3), nn.Linear(4, 4),
                          nn.Conv2d(3, 4, 3))
    model[4].to(torch.bfloat16)
    with torch.no_grad():
        model[2].weight.copy_(-model[2].weight.abs() - 0.1)  # all negative: the padding's 0 must not be its max
        model[3].weight.zero_()
        w = model[1].weight.view(-1)
        w[3] = w[-1] = w.abs().max() + 0.5  # a tie, one of them in the last (padded) row
    assert model[0].weight.numel() >= 1 << 18 and model[1].weight.numel() % ROW_BLOCK
    reg = R2Regularizer(model, R2Config(loss=loss, per_channel=False, margin_penalty=0.5))
    assert reg._plan(reg.weights(), True).flat_group is not None
    for step in range(2):
        with torch.no_grad():
            if loss == "margin":
                reg.margin.copy_(torch.stack([w.detach().float().abs().amax() * 0.6 for w in reg.weights()]))
            for w in reg.weights():
                w.mul_(1.1)
                w.grad = None
        value = reg()
        value.backward()
        if loss == "linf":
            refs = [_linf64(w) for w in reg.weights()]
            expected, grads = sum(r[0] for r in refs), [r[1] for r in refs]
        else:
            ws = [w.detach().double().requires_grad_() for w in reg.weights()]
            m = reg.margin.detach().double()
            expected = sum(((w.abs() - mi.abs()).clamp_min(0) ** 2).sum() + 0.5 * mi**2 for w, mi in zip(ws, m))
            grads = torch.autograd.grad(expected, ws)
        assert value.item() == pytest.approx(expected.item(), rel=1e-5), step
        for w, ref in zip(reg.weights(), grads):
            got = torch.zeros_like(w) if w.grad is None else w.grad
            assert got.layout == torch.strided
            tol = dict(rtol=1e-2, atol=1e-2) if w.dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(got.double(), ref, **tol)
    assert model[1].weight.grad.view(-1)[[3, -1]].tolist() == [0.5, 0.5] or loss == "margin"
