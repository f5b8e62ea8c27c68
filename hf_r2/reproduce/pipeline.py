"""The `hf-r2 reproduce` run: the plan (which trainings, which low-bit rows on each), the trainings, the measured
rows with their caches, and [`run_reproduce`], which ties them to the report."""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .._utils import read_json, write_json_atomic, write_text_atomic
from .apply import apply_setting
from .config import REPORT_NAME, RESULTS_NAME, RUN_INFO_NAME, ReproduceConfig
from .deploy import onnx_check
from .plan import Run, plan, row_spec, train_spec, variant_dir
from .report import assemble_results, format_report
from .sweep import chosen_lambdas, chosen_weight_decays, sweep_tables, weight_decay_tables
from .variants import BASELINE, CHOSEN, slug

__all__ = ["run_reproduce"]

logger = logging.getLogger(__name__)


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
# Training


@contextlib.contextmanager
def _run_lock(run: Run, *, wait: bool = True):
    """Hold the lock of `run` (the file `<run_dir>.lock`, beside its folder) while training or measuring it, so that
    several `hf-r2 reproduce` processes of one config share its work: each trains the runs no other holds, then
    waits for the others' (see [`_train_all`]). Yields whether the lock is held (always, with `wait`). The lock is
    the operating system's (`flock`): it goes with its process, so a killed run never leaves a stale one. Without
    `fcntl` (Windows) there is no lock: run one process per output folder there."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield True
        return
    path = run.run_dir.rstrip("/\\") + ".lock"
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _training_done(run: Run, config: ReproduceConfig) -> bool:
    """Whether `run` is trained already (and with the same settings); removes an interrupted training's folder."""
    info = read_json(os.path.join(run.run_dir, RUN_INFO_NAME))
    if info is None:
        if _resumable(run, config):
            logger.warning("%s holds an unfinished training: resuming it from its last epoch.", run.run_dir)
        elif os.path.isdir(run.run_dir):
            logger.warning("%s holds an unfinished training (no %s): training it again.", run.run_dir, RUN_INFO_NAME)
            shutil.rmtree(run.run_dir)
        return False
    spec = train_spec(run, config)
    if info.get("spec") != spec:
        old = info.get("spec") or {}
        diff = sorted(k for k in set(spec) | set(old) if spec.get(k) != old.get(k))
        raise ValueError(
            f"{run.run_dir} was trained with other settings (differing: {diff}). Use another `output_dir`, or "
            f"delete that folder to train it again."
        )
    return True


#: Written when a training starts: its spec, so that an interrupted training resumes only with the same settings.
_STARTED_NAME = "reproduce_run.started.json"


def _resumable(run: Run, config: ReproduceConfig) -> bool:
    """Whether `run` holds an interrupted training of the same spec with a complete epoch checkpoint."""
    from ..checkpoints import latest_checkpoint

    started = read_json(os.path.join(run.run_dir, _STARTED_NAME))
    return started == train_spec(run, config) and latest_checkpoint(run.run_dir) is not None


#: The files of a trained folder that a copied baseline keeps (the weights, how to build them, what they were
#: trained with and the Trainer's log, which holds the validation curve).
_COPIED_FILES = ("model.safetensors", "config.json", "r2_config.json", "r2_stats.json", "r2_training.json",
                 "trainer_state.json", "all_results.json", "eval_results.json")


def _check_baseline(run: Run, config: ReproduceConfig, data: _Data) -> None:
    """A baseline folder trained elsewhere must fit this comparison: the same classes in the same order, the same
    input size and dataset (what `config.json` and `r2_training.json` record), so fine-tunes start from a model of
    this task and no validation image was trained on."""
    folder = run.copy_from
    saved = read_json(os.path.join(folder, "config.json")) or {}
    labels = saved.get("label_names") or (saved.get("pretrained_cfg") or {}).get("label_names")
    if labels is None and isinstance(saved.get("id2label"), dict):
        labels = [saved["id2label"][k] for k in sorted(saved["id2label"], key=int)]
    size = (saved.get("pretrained_cfg") or {}).get("input_size")
    trained = read_json(os.path.join(folder, "r2_training.json")) or {}
    problems = []
    if labels is not None and list(labels) != list(data.label_names):
        problems.append(f"its classes {list(labels)[:4]}... are not the dataset's {data.label_names[:4]}...")
    if size is not None and int(size[-1]) != config.input_size:
        problems.append(f"it was trained at {size[-1]}x{size[-1]}, the config's input_size is {config.input_size}")
    if trained.get("dataset") not in (None, config.dataset):
        problems.append(f"it was trained on {trained['dataset']!r}, the config's dataset is {config.dataset!r}")
    if problems:
        raise ValueError(f"`baselines[{run.model!r}]` = {folder!r} does not fit this config: "
                         + "; ".join(problems) + ".")


def _copy_baseline(run: Run, config: ReproduceConfig, data: _Data) -> dict[str, Any]:
    """A baseline trained elsewhere (`baselines`), copied into `run.run_dir` as if trained here."""
    source = run.copy_from
    if not os.path.isfile(os.path.join(source, "model.safetensors")):
        raise FileNotFoundError(f"`baselines[{run.model!r}]` = {source!r} holds no model.safetensors: give the folder "
                                "that `hf-r2 train` saved (its --output_dir).")
    _check_baseline(run, config, data)
    os.makedirs(run.run_dir, exist_ok=True)
    for name in _COPIED_FILES:
        if os.path.isfile(os.path.join(source, name)):
            shutil.copy2(os.path.join(source, name), os.path.join(run.run_dir, name))
    state = read_json(os.path.join(source, "trainer_state.json")) or {}
    info = {"spec": train_spec(run, config), "train_seconds": 0.0, "copied_from": os.path.abspath(source),
            "global_step": state.get("global_step"), "train_metrics": {},
            "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_json_atomic(os.path.join(run.run_dir, RUN_INFO_NAME), info)
    return info


def _train(run: Run, data: _Data, config: ReproduceConfig, progress: bool) -> dict[str, Any]:
    """Train `run` with R2Trainer (from random init, or from its baseline for a fine-tune; an interrupted training
    of the same spec from its last epoch checkpoint), save it, then write `reproduce_run.json` (last: it marks the
    training done). A copied baseline is copied instead."""
    if run.copy_from:
        return _copy_baseline(run, config, data)
    from transformers import set_seed

    from ..data import DataArguments, record_data_config, with_transforms
    from ..metrics import compute_accuracy
    from ..models import create_model
    from ..train import train_model
    from ..training_args import R2TrainingArguments

    variant = run.variant
    recipe = config.recipe(run.model, variant)
    set_seed(run.seed)
    if run.init_dir:  # a fine-tune: the baseline's weights; R2's margins / temperatures start from them
        model = create_model(run.init_dir, pretrained=True)
    else:
        model = create_model(run.model, label_names=data.label_names, **config.model_kwargs.get(run.model, {}))
    record_data_config(model, DataArguments(dataset_name=config.dataset, input_size=config.input_size))
    baseline = variant["loss"] == BASELINE
    validate = data.val is not None
    optimizer = {"optim": "sgd", "optim_args": f"momentum={config.momentum}"} if config.optimizer == "sgd" else {}
    args = R2TrainingArguments(
        output_dir=run.run_dir,
        num_train_epochs=recipe["epochs"],
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=256,
        learning_rate=recipe["lr"],
        weight_decay=recipe["weight_decay"],
        lr_scheduler_type="cosine",
        warmup_steps=recipe["warmup_ratio"],
        logging_steps=50,
        eval_strategy="epoch" if validate else "no",  # the validation curve (plateau plot)
        save_strategy="epoch",  # one checkpoint, the last epoch's: an interrupted training resumes from it
        save_total_limit=1,
        resume_from_checkpoint="latest" if _resumable(run, config) else None,
        report_to="none",
        seed=run.seed,
        dataloader_pin_memory=False,
        disable_tqdm=None if progress else True,
        r2_loss="linf" if baseline else variant["loss"],
        r2_weight=0.0 if baseline else variant["weight"],
        r2_per_channel=variant["per_channel"],
        **optimizer,
        **{f"r2_{k}": v for k, v in variant["r2"].items()},
    )
    size = {"input_size": config.input_size}
    train_ds = with_transforms(data.raw["train"], model, train=True, seed=run.seed, **size)
    val_ds = with_transforms(data.val, model, train=False, **size) if validate else None
    os.makedirs(run.run_dir, exist_ok=True)
    write_json_atomic(os.path.join(run.run_dir, _STARTED_NAME), train_spec(run, config))
    start = time.perf_counter()
    trainer, result = train_model(model, args, train_ds, val_ds, dataset=config.dataset,
                                  compute_metrics=compute_accuracy if validate else None)
    seconds = time.perf_counter() - start  # this session's part, when resumed
    for name in os.listdir(run.run_dir):  # the model is saved: the epoch checkpoints have done their job
        if name.startswith("checkpoint-"):
            shutil.rmtree(os.path.join(run.run_dir, name))
    if validate:
        trainer.save_state()  # trainer_state.json: the validation top-1 per epoch
    info = {
        "spec": train_spec(run, config),
        "train_seconds": seconds,
        "global_step": trainer.state.global_step,
        "train_metrics": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))},
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    write_json_atomic(os.path.join(run.run_dir, RUN_INFO_NAME), info)
    os.remove(os.path.join(run.run_dir, _STARTED_NAME))
    return info


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
               disable=not progress)
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
        del model
    return {"rows": rows, "stats": stats, "float_model": float_model}


def _train_all(runs_planned: list[Run], data: _Data, config: ReproduceConfig, progress: bool,
               trained_now: set[str]) -> None:
    """Train every planned run not trained yet (adding its folder to `trained_now`). A run another process is
    training (its lock is held) is passed over, and waited for once this process has trained the rest; if that
    process ended without finishing it, this one trains it (from its last epoch)."""
    from tqdm.auto import tqdm

    def train_if_needed(run: Run) -> None:
        if not _training_done(run, config):  # under the lock: another process may be writing the folder
            _train(run, data, config, progress)
            trained_now.add(run.run_dir)

    elsewhere = []
    for run in tqdm(runs_planned, desc="trainings", disable=not progress):
        with _run_lock(run, wait=False) as held:
            if held:
                train_if_needed(run)
            else:
                elsewhere.append(run)
    for run in elsewhere:
        logger.info("%s is being trained by another process: waiting for it.", run.run_dir)
        with _run_lock(run):
            train_if_needed(run)


def _variant_names(run: Run, config: ReproduceConfig, chosen: dict[str, dict[str, float | None]] | None,
                   chosen_weight_decay: dict[str, float | None] | None) -> list[str]:
    """The configured variants `run` is a headline training of, their chosen values resolved (one training can be
    several: the tuned baseline is the default one when the sweep keeps the default weight decay)."""
    if "headline" not in run.roles:
        return []
    resolved = [(v["name"], config.resolve(v, run.model, chosen, chosen_weight_decay)) for v in config.variants]
    return [name for name, v in resolved if v is not None and variant_dir(v) == variant_dir(run.variant)
            and (v["seeds"] is None or run.seed in v["seeds"])]


def _measure_all(
    runs_planned: list[Run], data: _Data, config: ReproduceConfig, progress: bool,
    chosen: dict[str, dict[str, float | None]] | None, plots: bool = True,
    chosen_weight_decay: dict[str, float | None] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """The measured runs (rows, stats, curves; `variant_names`: the configured variants each run is, with their
    `chosen` lambdas resolved) and, with `plots`, what the plots need from the first seed's models."""
    import numpy as np
    from tqdm.auto import tqdm

    from .._targets import find_target_modules
    from ..plots import select_layers

    first = config.seeds[0]
    runs: list[dict[str, Any]] = []
    weights: dict[str, dict[str, dict[str, Any]]] = {}
    layer_stats: dict[str, dict[str, Any]] = {}
    plot_layers: dict[str, list[str]] = {}
    for run in tqdm(runs_planned, desc="low-bit rows", disable=not progress):
        with _run_lock(run):  # another process measuring it writes the same cache: its rows are then reused
            measured = _measure(run, data, config, progress)
        names = _variant_names(run, config, chosen, chosen_weight_decay)
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
            Show progress bars (over the trainings, the runs' low-bit rows, and the Trainer's and fine-tunes' own).
        print_fn (`Callable[[str], Any]`, *optional*, defaults to `print`):
            Where the report goes at the end; `None` prints nothing.

    Returns:
        `dict`: the contents of `output_dir/results.json`: `config`, `data`, `runs` (one per training: model,
        variant, seed, `run_dir`, `trained_now`, `train_seconds`, `stats` and `rows` = `{setting: {accuracy,
        seconds, cached, ...}}`), `summary` (`[model][setting][variant]` = `{seeds, values, mean, std,
        headline}`), `weight_stats`, `lambda_sweep`, `chosen_lambdas` (the `weight: chosen` variants' lambda per
        model), `timing`, `plots`. With `weight: chosen` variants the sweeps are trained and measured first, then
        the chosen variants' other seeds.
    """
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
        _train_all(wd_phase, data, config, progress, trained_now)
        measured, *_ = _measure_all(wd_phase, data, config, progress, None, plots=False)
        chosen_wd = chosen_weight_decays(weight_decay_tables(config, measured))
    if any(v["weight"] == CHOSEN for v in config.variants):  # the sweeps first: they choose those variants' lambdas
        first_phase = plan(config, None, chosen_wd)
        _train_all(first_phase, data, config, progress, trained_now)
        # the choice reads the sweeps' runs and their references' first-seed runs; the rest is measured once, below
        references = {config.reference_of(v) for v in config.variants if v["weight"] == CHOSEN}
        needed = [r for r in first_phase if any(role.startswith("sweep:") for role in r.roles)
                  or (r.seed == config.seeds[0] and references & set(_variant_names(r, config, None, chosen_wd)))]
        measured, *_ = _measure_all(needed, data, config, progress, None, plots=False, chosen_weight_decay=chosen_wd)
        chosen = chosen_lambdas(config, sweep_tables(config, measured))
    runs_planned = plan(config, chosen, chosen_wd)
    _train_all(runs_planned, data, config, progress, trained_now)
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
