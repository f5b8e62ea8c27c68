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
