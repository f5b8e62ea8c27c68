"""Lambda sweeps of `hf-r2 reproduce`: one table per swept variant and model (top-1 at each lambda, next to the
variant's reference), and the lambda each sweep chooses on the validation split ([`SWEEP_RULE`])."""

from __future__ import annotations

from typing import Any

from .config import ReproduceConfig
from .variants import CHOSEN

__all__ = ["SWEEP_RULE", "sweep_tables", "choose_lambda", "chosen_lambdas"]

#: How a sweep chooses its lambda (needs `validation_size`; the test split never enters the choice).
SWEEP_RULE = ("the lambda with the highest mean validation top-1 over the sweep's low-bit settings, among those whose "
              "float validation top-1 is at most 1 point below the reference's (the variant's `compare_to`, else the "
              "baseline); none if no lambda keeps that")


def choose_lambda(rows: list[dict[str, Any]], settings: list[str]) -> dict[str, Any] | None:
    """The row [`SWEEP_RULE`] picks from a sweep table's rows (`rows[0]` is the reference, lambda 0), or `None`
    (no validation numbers, or no lambda keeps the float top-1 within a point)."""
    reference, candidates = rows[0], rows[1:]
    if reference.get("lambda") != 0 or "FP" not in reference.get("val_accuracy", {}):
        return None
    floor = reference["val_accuracy"]["FP"] - 0.01
    scored = []
    for row in candidates:
        val = row.get("val_accuracy", {})
        if "FP" not in val or not all(s in val for s in settings) or val["FP"] < floor:
            continue
        scored.append((sum(val[s] for s in settings) / max(len(settings), 1), row))
    if not scored:
        return None
    best = max(scored, key=lambda pair: pair[0])
    return {"lambda": best[1]["lambda"], "variant": best[1]["variant"], "score": best[0]}


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
            row = {"lambda": lam, "variant": run["variant"]["name"], "run_dir": run["run_dir"],
                   "accuracy": {c: run["rows"][c]["accuracy"] for c in columns if c in run["rows"]}}
            val = {c: run["rows"][c]["val_accuracy"] for c in columns if "val_accuracy" in run["rows"].get(c, {})}
            return {**row, "val_accuracy": val} if val else row

        for model in sweep["models"]:
            rows = []
            base = next((r for r in runs if r["model"] == model and r["seed"] == first
                         and reference in r["variant_names"]), None)
            if base is not None:
                rows.append(row_of(base, 0.0))
            for lam in sweep["lambdas"]:
                run = next(r for r in runs if r["model"] == model and f"sweep:{swept['name']}:{lam:g}" in r["roles"])
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
