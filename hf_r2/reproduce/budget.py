"""The fine-tune budget curve of an `hf-r2 reproduce` run (issue 34): for each family of R2 fine-tunes (the same
recipe from the same checkpoint at several lengths, each against its same-length control without R2), the gain over
the control at each low-bit row against the budget, beside the gain of the budget spent on QAT / DKM instead and the
gain of R2 trained from scratch. [`budget_tables`] computes it (stored in `results.json` as `finetune_budget`),
[`format_budget`] writes its `results.md` section and [`plot_budgets`] its PNGs; [`attach_budget`] does both
for an assembled (or loaded) `results.json`.

The curves, all on the test images (they report; choices such as each variant's lambda are made on the validation
split, whose gains results.json carries beside them as `val_gain`):

- *R2 fine-tune*: the R2 fine-tune's top-1 at the row minus its control's (`compare_to`: the same checkpoint, the
  same budget and schedule, no R2), in points.
- *QAT* (PTQ rows) / *DKM* (k-means rows): the top-1 of the starting checkpoint trained that budget by QAT at the
  row's bits (or DKM at its bits), minus the same control's top-1 at the row. Both gains share the control, so the
  vertical distance between the two curves is R2 fine-tune minus QAT, each having spent the same epochs from the same
  checkpoint; a QAT row counts at a budget when its fine-tune length is within 2 % of it.
- *From scratch*: an R2 variant of the same loss trained from random init, minus its own reference (a horizontal
  line): from the same results, else from the `results.json` of the study that trained the external baseline.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from .config import RESULTS_NAME, ReproduceConfig
from .summary import mean_std
from .variants import BASELINE, on_model, slug

__all__ = ["budget_tables", "from_scratch_gains", "format_budget", "plot_budgets", "attach_budget"]

# The keys that make two R2 fine-tunes the same recipe at another length.
_LENGTH_KEYS = ("name", "epochs", "compare_to", "seeds", "models")
# The trained alternative spending the budget, by the method of the row it is set beside.
_ALTERNATIVE = {"ptq": "qat", "kmeans": "dkm"}
_TOLERANCE = 0.02


def _delta(table: dict[str, Any] | None, setting: str, name: str, reference: str) -> tuple[float, float | None] | None:
    """`(points, std)`: `name`'s mean top-1 at `setting` minus `reference`'s, and the sample std of the per-seed
    differences (seeds run by both; `None` for one); `None` where either is not measured."""
    cells = (table or {}).get(setting, {})
    cell, base = cells.get(name), cells.get(reference)
    if _mean(table, setting, name) is None or _mean(table, setting, reference) is None:
        return None
    paired = [100 * (a - base["values"][base["seeds"].index(s)])
              for s, a in zip(cell["seeds"], cell["values"]) if s in base["seeds"]]
    return 100 * (cell["mean"] - base["mean"]), (mean_std(paired)[1] if paired else None)


def _mean(table: dict[str, Any] | None, setting: str, name: str) -> float | None:
    """`name`'s mean top-1 at `setting`; `None` where not measured or not a number (never drawn as 0)."""
    cell = (table or {}).get(setting, {}).get(name)
    return None if cell is None or cell["mean"] is None or math.isnan(cell["mean"]) else cell["mean"]


def from_scratch_gains(results: dict[str, Any], model: str, loss: str) -> dict[str, Any] | None:
    """The gains, per row, of the first R2 variant of `loss` trained from scratch on `model` in `results` (a
    `results.json`) over its reference: `{variant, reference, gains: {row: points}}`, `None` where there is none."""
    config = ReproduceConfig.from_dict(results["config"])
    table = results["summary"].get(model)
    for variant in config.variants:
        if variant["loss"] != loss or variant.get("init_from") or not on_model(variant, model):
            continue
        reference = config.reference_of(variant)
        found = {row: d[0] for row in table or {} if (d := _delta(table, row, variant["name"], reference))}
        if found:
            return {"variant": variant["name"], "reference": reference, "gains": found}
    return None


def _study_of(baseline_dir: str) -> str | None:
    """The `results.json` of the study whose run folder `<output_dir>/runs/<model>/<variant>/seed<k>` is
    `baseline_dir`, if it exists."""
    parts = os.path.normpath(os.path.expanduser(baseline_dir)).split(os.sep)
    if len(parts) < 5 or parts[-4] != "runs":
        return None
    path = os.path.join(os.sep.join(parts[:-4]) or os.sep, RESULTS_NAME)
    return path if os.path.isfile(path) else None


def _external_scratch(config: ReproduceConfig, model: str, loss: str) -> dict[str, Any] | None:
    path = _study_of(config.baselines[model]) if model in config.baselines else None
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            found = from_scratch_gains(json.load(f), model, loss)
    except (OSError, ValueError, KeyError):  # an unfinished or older study: no line rather than no report
        return None
    return found and {**found, "source": path}


def _alternatives(config: ReproduceConfig, table: dict[str, Any], row: str, budget: float, steps_per_epoch: int | None,
                  control: str, val_table: dict[str, Any] | None) -> dict[str, Any]:
    """The QAT / DKM rows of the starting checkpoint at `row`'s bits whose fine-tune is `budget` epochs long."""
    setting = config.setting(row)
    method = _ALTERNATIVE.get(setting["method"])
    start = config.baseline_variant
    out: dict[str, Any] = {}
    for s in config.low_bit:
        if s["method"] != method or s["w_bits"] != setting["w_bits"] or s.get("a_bits") != setting.get("a_bits"):
            continue
        steps = s.get("finetune_steps") or config.finetune_max_steps
        epochs = s.get("finetune_epochs") or (
            (steps / steps_per_epoch if steps_per_epoch else None) if steps else float(config.finetune_epochs))
        accuracy, base = _mean(table, s["name"], start), _mean(table, row, control)
        if epochs is None or abs(epochs - budget) > _TOLERANCE * budget or accuracy is None:
            continue
        val, val_base = _mean(val_table, s["name"], start), _mean(val_table, row, control)
        out[s["name"]] = {"method": method, "epochs": epochs, "accuracy": accuracy,
                          "gain": None if base is None else 100 * (accuracy - base),
                          "val_gain": None if val is None or val_base is None else 100 * (val - val_base)}
    return out


def _family_rows(config: ReproduceConfig, results: dict[str, Any], model: str, variant: dict[str, Any],
                 budget: float, steps_per_epoch: int | None) -> dict[str, Any]:
    table = results["summary"][model]
    val_table = (results.get("val_summary") or {}).get(model)
    name, control = variant["name"], variant["compare_to"]
    rows: dict[str, Any] = {}
    for row in table:
        gain, val = _delta(table, row, name, control), _delta(val_table, row, name, control)
        rows[row] = {"control": _mean(table, row, control), "r2": _mean(table, row, name),
                     "gain": gain and gain[0], "std": gain and gain[1], "val_gain": val and val[0],
                     "alternatives": {} if row == "FP" else _alternatives(config, table, row, budget, steps_per_epoch,
                                                                          control, val_table)}
    return rows


def budget_tables(results: dict[str, Any]) -> dict[str, Any]:
    """`{model: {checkpoint_epochs, families: [...]}}` from the assembled results (`config`, `summary`, and
    `val_summary` / `data` where present), for the models with an R2 fine-tune compared to a fine-tune control;
    `{}` without one. Each family: `{name, loss, variants, from_scratch, budgets}`, `budgets` sorted by length,
    each `{epochs, percent, variant, control, rows: {row: {control, r2, gain, std, val_gain, alternatives}}}`
    (top-1 as fractions, gains in points, `None` where not measured)."""
    config = ReproduceConfig.from_dict(results["config"])
    names = {v["name"]: v for v in config.variants}
    train_images = (results.get("data") or {}).get("train_images")
    steps_per_epoch = math.ceil(train_images / config.batch_size) if train_images else None
    out: dict[str, Any] = {}
    for model in results["summary"]:
        start = next((v for v in config.variants if v["name"] == config.baseline_variant), {})
        checkpoint = None if config.max_steps > 0 else config.recipe(model, start)["epochs"]
        families: dict[str, dict[str, Any]] = {}
        for v in config.variants:
            control = names.get(v["compare_to"] or "")
            if (v["loss"] == BASELINE or not v.get("init_from") or control is None or not control.get("init_from")
                    or not on_model(v, model)):
                continue
            epochs = float(config.recipe(model, v)["epochs"])
            key = json.dumps({k: x for k, x in v.items() if k not in _LENGTH_KEYS}, sort_keys=True)
            family = families.setdefault(key, {"name": v["name"], "loss": v["loss"], "variants": [], "budgets": []})
            family["variants"].append(v["name"])
            family["budgets"].append({
                "epochs": epochs, "percent": 100 * epochs / checkpoint if checkpoint else None, "variant": v["name"],
                "control": control["name"], "control_epochs": float(config.recipe(model, control)["epochs"]),
                "rows": _family_rows(config, results, model, v, epochs, steps_per_epoch)})
        for family in families.values():
            family["budgets"].sort(key=lambda b: b["epochs"])
            # the rows of the family: measured on an R2 fine-tune at some budget (at the others they show as missing)
            keep = {row for b in family["budgets"] for row, cells in b["rows"].items() if cells["r2"] is not None}
            for b in family["budgets"]:
                b["rows"] = {row: cells for row, cells in b["rows"].items() if row in keep}
            family["name"] = family["budgets"][0]["variant"]
            inside = from_scratch_gains(results, model, family["loss"])
            family["from_scratch"] = ({**inside, "source": "this study"} if inside
                                      else _external_scratch(config, model, family["loss"]))
        if families:
            out[model] = {"checkpoint_epochs": checkpoint, "families": list(families.values())}
    return out


def _budget_label(budget: dict[str, Any], newline: str = " ") -> str:
    percent = budget.get("percent")
    return f"{budget['epochs']:g} ep" + (f"{newline}({percent:.1f} %)" if percent is not None else "")


def _source(scratch: dict[str, Any]) -> str:
    """Where a from-scratch gain comes from, a home folder written `~`."""
    home = os.path.expanduser("~")
    where = scratch["source"]
    return "~" + where[len(home):] if where.startswith(home + os.sep) else where


def _points(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2f}"


def _top1(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def plot_budgets(tables: dict[str, Any], folder: str) -> None:
    """Write one PNG per model and family into `folder` ([`~hf_r2.plots.plot_budget_curves`]) and record its path as
    the family's `plot`: the gains over the control (R2 fine-tune, QAT / DKM, from scratch as a line) and the top-1
    (R2 fine-tune, control, QAT / DKM) of each low-bit row against the budget."""
    from ..plots import plot_budget_curves

    for model, entry in tables.items():
        for family in entry["families"]:
            gains: dict[str, dict[str, dict[float, float | None]]] = {}
            top1: dict[str, dict[str, dict[float, float | None]]] = {}
            for budget in family["budgets"]:
                x = budget["epochs"]
                for row, cells in budget["rows"].items():
                    if row == "FP":
                        continue
                    gains.setdefault(row, {}).setdefault("R2 fine-tune", {})[x] = cells["gain"]
                    for name, alt in cells["alternatives"].items():
                        gains[row].setdefault(alt["method"].upper(), {})[x] = alt["gain"]
                    curves = top1.setdefault(row, {})
                    curves.setdefault("R2 fine-tune", {})[x] = cells["r2"] and 100 * cells["r2"]
                    for name, alt in cells["alternatives"].items():
                        curves.setdefault(alt["method"].upper(), {})[x] = 100 * alt["accuracy"]
                    curves.setdefault("control (no R2)", {})[x] = cells["control"] and 100 * cells["control"]
            if not gains:
                continue
            scratch = family.get("from_scratch")
            source = scratch and f"from scratch ({scratch['variant']} - {scratch['reference']}, {_source(scratch)})"
            family["plot"] = plot_budget_curves(
                {"gain over the same-length control (points)": gains, "top-1 at the row (%)": top1},
                os.path.join(folder, f"{slug(model)}_{slug(family['name'])}_finetune_budget.png"),
                levels=scratch and scratch["gains"], level_label=source or "from scratch",
                budgets={b["epochs"]: _budget_label(b, "\n") for b in family["budgets"]},
                title=f"{model}: {family['name']}"
                      + (f" ({', '.join(family['variants'])})" if len(family["variants"]) > 1 else "")
                      + " against the fine-tune budget, test top-1")


def format_budget(tables: dict[str, Any] | None, output_dir: str) -> list[str]:
    """The `results.md` section of [`budget_tables`] (markdown lines; none without R2 fine-tunes)."""
    if not tables:
        return []
    lines = ["## R2 fine-tune against its budget", "",
             "Per family of R2 fine-tunes (one recipe from the same checkpoint at each length), on the test images "
             "(validation in parentheses): the control (`compare_to`: the same fine-tune without R2) and the R2 "
             "fine-tune's top-1, the gain (R2 fine-tune minus control, points, ± the sample std of the per-seed "
             "differences), the QAT (PTQ rows) or DKM (k-means rows) of the starting checkpoint trained the same "
             "budget (its top-1, then its gain over the same control: the two gains differ by R2 fine-tune minus "
             "QAT) and the gain of R2 trained from scratch over its own reference. `-`: not measured.", ""]
    for model, entry in tables.items():
        for family in entry["families"]:
            budgets = family["budgets"]
            of = (f" of the checkpoint's {entry['checkpoint_epochs']:g} epochs"
                  if entry.get("checkpoint_epochs") else "")
            scratch = family.get("from_scratch")
            lines += [f"### {model}: {family['name']}", "",
                      f"Budgets: {', '.join(_budget_label(b) for b in budgets)}{of}"
                      + (" (one budget so far: points, no curve)." if len(budgets) == 1 else ".")
                      + " Variants: " + ", ".join(f"{b['variant']} against {b['control']}" for b in budgets) + "."]
            if scratch:
                lines.append(f"From scratch: {scratch['variant']} minus {scratch['reference']} ({_source(scratch)}).")
            lines += ["", "| budget | row | control | R2 fine-tune | gain | QAT / DKM, same budget: top-1 (gain) "
                          "| from scratch |", "|---|---|---|---|---|---|---|"]
            for budget in budgets:
                for row, c in budget["rows"].items():
                    gain = _points(c["gain"]) + (f" ± {c['std']:.2f}" if c["std"] is not None else "")
                    if c["val_gain"] is not None:
                        gain += f" ({c['val_gain']:+.2f})"
                    alt = "; ".join(f"{name} {_top1(a['accuracy'])} ({_points(a['gain'])})"
                                    for name, a in c["alternatives"].items()) or "-"
                    level = scratch and scratch["gains"].get(row)
                    lines.append(f"| {_budget_label(budget)} | {row} | {_top1(c['control'])} | {_top1(c['r2'])} "
                                 f"| {gain} | {alt} | {_points(level)} |")
            if family.get("plot"):
                lines += ["", f"![fine-tune budget: {family['name']}]"
                              f"({os.path.relpath(family['plot'], output_dir)})"]
            lines.append("")
    return lines


def attach_budget(results: dict[str, Any], folder: str) -> dict[str, Any]:
    """Add `finetune_budget` ([`budget_tables`]) to `results`, its PNGs written into `folder`, where it has R2
    fine-tunes with controls; `results` is left as it was otherwise, so older reports render unchanged. Also for a
    `results.json` written before this existed: attach, then [`~hf_r2.reproduce.format_report`] again."""
    tables = budget_tables(results)
    if tables:
        plot_budgets(tables, folder)
        results["finetune_budget"] = tables
    return results
