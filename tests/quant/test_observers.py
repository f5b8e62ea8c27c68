"""`hf_r2.quant.observers.RangeObserver` against references written out here: the min/max grid in float64,
`numpy.quantile`, a brute-force search over the clip ratios, and the statistics of reservoir sampling."""

import numpy as np
import pytest
import torch

from hf_r2.quant.observers import RangeObserver

RATIOS = np.linspace(1.0, 0.2, 100)


# ---- references (float64) ---------------------------------------------------------------------------------------


def ref_grid(lo: float, hi: float, bits: int) -> tuple[float, float]:
    """Scale and zero point of the asymmetric grid over `[min(lo, 0), max(hi, 0)]`."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    s = (hi - lo) / (2**bits - 1)
    return s, (float(np.round(-lo / s)) if s > 0 else 0.0)


def ref_fake(x: np.ndarray, s: float, z: float, bits: int) -> np.ndarray:
    if s == 0:
        return np.zeros_like(x)
    return (np.clip(np.round(x / s + z), 0, 2**bits - 1) - z) * s


def sq_err(x: np.ndarray, s: float, z: float, bits: int) -> float:
    return float(((ref_fake(x, s, z, bits) - x) ** 2).sum())


def observe(method: str, batches, **kwargs) -> RangeObserver:
    obs = RangeObserver(method, **kwargs)
    for b in batches:
        obs.update(b)
    return obs


def batches(seed: int = 0, kind: str = "normal", n: int = 5, shape=(4, 8, 6, 6)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        x = torch.randn(shape, generator=g) * (0.5 + i * 0.3) + 0.2 * i
        if kind == "laplace":
            x = torch.sign(x) * torch.empty(shape).exponential_(generator=g)
        if kind == "outliers":
            x = x.flatten()
            x[torch.randint(0, x.numel(), (3,), generator=g)] *= 25.0
            x = x.reshape(shape)
        if kind == "relu":
            x = x.clamp_min(0)
        out.append(x)
    return out


def all_values(bs) -> np.ndarray:
    return torch.cat([b.flatten() for b in bs]).double().numpy()


def as_floats(qparams) -> tuple[float, float]:
    s, z = qparams
    assert s.dim() == 0 and z.dim() == 0 and s.dtype == torch.float32 and z.dtype == torch.float32
    return float(s), float(z)


# ---- min-max ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("kind", ["normal", "relu", "outliers"])
def test_minmax_is_the_grid_of_the_true_range(bits, kind):
    bs = batches(kind=kind)
    data = all_values(bs)
    obs = observe("minmax", bs)
    assert float(obs.min) == data.min() and float(obs.max) == data.max()
    assert obs.count == data.size
    s, z = as_floats(obs.qparams(bits))
    s_ref, z_ref = ref_grid(data.min(), data.max(), bits)
    assert s == pytest.approx(s_ref, rel=1e-6)
    assert z == z_ref
    # the grid covers the whole range: nothing is clipped by more than half a step
    assert (np.abs(ref_fake(data, s, z, bits) - data) <= s / 2 * (1 + 1e-5)).all()


# ---- percentile ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("percentile", [99.0, 99.9, 100.0])
@pytest.mark.parametrize("kind", ["normal", "outliers", "relu"])
def test_percentile_matches_numpy_quantile_when_the_data_fits(percentile, kind):
    bs = batches(kind=kind)
    data = all_values(bs)
    obs = observe("percentile", bs, percentile=percentile, sample_size=data.size)
    q_lo, q_hi = np.quantile(data, [1 - percentile / 100, percentile / 100])
    s, z = as_floats(obs.qparams(4))
    s_ref, z_ref = ref_grid(q_lo, q_hi, 4)
    assert s == pytest.approx(s_ref, rel=1e-6)
    assert z == z_ref
    if kind == "outliers" and percentile < 100:
        # outliers are clipped: the range is much narrower than min-max
        s_mm, _ = as_floats(observe("minmax", bs).qparams(4))
        assert s < 0.5 * s_mm


# ---- MSE ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("kind", ["normal", "laplace", "outliers", "relu"])
def test_mse_error_is_minimal_and_never_above_minmax(bits, kind):
    bs = batches(kind=kind, n=3)
    data = all_values(bs)
    s, z = as_floats(observe("mse", bs, sample_size=data.size).qparams(bits))
    s_mm, z_mm = as_floats(observe("minmax", bs).qparams(bits))
    err, err_mm = sq_err(data, s, z, bits), sq_err(data, s_mm, z_mm, bits)
    assert err <= err_mm * (1 + 1e-6)
    # brute force over the 100 clip ratios, in float64
    lo, hi = min(data.min(), 0.0), max(data.max(), 0.0)
    best = min(sq_err(data, *ref_grid(lo * r, hi * r, bits), bits) for r in RATIOS)
    assert err <= best * (1 + 1e-4)
    if (kind == "laplace" and bits <= 4) or (kind == "outliers" and bits == 4):
        assert err < 0.8 * err_mm  # heavy tails: clipping pays off


# ---- the reservoir ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("first_batch", [300, 5000])
def test_reservoir_is_bounded_and_uniform(first_batch):
    size = 1000
    obs = RangeObserver("percentile", sample_size=size, seed=0)
    # the values are their own global positions, so the sample shows which positions were kept
    sizes = [first_batch] + [700] * 200
    start = 0
    for n in sizes:
        x = torch.arange(start, start + n, dtype=torch.float32)
        before = x.clone()
        obs.update(x)
        assert torch.equal(x, before), "the observer changed its input"
        assert obs._sample.numel() <= size
        start += n
    total = start
    sample = obs._sample.double().numpy()
    assert sample.size == size
    assert np.unique(sample).size == size  # each position at most once
    assert ((sample >= 0) & (sample < total)).all()
    # uniform over all positions: 10 equal bins, each about size / 10 = 100 (binomial sd ~9.5)
    counts = np.histogram(sample, bins=10, range=(0, total))[0]
    assert (np.abs(counts - size / 10) < 45).all(), counts
    assert abs(sample.mean() / total - 0.5) < 0.04
    # the first batch is not over-represented
    assert (sample < first_batch).sum() <= first_batch / total * size + 45


def _sequential_reservoir(batches, size, seed):
    """The reservoir one value at a time, from the same random draws as the observer's bulk update: each kept value
    overwrites its slot in turn, so of two values drawn for one slot the later stays."""
    generator = torch.Generator().manual_seed(seed)
    sample, seen = [], 0
    for x in batches:
        x = x.reshape(-1).double()
        taken = x[: size - len(sample)].tolist()
        sample += taken
        x, seen = x[len(taken):], seen + len(taken)
        if x.numel() == 0:
            continue
        positions = torch.arange(seen + 1, seen + x.numel() + 1, dtype=torch.float64)
        keep = torch.rand(x.numel(), generator=generator, dtype=torch.float64) < size / positions
        idx = keep.nonzero().squeeze(1).tolist()
        if idx:
            slots = torch.randint(0, size, (len(idx),), generator=generator).tolist()
            for i, slot in zip(idx, slots):
                sample[slot] = x[i].item()
        seen += x.numel()
    return sample


@pytest.mark.parametrize("threads", [1, 2])
def test_reservoir_is_the_sequential_one_and_the_same_on_every_run(threads):
    """Many values drawn for few slots (duplicate slots in one batch): the sample is the one-at-a-time reference's,
    whatever the thread count, on every run (a bulk `sample[slots] = values` left the winner of a duplicate to the
    threads, and the demo's MSE activation ranges changed from run to run)."""
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(20000, generator=g) for _ in range(5)]
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        samples = []
        for _ in range(3):
            obs = RangeObserver("mse", sample_size=4096, seed=3)
            for x in batches:
                obs.update(x)
            samples.append(obs._sample.double())
    finally:
        torch.set_num_threads(old)
    reference = torch.tensor(_sequential_reservoir(batches, 4096, 3), dtype=torch.float64)
    for sample in samples:
        assert torch.equal(sample, reference)


def test_reservoir_keeps_everything_until_full_and_does_not_alias_the_input():
    obs = RangeObserver("mse", sample_size=50)
    x = torch.randn(2, 10)
    obs.update(x)
    assert torch.equal(obs._sample, x.flatten())
    x.mul_(100)  # the caller reuses its buffer: the sample must not change
    assert obs._sample.abs().max() < 10
    big = torch.randn(1000)
    ref = big.clone()
    obs.update(big)
    assert torch.equal(big, ref) and obs._sample.numel() == 50
    # minmax keeps no sample at all
    mm = observe("minmax", [torch.randn(10000)])
    assert mm._sample is None


# ---- signs of the data ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse"])
@pytest.mark.parametrize("bits", [2, 8])
def test_non_negative_data_gives_the_unsigned_grid(method, bits):
    bs = batches(kind="relu")
    assert min(float(b.min()) for b in bs) == 0.0
    s, z = as_floats(observe(method, bs).qparams(bits))
    assert z == 0.0 and s > 0
    assert ref_fake(np.zeros(1), s, z, bits)[0] == 0.0
    # strictly positive data: still z = 0 (0 is always in the range)
    pos = [b + 1.0 for b in bs]
    s, z = as_floats(observe(method, pos).qparams(bits))
    assert z == 0.0
    if method == "minmax":
        assert s == pytest.approx(max(float(b.max()) for b in pos) / (2**bits - 1), rel=1e-6)


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse"])
def test_non_positive_data_puts_zero_at_the_top_code(method):
    bs = [-b for b in batches(kind="relu")]
    s, z = as_floats(observe(method, bs).qparams(4))
    assert z == 15.0 and s > 0


def test_all_zero_data_gives_a_zero_grid():
    s, z = as_floats(observe("mse", [torch.zeros(3, 4)]).qparams(4))
    assert s == 0.0 and z == 0.0


# ---- errors ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse"])
def test_qparams_without_data_raises(method):
    obs = RangeObserver(method)
    with pytest.raises(RuntimeError, match="seen no data"):
        obs.qparams(8)
    obs.update(torch.empty(0, 3))  # an empty batch is no data either
    with pytest.raises(RuntimeError, match="seen no data"):
        obs.qparams(8)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(method="max"), "`method` must be one of 'minmax', 'percentile', 'mse', got 'max'"),
        (dict(method="min_max"), "Did you mean `method='minmax'`"),
        (dict(percentile=50), r"`percentile` must be in \(50, 100\], got 50"),
        (dict(percentile=100.5), r"`percentile` must be in \(50, 100\]"),
        (dict(sample_size=0), "`sample_size` must be a positive integer, got 0"),
        (dict(sample_size=True), "`sample_size` must be a positive integer"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RangeObserver(**kwargs)
