"""`quant.cluster._palette`: `kmeans_1d` against a written-out float64 Lloyd and the brute-force optimum, its special
cases and errors; `count_groups`; DKM's palettes are finalized through `finalize_learned_palettes_` (tested in
test_dkm.py)."""

import itertools

import pytest
import torch

from hf_r2.quant.cluster._palette import count_groups, kmeans_1d

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


# ---- count_groups -------------------------------------------------------------------------------------------------


def test_count_groups():
    w = torch.zeros(12, 3)
    assert count_groups("fc", w, None) == 1
    assert count_groups("fc", w, 1) == 12
    assert count_groups("fc", w, 4) == 3
    with pytest.raises(ValueError, match=r"`group_size=5` does not divide the 12 output channels of layer 'fc'"):
        count_groups("fc", w, 5)
