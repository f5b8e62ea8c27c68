"""The sweeps of `hf-r2 reproduce` and the values they choose on the validation split: the lambda sweeps (one table
per swept variant and model: top-1 at each lambda next to the variant's reference; [`SWEEP_RULE`]) and the baseline's
weight-decay sweep (one table per model: top-1 at each multiple of the recipe's weight decay; [`WEIGHT_DECAY_RULE`]).
Both rules are one: the best mean validation low-bit top-1 among candidates whose float validation top-1 stays within
a point of the reference's, so that R2 and the baseline it is compared with are tuned alike."""

from __future__ import annotations

from typing import Any

from .config import ReproduceConfig
from .variants import CHOSEN

__all__ = [
    "SWEEP_RULE",
    "WEIGHT_DECAY_RULE",
    "sweep_tables",
    "choose_lambda",
    "chosen_lambdas",
    "weight_decay_tables",
    "choose_weight_decay",
    "chosen_weight_decays",
]

#: How a sweep chooses its lambda (needs `validation_size`; the test split never enters the choice).
SWEEP_RULE = ("the lambda with the highest mean validation top-1 over the sweep's low-bit settings, among those whose "
              "float validation top-1 is at most 1 point below the reference's (the variant's `compare_to`, else the "
              "baseline); none if no lambda keeps that")


#: How the weight-decay sweep chooses the baseline's weight decay (the default is a candidate too).
WEIGHT_DECAY_RULE = ("the weight decay with the highest mean validation top-1 over the sweep's low-bit settings, "
                     "among those (the default's included) whose float validation top-1 is at most 1 point below the "
                     "default's")


def _best(reference: dict[str, Any], candidates: list[dict[str, Any]], settings: list[str]
          ) -> tuple[float, dict[str, Any]] | None:
    """`(score, row)` of the candidate with the highest mean validation top-1 over `settings` among those whose
    float validation top-1 is at least the reference's minus 1 point; `None` if none (or no validation numbers).
    A NaN anywhere disqualifies its row (every comparison with NaN is false)."""
    if "FP" not in reference.get("val_accuracy", {}):
        return None
    floor = reference["val_accuracy"]["FP"] - 0.01
    scored = []
    for row in candidates:
        val = row.get("val_accuracy", {})
        if "FP" not in val or not all(s in val for s in settings) or not val["FP"] >= floor:
            continue
        score = sum(val[s] for s in settings) / max(len(settings), 1)
        if score == score:  # not NaN
            scored.append((score, row))
    return max(scored, key=lambda pair: pair[0]) if scored else None


def choose_lambda(rows: list[dict[str, Any]], settings: list[str]) -> dict[str, Any] | None:
    """The row [`SWEEP_RULE`] picks from a sweep table's rows (`rows[0]` is the reference, lambda 0), or `None`
    (no validation numbers, or no lambda keeps the float top-1 within a point)."""
    if rows[0].get("lambda") != 0:
        return None
    best = _best(rows[0], rows[1:], settings)
    return None if best is None else {"lambda": best[1]["lambda"], "variant": best[1]["variant"], "score": best[0]}


def choose_weight_decay(rows: list[dict[str, Any]], settings: list[str]) -> dict[str, Any] | None:
    """The row [`WEIGHT_DECAY_RULE`] picks from a weight-decay sweep table's rows (the one of factor 1 is the
    reference, and a candidate), as `{factor, weight_decay, score}`; `None` without the reference's validation
    numbers."""
    reference = next((row for row in rows if row["factor"] == 1), None)
    best = None if reference is None else _best(reference, rows, settings)
    return None if best is None else {"factor": best[1]["factor"], "weight_decay": best[1]["weight_decay"],
                                      "score": best[0]}


def _row(run: dict[str, Any], columns: list[str]) -> dict[str, Any]:
    """A sweep table's row of a measured run: its test `accuracy` (and `val_accuracy`) of `columns`."""
    row = {"run_dir": run["run_dir"],
           "accuracy": {c: run["rows"][c]["accuracy"] for c in columns if c in run["rows"]}}
    val = {c: run["rows"][c]["val_accuracy"] for c in columns if "val_accuracy" in run["rows"].get(c, {})}
    return {**row, "val_accuracy": val} if val else row


def weight_decay_role(factor: float) -> str:
    """The plan's role of the weight-decay sweep's training at `factor`."""
    return f"wd_sweep:{factor:g}"


def weight_decay_tables(config: ReproduceConfig, runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The weight-decay sweep as `{variant, settings, seed, models: {model: {rows, chosen}}}`; one row per factor
    (`factor`, `weight_decay`, test `accuracy` and validation `val_accuracy` of FP and the sweep's settings)."""
    sweep = config.weight_decay_sweep
    if not sweep:
        return None
    columns = ["FP", *sweep["settings"]]
    table: dict[str, Any] = {"variant": config.baseline_variant, "settings": sweep["settings"],
                             "seed": config.seeds[0], "models": {}}
    for model in sweep["models"]:
        rows = []
        for factor in sweep["factors"]:
            run = next((r for r in runs if r["model"] == model and weight_decay_role(factor) in r["roles"]), None)
            if run is not None:
                rows.append({"factor": factor, "weight_decay": config.weight_decay_of(model, factor),
                             **_row(run, columns)})
        complete = len(rows) == len(sweep["factors"])
        table["models"][model] = {"rows": rows,
                                  "chosen": choose_weight_decay(rows, sweep["settings"]) if complete else None}
    return table


def chosen_weight_decays(table: dict[str, Any] | None) -> dict[str, float | None]:
    """`{model: weight decay or None}`: the weight decay the sweep chose for each model ([`WEIGHT_DECAY_RULE`])."""
    return {model: (t["chosen"] or {}).get("weight_decay") for model, t in ((table or {}).get("models") or {}).items()}


def sweep_tables(config: ReproduceConfig, runs: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """One table per sweep: `{variant, reference, settings, seed, models: {model: {rows, chosen}}}`; each row holds
    the test `accuracy` (and, with a validation split, `val_accuracy`) of FP and the sweep's settings."""
    if not config.lambda_sweep:
        return None
    first = config.seeds[0]
    out = []
    for sweep in config.lambda_sweep:
        swept = next(v for v in config.variants if v["name"] == sweep["variant"])
        reference = config.reference_of(swept)
        columns = ["FP", *sweep["settings"]]
        table: dict[str, Any] = {"variant": sweep["variant"], "reference": reference, "settings": sweep["settings"],
                                 "seed": first, "models": {}}

        def row_of(run: dict[str, Any], lam: float) -> dict[str, Any]:
            return {"lambda": lam, "variant": run["variant"]["name"], **_row(run, columns)}

        for model in sweep["models"]:
            rows = []
            base = next((r for r in runs if r["model"] == model and r["seed"] == first
                         and reference in r["variant_names"]), None)
            if base is not None:
                rows.append(row_of(base, 0.0))
            for lam in sweep["lambdas"]:  # a run is missing while a value it needs is not chosen yet
                run = next((r for r in runs if r["model"] == model
                            and f"sweep:{swept['name']}:{lam:g}" in r["roles"]), None)
                if run is not None:
                    rows.append(row_of(run, lam))
            table["models"][model] = {"rows": rows, "chosen": choose_lambda(rows, sweep["settings"]) if base else None}
        out.append(table)
    return out


def chosen_lambdas(config: ReproduceConfig, tables: list[dict[str, Any]] | None) -> dict[str, dict[str, float | None]]:
    """`{variant: {model: lambda or None}}` for the `weight: chosen` variants: the lambda each model's sweep chose
    ([`SWEEP_RULE`]); `None` where no lambda kept the float top-1 (that variant is then not run on that model)."""
    out: dict[str, dict[str, float | None]] = {}
    for table in tables or []:
        variant = next(v for v in config.variants if v["name"] == table["variant"])
        if variant["weight"] == CHOSEN:
            out[variant["name"]] = {model: (t["chosen"] or {}).get("lambda") for model, t in table["models"].items()}
    return out
