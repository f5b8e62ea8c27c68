"""The `hf-r2 reproduce` run: the data, the trainings (in [`hf_r2.reproduce.training`]), the measured rows with
their caches, and [`run_reproduce`], which ties them to the plan (which trainings, which low-bit rows on each) and
the report."""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .._utils import read_json, write_json_atomic, write_text_atomic
from ..progress import bars_wanted, format_seconds, quiet_info, readable_logging, say
from .apply import apply_setting
from .config import REPORT_NAME, RESULTS_NAME, RUN_INFO_NAME, ReproduceConfig
from .deploy import onnx_check
from .plan import Run, plan, row_spec, variant_names
from .report import assemble_results, format_report
from .sweep import chosen_lambdas, chosen_weight_decays, sweep_tables, weight_decay_tables
from .training import run_label, run_lock, train_all
from .variants import CHOSEN, slug

__all__ = ["run_reproduce"]


# ----------------------------------------------------------------------------------------------------------------
# The data


@dataclass
class _Data:
    """The dataset of a run (`raw`: `"train"` / `"test"` splits), its class names, and each architecture's
    preprocessed views ([`_ModelData`]), built once per model name."""

    raw: Any
    label_names: list[str]
    val: Any = None  # the validation split (held out of `raw["train"]`), when `validation_size` is set
    per_model: dict[str, _ModelData] = field(default_factory=dict)


@dataclass
class _ModelData:
    """One architecture's views of the data: test batches, calibration batches and the augmented training set."""

    eval: list[dict[str, Any]]
    calibration: list[dict[str, Any]]
    train: Any
    val: list[dict[str, Any]] | None = None


# ----------------------------------------------------------------------------------------------------------------
# Low-bit rows


def _batches(dataset, batch_size: int) -> list[dict[str, Any]]:
    import torch

    from ..data import collate_fn

    return list(torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn))


def _model_data(model, key: str, data: _Data, config: ReproduceConfig) -> _ModelData:
    """Eval batches, calibration batches and the fine-tuning set in `model`'s preprocessing, cached under `key`
    (the model name: every training of one architecture preprocesses alike)."""
    from ..data import calibration_batches, with_transforms

    cache = data.per_model
    if key not in cache:
        raw, size = data.raw, {"input_size": config.input_size}
        cache[key] = _ModelData(
            eval=_batches(with_transforms(raw["test"], model, train=False, **size), 256),
            calibration=calibration_batches(raw["train"], model, config.calibration_samples, seed=config.data_seed,
                                            batch_size=64, **size),
            train=with_transforms(raw["train"], model, train=True, seed=None, **size),  # each fine-tune: its seed
            val=None if data.val is None else _batches(with_transforms(data.val, model, train=False, **size), 256),
        )
    return cache[key]


def _val_curve(run_dir: str) -> dict[str, float] | None:
    """Validation top-1 per epoch (`{epoch: accuracy}`) from the Trainer's log of a training, if it evaluated."""
    state = read_json(os.path.join(run_dir, "trainer_state.json")) or {}
    curve = {f"{e['epoch']:g}": e["eval_accuracy"] for e in state.get("log_history", []) if "eval_accuracy" in e}
    return curve or None


def _load_float(run_dir: str):
    from ..models import create_model

    return create_model(run_dir, pretrained=True).eval()


def _measure(run: Run, data: _Data, config: ReproduceConfig, progress: bool) -> dict[str, Any]:
    """FP and every low-bit row of `run`, from the cache where its spec matches; new rows are cached at once."""
    import torch
    from tqdm.auto import tqdm

    from ..config import R2Config
    from ..metrics import evaluate_accuracy
    from ..quant import float_row, read_results, update_results
    from ..regularizer import R2Regularizer

    cached = {(row["setting"], row.get("method")): row for row in read_results(run.run_dir)}
    float_model = _load_float(run.run_dir)
    stats = R2Regularizer(float_model, R2Config()).stats()
    rows: dict[str, Any] = {}
    todo = ["FP", *run.settings]
    bar = tqdm(todo, desc=f"low-bit {run.model}/{run.variant['name']}/seed{run.seed}", leave=False,
               disable=not bars_wanted(progress))
    for name in bar:
        setting = None if name == "FP" else config.setting(name)
        method = "float" if setting is None else setting["method"]
        spec = row_spec(setting, config)
        row = cached.get((name, method))
        if row is not None and row.get("spec") == spec:
            rows[name] = {**row, "cached": True}
            continue
        bar.set_postfix_str(name)
        model_data = _model_data(float_model, run.model, data, config)
        start = time.perf_counter()
        if setting is None:
            model = float_model
        else:
            torch.manual_seed(run.seed)
            with quiet_info("hf_r2.quant"):  # this row's line below says what it gave
                model = apply_setting(copy.deepcopy(float_model), setting, config, run.seed,
                                      calibration=model_data.calibration, train_dataset=model_data.train)
        accuracy = evaluate_accuracy(model, model_data.eval)["accuracy"]
        measured = {"seconds": time.perf_counter() - start, "spec": spec}
        if model_data.val is not None:
            measured["val_accuracy"] = evaluate_accuracy(model, model_data.val)["accuracy"]
        if spec.get("onnx"):
            path = os.path.join(run.run_dir, "onnx", f"{slug(name)}.onnx")
            measured["onnx"] = onnx_check(model, model_data.eval, path, config.input_size)
        if setting is None:
            row = float_row(accuracy, **measured)
        else:
            row = {
                "setting": name,
                "method": method,
                "w_bits": setting["w_bits"],
                "a_bits": setting["a_bits"],
                "accuracy": accuracy,
                **measured,
            }
        update_results(run.run_dir, [row])
        rows[name] = {**row, "cached": False}
        say(f"  {name}: top-1 {100 * accuracy:.2f} ({format_seconds(measured['seconds'])})")
        del model
    reused = sum(row["cached"] for row in rows.values())
    if reused:
        say(f"  {reused} of {len(rows)} rows from the cache")
    return {"rows": rows, "stats": stats, "float_model": float_model}


def _measure_all(
    runs_planned: list[Run], data: _Data, config: ReproduceConfig, progress: bool,
    chosen: dict[str, dict[str, float | None]] | None, plots: bool = True,
    chosen_weight_decay: dict[str, float | None] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """The measured runs (rows, stats, curves; `variant_names`: the configured variants each run is, with their
    `chosen` lambdas resolved) and, with `plots`, what the plots need from the first seed's models."""
    import numpy as np

    from .._targets import find_target_modules
    from ..plots import select_layers

    first = config.seeds[0]
    runs: list[dict[str, Any]] = []
    weights: dict[str, dict[str, dict[str, Any]]] = {}
    layer_stats: dict[str, dict[str, Any]] = {}
    plot_layers: dict[str, list[str]] = {}
    for index, run in enumerate(runs_planned, 1):
        say(f"Measuring {index} of {len(runs_planned)}: {run_label(run)}, FP and {len(run.settings)} low-bit rows")
        with run_lock(run):  # another process measuring it writes the same cache: its rows are then reused
            measured = _measure(run, data, config, progress)
        names = variant_names(run, config, chosen, chosen_weight_decay)
        info = read_json(os.path.join(run.run_dir, RUN_INFO_NAME))
        runs.append({
            "model": run.model, "variant": run.variant, "variant_names": names, "seed": run.seed,
            "roles": run.roles, "run_dir": run.run_dir, "train_seconds": info["train_seconds"],
            "global_step": info.get("global_step"), "train_loss": info.get("train_metrics", {}).get("train_loss"),
            "stats": {"overall": measured["stats"]["overall"]}, "rows": measured["rows"],
            "val_curve": _val_curve(run.run_dir),
        })
        if plots and run.seed == first and names:
            model = measured["float_model"]
            if run.model not in plot_layers:
                targets = find_target_modules(model)
                depthwise = [n for n, m in targets if getattr(m, "groups", 1) > 1]
                plot_layers[run.model] = select_layers([n for n, _ in targets], config.plot_layers, depthwise)
            for name in names:
                weights.setdefault(run.model, {})[name] = {
                    layer: model.get_submodule(layer).weight.detach().float().numpy().ravel().astype(np.float32)
                    for layer in plot_layers[run.model]
                }
                layer_stats.setdefault(run.model, {})[name] = measured["stats"]["per_layer"]
    return runs, weights, layer_stats


# ----------------------------------------------------------------------------------------------------------------
# Entry point


def run_reproduce(
    config: ReproduceConfig | str | os.PathLike,
    *,
    progress: bool = True,
    print_fn: Callable[[str], Any] | None = print,
) -> dict[str, Any]:
    """Train, measure and report everything `config` describes (see the module docstring); resumable.

    Args:
        config ([`ReproduceConfig`], `str` or `os.PathLike`):
            The config, or a YAML / JSON file of it.
        progress (`bool`, *optional*, defaults to `True`):
            Show progress bars (each training's, each run's low-bit rows' and the fine-tunes' own) when stdout and
            stderr are a terminal; otherwise, or with `False`, progress is plain lines (see below).
        print_fn (`Callable[[str], Any]`, *optional*, defaults to `print`):
            Where the report goes at the end; `None` prints nothing.

    Returns:
        `dict`: the contents of `output_dir/results.json`: `config`, `data`, `runs` (one per training: model,
        variant, seed, `run_dir`, `trained_now`, `train_seconds`, `stats` and `rows` = `{setting: {accuracy,
        seconds, cached, ...}}`), `summary` (`[model][setting][variant]` = `{seeds, values, mean, std,
        headline}`), `weight_stats`, `lambda_sweep`, `chosen_lambdas` (the `weight: chosen` variants' lambda per
        model), `timing`, `plots`. With `weight: chosen` variants the sweeps are trained and measured first, then
        the chosen variants' other seeds.

    Progress: a line when each training starts, then its progress (a bar in a terminal, else a line at each tenth
    of its steps) and its end; a line when each run's rows are measured, then one per row with its top-1.
    """
    with readable_logging(bars_wanted(progress)):
        return _run_reproduce(config, progress, print_fn)


def _run_reproduce(config: ReproduceConfig | str | os.PathLike, progress: bool,
                   print_fn: Callable[[str], Any] | None) -> dict[str, Any]:
    from ..data import label_names, load_image_dataset

    if not isinstance(config, ReproduceConfig):
        config = ReproduceConfig.from_file(config)
    start = time.perf_counter()
    os.makedirs(config.output_dir, exist_ok=True)
    config.save_pretrained(config.output_dir)

    raw = load_image_dataset(config.dataset, data_dir=config.data_dir, max_train_samples=config.max_train_samples,
                             max_eval_samples=config.max_eval_samples, seed=config.data_seed)
    val = None
    if config.validation_size:  # train on the rest of the training split; the test split stays as it is
        held_out = load_image_dataset(config.dataset, data_dir=config.data_dir, validation_size=config.validation_size,
                                      max_train_samples=config.max_train_samples, seed=config.data_seed)
        raw["train"], val = held_out["train"], held_out["test"]
    data = _Data(raw, label_names(raw), val)
    chosen: dict[str, dict[str, float | None]] | None = None
    chosen_wd: dict[str, float | None] | None = None
    trained_now: set[str] = set()
    if config.weight_decay_sweep:  # the baseline's weight decay first: the lambda sweeps may train at its choice
        wd_phase = [r for r in plan(config) if any(role.startswith("wd_sweep:") for role in r.roles)]
        train_all(wd_phase, data, config, progress, trained_now)
        measured, *_ = _measure_all(wd_phase, data, config, progress, None, plots=False)
        chosen_wd = chosen_weight_decays(weight_decay_tables(config, measured))
    if any(v["weight"] == CHOSEN for v in config.variants):  # the sweeps first: they choose those variants' lambdas
        first_phase = plan(config, None, chosen_wd)
        train_all(first_phase, data, config, progress, trained_now)
        # the choice reads the sweeps' runs and their references' first-seed runs; the rest is measured once, below
        references = {config.reference_of(v) for v in config.variants if v["weight"] == CHOSEN}
        needed = [r for r in first_phase if any(role.startswith("sweep:") for role in r.roles)
                  or (r.seed == config.seeds[0] and references & set(variant_names(r, config, None, chosen_wd)))]
        measured, *_ = _measure_all(needed, data, config, progress, None, plots=False, chosen_weight_decay=chosen_wd)
        chosen = chosen_lambdas(config, sweep_tables(config, measured))
    runs_planned = plan(config, chosen, chosen_wd)
    train_all(runs_planned, data, config, progress, trained_now)
    runs, weights, layer_stats = _measure_all(runs_planned, data, config, progress, chosen,
                                              chosen_weight_decay=chosen_wd)
    for run in runs:
        run["trained_now"] = run["run_dir"] in trained_now

    # 3. results, report, plots
    data_info = {"dataset": config.dataset, "num_classes": len(data.label_names),
                 "train_images": raw["train"].num_rows, "test_images": raw["test"].num_rows,
                 "calibration_images": min(config.calibration_samples, raw["train"].num_rows)}
    if val is not None:
        data_info["validation_images"] = val.num_rows
    timing = {"seconds": time.perf_counter() - start, "trainings": len(runs_planned), "trained_now": len(trained_now)}
    results = assemble_results(config, runs, data_info, timing, weights, layer_stats, chosen, chosen_wd)
    write_json_atomic(os.path.join(config.output_dir, RESULTS_NAME), results)
    report = format_report(results)
    write_text_atomic(os.path.join(config.output_dir, REPORT_NAME), report)
    if print_fn:
        print_fn(report)
    return results
