"""DKM (hf_r2.quant.cluster.dkm): the memory-bounded autograd Functions against plain autograd, `prepare_dkm` /
`finalize_dkm` on real models, and `palettize_(method="dkm")`."""

import copy
import math

import pytest
import torch
from conftest import conv_net, make_timm
from torch import nn
from torch.nn.utils import parametrize

import hf_r2.quant.cluster.dkm as dkm
from hf_r2 import R2Config, R2Regularizer, find_target_modules
from hf_r2.quant import PalettizeConfig, kmeans_1d, palette_indices, palettize, palettize_
from hf_r2.quant.cluster.dkm import DKMParametrization, finalize_dkm, is_dkm_prepared, prepare_dkm


def _reference(x: torch.Tensor, c: torch.Tensor, tau: torch.Tensor, iters: int):
    """DKM written out under plain autograd, one group at a time (x (G, n), c (G, K), tau (G, 1)): for each group,
    `iters` times `A = softmax_j(-(x_i - c_j)^2 / tau)`, `c_j = sum_i A_ij x_i / sum_i A_ij` (a centroid whose total
    attention is within 2 n exp(-50) stays put), then `y_i = sum_j A_ij c_j`."""
    ys, cs = [], []
    for g in range(x.shape[0]):
        xg, cg, t = x[g], c[g], tau[g, 0]
        for _ in range(iters):
            a = torch.softmax(-((xg[:, None] - cg[None, :]) ** 2) / t, dim=1)
            mass = a.sum(0)
            alive = mass > 2 * xg.numel() * math.exp(-50)
            cg = torch.where(alive, (a * xg[:, None]).sum(0) / torch.where(alive, mass, torch.ones_like(mass)), cg)
        a = torch.softmax(-((xg[:, None] - cg[None, :]) ** 2) / t, dim=1)
        ys.append((a * cg[None, :]).sum(1))
        cs.append(cg)
    return torch.stack(ys), torch.stack(cs)


def _inputs(groups=3, n=37, k=4, seed=0, tau_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(groups, n, generator=g, dtype=torch.float64) * 0.1).requires_grad_()
    c0 = kmeans_1d(x.detach(), k)[0].add(0.01 * torch.randn(groups, k, generator=g, dtype=torch.float64))
    c0.requires_grad_()
    tau = torch.full((groups, 1), 2e-3 * tau_scale, dtype=torch.float64)
    return x, c0, tau


@pytest.fixture(params=[1 << 18, 2 * 41 * 4, 16, 1], ids=["one_block", "group_blocks", "column_blocks", "entries"])
def chunk(request, monkeypatch):
    """Run each test with the attention computed in one block, in blocks of whole groups (2 groups of 41 weights
    at K = 4), in blocks of a few weights of one group, and entry by entry."""
    monkeypatch.setattr(dkm, "_CHUNK_ELEMENTS", request.param)
    return request.param


# ---- the Functions --------------------------------------------------------------------------------------------------


def test_functions_gradcheck(chunk):
    x, c0, tau = _inputs(groups=2, n=11, k=4)
    assert torch.autograd.gradcheck(lambda x, c: dkm._DKMSoftAssign.apply(x, c, tau), (x, c0))
    assert torch.autograd.gradcheck(lambda x, c: dkm._DKMCentroidStep.apply(x, c, tau), (x, c0))
    # the whole forward (2 updates, then the assignment), any weight shape read as (G, n)
    x4 = x.detach().reshape(2, 11, 1, 1).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, c: dkm._dkm_forward(x, c, tau, 2), (x4, c0))


@pytest.mark.parametrize("k, iters", [(2, 0), (4, 1), (4, 3), (8, 2)])
def test_matches_plain_autograd_reference(chunk, k, iters):
    x, c0, tau = _inputs(groups=3, n=41, k=k, seed=k + iters)
    y, c = dkm._dkm_forward(x, c0, tau, iters)
    y_ref, c_ref = _reference(x, c0, tau, iters)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(c, c_ref, rtol=1e-12, atol=1e-14)
    # the module's own reference (used by the benchmark) is the same maths
    y_mod, c_mod = dkm._dkm_reference(x, c0, tau, iters)
    torch.testing.assert_close(y_mod, y_ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(c_mod, c_ref, rtol=1e-12, atol=1e-14)
    # gradients of a loss touching both outputs
    gy, gc = torch.randn_like(y), torch.randn_like(c)
    grads = torch.autograd.grad((y * gy).sum() + (c * gc).sum(), (x, c0))
    grads_ref = torch.autograd.grad((y_ref * gy).sum() + (c_ref * gc).sum(), (x, c0))
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    assert grads[0].abs().sum() > 0 and (iters == 0 or grads[1].abs().sum() > 0)


def test_dead_centroid_and_float32(chunk):
    x, c0, tau = _inputs(groups=2, n=23, k=4)
    c_far = c0.detach().clone()
    c_far[:, -1] = 50.0  # attention to it underflows for every weight: it must stay, with no NaN anywhere
    c_far.requires_grad_()
    y, c = dkm._dkm_forward(x, c_far, tau, 2)
    y_ref, c_ref = _reference(x, c_far, tau, 2)
    assert torch.equal(c[:, -1].detach(), torch.full((2,), 50.0, dtype=c.dtype))
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(c, c_ref)
    gc = torch.randn_like(c)
    grads = torch.autograd.grad(y.sum() + (c * gc).sum(), (x, c_far))
    grads_ref = torch.autograd.grad(y_ref.sum() + (c_ref * gc).sum(), (x, c_far))
    for got, want in zip(grads, grads_ref):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grads[1][:, -1], gc[:, -1])  # passed straight through
    # float32 (and bfloat16 weights, computed in float32) against the float64 result
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        x32 = x.detach().to(dtype).requires_grad_()
        y32, c32 = dkm._dkm_forward(x32, c0.detach().float(), tau.float(), 2)
        assert y32.dtype == dtype and c32.dtype == torch.float32
        y64, _ = _reference(x32.detach().double(), c0.detach(), tau, 2)
        torch.testing.assert_close(y32.double(), y64, rtol=tol, atol=tol * 0.1)
        y32.float().sum().backward()
        assert x32.grad.dtype == dtype and torch.isfinite(x32.grad.float()).all()


def test_functions_keep_no_n_by_k_tensor():
    """What autograd keeps for backward: the Functions save the latent weight itself (no copy) and O(K) vectors."""
    x, c0, tau = _inputs(groups=1, n=5000, k=4)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y, _ = dkm._dkm_forward(x, c0, tau, 3)
    big = [t for t in saved if t.numel() >= x.numel()]
    assert big and all(t.data_ptr() == x.data_ptr() for t in big), [tuple(t.shape) for t in big]
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        dkm._dkm_reference(x, c0, tau, 3)
    assert sum(t.numel() for t in saved) >= 3 * 4 * x.numel()  # the naive version keeps n x K per iteration


# ---- prepare / train / finalize -------------------------------------------------------------------------------------


def _train(model, steps=3, lr=0.05, size=16):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, size, size, generator=g), torch.randint(0, 4, (8,), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        out = model(x)
        logits = out if isinstance(out, torch.Tensor) else out.logits
        loss = nn.functional.cross_entropy(logits, y % logits.shape[-1])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_prepare_train_finalize():
    model = conv_net(4)
    keys = list(model.state_dict())
    params = {name: p for name, p in model.named_parameters()}
    config = PalettizeConfig(bits=2, method="dkm", group_size=2, temperature=2.0, dkm_iters=2)
    assert prepare_dkm(model, config) is model and is_dkm_prepared(model)
    # (not find_target_modules: it reads every `weight`, and a read in training mode is a DKM forward pass)
    targets = [(n, model.get_submodule(n)) for n in ("0", "3", "4", "7")]
    for name, module in targets:
        assert parametrize.is_parametrized(module, "weight")
        p = module.parametrizations.weight[0]
        latent = module.parametrizations.weight.original
        assert isinstance(p, DKMParametrization) and p.centroids.shape == (latent.shape[0] // 2, 4)
        # the latent weight is the original Parameter, so optimizers built before or after see the same tensor
        assert module.parametrizations.weight.original is params[f"{name}.weight"]
        # initial centroids: k-means of the weight; tau: temperature x the k-means distortion
        latent = module.parametrizations.weight.original.detach().reshape(p.num_groups, -1)
        c, idx = kmeans_1d(latent, 4)
        torch.testing.assert_close(p.centroids, c)
        torch.testing.assert_close(p.tau[:, 0], 2.0 * (latent - c.gather(1, idx)).square().mean(1))
    assert "0.parametrizations.weight.original" in model.state_dict()
    assert "0.parametrizations.weight.0.centroids" in model.state_dict()

    start = {n: m.parametrizations.weight[0].centroids.clone() for n, m in targets}
    latent0 = {n: m.parametrizations.weight.original.detach().clone() for n, m in targets}
    losses = _train(model, steps=4)
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    for name, module in targets:
        p = module.parametrizations.weight[0]
        assert not torch.equal(p.centroids, start[name]), f"{name}: centroids did not move"
        assert not torch.equal(module.parametrizations.weight.original, latent0[name])
        # the soft weight: each entry a convex combination of its group's centroids, near one of them
        w = module.weight.detach().reshape(p.num_groups, -1)
        assert torch.all(w >= p.centroids.min(1, keepdim=True).values - 1e-6)
    # eval mode leaves the warm-start buffers alone
    model.eval()
    frozen = {n: m.parametrizations.weight[0].centroids.clone() for n, m in targets}
    with torch.no_grad():
        model(torch.randn(2, 3, 16, 16))
    for name, module in targets:
        assert torch.equal(module.parametrizations.weight[0].centroids, frozen[name])

    expected = {}
    for name, module in targets:
        p = module.parametrizations.weight[0]
        latent = module.parametrizations.weight.original.detach()
        palette = p.final_centroids(latent)
        near = (latent.reshape(p.num_groups, -1, 1) - palette[:, None, :]).abs().argmin(-1)
        expected[name] = (palette, palette.gather(1, near).reshape(latent.shape))
    assert finalize_dkm(model) is model and not is_dkm_prepared(model)
    assert list(model.state_dict()) == keys
    for name, module in targets:
        assert not parametrize.is_parametrized(module)
        assert type(module) in (nn.Conv2d, nn.Linear)
        assert module.weight is params[f"{name}.weight"]
        palette, weight = expected[name]
        torch.testing.assert_close(module.weight_palette, palette, rtol=0, atol=0)
        torch.testing.assert_close(module.weight, weight, rtol=0, atol=0)
        idx = palette_indices(module)
        assert idx.dtype == torch.uint8 and torch.equal(
            module.weight_palette.gather(1, idx.reshape(palette.shape[0], -1).long()).reshape(weight.shape),
            module.weight,
        )
    assert torch.isfinite(model(torch.randn(2, 3, 16, 16))).all()
    with pytest.raises(ValueError, match="no DKM-prepared layer"):
        finalize_dkm(model)


def test_dkm_first_last_bits():
    """first_last_bits=8 trains 256-centroid palettes on the end layers and 2^bits on the others."""
    model = prepare_dkm(conv_net(4), PalettizeConfig(bits=1, method="dkm", first_last_bits=8))
    _train(model, steps=1)
    finalize_dkm(model)
    sizes = {name: model.get_submodule(name).weight_palette.shape[1] for name in ("0", "3", "4", "7")}
    assert sizes == {"0": 256, "3": 2, "4": 2, "7": 256}
    for name in ("3", "4"):
        assert model.get_submodule(name).weight.unique().numel() <= 2


def test_palettize_with_dkm_method_and_errors():
    model = prepare_dkm(conv_net(4), bits=1, skip_first_last=True)
    _train(model, steps=1)
    with pytest.raises(ValueError, match="already prepared for DKM"):
        prepare_dkm(model, PalettizeConfig(bits=1))
    with pytest.raises(ValueError, match=r"prepared for DKM \(2 layers\) but `method='kmeans'`.*method='dkm'"):
        palettize_(model, PalettizeConfig(bits=1))
    ref = finalize_dkm(copy.deepcopy(model))
    # the copying verb finalizes a copy (the prepared model is left as it was), k-means on the other layers
    out = palettize(model, PalettizeConfig(bits=1, method="dkm"))
    assert is_dkm_prepared(model) and not is_dkm_prepared(out)
    assert torch.isfinite(model(torch.randn(2, 3, 8, 8))).all()  # finalizing copies did not break the original
    for name in ("3", "4"):
        assert torch.equal(out.get_submodule(name).weight, ref.get_submodule(name).weight)
        assert out.get_submodule(name).weight.unique().numel() <= 2
    for name in ("0", "7"):  # not prepared: clustered by k-means (1 bit: 2 values)
        assert out.get_submodule(name).weight.unique().numel() == 2
        assert not hasattr(ref.get_submodule(name), "weight_palette")
    # on a model never prepared, "dkm" is k-means
    plain = conv_net(4)
    a, b = palettize(plain, bits=2, method="dkm"), palettize(plain, bits=2)
    for (k1, v1), v2 in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v1, v2), k1
    with pytest.raises(ValueError, match="`group_size=4` does not divide the 6 output channels of layer '4'"):
        prepare_dkm(conv_net(4), bits=2, group_size=4)
    with pytest.raises(ValueError, match=r"Unknown `PalettizeConfig` field\(s\) \['tau'\]"):
        prepare_dkm(conv_net(4), tau=1.0)


def test_autocast_is_off_inside_dkm():
    lin = prepare_dkm(nn.Linear(64, 32), bits=2).eval()
    w = lin.weight.detach().clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w_amp = lin.weight
        loss = lin(torch.randn(4, 64)).float().square().mean()
    assert w_amp.dtype == torch.float32 and torch.equal(w_amp.detach(), w)
    loss.backward()
    assert torch.isfinite(lin.parametrizations.weight.original.grad).all()


def test_checkpoint_round_trip_of_prepared_model():
    model = prepare_dkm(conv_net(4), bits=2)
    _train(model, steps=2)
    state = model.state_dict()
    other = prepare_dkm(conv_net(4), bits=2)
    other.load_state_dict(state)  # resuming: same keys, the warm-start centroids and tau come back
    x = torch.randn(2, 3, 16, 16)
    model.eval(), other.eval()
    torch.testing.assert_close(model(x), other(x), rtol=0, atol=0)


@pytest.mark.parametrize("model_name", ["timm_cnn", "hf_convnext", "mobilenetv3_small_050"])
def test_real_models_train_and_finalize(request, model_name):
    model = make_timm(model_name) if model_name.startswith("mobilenet") else request.getfixturevalue(model_name)
    keys = list(model.state_dict())
    prepare_dkm(model, PalettizeConfig(bits=2, method="dkm", dkm_iters=1))
    losses = _train(model, steps=2, lr=0.01, size=32)
    assert all(math.isfinite(v) for v in losses)
    palettize_(model, PalettizeConfig(bits=2, method="dkm"))
    assert list(model.state_dict()) == keys
    for name, module in find_target_modules(model):
        assert module.weight.unique().numel() <= 4, name
        palette_indices(module)
    model.eval()
    out = model(torch.randn(2, 3, 32, 32))
    assert torch.isfinite(out if isinstance(out, torch.Tensor) else out.logits).all()


def test_r2_regularizer_on_prepared_model():
    """R2-Loss reaches the latent weights through DKM (its sparse gradients included)."""
    model = conv_net(4)
    reg = R2Regularizer(model, R2Config(loss="linf"))  # built before prepare_dkm: see the report to the lead
    prepare_dkm(model, bits=2)
    (model(torch.randn(2, 3, 8, 8)).sum() + reg()).backward()
    reg().backward()  # R2 alone: a sparse gradient into the DKM backward
    for _, module in find_target_modules(model):
        grad = module.parametrizations.weight.original.grad
        assert grad is not None and not grad.is_sparse and torch.isfinite(grad).all()
    # R2 sees the clustered weights: its value is that of the soft weights (eval: the warm start stays put)
    model.eval()
    with torch.no_grad():
        expected = sum(m.weight.abs().max() for _, m in find_target_modules(model))
    torch.testing.assert_close(reg().detach(), expected.float())
