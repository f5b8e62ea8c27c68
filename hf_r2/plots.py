"""Figures of a baseline vs R2 comparison, as PNG files: weight histograms, per-layer ranges, accuracy against bits.

Each function takes plain numbers (arrays and dicts, no models) and writes one PNG. They draw on a matplotlib
[`~matplotlib.figure.Figure`] with the Agg canvas directly, never through `pyplot`, so they work without a display
and leave the process' matplotlib backend as it was. [`hf_r2.reproduce`] calls them on its results.

```python
>>> from hf_r2.plots import plot_accuracy_vs_bits
>>> plot_accuracy_vs_bits({"baseline": {"PTQ": {4: 63.7, 2: 62.9}}, "linf": {"PTQ": {4: 64.9, 2: 64.0}}},
...                       "acc_vs_bits.png", fp={"baseline": 66.2, "linf": 65.5})
'acc_vs_bits.png'
```
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["select_layers", "plot_weight_histograms", "plot_layer_ranges", "plot_accuracy_vs_bits", "plot_curves",
           "plot_budget_curves"]

# Bit widths on the x axis of `plot_accuracy_vs_bits`, left to right after the float point.
_BITS = (8, 4, 2, 1)
_LINESTYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "D")


def _figure(width: float, height: float, ncols: int = 1, nrows: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def _save(fig, path: str | os.PathLike) -> str:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=100, format="png")
    return path


def _colors(count: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(count)]


def select_layers(names: Sequence[str], count: int = 4, prefer: Sequence[str] = ()) -> list[str]:
    """`count` layer names spread evenly over `names` (first and last included), in their order.

    If none of the picks is in `prefer` (e.g. the depthwise convolutions), the inner pick nearest to a preferred
    layer is swapped for it, so that one layer of that kind is shown too.

    ```python
    >>> select_layers([f"l{i}" for i in range(10)], 4)
    ['l0', 'l3', 'l6', 'l9']
    ```
    """
    names = list(names)
    if count < 1:
        raise ValueError(f"`count` must be >= 1, got {count}.")
    if len(names) <= count:
        return names
    picks = [0] if count == 1 else sorted({round(i * (len(names) - 1) / (count - 1)) for i in range(count)})
    preferred = [names.index(n) for n in prefer if n in names]
    inner = picks[1:-1]
    if preferred and inner and not set(picks) & set(preferred):
        pick, index = min(((p, q) for p in inner for q in preferred), key=lambda pq: abs(pq[0] - pq[1]))
        picks = sorted(set(picks) - {pick} | {index})
    return [names[i] for i in picks]


def plot_weight_histograms(
    weights: Mapping[str, Mapping[str, np.ndarray]],
    path: str | os.PathLike,
    *,
    title: str | None = None,
    bins: int = 80,
) -> str:
    """Overlaid histograms of a few layers' weights, one panel per layer, one outline per model.

    Args:
        weights (`Mapping[str, Mapping[str, np.ndarray]]`):
            `weights[label][layer]`: the layer's weights (any shape, flattened here) in the model called `label`
            (e.g. `"baseline"`, `"linf"`). Panels follow the layers of the first label.
        path (`str` or `os.PathLike`):
            The PNG to write.
        title (`str`, *optional*):
            Figure title.
        bins (`int`, *optional*, defaults to `80`):
            Bins per histogram, shared by all models within a panel (spanning the widest range) so that outlines
            compare; the y axis is logarithmic, where outliers show.

    Returns:
        `str`: `path`.
    """
    labels = list(weights)
    if not labels:
        raise ValueError("`weights` is empty: give at least one model's layer weights.")
    layers = list(weights[labels[0]])
    if not layers:
        raise ValueError(f"`weights[{labels[0]!r}]` holds no layer.")
    ncols = min(len(layers), 4)
    nrows = math.ceil(len(layers) / ncols)
    fig, axes = _figure(4.0 * ncols, 3.2 * nrows, ncols, nrows)
    colors = _colors(len(labels))
    for ax, layer in zip(axes, layers):
        arrays = {label: np.asarray(weights[label][layer], dtype=np.float64).ravel()
                  for label in labels if layer in weights[label]}
        lo = min(float(a.min()) for a in arrays.values())
        hi = max(float(a.max()) for a in arrays.values())
        edges = np.linspace(lo, hi if hi > lo else lo + 1e-8, bins + 1)
        for color, (label, values) in zip(colors, arrays.items()):
            max_abs = float(np.abs(values).max())
            ax.hist(values, bins=edges, histtype="step", linewidth=1.4, color=color,
                    label=f"{label} (max |w| {max_abs:.3g})")
        ax.set_yscale("log")
        ax.set_title(layer, fontsize=9)
        ax.set_xlabel("weight")
        ax.legend(fontsize=7)
    for ax in axes[len(layers):]:
        ax.set_visible(False)
    axes[0].set_ylabel("count (log)")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_layer_ranges(
    stats: Mapping[str, Mapping[str, Mapping[str, float]]],
    path: str | os.PathLike,
    *,
    title: str | None = None,
) -> str:
    """Grouped bars, per layer, of `max |w|`, `std(w)` and `max |w| / std(w)`, one bar colour per model.

    Args:
        stats (`Mapping[str, Mapping[str, Mapping[str, float]]]`):
            `stats[label][layer]` with the keys `min`, `max` and `std` (as in
            [`~hf_r2.R2Regularizer.stats`]`()["per_layer"]`). Layers follow the first label's order; the x axis
            numbers them.
        path (`str` or `os.PathLike`):
            The PNG to write.
        title (`str`, *optional*):
            Figure title.

    Returns:
        `str`: `path`.
    """
    labels = list(stats)
    if not labels:
        raise ValueError("`stats` is empty: give at least one model's per-layer statistics.")
    layers = list(stats[labels[0]])
    if not layers:
        raise ValueError(f"`stats[{labels[0]!r}]` holds no layer.")
    width = max(8.0, min(40.0, 0.12 * len(layers) * len(labels) + 3))
    fig, axes = _figure(width, 8.5, 1, 3)
    colors = _colors(len(labels))
    x = np.arange(len(layers))
    bar = 0.8 / len(labels)

    def values(label: str, key: str) -> np.ndarray:
        out = []
        for layer in layers:
            s = stats[label].get(layer)
            if s is None:
                out.append(np.nan)
                continue
            max_abs = max(abs(s["min"]), abs(s["max"]))
            out.append({"max_abs": max_abs, "std": s["std"],
                        "ratio": max_abs / s["std"] if s["std"] > 0 else np.nan}[key])
        return np.asarray(out, dtype=np.float64)

    for ax, (key, ylabel) in zip(axes, (("max_abs", "max |w|"), ("std", "std(w)"), ("ratio", "max |w| / std(w)"))):
        for i, (label, color) in enumerate(zip(labels, colors)):
            ax.bar(x - 0.4 + (i + 0.5) * bar, values(label, key), width=bar, color=color, label=label)
        ax.set_ylabel(ylabel)
        ax.set_xlim(-0.6, len(layers) - 0.4)
    axes[0].legend(fontsize=8, ncols=min(len(labels), 5))
    step = max(1, len(layers) // 40)
    axes[-1].set_xticks(x[::step])
    axes[-1].set_xlabel(f"layer index (0 = {layers[0]}, {len(layers) - 1} = {layers[-1]})")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _consecutive_runs(points: Sequence[tuple[int, float]]) -> list[list[tuple[int, float]]]:
    """`(position, value)` points, sorted by position, cut into runs of consecutive positions."""
    runs: list[list[tuple[int, float]]] = []
    for point in points:
        if runs and point[0] == runs[-1][-1][0] + 1:
            runs[-1].append(point)
        else:
            runs.append([point])
    return runs


def plot_accuracy_vs_bits(
    curves: Mapping[str, Mapping[str, Mapping[int, float]]],
    path: str | os.PathLike,
    *,
    fp: Mapping[str, float] | None = None,
    title: str | None = None,
    ylabel: str = "top-1 (%)",
) -> str:
    """Accuracy against weight bits: one colour per variant, one line style and marker per family of methods.

    The x axis is categorical: `FP` (if `fp` is given), then 8, 4, 2 and 1 bits. Only measured points are drawn:
    each one has its marker, and a line joins two points only where they are neighbours on the axis, so no segment
    crosses a width that was not measured (a family measured at FP and 2 bits alone shows two markers, no line).

    Args:
        curves (`Mapping[str, Mapping[str, Mapping[int, float]]]`):
            `curves[variant][family][bits]`: the accuracy of `variant` at `bits` weight bits with the methods of
            `family` (e.g. `"PTQ"`, `"clustering"`).
        path (`str` or `os.PathLike`):
            The PNG to write.
        fp (`Mapping[str, float]`, *optional*):
            The float accuracy of each variant, drawn at `FP` with each of its families' markers, and joined to
            a family's line where that family was measured at 8 bits.
        title (`str`, *optional*):
            Figure title.
        ylabel (`str`, *optional*, defaults to `"top-1 (%)"`):
            The y axis label.

    Returns:
        `str`: `path`.
    """
    from matplotlib.lines import Line2D

    variants = list(curves)
    if not variants:
        raise ValueError("`curves` is empty: give at least one variant's accuracies.")
    families = list(dict.fromkeys(f for v in variants for f in curves[v]))
    fig, (ax,) = _figure(7.5, 4.8)
    handles: list[Any] = []  # one legend entry per variant and family, with its line style and marker
    ticks = (["FP"] if fp else []) + [str(b) for b in _BITS]
    position = {b: i + (1 if fp else 0) for i, b in enumerate(_BITS)}
    for color, variant in zip(_colors(len(variants)), variants):
        for j, family in enumerate(families):
            points = sorted((position[int(b)], a) for b, a in curves[variant].get(family, {}).items()
                            if int(b) in position and a is not None)
            if fp and variant in fp and points:
                points = [(0, fp[variant])] + points
            if not points:
                continue
            style = {"marker": _MARKERS[j % len(_MARKERS)], "color": color}
            linestyle = _LINESTYLES[j % len(_LINESTYLES)]
            for run in _consecutive_runs(points):  # a line within each run of neighbouring widths, none across gaps
                xs, ys = zip(*run)
                ax.plot(xs, ys, linestyle=linestyle if len(run) > 1 else "none", **style)
            handles.append(Line2D([], [], linestyle=linestyle, label=f"{variant} ({family})", **style))
    ax.set_xticks(range(len(ticks)), ticks)
    ax.set_xlabel("weight bits")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, fontsize=7, ncols=2)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)


def plot_curves(
    curves: Mapping[str, Mapping[float, float]],
    path: str | os.PathLike,
    *,
    title: str | None = None,
    xlabel: str = "epoch",
    ylabel: str = "validation top-1 (%)",
) -> str:
    """Training curves, one line per label: e.g. the validation top-1 after each epoch of each variant, to show
    where the float accuracy plateaus.

    Args:
        curves (`Mapping[str, Mapping[float, float]]`):
            `curves[label][x] = y` (e.g. epoch -> accuracy in %).
        path (`str` or `os.PathLike`):
            The PNG to write.
        title, xlabel, ylabel (`str`, *optional*):
            Figure title and axis labels.

    Returns:
        `str`: `path`.
    """
    labels = [label for label, points in curves.items() if points]
    if not labels:
        raise ValueError("`curves` holds no point: give at least one label with (x, y) values.")
    fig, (ax,) = _figure(7.5, 4.8)
    for color, label in zip(_colors(len(labels)), labels):
        xs, ys = zip(*sorted((float(x), float(y)) for x, y in curves[label].items()))
        ax.plot(xs, ys, marker="o", markersize=3, color=color, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)


def plot_budget_curves(
    panels: Mapping[str, Mapping[str, Mapping[str, Mapping[float, float | None]]]],
    path: str | os.PathLike,
    *,
    levels: Mapping[str, float] | None = None,
    level_label: str = "from scratch",
    budgets: Mapping[float, str] | None = None,
    title: str | None = None,
) -> str:
    """Values against a training budget, one panel each side by side: one colour per row (e.g. a low-bit setting),
    one line style and marker per curve (e.g. `"R2 fine-tune"`, `"QAT"`).

    Only measured points are drawn: a missing or NaN value is a gap, never a zero, and a line joins two points only
    where no budget between them lacks a value, so a single budget shows markers and no line.

    Args:
        panels (`Mapping[str, Mapping[str, Mapping[str, Mapping[float, float | None]]]]`):
            `panels[ylabel][row][curve][budget]`: the value of `curve` at `row` after `budget` (e.g. epochs).
        path (`str` or `os.PathLike`):
            The PNG to write.
        levels (`Mapping[str, float]`, *optional*):
            A value per row drawn across the first panel as a horizontal dash-dot line in the row's colour (e.g.
            the gain of training from scratch), named `level_label` in the legend.
        level_label (`str`, *optional*, defaults to `"from scratch"`):
            The legend entry of `levels`.
        budgets (`Mapping[float, str]`, *optional*):
            The x ticks: budget -> label (e.g. `{2.0: "2 ep\\n6.7 %"}`); default: the budgets of the points.
        title (`str`, *optional*):
            Figure title.

    Returns:
        `str`: `path`.
    """
    from matplotlib.lines import Line2D

    def measured(value: float | None) -> bool:
        return value is not None and not math.isnan(value)

    rows = list(dict.fromkeys(r for panel in panels.values() for r in panel))
    curves = list(dict.fromkeys(c for panel in panels.values() for r in panel.values() for c in r))
    if not rows or not curves:
        raise ValueError("`panels` holds no curve: give at least one row with a curve of (budget, value) points.")
    xs = sorted(budgets or {float(b) for p in panels.values() for r in p.values() for c in r.values() for b in c})
    if len(rows) > 10:
        from matplotlib import colormaps

        colors = {row: colormaps["tab20"](i % 20) for i, row in enumerate(rows)}
    else:
        colors = dict(zip(rows, _colors(len(rows))))
    fig, axes = _figure(6.0 * len(panels), 4.8, len(panels))
    for ax, (ylabel, panel) in zip(axes, panels.items()):
        for row, by_curve in panel.items():
            for j, curve in enumerate(curves):
                values = {float(b): v for b, v in by_curve.get(curve, {}).items()}
                points = [(i, x, values.get(x)) for i, x in enumerate(xs)]
                points = [(i, x, v) for i, x, v in points if measured(v)]
                style = {"color": colors[row], "marker": _MARKERS[j % len(_MARKERS)]}
                for run in _consecutive_runs([(i, (x, v)) for i, x, v in points]):
                    run_x, run_y = zip(*(xy for _, xy in run))
                    ax.plot(run_x, run_y, linestyle=_LINESTYLES[j % len(_LINESTYLES)] if len(run) > 1 else "none",
                            **style)
        ax.set_xticks(xs, [(budgets or {}).get(x, f"{x:g}") for x in xs])
        ax.set_xlabel("fine-tune budget")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(xs) == 1:
            ax.set_xlim(xs[0] - 1, xs[0] + 1)
    first = axes[0]
    for row, level in (levels or {}).items():
        if row in colors and measured(level):
            first.axhline(level, color=colors[row], linestyle="-.", linewidth=1.0)
    first.axhline(0.0, color="grey", linewidth=0.8)
    handles = [Line2D([], [], color=colors[r], label=r) for r in rows]
    handles += [Line2D([], [], color="black", linestyle=_LINESTYLES[j % len(_LINESTYLES)],
                       marker=_MARKERS[j % len(_MARKERS)], label=c) for j, c in enumerate(curves)]
    if levels and any(r in colors and measured(v) for r, v in levels.items()):
        handles.append(Line2D([], [], color="black", linestyle="-.", label=level_label))
    axes[-1].legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)
