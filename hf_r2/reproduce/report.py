"""The `hf-r2 reproduce` report: mean and std over seeds, the lambda-sweep table, `results.md` ([`format_report`])
and the plots."""

from __future__ import annotations

import os
from typing import Any

from .config import ReproduceConfig
from .variants import BASELINE, slug

__all__ = ["assemble_results", "format_report", "PAPER_TARGETS"]


# ----------------------------------------------------------------------------------------------------------------
# Summaries


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (`ddof=1`; `None` for a single value)."""
    import numpy as np

    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), (float(array.std(ddof=1)) if array.size > 1 else None)


def _summarise(config: ReproduceConfig, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """`summary[model][setting][variant] = {seeds, values, mean, std, headline}` over the headline runs."""
    first = config.seeds[0]
    summary: dict[str, Any] = {}
    for model in config.models:
        table: dict[str, Any] = {}
        for setting in ["FP", *(s["name"] for s in config.low_bit)]:
            headline = setting == "FP" or config.setting(setting)["headline"]
            seeds = config.seeds if headline else [first]
            table[setting] = {}
            for variant in config.variants:
                found = [
                    (r["seed"], r["rows"][setting]["accuracy"])
                    for r in runs
                    if r["model"] == model and variant["name"] in r["variant_names"] and r["seed"] in seeds
                    and setting in r["rows"]
                ]
                found.sort(key=lambda pair: config.seeds.index(pair[0]))
                if not found:
                    continue
                mean, std = _mean_std([a for _, a in found])
                table[setting][variant["name"]] = {"seeds": [s for s, _ in found], "values": [a for _, a in found],
                                                   "mean": mean, "std": std, "headline": headline}
        summary[model] = table
    return summary


#: The paper's gains as targets, in top-1 points of R2 over the baseline: `(setting prefix, least gain)`. FP must stay
#: within 1 point; W2A8 PTQ, W2A2 QAT and 1-bit clustering gained 8.8, 3.1 and 7.0 points on ImageNet.
PAPER_TARGETS: tuple[tuple[str, float], ...] = (("FP", -1.0), ("W2A8 ", 8.0), ("W2A2 ", 3.0), ("W1 ", 7.0))


def _target_of(setting: str) -> float | None:
    for prefix, target in PAPER_TARGETS:
        if setting == prefix or (prefix.endswith(" ") and setting.startswith(prefix)):
            return target
    return None


def _gains(config: ReproduceConfig, summary: dict[str, Any]) -> dict[str, Any]:
    """`gains[model][setting][variant] = {delta, std, target, met}` for the settings with a paper target: `delta` is
    the R2 variant's mean top-1 minus the baseline's (points), `std` the sample std of the per-seed differences
    (seeds run by both; `None` for one seed), `met` whether `delta >= target`."""
    baseline = config.baseline_variant
    out: dict[str, Any] = {}
    if baseline is None:
        return out
    for model, table in summary.items():
        rows: dict[str, Any] = {}
        for setting, cells in table.items():
            target = _target_of(setting)
            base = cells.get(baseline)
            if target is None or base is None:
                continue
            rows[setting] = {}
            for variant in config.variants:
                cell = cells.get(variant["name"])
                if variant["name"] == baseline or cell is None:
                    continue
                paired = [100 * (a - base["values"][base["seeds"].index(seed)])
                          for seed, a in zip(cell["seeds"], cell["values"]) if seed in base["seeds"]]
                delta = 100 * (cell["mean"] - base["mean"])
                rows[setting][variant["name"]] = {"delta": delta, "std": _mean_std(paired)[1] if paired else None,
                                                  "target": target, "met": delta >= target}
        out[model] = rows
    return out


def _summarise_stats(config: ReproduceConfig, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Overall weight statistics per model and variant, averaged over the headline seeds."""
    out: dict[str, Any] = {}
    for model in config.models:
        out[model] = {}
        for variant in config.variants:
            found = [r["stats"]["overall"] for r in runs
                     if r["model"] == model and variant["name"] in r["variant_names"] and r["seed"] in config.seeds]
            if found:
                out[model][variant["name"]] = {k: _mean_std([f[k] for f in found])[0] for k in found[0]}
    return out


def _sweep_table(config: ReproduceConfig, runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    sweep = config.lambda_sweep
    if not sweep:
        return None
    first = config.seeds[0]
    baseline = config.baseline_variant
    out: dict[str, Any] = {"variant": sweep["variant"], "settings": sweep["settings"], "seed": first, "models": {}}
    for model in sweep["models"]:
        rows = []
        base = next((r for r in runs if r["model"] == model and r["seed"] == first
                     and baseline in r["variant_names"]), None)
        if base is not None:
            rows.append({"lambda": 0.0, "variant": baseline, "run_dir": base["run_dir"],
                         "accuracy": {s: base["rows"][s]["accuracy"] for s in ["FP", *sweep["settings"]]
                                      if s in base["rows"]}})
        for lam in sweep["lambdas"]:
            run = next(r for r in runs if r["model"] == model and f"sweep:{lam:g}" in r["roles"])
            rows.append({"lambda": lam, "variant": run["variant"]["name"], "run_dir": run["run_dir"],
                         "accuracy": {s: run["rows"][s]["accuracy"] for s in ["FP", *sweep["settings"]]}})
        out["models"][model] = rows
    return out


# ----------------------------------------------------------------------------------------------------------------
# Report


def _variant_label(variant: dict[str, Any]) -> str:
    if variant["loss"] == BASELINE:
        return f"{variant['name']} (no R2)"
    grid = ", per channel" if variant["per_channel"] else ""
    return f"{variant['name']} (λ={variant['weight']:g}{grid})"


def _cell(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "-"
    if entry["std"] is None:
        return f"{100 * entry['mean']:.2f}"
    return f"{100 * entry['mean']:.2f} ± {100 * entry['std']:.2f}"


def _format_gains(config: ReproduceConfig, gains: dict[str, Any]) -> list[str]:
    """The section comparing R2's gains with the paper's (markdown lines; none without gains)."""
    if not any(gains.values()):
        return []
    variants = [v for v in config.variants if v["loss"] != BASELINE]
    lines = ["## R2 minus baseline, against the paper's gains", "",
             "Top-1 points of each R2 variant over the baseline (mean over the seeds both ran; ± the sample std of "
             "the per-seed differences); **bold**: the target is met. Targets from the paper's ImageNet gains: FP "
             "within 1 point (>= -1), W2A8 PTQ >= +8, W2A2 QAT >= +3, 1-bit clustering >= +7.", ""]
    for model, rows in gains.items():
        if not rows:
            continue
        lines += [f"### {model}", "", "| setting | target | " + " | ".join(v["name"] for v in variants) + " |",
                  "|---|---|" + "---|" * len(variants)]
        for setting, cells in rows.items():
            target = next(iter(cells.values()))["target"] if cells else None
            texts = []
            for v in variants:
                cell = cells.get(v["name"])
                if cell is None:
                    texts.append("-")
                    continue
                text = f"{cell['delta']:+.2f}" + (f" ± {cell['std']:.2f}" if cell["std"] is not None else "")
                texts.append(f"**{text}**" if cell["met"] else text)
            lines.append(f"| {setting} | {'' if target is None else f'{target:+g}'} | " + " | ".join(texts) + " |")
        met = sorted({s for s, cells in rows.items() for c in cells.values() if c["met"] and s != "FP"})
        lines += ["", f"Low-bit targets met on {model}: " + (", ".join(met) if met else "none") + ".", ""]
    return lines


def _low_bit_line(config: ReproduceConfig, calibration_images: int, finetune: str) -> str:
    """How the low-bit rows were made, naming only the methods the config has."""
    methods = {s["method"] for s in config.low_bit}
    parts = ["first and last layer at 8 bits in every row",
             f"PTQ and clustering rows re-estimate BN on {calibration_images} training images"]
    tuned = " and ".join(name for name, method in (("QAT", "qat"), ("DKM", "dkm")) if method in methods)
    if tuned:
        parts.append(f"{tuned} fine-tune {finetune} (AdamW lr {config.finetune_lr:g}, R2 off)")
    if any(s["rounding"] == "adaround" for s in config.low_bit):
        parts.append("AdaRound " + (f"{config.adaround_iters} iterations per layer" if config.adaround_iters
                                    else "at its default length"))
    return "Low-bit: " + "; ".join(parts) + "."


def format_report(results: dict[str, Any]) -> str:
    """The markdown of `results.md` from a [`run_reproduce`] result (or a loaded `results.json`)."""
    config = ReproduceConfig.from_dict(results["config"])
    data = results["data"]
    seeds = config.seeds
    recipe = (f"{config.max_steps} steps" if config.max_steps > 0 else f"{config.epochs:g} epoch(s)") + (
        f", batch {config.batch_size}, AdamW lr {config.lr:g} (cosine, {config.warmup_ratio:g} warm-up), weight "
        f"decay {config.weight_decay:g}"
    )
    finetune = (f"{config.finetune_max_steps} steps" if config.finetune_max_steps
                else f"{config.finetune_epochs} epoch(s)")
    lines = [
        "# R2-Loss side by side: baseline vs R2 variants, float and low-bit top-1",
        "",
        f"Data: {config.dataset}, {data['train_images']} training / {data['test_images']} test images at "
        f"{config.input_size}x{config.input_size} (subsets drawn with data seed {config.data_seed}); top-1 (%) on "
        "the test images.",
        f"Recipe, the same for every variant: {recipe}. Seeds: {seeds}; cells are mean ± std (sample std, ddof=1) "
        f"over the seeds for the headline rows; rows marked † ran on the first seed ({seeds[0]}) only. FP is the "
        "float model as trained; the low-bit rows re-estimate BN, which can put them above FP after a short training.",
        _low_bit_line(config, data["calibration_images"], finetune),
        "",
    ]
    variants = config.variants
    for model, table in results["summary"].items():
        kwargs = ", ".join(f"{k}={v}" for k, v in config.model_kwargs.get(model, {}).items())
        lines += [f"## {model}" + (f" ({kwargs})" if kwargs else ""), "",
                  "| setting | " + " | ".join(_variant_label(v) for v in variants) + " |",
                  "|---|" + "---|" * len(variants)]
        for setting, cells in table.items():
            headline = setting == "FP" or config.setting(setting)["headline"]
            label = setting if headline else f"{setting} †"
            lines.append(f"| {label} | " + " | ".join(_cell(cells.get(v["name"])) for v in variants) + " |")
        stats = results["weight_stats"].get(model, {})
        if stats:
            lines.append("| largest abs(w) | " + " | ".join(
                f"{stats[v['name']]['max_abs']:.3f}" if v["name"] in stats else "-" for v in variants) + " |")
            lines.append("| mean max abs(w)/std | " + " | ".join(
                f"{stats[v['name']]['mean_max_over_std']:.2f}" if v["name"] in stats else "-" for v in variants)
                + " |")
        plots = results.get("plots", {}).get(model, {})
        if plots:
            lines += [""] + [f"![{kind}]({os.path.relpath(path, results['output_dir'])})"
                             for kind, path in plots.items()]
        lines.append("")
    lines += _format_gains(config, results.get("gains") or {})
    sweep = results.get("lambda_sweep")
    if sweep:
        for model, rows in sweep["models"].items():
            columns = ["FP", *sweep["settings"]]
            lines += [f"## Lambda sweep: {sweep['variant']} on {model} (seed {sweep['seed']})", "",
                      "| λ | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
            for row in rows:
                lam = "0 (baseline)" if row["lambda"] == 0 else f"{row['lambda']:g}"
                lines.append(f"| {lam} | " + " | ".join(
                    f"{100 * row['accuracy'][c]:.2f}" if c in row["accuracy"] else "-" for c in columns) + " |")
            lines.append("")
    timing = results["timing"]
    lines += [
        "## Time",
        "",
        f"This invocation: {timing['seconds']:.0f} s ({timing['trained_now']} trainings run, "
        f"{timing['reused_trainings']} reused; {timing['rows_computed']} low-bit rows computed, "
        f"{timing['rows_cached']} from the cache).",
        f"All steps, including those of earlier invocations: training {timing['train_seconds_total']:.0f} s over "
        f"{timing['trainings']} trainings, low-bit rows {timing['low_bit_seconds_total']:.0f} s.",
        f"Machine: {timing['machine']}.",
        "",
    ]
    return "\n".join(lines)


def _plots(config: ReproduceConfig, results: dict[str, Any], weights: dict[str, Any],
           layer_stats: dict[str, Any]) -> dict[str, dict[str, str]]:
    """Write the PNGs of each model; returns `{model: {kind: path}}`."""
    from ..plots import plot_accuracy_vs_bits, plot_layer_ranges, plot_weight_histograms

    out: dict[str, dict[str, str]] = {}
    folder = os.path.join(config.output_dir, "plots")
    families = {"ptq": "PTQ", "kmeans": "k-means / DKM", "dkm": "k-means / DKM"}
    for model, table in results["summary"].items():
        stem = slug(model)
        paths: dict[str, str] = {}
        if weights.get(model):
            count = len(next(iter(weights[model].values())))
            paths["weight histograms"] = plot_weight_histograms(
                weights[model], os.path.join(folder, f"{stem}_weight_hist.png"),
                title=f"{model}: weights of {count} layers (seed {config.seeds[0]})")
        if layer_stats.get(model):
            paths["per-layer ranges"] = plot_layer_ranges(
                layer_stats[model], os.path.join(folder, f"{stem}_layer_ranges.png"),
                title=f"{model}: per-layer max |w|, std and their ratio (seed {config.seeds[0]})")
        curves: dict[str, dict[str, dict[int, float]]] = {}
        fp: dict[str, float] = {}
        for variant in config.variants:
            name = variant["name"]
            if name in table.get("FP", {}):
                fp[name] = 100 * table["FP"][name]["mean"]
            for setting in config.low_bit:
                entry = table.get(setting["name"], {}).get(name)
                family = families.get(setting["method"])
                if entry is None or family is None:
                    continue
                points = curves.setdefault(name, {}).setdefault(family, {})
                points[setting["w_bits"]] = max(points.get(setting["w_bits"], -1.0), 100 * entry["mean"])
        if curves:
            paths["accuracy vs bits"] = plot_accuracy_vs_bits(
                curves, os.path.join(folder, f"{stem}_accuracy_vs_bits.png"), fp=fp,
                title=f"{model}: top-1 against weight bits\n(per family, the best configured row at each bit width)")
        out[model] = paths
    return out


def assemble_results(
    config: ReproduceConfig,
    runs: list[dict[str, Any]],
    data_info: dict[str, Any],
    timing: dict[str, Any],
    weights: dict[str, Any],
    layer_stats: dict[str, Any],
) -> dict[str, Any]:
    """The contents of `results.json` from the measured `runs` (see [`run_reproduce`]): the config, the data, the
    runs, the summaries over seeds, the range statistics, the lambda sweep, the gains against [`PAPER_TARGETS`],
    the plots (written here, from `weights` / `layer_stats` of the first seed's models) and the timing (`timing`
    holds `seconds`, `trainings` and `trained_now`; the row counts and summed times are added here)."""
    rows_all = [row for r in runs for row in r["rows"].values()]
    results: dict[str, Any] = {
        "config": config.to_dict(),
        "output_dir": os.path.abspath(config.output_dir),
        "data": data_info,
        "runs": runs,
        "summary": _summarise(config, runs),
        "weight_stats": _summarise_stats(config, runs),
        "lambda_sweep": _sweep_table(config, runs),
    }
    results["gains"] = _gains(config, results["summary"])
    results["plots"] = _plots(config, results, weights, layer_stats)
    results["timing"] = {
        **timing,
        "reused_trainings": timing["trainings"] - timing["trained_now"],
        "rows_computed": sum(not row["cached"] for row in rows_all),
        "rows_cached": sum(bool(row["cached"]) for row in rows_all),
        "train_seconds_total": sum(r["train_seconds"] for r in runs),
        "low_bit_seconds_total": sum(row.get("seconds", 0.0) for row in rows_all),
        "machine": _machine(),
    }
    return results


def _machine() -> str:
    from .._utils import machine_info

    info = machine_info()
    gpu = "CUDA" if info.get("PyTorch accelerator", "").startswith("cuda") else "no GPU"
    return (f"{info['Machine']}, {info['CPU count']} CPUs, torch {info['torch version']} with "
            f"{info.get('torch threads', '?')} threads, {gpu}, load average {info['Load average']}")
