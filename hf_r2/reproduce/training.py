"""The trainings of `hf-r2 reproduce`: each planned run trained once (from random init, from its baseline for a
fine-tune, or copied from a baseline trained elsewhere), resumed from its last epoch after an interruption, and
shared between several processes of one config through a lock per run ([`run_lock`], [`train_all`]); each says
when it starts, how far it is and when it ends ([`hf_r2.progress`]). `data` is the run's data (`raw` splits,
`label_names`, `val`), as [`hf_r2.reproduce.pipeline`] loads it."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from typing import Any

from .._utils import read_json, write_json_atomic
from ..progress import quiet_info, say
from .config import RUN_INFO_NAME, ReproduceConfig
from .plan import Run, train_spec
from .variants import BASELINE

__all__ = ["run_lock", "train_all", "run_label"]

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def run_lock(run: Run, *, wait: bool = True):
    """Hold the lock of `run` (the file `<run_dir>.lock`, beside its folder) while training or measuring it, so that
    several `hf-r2 reproduce` processes of one config share its work: each trains the runs no other holds, then
    waits for the others' (see [`train_all`]). Yields whether the lock is held (always, with `wait`). The lock is
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


def _check_baseline(run: Run, config: ReproduceConfig, data: Any) -> None:
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


def _copy_baseline(run: Run, config: ReproduceConfig, data: Any) -> dict[str, Any]:
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


def _train(run: Run, data: Any, config: ReproduceConfig, progress: bool) -> dict[str, Any]:
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
        r2_lambda=0.0 if baseline else variant["weight"],
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
                                  compute_metrics=compute_accuracy if validate else None, log_lines=False,
                                  indent="  ")
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


def train_all(runs_planned: list[Run], data: Any, config: ReproduceConfig, progress: bool,
              trained_now: set[str]) -> None:
    """Train every planned run not trained yet (adding its folder to `trained_now`). A run another process is
    training (its lock is held) is passed over, and waited for once this process has trained the rest; if that
    process ended without finishing it, this one trains it (from its last epoch)."""
    count = len(runs_planned)

    def train_if_needed(run: Run, index: int) -> None:
        heading = f"Training {index} of {count}: {run_label(run)}"
        if _training_done(run, config):  # under the lock: another process may be writing the folder
            if run.run_dir not in trained_now:  # (not when an earlier phase of this invocation trained it)
                say(f"{heading}: trained already, reused")
            return
        say(f"{heading} -> {run.run_dir}")
        with quiet_info("hf_r2.trainer"):  # its checkpoints' INFO lines; the progress lines say where it is
            _train(run, data, config, progress)
        trained_now.add(run.run_dir)

    elsewhere = []
    for index, run in enumerate(runs_planned, 1):
        with run_lock(run, wait=False) as held:
            if held:
                train_if_needed(run, index)
            else:
                elsewhere.append((index, run))
    for index, run in elsewhere:
        say(f"Training {index} of {count}: {run_label(run)} is being trained by another process: waiting for it")
        with run_lock(run):
            train_if_needed(run, index)


def run_label(run: Run) -> str:
    """`resnet10t linf, seed 0`: a training as the progress lines name it."""
    return f"{run.model} {run.variant['name']}, seed {run.seed}"
