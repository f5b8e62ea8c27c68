"""R2Regularizer: target selection, and its batched values and gradients against the functional losses."""

import pytest
import torch
from conftest import make_timm, perturb_r2_params, r2_reference_total
from torch import nn

from hf_r2 import R2Config, R2Regularizer, find_target_modules
from hf_r2.losses import kurtosis_r2, linf_r2

LOSSES = ["linf", "margin", "soft_min_max", "kurtosis"]


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("model_name", ["test_resnet", "test_efficientnet", "test_vit"])
def test_matches_functional_losses(loss, per_channel, model_name):
    model = make_timm(model_name, **({"img_size": 32} if "vit" in model_name else {}))
    reg = R2Regularizer(model, R2Config(loss=loss, per_channel=per_channel, margin_penalty=0.5))
    perturb_r2_params(reg)
    expected, ref_weights, ref_param = r2_reference_total(reg)
    expected.backward()
    value = reg()
    value.backward()
    assert value.dtype == torch.float32 and value.dim() == 0
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    tol = dict(rtol=1e-3, atol=1e-6) if loss in ("soft_min_max", "kurtosis") else dict(rtol=1e-5, atol=1e-7)
    for w, ref in zip(reg.weights(), ref_weights):
        got = torch.zeros_like(w) if w.grad is None else w.grad
        torch.testing.assert_close(got, ref.grad, **tol)
    if ref_param is not None:
        torch.testing.assert_close(next(reg.parameters()).grad, ref_param.grad, **tol)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("wrap", ["weight_norm", "spectral_norm"])
def test_parametrized_weights_match_functional_losses(loss, per_channel, wrap):
    """A weight computed by a parametrization (not a leaf) gets R2's gradient through it: equal to autograd through
    the functional losses (per-tensor L-inf used to crash here: its sparse gradient reached weight_norm's backward)."""
    from torch.nn.utils import parametrizations

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3, groups=2), nn.Flatten(),
                          nn.Linear(6 * 4 * 4, 5))
    for i in (0, 2, 4):
        getattr(parametrizations, wrap)(model[i])
    model.eval()  # spectral_norm's power iteration would change the weight between the two evaluations
    reg = R2Regularizer(model, R2Config(loss=loss, per_channel=per_channel, margin_penalty=0.5))
    perturb_r2_params(reg)
    originals = [p for n, p in model.named_parameters() if "original" in n]
    expected, _, ref_param = r2_reference_total(reg, [model[i].weight for i in (0, 2, 4)])
    ref_grads = torch.autograd.grad(expected, originals + ([ref_param] if ref_param is not None else []))
    x = torch.randn(2, 3, 8, 8)
    task = model(x).sum()
    task_grads = torch.autograd.grad(task, originals, retain_graph=True)
    value = reg()
    (task + value).backward()  # with a task loss, as in training
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    tol = dict(rtol=1e-3, atol=1e-5) if loss in ("soft_min_max", "kurtosis") else dict(rtol=1e-5, atol=1e-6)
    for p, ref, t in zip(originals, ref_grads, task_grads):
        assert p.grad is not None and not p.grad.is_sparse
        torch.testing.assert_close(p.grad, ref + t, **tol)
    if ref_param is not None:
        torch.testing.assert_close(next(reg.parameters()).grad, ref_grads[-1], **tol)


def test_layer_values_are_per_layer():
    model = make_timm("test_resnet")
    reg = R2Regularizer(model, loss="linf")
    values = reg.layer_values()
    assert values.shape == (len(reg.names),)
    expected = torch.stack([w.detach().abs().max() for w in reg.weights()])
    torch.testing.assert_close(values, expected)


def test_targets_cover_conv_depthwise_and_linear():
    model = make_timm("test_efficientnet")
    names = [n for n, _ in find_target_modules(model)]
    modules = dict(model.named_modules())
    assert any(isinstance(modules[n], nn.Conv2d) and modules[n].groups > 1 for n in names)  # depthwise
    assert any(isinstance(modules[n], nn.Linear) for n in names)
    expected = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert names == expected


def test_transformers_model_targets(hf_resnet):
    names = [n for n, _ in find_target_modules(hf_resnet)]
    assert any("convolution" in n for n in names) and names[-1].startswith("classifier")


def test_include_exclude_and_skip_first_last():
    model = make_timm("test_resnet")
    all_names = [n for n, _ in find_target_modules(model)]
    only = [n for n, _ in find_target_modules(model, include=[r"^layer1\."])]
    assert only and all(n.startswith("layer1.") for n in only)
    without_fc = [n for n, _ in find_target_modules(model, exclude=[r"^fc$"])]
    assert without_fc == [n for n in all_names if n != "fc"]
    inner = [n for n, _ in find_target_modules(model, skip_first_last=True)]
    assert inner == all_names[1:-1]


def test_no_match_names_the_pattern():
    model = make_timm("test_resnet")
    with pytest.raises(ValueError, match=r"include='nothing_here'"):
        R2Regularizer(model, include=["nothing_here"])


def test_model_without_layers_is_an_error():
    with pytest.raises(ValueError, match="no Conv1d/Conv2d/Conv3d/Linear"):
        R2Regularizer(nn.Sequential(nn.ReLU()))


def test_config_or_kwargs_not_both():
    with pytest.raises(TypeError, match="not both"):
        R2Regularizer(make_timm("test_resnet"), R2Config(), loss="margin")


def test_own_parameters_only_and_model_state_untouched():
    model = make_timm("test_resnet")
    keys = set(model.state_dict())
    reg = R2Regularizer(model, loss="margin", per_channel=True)
    assert [n for n, _ in reg.named_parameters()] == ["margin"]
    assert reg.margin.numel() == sum(w.shape[0] for w in reg.weights())
    assert set(model.state_dict()) == keys
    assert set(reg.state_dict()) == {"margin"}
    assert not list(R2Regularizer(model, loss="linf").parameters())


@pytest.mark.parametrize("per_channel", [False, True])
def test_margin_initialised_at_max_abs(per_channel):
    reg = R2Regularizer(make_timm("test_resnet"), loss="margin", per_channel=per_channel, margin_penalty=2.0)
    ws = reg.weights()
    expected = torch.cat([w.detach().abs().reshape(w.shape[0], -1).amax(1) if per_channel else
                          w.detach().abs().max()[None] for w in ws])
    torch.testing.assert_close(reg.margin.detach(), expected)
    # no excess at the start: only the penalty remains, and no weight gets a gradient
    value = reg()
    value.backward()
    assert value.item() == pytest.approx(2.0 * expected.pow(2).sum().item(), rel=1e-5)
    assert all(w.grad is None or torch.count_nonzero(w.grad) == 0 for w in ws)


def test_soft_min_max_starts_within_ten_percent_of_range():
    reg = R2Regularizer(make_timm("test_resnet"), loss="soft_min_max", soft_min_max_penalty=0.0)
    spans = torch.stack([w.detach().max() - w.detach().min() for w in reg.weights()])
    values = reg.layer_values().detach()
    assert torch.all(values >= 0.9 * spans) and torch.all(values <= spans * (1 + 1e-6))


def test_ties_share_the_linf_subgradient():
    layer = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.5, -0.5, 0.1, 0.2], [0.3, 0.5, -0.2, 0.0]]))
    reg = R2Regularizer(nn.Sequential(layer), loss="linf")
    reg().backward()
    # max |w| = 0.5 is hit three times; +0.5 wins the tie with -0.5, and the two +0.5 share the gradient
    assert layer.weight.grad.sum().item() == pytest.approx(1.0)
    assert layer.weight.grad[0, 0].item() == pytest.approx(0.5)
    assert layer.weight.grad[1, 1].item() == pytest.approx(0.5)


@pytest.mark.parametrize("loss", LOSSES)
def test_conv1d_conv3d_linear_channels_last_and_bf16(loss):
    model = nn.Sequential(nn.Conv1d(3, 4, 3), nn.Conv3d(2, 5, 2), nn.Conv2d(3, 6, 3), nn.Linear(7, 1))
    model[2].to(memory_format=torch.channels_last)
    for per_channel in (False, True):
        reg = R2Regularizer(model, loss=loss, per_channel=per_channel)
        perturb_r2_params(reg)
        expected, ref_weights, _ = r2_reference_total(reg)
        expected.backward()
        reg().backward()
        for w, ref in zip(reg.weights(), ref_weights):
            torch.testing.assert_close(torch.zeros_like(w) if w.grad is None else w.grad, ref.grad,
                                       rtol=1e-3, atol=1e-6)
            w.grad = None
    model16 = model.to(torch.bfloat16)
    reg = R2Regularizer(model16, loss=loss)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = reg()
    assert value.dtype == torch.float32
    value.backward()
    assert all(w.grad is None or w.grad.dtype == torch.bfloat16 for w in reg.weights())


def test_warmup_ramps_lambda():
    reg = R2Regularizer(make_timm("test_resnet"), r2_lambda=0.2, warmup_steps=10)
    assert reg.lambda_at(0) == 0.0
    assert reg.lambda_at(5) == pytest.approx(0.1)
    assert reg.lambda_at(10) == pytest.approx(0.2) and reg.lambda_at(50) == pytest.approx(0.2)
    assert R2Regularizer(make_timm("test_resnet"), weight=0.3).lambda_at(0) == pytest.approx(0.3)  # older names
    assert reg.weight_at(5) == reg.lambda_at(5)


def test_stats_against_numpy():
    model = make_timm("test_resnet")
    reg = R2Regularizer(model)
    stats = reg.stats()
    assert list(stats["per_layer"]) == reg.names
    for name, w in zip(reg.names, reg.weights()):
        a = w.detach().double().numpy().reshape(-1)
        s = stats["per_layer"][name]
        c = a - a.mean()
        assert s["min"] == pytest.approx(a.min()) and s["max"] == pytest.approx(a.max())
        assert s["std"] == pytest.approx(a.std(), rel=1e-5)
        assert s["max_over_std"] == pytest.approx(abs(a).max() / a.std(), rel=1e-5)
        assert s["kurtosis"] == pytest.approx((c**4).mean() / (c**2).mean() ** 2, rel=1e-4)
    assert stats["overall"]["max_abs"] == pytest.approx(max(w.detach().abs().max().item() for w in reg.weights()))


@pytest.mark.parametrize("loss", ["linf", "margin", "soft_min_max"])
def test_training_on_r2_shrinks_the_range(loss):
    model = make_timm("test_resnet")
    reg = R2Regularizer(model, loss=loss)
    before = reg.stats()["overall"]["mean_max_over_std"]
    opt = torch.optim.SGD([*reg.weights(), *reg.parameters()], lr=0.01)
    for _ in range(30):
        opt.zero_grad()
        reg().backward()
        opt.step()
    after = reg.stats()["overall"]["mean_max_over_std"]
    assert after < before


@pytest.mark.parametrize("loss", ["linf", "margin", "soft_min_max"])
def test_r2_gradient_adds_into_the_task_gradient(loss):
    """R2's sparse gradients must end as ordinary dense `.grad`s equal to task gradient + R2 gradient, on the
    first micro-batch (`.grad` is None) and when accumulating into an existing `.grad`."""
    model = make_timm("test_resnet")
    reg = R2Regularizer(model, loss=loss)
    perturb_r2_params(reg)
    x = torch.randn(2, 3, 32, 32)
    model(x).square().mean().backward()
    task = [w.grad.clone() for w in reg.weights()]
    model.zero_grad()
    expected, ref_weights, _ = r2_reference_total(reg)
    expected.backward()
    for accumulate in (False, True):
        model.zero_grad(set_to_none=not accumulate)
        (model(x).square().mean() + reg()).backward()
        for w, t, ref in zip(reg.weights(), task, ref_weights):
            assert w.grad.layout == torch.strided
            torch.testing.assert_close(w.grad, t + ref.grad, rtol=1e-4, atol=1e-6)


def test_dense_grad_hook_is_put_once_and_follows_copies():
    import copy

    model = make_timm("test_resnet")
    for _ in range(3):
        R2Regularizer(model, loss="linf")
    w = R2Regularizer(model, loss="linf").weights()[0]
    assert len(w._post_accumulate_grad_hooks) == 1
    clone = copy.deepcopy(model)
    reg = R2Regularizer(clone, loss="linf")
    reg().backward()  # R2 alone: without the hook the copy's .grad would stay sparse
    assert all(v.grad.layout == torch.strided for v in reg.weights())


def _three_layers() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.Flatten(), nn.Linear(6 * 4 * 4, 5))


@pytest.mark.parametrize("loss", LOSSES)
def test_frozen_layers_are_left_out_unless_asked(loss):
    model = _three_layers()
    model[0].weight.requires_grad_(False)  # e.g. a frozen stem
    reg = R2Regularizer(model, R2Config(loss=loss))
    assert reg.names == ["2", "4"] and reg.skipped_frozen == ["0"]
    stats = reg.stats()
    assert stats["skipped_frozen"] == ["0"] and set(stats["per_layer"]) == {"2", "4"}
    expected, _, _ = r2_reference_total(reg)  # the functional losses over the two trainable layers only
    assert reg().item() == pytest.approx(expected.item(), rel=1e-5)
    kept = R2Regularizer(model, R2Config(loss=loss, skip_frozen=False))
    assert kept.names == ["0", "2", "4"] and kept.skipped_frozen == []
    if loss == "margin":  # one margin per regularised layer: none for the frozen one
        assert reg.margin.numel() == 2 and kept.margin.numel() == 3


def test_all_frozen_is_a_clear_error():
    model = _three_layers().requires_grad_(False)
    with pytest.raises(ValueError, match=r"Every target layer of Sequential is frozen .*skip_frozen=False"):
        R2Regularizer(model, R2Config())
    reg = R2Regularizer(model, R2Config(skip_frozen=False))  # asked for: constant terms, no trainable weight
    assert len(reg.names) == 3 and not reg().requires_grad


def test_frozen_parametrized_weight_is_detected_without_computing_it():
    from torch.nn.utils import parametrizations

    model = _three_layers()
    parametrizations.weight_norm(model[2])
    for p in model[2].parametrizations.weight.parameters():
        p.requires_grad_(False)
    assert R2Regularizer(model, R2Config()).skipped_frozen == ["2"]


@pytest.mark.parametrize("loss", LOSSES)
def test_a_weight_shared_by_two_layers_counts_once(loss):
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    model[2].weight = model[0].weight  # one tensor, two layers
    reg = R2Regularizer(model, R2Config(loss=loss, per_channel=True))
    assert reg.names == ["0", "4"]
    w0, w4 = model[0].weight, model[4].weight
    ref = {"linf": lambda w: linf_r2(w, True), "kurtosis": lambda w: kurtosis_r2(w, 1.8, True)}
    if loss in ref:
        assert reg().item() == pytest.approx((ref[loss](w0) + ref[loss](w4)).item(), rel=1e-5)
    if loss == "margin":
        assert reg.margin.numel() == 6 + 3  # per channel: one margin per row of each distinct weight
    if loss == "soft_min_max":
        assert reg.log_alpha.numel() == 6 + 3


def test_compiled_model_has_the_eager_names():
    model = make_timm("test_resnet")
    compiled = torch.compile(model)  # wraps the model as `_orig_mod`; nothing is compiled until it runs
    eager = R2Regularizer(model, R2Config(include=["layer1"], exclude=["downsample"]))
    wrapped = R2Regularizer(compiled, R2Config(include=["^layer1"], exclude=["downsample"]))
    assert wrapped.names == eager.names and all(not n.startswith("_orig_mod") for n in wrapped.names)
    assert wrapped.stats()["per_layer"].keys() == eager.stats()["per_layer"].keys()
    assert [n for n, _ in find_target_modules(compiled)] == [n for n, _ in find_target_modules(model)]
    assert wrapped().item() == pytest.approx(eager().item())
