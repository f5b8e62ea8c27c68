"""Tests of hf_r2.plots: layer selection and the PNGs (valid files, readable, large enough)."""

import numpy as np
import pytest
from conftest import assert_png

from hf_r2.plots import plot_accuracy_vs_bits, plot_layer_ranges, plot_weight_histograms, select_layers


def test_select_layers():
    names = [f"l{i}" for i in range(10)]
    assert select_layers(names, 4) == ["l0", "l3", "l6", "l9"]
    assert select_layers(names, 1) == ["l0"]
    assert select_layers(names[:3], 4) == names[:3]
    # a preferred (e.g. depthwise) layer replaces the nearest inner pick
    assert select_layers(names, 4, prefer=["l5"]) == ["l0", "l3", "l5", "l9"]
    assert select_layers(names, 4, prefer=["l3"]) == ["l0", "l3", "l6", "l9"]  # already shown
    with pytest.raises(ValueError, match="`count` must be >= 1"):
        select_layers(names, 0)


def test_plots_write_valid_pngs(tmp_path):
    rng = np.random.default_rng(0)
    weights = {"baseline": {"a": rng.normal(size=500), "b": rng.standard_t(2, size=(8, 8))},
               "linf": {"a": rng.uniform(-1, 1, size=500), "b": rng.uniform(-1, 1, size=64)}}
    assert_png(plot_weight_histograms(weights, tmp_path / "h.png", title="t"))
    stats = {label: {layer: {"min": float(w.min()), "max": float(w.max()), "std": float(w.std())}
                     for layer, w in layers.items()} for label, layers in weights.items()}
    assert_png(plot_layer_ranges(stats, tmp_path / "sub" / "r.png"))
    curves = {"baseline": {"PTQ": {8: 66.0, 4: 63.0, 2: 50.0}, "clustering": {2: 60.0, 1: 40.0}},
              "linf": {"PTQ": {8: 65.5, 4: 64.9, 2: 62.0}, "clustering": {2: 64.0, 1: 60.0}}}
    assert_png(plot_accuracy_vs_bits(curves, tmp_path / "b.png", fp={"baseline": 66.2, "linf": 65.5}))
    assert_png(plot_accuracy_vs_bits(curves, tmp_path / "b2.png"))
    with pytest.raises(ValueError, match="`weights` is empty"):
        plot_weight_histograms({}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="`curves` is empty"):
        plot_accuracy_vs_bits({}, tmp_path / "x.png")


def test_accuracy_vs_bits_draws_measured_points_only(tmp_path, monkeypatch):
    """Markers at every measured width; a line only between neighbouring measured widths (none from FP to a 2-bit
    k-means point across the 8 and 4 bits it never measured)."""
    import hf_r2.plots as plots

    figures = []
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or save(fig, path))
    curves = {"baseline": {"PTQ": {8: 66.0, 4: 63.0, 2: 50.0}, "k-means": {2: 60.0}},
              "linf": {"PTQ": {8: 65.5, 2: 62.0}, "k-means": {2: 64.0, 1: 58.0}}}
    assert_png(plot_accuracy_vs_bits(curves, tmp_path / "b.png", fp={"baseline": 66.2, "linf": 65.5}))
    (ax,) = figures[-1].axes
    segments = []  # x positions: FP 0, then 8, 4, 2 and 1 bits at 1 to 4
    for line in ax.lines:
        xs = [int(x) for x in line.get_xdata()]
        assert line.get_marker() not in (None, "", "None", " ")  # every measured point has its marker
        assert xs == sorted(xs) and all(b - a == 1 for a, b in zip(xs, xs[1:]))  # no segment spans a gap
        if len(xs) == 1:
            assert line.get_linestyle() in ("None", "none", "")  # a lone point: a marker, no line
        segments.extend(zip(xs, xs[1:]))
    # the lines joined exactly the measured neighbours: FP-8-4-2 (baseline PTQ), FP-8 (linf PTQ), 2-1 (linf k-means)
    assert sorted(segments) == [(0, 1), (0, 1), (1, 2), (2, 3), (3, 4)]
    points = sorted((int(x), float(y)) for line in ax.lines for x, y in zip(line.get_xdata(), line.get_ydata()))
    expected = sorted([(0, 66.2), (1, 66.0), (2, 63.0), (3, 50.0), (0, 66.2), (3, 60.0),
                       (0, 65.5), (1, 65.5), (3, 62.0), (0, 65.5), (3, 64.0), (4, 58.0)])
    assert points == expected
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    assert labels == ["baseline (PTQ)", "baseline (k-means)", "linf (PTQ)", "linf (k-means)"]


def test_plot_budget_curves_leaves_gaps_for_missing_values(tmp_path, monkeypatch):
    """None and NaN are gaps, never zeros; one budget gives markers; no curve at all is refused."""
    from matplotlib.axes import Axes

    from hf_r2.plots import plot_budget_curves

    drawn = []
    plot = Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda ax, xs, ys, *a, **k: drawn.append((list(xs), list(ys), k.get(
        "linestyle"))) or plot(ax, xs, ys, *a, **k))
    gains = {"W2A8": {"R2": {2.0: 5.0, 4.0: None, 6.0: 7.0}, "QAT": {2.0: float("nan"), 4.0: 3.0, 6.0: 4.0}}}
    path = plot_budget_curves({"gain": gains}, tmp_path / "b.png", levels={"W2A8": 9.0},
                              budgets={2.0: "2 ep", 4.0: "4 ep", 6.0: "6 ep"})
    assert_png(path)
    assert sorted(drawn) == [([2.0], [5.0], "none"), ([4.0, 6.0], [3.0, 4.0], "--"), ([6.0], [7.0], "none")]
    drawn.clear()
    assert_png(plot_budget_curves({"gain": {"W1": {"R2": {2.0: 1.5}}}}, tmp_path / "one.png"))
    assert drawn == [([2.0], [1.5], "none")]
    with pytest.raises(ValueError, match="`panels` holds no curve"):
        plot_budget_curves({"gain": {}}, tmp_path / "none.png")
