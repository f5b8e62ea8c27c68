"""`hf-r2 reproduce CONFIG --status`: where a long reproduce run stands, read from its cache without training or
measuring anything: per training, done (with its low-bit rows measured so far), running (epoch k of n, in another
process), interrupted (resumes from epoch k) or missing; and which choices (weight decay, lambdas) are made yet."""

from __future__ import annotations

import os
import re
from typing import Any

from .._utils import read_json
from .config import RUN_INFO_NAME, ReproduceConfig
from .plan import Run, plan, row_spec, variant_names
from .sweep import chosen_lambdas, chosen_weight_decays, sweep_tables, weight_decay_tables
from .training import run_lock
from .variants import CHOSEN

__all__ = ["run_states", "format_status"]

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def _locked_elsewhere(run: Run) -> bool:
    """Whether another process holds `run`'s lock (is training or measuring it)."""
    if not os.path.exists(run.run_dir.rstrip("/\\") + ".lock"):  # never trained: do not create its lock file
        return False
    with run_lock(run, wait=False) as held:
        return not held


def _epochs_done(run_dir: str) -> float | None:
    """The epoch of the newest epoch checkpoint in `run_dir` (`None` if there is none)."""
    names = [n for n in (os.listdir(run_dir) if os.path.isdir(run_dir) else []) if _CHECKPOINT.match(n)]
    if not names:
        return None
    newest = max(names, key=lambda n: int(_CHECKPOINT.match(n).group(1)))
    state = read_json(os.path.join(run_dir, newest, "trainer_state.json")) or {}
    return state.get("epoch")


def _cached_rows(run: Run, config: ReproduceConfig) -> dict[str, Any]:
    """The rows of `run` cached with the current spec, by setting name (FP included)."""
    from ..quant import read_results

    cached = {(row["setting"], row.get("method")): row for row in read_results(run.run_dir)}
    rows = {}
    for name in ["FP", *run.settings]:
        setting = None if name == "FP" else config.setting(name)
        row = cached.get((name, "float" if setting is None else setting["method"]))
        if row is not None and row.get("spec") == row_spec(setting, config):
            rows[name] = row
    return rows


def _as_measured(runs: list[Run], config: ReproduceConfig, chosen_wd: dict[str, float | None] | None
                 ) -> list[dict[str, Any]]:
    """The runs in the shape the sweep tables read, from the cache only."""
    return [{"model": r.model, "variant": r.variant, "seed": r.seed, "roles": r.roles, "run_dir": r.run_dir,
             "variant_names": variant_names(r, config, None, chosen_wd), "rows": _cached_rows(r, config)}
            for r in runs]


def _open_if_incomplete(table: dict[str, Any], expected_rows: int) -> None:
    """Leave a model's choice open while its sweep has a row missing or not measured on the validation split yet
    (the run itself chooses only once every row is there)."""
    columns = {"FP", *table["settings"]}
    for t in table["models"].values():
        if len(t["rows"]) != expected_rows or any(columns - set(r.get("val_accuracy", {})) for r in t["rows"]):
            t["chosen"] = None


def _choices(config: ReproduceConfig) -> tuple[dict[str, dict[str, float | None]] | None,
                                                 dict[str, float | None] | None]:
    """The lambdas and weight decays the cached sweeps choose (a sweep with rows still missing chooses nothing)."""
    chosen_wd = None
    if config.weight_decay_sweep:
        table = weight_decay_tables(config, _as_measured(plan(config), config, None))
        _open_if_incomplete(table, len(config.weight_decay_sweep["factors"]))
        chosen_wd = chosen_weight_decays(table)
    chosen = None
    if any(v["weight"] == CHOSEN for v in config.variants):
        tables = sweep_tables(config, _as_measured(plan(config, None, chosen_wd), config, chosen_wd)) or []
        for sweep, table in zip(config.lambda_sweep or [], tables):
            _open_if_incomplete(table, 1 + len(sweep["lambdas"]))
        chosen = chosen_lambdas(config, tables)
    return chosen, chosen_wd


def run_states(config: ReproduceConfig) -> dict[str, Any]:
    """`{"runs": [{model, variant, seed, roles, run_dir, state, epoch, epochs, rows, rows_total}], "chosen_lambdas",
    "chosen_weight_decays", "waiting": [variant names not planned yet, per model]}`; `state` is `done`, `running`,
    `interrupted` or `missing`."""
    chosen, chosen_wd = _choices(config)
    runs = plan(config, chosen, chosen_wd)
    out = []
    for run in runs:
        done = read_json(os.path.join(run.run_dir, RUN_INFO_NAME)) is not None
        running = _locked_elsewhere(run)
        epoch = None if done else _epochs_done(run.run_dir)
        state = ("running" if running else "done") if done else (
            "running" if running else "interrupted" if epoch is not None else "missing")
        out.append({"model": run.model, "variant": run.variant["name"], "seed": run.seed, "roles": run.roles,
                    "run_dir": run.run_dir, "state": state, "epoch": epoch,
                    "epochs": config.recipe(run.model, run.variant)["epochs"],
                    "rows": len(_cached_rows(run, config)) if done else 0, "rows_total": 1 + len(run.settings)})
    waiting = [f"{v['name']} on {model}" for v in config.variants for model in config.models
               if config.resolve(v, model) is None and config.resolve(v, model, chosen, chosen_wd) is None
               and (v["models"] is None or model in v["models"])]
    return {"runs": out, "chosen_lambdas": chosen or {}, "chosen_weight_decays": chosen_wd or {},
            "waiting": waiting}


def format_status(config: ReproduceConfig, states: dict[str, Any]) -> str:
    """One line per training, then the choices made and the variants waiting for one."""
    lines = [f"{config.output_dir}:"]
    for r in sorted(states["runs"], key=lambda r: config.models.index(r["model"])):
        state = r["state"]
        if state == "done":
            state += f", {r['rows']}/{r['rows_total']} rows measured"
        elif r["epoch"] is not None:
            state += f" (epoch {r['epoch']:g} of {r['epochs']:g} done)"
        roles = ", ".join(r["roles"])
        lines.append(f"  {r['model']:<18} {r['variant']:<28} seed {r['seed']}  {state:<34} [{roles}]")
    counts = {s: sum(r["state"] == s for r in states["runs"]) for s in ("done", "running", "interrupted", "missing")}
    lines.append("  " + ", ".join(f"{n} {s}" for s, n in counts.items()) + f" of {len(states['runs'])} trainings")
    for model, wd in states["chosen_weight_decays"].items():
        lines.append(f"  weight decay chosen for {model}: " + ("not yet" if wd is None else f"{wd:g}"))
    for variant, by_model in states["chosen_lambdas"].items():
        for model, lam in by_model.items():
            lines.append(f"  lambda chosen for {variant} on {model}: " + ("not yet" if lam is None else f"{lam:g}"))
    if states["waiting"]:
        lines.append("  waiting for a sweep's choice (trained after it): " + "; ".join(states["waiting"]))
    return "\n".join(lines)
