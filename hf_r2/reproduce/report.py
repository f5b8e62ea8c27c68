"""The `hf-r2 reproduce` report: `results.json` ([`assemble_results`]: summaries, sweeps, gains, plots, timing),
`results.md` ([`format_report`]) and the plots."""

from __future__ import annotations

import os
from typing import Any

from .budget import attach_budget, format_budget
from .config import ReproduceConfig
from .summary import gains, summarise, summarise_stats
from .sweep import SWEEP_RULE, WEIGHT_DECAY_RULE, sweep_tables, weight_decay_tables
from .variants import BASELINE, CHOSEN, on_model, slug

__all__ = ["assemble_results", "format_report"]


# ----------------------------------------------------------------------------------------------------------------
# Report


def _variant_label(variant: dict[str, Any], model: str, chosen: dict[str, dict[str, float | None]],
                   chosen_weight_decay: dict[str, float | None] | None = None) -> str:
    how = []
    if variant.get("weight_decay") == CHOSEN:
        wd = (chosen_weight_decay or {}).get(model)
        how.append("wd " + ("not chosen" if wd is None else f"{wd:g} chosen"))
    elif variant.get("weight_decay") is not None:
        how.append(f"wd {variant['weight_decay']:g}")
    if variant.get("init_from"):
        how.append("fine-tune" + (f" {variant['epochs']:g} ep" if variant.get("epochs") else ""))
    if variant["loss"] == BASELINE:
        how.append("no R2")
    else:
        if variant["weight"] == CHOSEN:
            lam = chosen.get(variant["name"], {}).get(model)
            weight = "none kept FP" if lam is None else f"{lam:g} chosen"
        else:
            weight = f"{variant['weight']:g}"
        how.append(f"λ={weight}" + (", per channel" if variant["per_channel"] else ""))
    if variant.get("seeds") is not None:
        how.append("seed " + ", ".join(str(s) for s in variant["seeds"]))
    return f"{variant['name']} ({', '.join(how)})"


def _cell(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "-"
    if entry["std"] is None:
        return f"{100 * entry['mean']:.2f}"
    return f"{100 * entry['mean']:.2f} ± {100 * entry['std']:.2f}"


def _sweep_cells(row: dict[str, Any], columns: list[str]) -> list[str]:
    """A sweep row's cells: test top-1 (%), the validation top-1 in parentheses where measured."""
    cells = []
    for c in columns:
        text = f"{100 * row['accuracy'][c]:.2f}" if c in row["accuracy"] else "-"
        if c in row.get("val_accuracy", {}):
            text += f" ({100 * row['val_accuracy'][c]:.2f})"
        cells.append(text)
    return cells


def _sweep_section(title: str, note: str, first: str, columns: list[str], rows: list[tuple[str, dict[str, Any]]],
                   rule: str, chosen: str | None) -> list[str]:
    """One sweep table (markdown lines): `rows` are `(label, row)`; with validation numbers, the choice (`chosen`,
    `None`: none) and the `rule` that made it."""
    validation = any(row.get("val_accuracy") for _, row in rows)
    lines = [f"## {title}", "", "Top-1 (%) on the test images" + (" (validation in parentheses)" if validation else "")
             + note + ".", "", f"| {first} | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    lines += [f"| {label} | " + " | ".join(_sweep_cells(row, columns)) + " |" for label, row in rows]
    if validation:
        lines += ["", f"Chosen on the validation split ({rule}): {chosen or 'none'}."]
    return [*lines, ""]


def _format_weight_decay_sweep(table: dict[str, Any] | None) -> list[str]:
    """The weight-decay sweep of the baseline, one table per model (markdown lines; none without a sweep)."""
    lines: list[str] = []
    for model, sweep in ((table or {}).get("models") or {}).items():
        chosen = sweep.get("chosen")
        rows = [(f"{row['weight_decay']:g} (x{row['factor']:g}" + (", default)" if row["factor"] == 1 else ")"), row)
                for row in sweep["rows"]]
        lines += _sweep_section(f"Weight-decay sweep: {table['variant']} on {model} (seed {table['seed']})",
                                "; the weight decay as a multiple of the recipe's (1: the default)", "weight decay",
                                ["FP", *table["settings"]], rows, WEIGHT_DECAY_RULE,
                                chosen and f"{chosen['weight_decay']:g} (x{chosen['factor']:g})")
    return lines


def _format_gains(config: ReproduceConfig, gains: dict[str, Any], chance: float | None = None) -> list[str]:
    """The section comparing R2's gains with the paper's (markdown lines; none without gains). Every verdict is
    [`~hf_r2.reproduce.summary.verdict`]'s, so this section, results.json and the README agree."""
    if not any(rows for rows in gains.values() if any(cells for cells in rows.values())):
        return []
    at_chance = (f" Chance is {100 * chance:.2f} %: a reference at less than 1.5x chance is marked *at chance* (a "
                 "gain over a collapsed model says less than its size; read the retention)." if chance else "")
    lines = ["## R2 minus its reference, against the paper's claims", "",
             "Top-1 points of each R2 variant over its reference (the baseline, or the variant named by its "
             "`compare_to`, e.g. the same-length fine-tune without R2; mean over the seeds both ran; ± the sample "
             "std of the per-seed differences), then reference -> R2 top-1 and retention (low-bit top-1 / float "
             "top-1 of the same model). Each claim is scored on its own method's rows: W2A8 PTQ >= +8 (the paper's "
             "MobileNet-V2 +8.83), W2A2 QAT >= +3 (MobileNet-V1 +3.09), 1-bit clustering >= +7 (ResNet-18 DKM "
             "+7.04; k-means rows are scored against it too). **Bold**: met. A low-bit gain counts only where R2's "
             "float top-1 is within 1 point of its reference's (FP row >= -1); otherwise it is marked *outside the "
             "float rule*." + at_chance, ""]
    for model, rows in gains.items():
        if not any(rows.values()):
            continue
        variants = [v for v in config.variants if on_model(v, model) and v["loss"] != BASELINE]
        lines += [f"### {model}", "", "| setting | claim, target | " + " | ".join(v["name"] for v in variants) + " |",
                  "|---|---|" + "---|" * len(variants)]
        for setting, cells in rows.items():
            if not cells:  # measured on no R2 variant (e.g. a post-training row on the baseline only)
                continue
            first = next(iter(cells.values()))
            claim = "float rule" if setting == "FP" else first["claim"]
            texts = []
            for v in variants:
                cell = cells.get(v["name"])
                if cell is None:
                    texts.append("-")
                    continue
                text = f"{cell['delta']:+.2f}" + (f" ± {cell['std']:.2f}" if cell["std"] is not None else "")
                text = f"**{text}**" if cell["met"] else text
                if cell.get("retention"):
                    ref, r2 = cell["retention"]
                    text += (f" ({100 * cell['reference_accuracy']:.2f} -> {100 * cell['accuracy']:.2f}; retention "
                             f"{100 * ref:.1f} -> {100 * r2:.1f} %)")
                if cell["verdict"] == "outside the float rule":
                    text += " *outside the float rule*"
                if chance and setting != "FP" and cell.get("reference_accuracy", 1.0) < 1.5 * chance:
                    text += " *at chance*"
                texts.append(text)
            lines.append(f"| {setting} | {claim}, {first['target']:+g} | " + " | ".join(texts) + " |")
        met = sorted({f"{c['claim']} ({s}: {name})" for s, cells in rows.items() for name, c in cells.items()
                      if c["met"] and s != "FP"})
        outside = sorted({f"{s}: {name}" for s, cells in rows.items() for name, c in cells.items()
                          if c["verdict"] == "outside the float rule" and c["delta"] >= c["target"]})
        lines += ["", f"Paper claims met on {model}: " + ("; ".join(met) if met else "none") + "."]
        if outside:
            lines.append("Gains at or above the target that do not count (outside the float rule): "
                         + "; ".join(outside) + ".")
        lines.append("")
    return lines


def _onnx_lines(results: dict[str, Any], model: str) -> list[str]:
    """One line per ONNX check of `model`'s runs: the file, its size, and ONNX Runtime's top-1 beside hf-r2's."""
    lines = []
    for run in (r for r in results["runs"] if r["model"] == model):
        for setting, row in run["rows"].items():
            check = row.get("onnx")
            if check:
                name = ", ".join(run["variant_names"]) or run["variant"]["name"]
                where = os.path.relpath(check["path"], results["output_dir"])
                lines.append(f"- ONNX Runtime, {setting}, {name} seed {run['seed']}: top-1 "
                             f"{100 * check['accuracy']:.2f} (hf-r2: {100 * row['accuracy']:.2f}); "
                             f"{check['file_bytes'] / 1024:.0f} KiB at {check['bits_per_weight']:.2f} bits a weight, "
                             f"`{where}`")
    return ["", *lines] if lines else []


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
    optimizer = "AdamW" if config.optimizer == "adamw" else f"SGD (momentum {config.momentum:g})"
    recipe = (f"{config.max_steps} steps" if config.max_steps > 0 else f"{config.epochs:g} epoch(s)") + (
        f", batch {config.batch_size}, {optimizer} lr {config.lr:g} (cosine, {config.warmup_ratio:g} warm-up), "
        f"weight decay {config.weight_decay:g}"
    )
    for model, override in config.recipes.items():
        recipe += f"; {model}: " + ", ".join(f"{k} {v:g}" for k, v in override.items())
    if config.baselines:
        recipe += "; baselines trained elsewhere: " + ", ".join(f"{m} ({p})" for m, p in config.baselines.items())
    finetune = (f"{config.finetune_max_steps} steps" if config.finetune_max_steps
                else f"{config.finetune_epochs} epoch(s)")
    lines = [
        "# R2-Loss side by side: baseline vs R2 variants, float and low-bit top-1",
        "",
        f"Data: {config.dataset}, {data['train_images']} training / {data['test_images']} test images at "
        f"{config.input_size}x{config.input_size} (subsets drawn with data seed {config.data_seed}); top-1 (%) on "
        "the test images." + (f" {data['validation_images']} training images held out as the validation split "
                              "(choices are made on it; results.json has every row on it as well)."
                              if data.get("validation_images") else ""),
        f"Recipe, the same for every variant: {recipe}. Seeds: {seeds}; cells are mean ± std (sample std, ddof=1) "
        f"over the seeds for the headline rows; rows marked † ran on the first seed ({seeds[0]}) only. FP is the "
        "float model as trained; the low-bit rows re-estimate BN, which can put them above FP after a short training.",
        _low_bit_line(config, data["calibration_images"], finetune),
        "",
    ]
    for model, table in results["summary"].items():
        variants = [v for v in config.variants if on_model(v, model)]
        kwargs = ", ".join(f"{k}={v}" for k, v in config.model_kwargs.get(model, {}).items())
        lines += [f"## {model}" + (f" ({kwargs})" if kwargs else ""), "",
                  "| setting | " + " | ".join(_variant_label(v, model, results.get("chosen_lambdas") or {},
                                                            results.get("chosen_weight_decays"))
                                             for v in variants) + " |",
                  "|---|" + "---|" * len(variants)]
        for setting, cells in table.items():
            if setting != "FP" and not on_model(config.setting(setting), model):
                continue  # a row measured on other models only
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
            lines.append("| mean kurtosis | " + " | ".join(
                f"{stats[v['name']]['mean_kurtosis']:.2f}" if v["name"] in stats else "-" for v in variants) + " |")
        lines += _onnx_lines(results, model)
        plots = results.get("plots", {}).get(model, {})
        if plots:
            lines += [""] + [f"![{kind}]({os.path.relpath(path, results['output_dir'])})"
                             for kind, path in plots.items()]
        lines.append("")
    classes = data.get("num_classes")
    lines += _format_gains(config, results.get("gains") or {}, 1 / classes if classes else None)
    lines += format_budget(results.get("finetune_budget"), results["output_dir"])
    lines += _format_weight_decay_sweep(results.get("weight_decay_sweep"))
    for sweep in results.get("lambda_sweep") or []:
        for model, table in sweep["models"].items():
            chosen = table.get("chosen")
            rows = [(f"0 ({sweep['reference']})" if row["lambda"] == 0 else f"{row['lambda']:g}", row)
                    for row in table["rows"]]
            lines += _sweep_section(f"Lambda sweep: {sweep['variant']} on {model} (seed {sweep['seed']})", "", "λ",
                                    ["FP", *sweep["settings"]], rows, SWEEP_RULE,
                                    chosen and f"λ = {chosen['lambda']:g}")
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
    from ..plots import plot_accuracy_vs_bits, plot_curves, plot_layer_ranges, plot_weight_histograms

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
        shown = [r for r in results["runs"] if r["model"] == model and r["seed"] == config.seeds[0]
                 and r.get("val_curve") and r["variant_names"]]
        # fine-tunes continue the baseline: drawn after its last epoch
        start = max((float(e) for r in shown if not r["variant"].get("init_from") for e in r["val_curve"]),
                    default=0.0)
        epochs = {r["variant"]["name"]: {float(e) + (start if r["variant"].get("init_from") else 0.0): 100 * a
                                         for e, a in r["val_curve"].items()} for r in shown}
        if epochs:
            paths["validation curves"] = plot_curves(
                epochs, os.path.join(folder, f"{stem}_validation_curves.png"),
                title=f"{model}: validation top-1 after each epoch (seed {config.seeds[0]})\n(fine-tunes drawn "
                      "after the baseline's last epoch)")
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
    chosen: dict[str, dict[str, float | None]] | None = None,
    chosen_weight_decay: dict[str, float | None] | None = None,
) -> dict[str, Any]:
    """The contents of `results.json` from the measured `runs` (see [`run_reproduce`]): the config, the data, the
    runs, the summaries over seeds, the range statistics, the lambda sweep, the gains against the paper's
    ([`~hf_r2.reproduce.summary.PAPER_TARGETS`]), the lambdas of the `weight: chosen` variants (`chosen`,
    `{variant: {model: lambda}}`), the weight-decay sweep and its choice per model (`chosen_weight_decay`), the
    plots (written here, from `weights` / `layer_stats` of the first seed's models), the fine-tune budget curves
    where R2 fine-tunes have controls (`finetune_budget`, [`~hf_r2.reproduce.budget.budget_tables`]) and the
    timing (`timing` holds `seconds`, `trainings` and `trained_now`; the row counts and summed times are added
    here)."""
    rows_all = [row for r in runs for row in r["rows"].values()]
    results: dict[str, Any] = {
        "config": config.to_dict(),
        "output_dir": os.path.abspath(config.output_dir),
        "data": data_info,
        "runs": runs,
        "summary": summarise(config, runs),
        "weight_stats": summarise_stats(config, runs),
        "lambda_sweep": sweep_tables(config, runs),
        "chosen_lambdas": chosen or {},
    }
    if config.weight_decay_sweep:
        results["weight_decay_sweep"] = weight_decay_tables(config, runs)
        results["chosen_weight_decays"] = chosen_weight_decay or {}
    if config.validation_size:
        results["val_summary"] = summarise(config, runs, key="val_accuracy")
    results["gains"] = gains(config, results["summary"])
    results["plots"] = _plots(config, results, weights, layer_stats)
    attach_budget(results, os.path.join(config.output_dir, "plots"))  # stored: older reports stay as they were
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
