"""`kmeans_1d`, `palettize` / `palettize_`, `palette_indices` and `PalettizeConfig` (hf_r2.quant.palettize)."""

import copy
import itertools
import json

import pytest
import torch
from conftest import conv_net, make_timm
from torch import nn

from hf_r2 import find_target_modules
from hf_r2.quant.palettize import (
    PALETTIZE_CONFIG_NAME,
    PalettizeConfig,
    PalettizeMethod,
    kmeans_1d,
    palette_indices,
    palettize,
    palettize_,
)

# ---- references ---------------------------------------------------------------------------------------------------


def _lloyd_reference(x: torch.Tensor, k: int, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain float64 Lloyd on one row, written out: quantile init at sorted positions floor((j + 1/2) n / k) (or the
    distinct values when there are at most k), nearest centroid by |x - c| (ties to the lower), means, until the
    assignment is stable."""
    x = x.double()
    n = x.numel()
    s = torch.sort(x).values
    distinct = torch.unique(s)
    if distinct.numel() <= k:
        c = torch.cat([distinct, distinct[-1:].expand(k - distinct.numel())])
    else:
        c = torch.stack([s[min(int((j + 0.5) * n / k), n - 1)] for j in range(k)])
    assign = None
    for _ in range(iters):
        # nearest centroid, ties to the lower one: argmin over the distance, first index on ties
        new = (x[:, None] - c[None, :]).abs().argmin(dim=1)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        c = torch.stack([x[assign == j].mean() if (assign == j).any() else c[j] for j in range(k)])
    c = torch.sort(c).values
    return c, (x[:, None] - c[None, :]).abs().argmin(dim=1)


def _sse(x: torch.Tensor, c: torch.Tensor, idx: torch.Tensor) -> float:
    return float(((x.double() - c.double()[idx]) ** 2).sum())


def _optimal_sse(x: torch.Tensor, k: int) -> float:
    """Exhaustive optimum of 1-D k-means: the best split of the sorted values into at most k contiguous runs."""
    s = torch.sort(x.double()).values
    n = s.numel()
    best = float("inf")
    for m in range(1, min(k, n) + 1):
        for cuts in itertools.combinations(range(1, n), m - 1):
            edges = (0, *cuts, n)
            sse = sum(float(((s[a:b] - s[a:b].mean()) ** 2).sum()) for a, b in zip(edges[:-1], edges[1:]))
            best = min(best, sse)
    return best


def _dp_sse(x: torch.Tensor, k: int) -> float:
    """The same optimum by dynamic programming over all values (O(k n^2)), for rows too long to enumerate."""
    s = torch.sort(x.double()).values
    n = s.numel()
    p1 = torch.cat([s.new_zeros(1), s.cumsum(0)])
    p2 = torch.cat([s.new_zeros(1), (s * s).cumsum(0)])
    a, b = torch.arange(n + 1)[:, None], torch.arange(n + 1)[None, :]
    cost = p2[b] - p2[a] - (p1[b] - p1[a]) ** 2 / (b - a).clamp(min=1)
    cost = torch.where(b > a, cost, torch.full_like(cost, float("inf")))
    best = cost[0].clone()  # at most m clusters over s[:b], m = 1
    for _ in range(k - 1):
        best = torch.minimum(best, (best[:, None] + cost).min(0).values)
    return float(best[n])


def _assert_lloyd_fixed_point(x: torch.Tensor, c: torch.Tensor, idx: torch.Tensor) -> None:
    assert torch.equal(idx, (x[:, None] - c[None, :]).abs().argmin(dim=1))  # nearest centroid
    for j in idx.unique():  # every used centroid is the mean of its values
        torch.testing.assert_close(c[j], x[idx == j].mean())


# ---- kmeans_1d ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 4, 16])
@pytest.mark.parametrize("dist", ["normal", "laplace", "bimodal"])
def test_kmeans_1d_quantile_init_matches_written_out_lloyd(k, dist):
    g = torch.Generator().manual_seed(k)
    n = 300
    if dist == "normal":
        x = torch.randn(5, n, generator=g)
    elif dist == "laplace":
        x = torch.distributions.Laplace(0.0, 1.0).sample((5, n))
    else:
        x = torch.randn(5, n, generator=g) * 0.2 + torch.randint(0, 2, (5, n), generator=g) * 3 - 1.5
    centroids, indices = kmeans_1d(x, k, iters=100, init="quantile")
    assert centroids.shape == (5, k) and centroids.dtype == x.dtype
    assert indices.shape == x.shape and indices.dtype == torch.long
    for row in range(5):
        ref_c, ref_idx = _lloyd_reference(x[row], k, iters=100)
        torch.testing.assert_close(centroids[row].double(), ref_c, rtol=0, atol=1e-6)
        assert torch.equal(indices[row], ref_idx)
    assert torch.all(centroids[:, 1:] >= centroids[:, :-1])


def test_kmeans_1d_is_optimal_on_small_rows():
    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        n, k = 4 + trial % 7, 2 + trial % 3
        x = torch.randn(n, generator=g, dtype=torch.float64)
        c, idx = kmeans_1d(x, k)  # "auto" = "dp": the global optimum for rows up to max(32, 8k) values
        opt = _optimal_sse(x, k)
        assert _dp_sse(x, k) == pytest.approx(opt, rel=1e-12, abs=1e-14)  # the two references agree
        assert _sse(x, c, idx) == pytest.approx(opt, rel=1e-9, abs=1e-14), (n, k)
        _assert_lloyd_fixed_point(x, c, idx)
    x = torch.randn(3, 32, generator=g, dtype=torch.float64)  # a batch of rows, each optimal
    c, idx = kmeans_1d(x, 4)
    for row in range(3):
        assert _sse(x[row], c[row], idx[row]) == pytest.approx(_dp_sse(x[row], 4), rel=1e-9)
    # well-separated clusters: exactly those, whichever initialisation
    x = torch.tensor([0.0, 0.1, 0.2, 5.0, 5.1, 9.0, 9.3, 9.4], dtype=torch.float64)
    for init in ("dp", "quantile"):
        c, idx = kmeans_1d(x, 3, init=init)
        torch.testing.assert_close(c, torch.tensor([0.1, 5.05, (9.0 + 9.3 + 9.4) / 3], dtype=x.dtype))


@pytest.mark.parametrize("n, k, bound", [(200, 16, 1.05), (600, 8, 1.02), (600, 4, 1.005)])
def test_kmeans_1d_near_optimal_on_larger_rows(n, k, bound):
    g = torch.Generator().manual_seed(n + k)
    x = torch.randn(4, n, generator=g, dtype=torch.float64)
    c, idx = kmeans_1d(x, k)
    cq, idxq = kmeans_1d(x, k, init="quantile")
    ratios, ratios_q = [], []
    for row in range(4):
        opt = _dp_sse(x[row], k)
        ratios.append(_sse(x[row], c[row], idx[row]) / opt)
        ratios_q.append(_sse(x[row], cq[row], idxq[row]) / opt)
        assert ratios[-1] >= 1 - 1e-9 and ratios_q[-1] >= 1 - 1e-9
        _assert_lloyd_fixed_point(x[row], c[row], idx[row])
    assert max(ratios) <= bound, ratios
    assert sum(ratios) <= sum(ratios_q) + 1e-9  # never worse than plain Lloyd from quantiles, here
    if k == 16:  # where quantile-initialised Lloyd stalls in a poor local optimum
        assert sum(ratios_q) / 4 > 1.2, ratios_q


def test_kmeans_1d_special_cases():
    # constant and all-zero rows: k copies of the value, no NaN
    x = torch.stack([torch.zeros(50), torch.full((50,), 0.25), torch.randn(50)])
    c, idx = kmeans_1d(x, 4)
    assert torch.isfinite(c).all()
    assert torch.equal(c[0], torch.zeros(4)) and torch.equal(c[1], torch.full((4,), 0.25))
    assert torch.equal(c.gather(1, idx)[:2], x[:2])
    # at most k distinct values: reproduced exactly, even with very unequal counts (quantile init alone would not)
    v = torch.tensor([-1.0, 0.5, 2.0])
    x = v[torch.tensor([0] * 2 + [1] * 95 + [2] * 3)]
    c, idx = kmeans_1d(x, 4)
    assert torch.equal(c, torch.tensor([-1.0, 0.5, 2.0, 2.0]))
    assert torch.equal(c[idx], x)
    # fewer values than centroids
    c, idx = kmeans_1d(torch.tensor([3.0, 1.0]), 8)
    assert torch.equal(c[idx], torch.tensor([3.0, 1.0])) and torch.isfinite(c).all()
    # 1-D in, 1-D out; iters=0 is the initialisation alone
    c, idx = kmeans_1d(torch.arange(8.0), 2, iters=0, init="quantile")
    assert c.shape == (2,) and idx.shape == (8,)
    torch.testing.assert_close(c, torch.tensor([2.0, 6.0]))
    # an empty cluster keeps its centroid (a gap in the data between two initial centroids)
    x = torch.tensor([0.0, 0.0, 0.0, 10.0, 10.0, 10.0, 10.0, 10.1])
    c, idx = kmeans_1d(x, 4)
    assert torch.isfinite(c).all() and torch.equal(c, torch.sort(c).values)


def test_kmeans_1d_errors():
    with pytest.raises(ValueError, match="floating point"):
        kmeans_1d(torch.arange(5), 2)
    with pytest.raises(ValueError, match=r"shape \(n,\) or \(G, n\)"):
        kmeans_1d(torch.zeros(2, 2, 2), 2)
    with pytest.raises(ValueError, match=r"shape \(n,\) or \(G, n\)"):
        kmeans_1d(torch.zeros(3, 0), 2)
    with pytest.raises(ValueError, match="`k` must be an integer >= 1, got 0"):
        kmeans_1d(torch.zeros(4), 0)
    with pytest.raises(ValueError, match="`iters` must be an integer >= 0, got -1"):
        kmeans_1d(torch.zeros(4), 2, iters=-1)
    with pytest.raises(ValueError, match="NaN or infinite"):
        kmeans_1d(torch.tensor([0.0, float("nan")]), 2)
    with pytest.raises(
        ValueError, match="`init` must be 'auto', 'dp' \\(k <= 64\\) or 'quantile', got 'kmeans\\+\\+'"
    ):
        kmeans_1d(torch.zeros(4), 2, init="kmeans++")
    with pytest.raises(ValueError, match="got 'dp' with k=128"):
        kmeans_1d(torch.zeros(4), 128, init="dp")


# ---- palettize ----------------------------------------------------------------------------------------------------


def _distinct_per_group(w: torch.Tensor, groups: int) -> int:
    return max(row.unique().numel() for row in w.reshape(groups, -1))


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_palettize_copy_per_tensor(bits):
    model = conv_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pmodel = palettize(model, PalettizeConfig(bits=bits))
    assert pmodel is not model
    for k, v in model.state_dict().items():  # the original is untouched
        assert torch.equal(v, before[k]), k
    assert not hasattr(model[0], "weight_palette")
    assert list(pmodel.state_dict()) == list(before)  # same keys: the palette buffer is not persistent
    targets = dict(find_target_modules(pmodel))
    for name, module in targets.items():
        w0 = before[f"{name}.weight"]
        palette = module.weight_palette
        assert palette.shape == (1, 2**bits) and palette.dtype == w0.dtype
        assert torch.all(palette[:, 1:] >= palette[:, :-1])
        n_distinct = module.weight.unique().numel()
        assert n_distinct <= 2**bits
        if bits == 1:  # 1 bit: exactly 2 values for a generic weight
            assert n_distinct == 2
        # each weight is its nearest palette entry (the k-means result on the original weight)
        c, idx = kmeans_1d(w0.reshape(1, -1), 2**bits, 50)
        assert torch.equal(palette, c)
        assert torch.equal(module.weight, c[0][idx[0]].reshape(w0.shape))
        nearest = (w0.reshape(-1, 1) - palette[0]).abs().argmin(1)
        assert torch.equal(module.weight.reshape(-1), palette[0][nearest])
    for k, v in pmodel.state_dict().items():  # biases and BN untouched
        if not k.endswith("weight") or k.startswith("1."):
            assert torch.equal(v, before[k]), k
    assert torch.isfinite(pmodel(torch.randn(2, 3, 8, 8))).all()


def test_palettize_in_place_kwargs_and_idempotent():
    model = conv_net()
    ref = palettize(model, PalettizeConfig(bits=2, group_size=2, exclude=["^7$"]))
    same = palettize_(model, bits=2, group_size=2, exclude=["^7$"])
    assert same is model
    for (k, v), v2 in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(v, v2), k
    override = palettize(conv_net(), PalettizeConfig(bits=8, exclude=["^7$"]), bits=2, group_size=2)
    assert override[0].weight_palette.shape == (4, 4)
    # palettizing again changes nothing, palette included
    again = palettize(model, PalettizeConfig(bits=2, group_size=2, exclude=["^7$"]))
    for name, module in find_target_modules(model, exclude=["^7$"]):
        other = again.get_submodule(name)
        assert torch.equal(module.weight, other.weight), name
        assert torch.equal(module.weight_palette, other.weight_palette), name


@pytest.mark.parametrize("group_size, groups", [(1, [8, 8, 6, 5]), (2, [4, 4, 3, None])])
def test_palettize_group_size(group_size, groups):
    model = conv_net()
    if None in groups:  # 2 does not divide the head's 5 outputs: a clear error, nothing changed
        before = copy.deepcopy(model.state_dict())
        with pytest.raises(ValueError, match=r"`group_size=2` does not divide the 5 output channels of layer '7'"):
            palettize_(model, bits=2, group_size=2)
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), k
        assert not hasattr(model[0], "weight_palette")
        palettize_(model, bits=2, group_size=2, exclude=[r"^7$"])  # the fix the message suggests
        groups = groups[:3]
        assert not hasattr(model[7], "weight_palette")
    else:
        palettize_(model, bits=2, group_size=group_size)
    for (name, module), g in zip(find_target_modules(model), groups):
        assert module.weight_palette.shape == (g, 4), name
        assert _distinct_per_group(module.weight, g) <= 4
        # each group's weights come from its own palette row
        rows = module.weight.reshape(g, -1)
        for r in range(g):
            assert set(rows[r].tolist()) <= set(module.weight_palette[r].tolist())
    # per-channel palettes are not all the same (the groups are clustered separately)
    assert not torch.equal(model[0].weight_palette[0], model[0].weight_palette[1])


def test_palettize_constant_zero_and_dtypes():
    lin = nn.Linear(4, 6)
    with torch.no_grad():
        lin.weight.zero_()
        lin.weight[3:].fill_(0.5)
    palettize_(lin, bits=2, group_size=3)
    assert torch.isfinite(lin.weight_palette).all()
    assert torch.equal(lin.weight[:3], torch.zeros(3, 4)) and torch.equal(lin.weight[3:], torch.full((3, 4), 0.5))
    assert torch.equal(palette_indices(lin), torch.zeros(6, 4, dtype=torch.uint8))
    for dtype in (torch.float64, torch.bfloat16):
        lin = nn.Linear(16, 4).to(dtype)
        palettize_(lin, bits=2)
        assert lin.weight.dtype == dtype and lin.weight_palette.dtype == dtype
        idx = palette_indices(lin)
        assert torch.equal(lin.weight_palette[0][idx.long()], lin.weight)


def test_palette_indices():
    model = palettize(conv_net(), PalettizeConfig(bits=3, group_size=2, exclude=["7"]))
    conv = model[3]  # depthwise, (8, 1, 3, 3), 4 groups
    idx = palette_indices(conv)
    assert idx.dtype == torch.uint8 and idx.shape == conv.weight.shape
    rows = idx.reshape(4, -1).long()
    assert torch.equal(conv.weight_palette.gather(1, rows).reshape(conv.weight.shape), conv.weight)
    with pytest.raises(ValueError, match="no `weight_palette` buffer"):
        palette_indices(model[7])
    with torch.no_grad():
        conv.weight.add_(1e-3)
    with pytest.raises(ValueError, match="no longer holds only values of its `weight_palette`"):
        palette_indices(conv)


@pytest.mark.parametrize("model_name", ["timm_cnn", "hf_resnet", "hf_convnext", "mobilenetv3_small_050"])
def test_palettize_real_models(request, model_name):
    if model_name.startswith("mobilenet"):  # depthwise and squeeze-excite convs, 0.6M parameters
        model = make_timm(model_name)
    else:
        model = request.getfixturevalue(model_name)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    keys = list(model.state_dict())
    pmodel = palettize(model, PalettizeConfig(bits=2, skip_first_last=True))
    assert list(pmodel.state_dict()) == keys
    targets = find_target_modules(pmodel)
    assert not hasattr(targets[0][1], "weight_palette") and not hasattr(targets[-1][1], "weight_palette")
    for name, module in targets[1:-1]:
        assert module.weight.unique().numel() <= 4, name
        palette_indices(module)
    out = pmodel(x)
    logits = out if isinstance(out, torch.Tensor) else out.logits
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    # the palettized weights load into a plain model of the same architecture
    plain = copy.deepcopy(model)
    plain.load_state_dict(pmodel.state_dict(), strict=True)


def test_first_last_bits_gives_the_end_layers_wider_palettes(timm_cnn):
    """first_last_bits=8: the first and last target layer get max(8, bits)-bit palettes (k-means of their own), the
    others `bits`; each layer's palette equals kmeans_1d of its own weights at its own palette size."""
    model = timm_cnn.eval()
    targets = [name for name, _ in find_target_modules(model)]
    out = palettize(model, PalettizeConfig(bits=1, first_last_bits=8))
    for index, name in enumerate(targets):
        k = 256 if index in (0, len(targets) - 1) else 2
        module = out.get_submodule(name)
        assert module.weight_palette.shape == (1, k), name
        palette, _ = kmeans_1d(model.get_submodule(name).weight.detach().reshape(1, -1), k, 50)
        assert torch.allclose(module.weight_palette, palette.to(module.weight_palette.dtype)), name
        assert module.weight.unique().numel() <= k
    # first_last_bits below bits changes nothing: the end layers get max(first_last_bits, bits)
    same = palettize(model, PalettizeConfig(bits=2, first_last_bits=1))
    ref = palettize(model, PalettizeConfig(bits=2))
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), ref.state_dict().values()))
    assert PalettizeConfig(bits=2, first_last_bits=8).layer_bits(0, 5) == 8
    assert PalettizeConfig(bits=2, first_last_bits=8).layer_bits(2, 5) == 2


# ---- PalettizeConfig ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        PalettizeConfig(),
        PalettizeConfig(bits=4, method="dkm", group_size=16, include=["layer"], exclude=["fc"], temperature=0.5),
        PalettizeConfig(bits=1, method=PalettizeMethod.KMEANS, skip_first_last=True, kmeans_iters=5, dkm_iters=1),
        PalettizeConfig(bits=1, first_last_bits=8),
    ],
)
def test_config_json_round_trip(tmp_path, config):
    path = config.save_pretrained(tmp_path)
    assert path.endswith(PALETTIZE_CONFIG_NAME)
    with open(path) as f:
        data = json.load(f)
    assert data["bits"] == config.bits and "hf_r2_version" in data
    loaded = PalettizeConfig.from_pretrained(tmp_path)
    assert loaded == config and loaded.to_dict() == config.to_dict()
    assert PalettizeConfig.from_pretrained(path) == config
    assert isinstance(loaded.method, str) and config.num_centroids == 2**config.bits


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"bits": 0}, r"`bits` must be an integer from 1 to 8 \(2\^bits centroids\), got 0"),
        ({"bits": 9}, "`bits` must be an integer from 1 to 8"),
        ({"bits": True}, "`bits` must be an integer from 1 to 8"),
        (
            {"method": "k-means"},
            r"`method` must be one of 'kmeans', 'dkm', got 'k-means'. Did you mean `method='kmeans'`",
        ),
        ({"method": "lloyd"}, "`method` must be one of 'kmeans', 'dkm', got 'lloyd'"),
        ({"group_size": 0}, r"`group_size` must be a positive integer .* got 0"),
        ({"group_size": "4"}, r"`group_size` must be a positive integer .* got '4'"),
        ({"skip_first_last": 1}, "`skip_first_last` must be `True` or `False`, got 1"),
        ({"first_last_bits": 0}, "`first_last_bits` must be an integer from 1 to 8 or `None`, got 0"),
        ({"first_last_bits": 8, "skip_first_last": True}, "`skip_first_last=True` leaves the first and last layer"),
        ({"kmeans_iters": 0}, "`kmeans_iters` must be an integer >= 1, got 0"),
        ({"dkm_iters": 1.5}, "`dkm_iters` must be an integer >= 1, got 1.5"),
        ({"temperature": 0.0}, "`temperature` must be a finite number > 0 .* got 0.0"),
        ({"temperature": float("inf")}, "`temperature` must be a finite number > 0 .* got inf"),
        ({"temperature": "1"}, "`temperature` must be a finite number > 0 .* got '1'"),
        ({"include": ["("]}, "`include` holds an invalid regular expression"),
        ({"exclude": 3}, "`exclude` must be a list of regular expressions"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PalettizeConfig(**kwargs)


def test_config_misc_errors():
    with pytest.raises(ValueError, match=r"Unknown `PalettizeConfig` field\(s\) \['bit'\]"):
        PalettizeConfig.from_dict({"bit": 2})
    with pytest.raises(ValueError, match=r"Unknown `PalettizeConfig` field\(s\) \['n_bits'\]"):
        palettize(conv_net(), n_bits=2)
    with pytest.raises(TypeError, match="`config` must be a `PalettizeConfig` or `None`, got dict"):
        palettize(conv_net(), {"bits": 2})
    with pytest.raises(ValueError, match="No target layer left"):
        palettize(conv_net(), include=["nothing_matches"])
    assert PalettizeConfig(temperature=2).temperature == 2.0
