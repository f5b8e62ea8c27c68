"""[`LoopConfig`]: the settings of the plain Accelerate loop ([`hf_r2.loop.train_with_accelerate`]), with its
choices ([`OptimizerType`], [`LRSchedulerType`]), its file name ([`LOOP_CONFIG_NAME`]), and what the loop builds from
it: the accelerator, the optimizer's parameter groups, the learning-rate schedule, the checkpoint to resume from, and
the checkpoints themselves ([`save_checkpoint`], [`load_checkpoint`]: nothing in them is unpickled in full)."""

from __future__ import annotations

import contextlib
import enum
import functools
import math
import os
import pickle
import re
import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Iterator

import torch
from torch import nn

from ._finite import check_finite_number
from ._utils import JsonConfigMixin, check_choice, format_choices, read_json, write_json_atomic
from .checkpoints import (
    LOOP_STATE_NAME,
    R2_STATE_NAME,
    CheckpointError,
    load_r2_state,
    publish_folder,
    resolve_resume,
    safe_torch_load,
    save_r2_state,
    staging_folder,
)

if TYPE_CHECKING:
    from .config import R2Config
    from .regularizer import R2Regularizer

__all__ = [
    "LOOP_CONFIG_NAME",
    "LRSchedulerType",
    "LoopConfig",
    "OptimizerType",
    "check_accelerator",
    "create_accelerator",
    "create_lr_scheduler",
    "create_optimizer",
    "load_checkpoint",
    "resolve_checkpoint",
    "save_checkpoint",
    "tracker_config",
]

LOOP_CONFIG_NAME = "loop_config.json"
# what accelerate's `register_for_checkpointing` writes, and its `load_state` reads with `weights_only=False`
_CUSTOM_PICKLE = re.compile(r"^custom_checkpoint_(\d+)\.pkl$")


class OptimizerType(str, enum.Enum):
    """Optimizers of the loop. Plain strings are accepted wherever an `OptimizerType` is."""

    SGD = "sgd"
    ADAMW = "adamw"


class LRSchedulerType(str, enum.Enum):
    """Learning-rate schedules of the loop (both after a linear warm-up)."""

    COSINE = "cosine"
    CONSTANT = "constant"


_MIXED_PRECISION = ("no", "fp16", "bf16")


@dataclass
class LoopConfig(JsonConfigMixin):
    """Settings of [`train_with_accelerate`]: everything but the R2 settings, which live in [`R2Config`].

    > Parameters that control the run

    output_dir (`str`, *optional*, defaults to `"outputs"`):
        Where checkpoints (`checkpoints/step_<n>`), tracker logs and the final model (`model/`) are written.
    num_epochs (`int`, *optional*, defaults to `1`):
        Passes over the training set (ignored when `max_steps` is set).
    max_steps (`int`, *optional*, defaults to `-1`):
        Total optimizer steps; overrides `num_epochs` when positive.
    seed (`int`, *optional*, defaults to `42`):
        Seed of the RNGs (`accelerate.utils.set_seed`), of the shuffling (accelerate's seedable sampler, with
        `data_seed=seed` in the accelerator [`train_with_accelerate`] builds: epoch `e` is shuffled by a generator
        seeded with `seed + e`, the same on every process and after a resume) and of the augmentation of a
        [`hf_r2.data.SeededTransformDataset`] built without a seed.

    > Parameters that control the batches

    per_device_batch_size (`int`, *optional*, defaults to `32`):
        Training micro-batch per process. The global batch per optimizer step is
        `per_device_batch_size * num_processes * gradient_accumulation_steps`.
    per_device_eval_batch_size (`int`, *optional*):
        Evaluation batch per process; defaults to `per_device_batch_size`.
    gradient_accumulation_steps (`int`, *optional*, defaults to `1`):
        Micro-batches per optimizer step. As in accelerate, an epoch's last, incomplete group still divides its
        task losses by this number; the R2 term is `lambda * R` on every step.
    dataloader_num_workers (`int`, *optional*, defaults to `0`):
        Worker processes of each `DataLoader`.

    > Parameters of the optimizer and schedule

    optimizer (`str` or [`OptimizerType`], *optional*, defaults to `"sgd"`):
        `"sgd"` (with `momentum`) or `"adamw"`.
    learning_rate (`float`, *optional*, defaults to `0.01`):
        Peak learning rate, also used for the R2 parameters.
    momentum (`float`, *optional*, defaults to `0.9`):
        SGD momentum.
    weight_decay (`float`, *optional*, defaults to `0.0`):
        Decoupled (AdamW) or L2 (SGD) weight decay on weights; biases, norm parameters, the model's
        `no_weight_decay()` names and the R2 parameters never decay.
    lr_scheduler_type (`str` or [`LRSchedulerType`], *optional*, defaults to `"cosine"`):
        `"cosine"` (to zero at the last step) or `"constant"`, after the warm-up.
    lr_warmup_steps (`int`, *optional*, defaults to `0`):
        Optimizer steps of linear learning-rate warm-up from 0 (R2's lambda has its own warm-up, in `R2Config`).

    > Parameters of precision and hardware

    mixed_precision (`str`, *optional*, defaults to `"no"`):
        `"no"`, `"fp16"` or `"bf16"`, passed to the `Accelerator`. The R2 terms are always computed in float32.
        On the CPU, accelerate applies only `"bf16"` (autocast); `"fp16"` runs in float32 there, with a warning.
    use_cpu (`bool`, *optional*, defaults to `False`):
        Train on the CPU even if a GPU is present. Needed for several CPU processes: without it, processes started
        by `accelerate launch --multi_gpu` on a machine without GPUs train alone, without DDP.

    > Parameters of checkpoints, evaluation and logging

    checkpointing_steps (`int`, *optional*):
        Save the full training state (`accelerator.save_state`) every this many optimizer steps, to
        `output_dir/checkpoints/step_<n>`.
    resume_from_checkpoint (`str`, *optional*):
        A checkpoint folder to resume from, or `"latest"` (also `"true"`) for the newest complete one under
        `output_dir/checkpoints` (none yet: start from the beginning, with a warning).
    logging_steps (`int`, *optional*, defaults to `10`):
        Log the training metrics (averaged over processes) every this many optimizer steps.
    log_with (`str`, *optional*):
        Tracker for `accelerator.log`, such as `"tensorboard"`, `"wandb"` or `"all"`; `None` or `"none"` for none.
    tracker_project_name (`str`, *optional*, defaults to `"hf-r2"`):
        Project (run) name given to the trackers.
    save_model (`bool`, *optional*, defaults to `True`):
        At the end, save the trained model to `output_dir/model` with `r2_config.json` and `r2_stats.json`.

    The evaluation set, if one is given, is evaluated at the end of every epoch.
    """

    config_name: ClassVar[str] = LOOP_CONFIG_NAME

    # the run
    output_dir: str = field(default="outputs", metadata={"help": "Where checkpoints, logs and the model go."})
    num_epochs: int = field(default=1, metadata={"help": "Passes over the training set (unless `max_steps`)."})
    max_steps: int = field(default=-1, metadata={"help": "Total optimizer steps; overrides `num_epochs` if > 0."})
    seed: int = field(default=42, metadata={"help": "Seed of the RNGs, the shuffling and the augmentation."})
    # the batches
    per_device_batch_size: int = field(default=32, metadata={"help": "Training micro-batch per process."})
    per_device_eval_batch_size: int | None = field(
        default=None, metadata={"help": "Evaluation batch per process (default: `per_device_batch_size`)."}
    )
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "Worker processes of each DataLoader."})
    # optimizer and schedule
    optimizer: str = field(default="sgd", metadata={"help": f"One of {format_choices(OptimizerType)}."})
    learning_rate: float = field(default=0.01, metadata={"help": "Peak learning rate (also for the R2 parameters)."})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum."})
    weight_decay: float = field(
        default=0.0, metadata={"help": "Weight decay on weights (never on biases, norms or R2 parameters)."}
    )
    lr_scheduler_type: str = field(
        default="cosine", metadata={"help": f"After the warm-up, one of {format_choices(LRSchedulerType)}."}
    )
    lr_warmup_steps: int = field(default=0, metadata={"help": "Optimizer steps of linear learning-rate warm-up."})
    # precision and hardware
    mixed_precision: str = field(default="no", metadata={"help": f"One of {format_choices(_MIXED_PRECISION)}."})
    use_cpu: bool = field(default=False, metadata={"help": "Train on the CPU (needed for several CPU processes)."})
    # checkpoints, evaluation, logging
    checkpointing_steps: int | None = field(
        default=None, metadata={"help": "Save the training state every this many optimizer steps."}
    )
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "Checkpoint folder to resume from, or `latest`."}
    )
    logging_steps: int = field(default=10, metadata={"help": "Log training metrics every this many steps."})
    log_with: str | None = field(
        default=None, metadata={"help": "Tracker for `accelerator.log` (`tensorboard`, `wandb`, `all`, `none`)."}
    )
    tracker_project_name: str = field(default="hf-r2", metadata={"help": "Project name given to the trackers."})
    save_model: bool = field(default=True, metadata={"help": "Save the trained model to `output_dir/model`."})

    def __post_init__(self) -> None:
        self.output_dir = os.fspath(self.output_dir)
        if not self.output_dir:
            raise ValueError("`output_dir` must be a non-empty path, got ''.")
        for name in ("num_epochs", "per_device_batch_size", "gradient_accumulation_steps", "logging_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"`max_steps` must be > 0, or -1 to use `num_epochs`, got {self.max_steps}.")
        for name in ("per_device_eval_batch_size", "checkpointing_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"`{name}` must be >= 1 or None, got {value!r}.")
        for name in ("dataloader_num_workers", "lr_warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)}.")
        for name in ("learning_rate", "weight_decay", "momentum"):  # NaN passes `x < 0`; NaN / inf would train
            check_finite_number(name, getattr(self, name))
        if not self.learning_rate > 0:
            raise ValueError(f"`learning_rate` must be > 0, got {self.learning_rate}.")
        if self.weight_decay < 0:
            raise ValueError(f"`weight_decay` must be >= 0, got {self.weight_decay}.")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"`momentum` must be in [0, 1), got {self.momentum}.")
        self.optimizer = check_choice("optimizer", self.optimizer, OptimizerType)
        self.lr_scheduler_type = check_choice("lr_scheduler_type", self.lr_scheduler_type, LRSchedulerType)
        self.mixed_precision = str(getattr(self.mixed_precision, "value", self.mixed_precision))
        if self.mixed_precision not in _MIXED_PRECISION:
            hint = " Did you mean `mixed_precision='no'`?" if self.mixed_precision in ("fp32", "none", "") else ""
            raise ValueError(
                f"`mixed_precision` must be one of {format_choices(_MIXED_PRECISION)}, "
                f"got {self.mixed_precision!r}.{hint}"
            )
        if isinstance(self.log_with, str) and self.log_with.lower() == "none":
            self.log_with = None

    @property
    def eval_batch_size(self) -> int:
        return self.per_device_eval_batch_size or self.per_device_batch_size


# ----------------------------------------------------------------------------------------------------------------
# What the loop builds from a LoopConfig
# ----------------------------------------------------------------------------------------------------------------


def _param_groups(model: nn.Module, regularizer: R2Regularizer | None, weight_decay: float) -> list[dict[str, Any]]:
    """Weights decay; biases, 1-d parameters (norms), the model's `no_weight_decay()` names and R2 parameters don't."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias") or name in skip:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
        {"params": [] if regularizer is None else list(regularizer.parameters()), "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def create_optimizer(model: nn.Module, regularizer: R2Regularizer | None, config: LoopConfig) -> torch.optim.Optimizer:
    groups = _param_groups(model, regularizer, config.weight_decay)
    if config.optimizer == OptimizerType.SGD.value:
        return torch.optim.SGD(groups, lr=config.learning_rate, momentum=config.momentum)
    return torch.optim.AdamW(groups, lr=config.learning_rate)


def _lr_factor(scheduler_step: int, *, scale: int, warmup: int, total: int, kind: str) -> float:
    # `scale` scheduler steps make one optimizer step (accelerate steps a prepared scheduler once per process)
    step = scheduler_step / scale
    if step < warmup:
        return step / warmup
    if kind == LRSchedulerType.CONSTANT.value:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def create_lr_scheduler(
    optimizer: torch.optim.Optimizer, config: LoopConfig, max_steps: int, scale: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine or constant, as a function of the optimizer step.

    A scheduler prepared by accelerate without `split_batches` is stepped `num_processes` times per optimizer
    step (it assumes the schedule was written for one process seeing the global batch in smaller batches), hence
    `scale`: the learning rate at optimizer step `k` is the same for any number of processes.
    """
    factor = functools.partial(
        _lr_factor, scale=scale, warmup=config.lr_warmup_steps, total=max_steps, kind=config.lr_scheduler_type
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def create_accelerator(config: LoopConfig):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    return Accelerator(
        cpu=config.use_cpu,
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=config.log_with,
        project_dir=config.output_dir,
        # seed + epoch shuffles identically on every process and after a resume
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
    )


def check_accelerator(accelerator, config: LoopConfig) -> None:
    if accelerator.gradient_accumulation_steps != config.gradient_accumulation_steps:
        raise ValueError(
            f"The accelerator has `gradient_accumulation_steps={accelerator.gradient_accumulation_steps}` but "
            f"`config.gradient_accumulation_steps={config.gradient_accumulation_steps}`: build it with "
            f"`Accelerator(gradient_accumulation_steps={config.gradient_accumulation_steps}, ...)`."
        )
    if str(accelerator.mixed_precision) != config.mixed_precision:
        raise ValueError(
            f"The accelerator has `mixed_precision={accelerator.mixed_precision!r}` but "
            f"`config.mixed_precision={config.mixed_precision!r}`: make them agree."
        )
    if not accelerator.step_scheduler_with_optimizer:
        raise ValueError(
            "The accelerator has `step_scheduler_with_optimizer=False`; this loop steps the scheduler with the "
            "optimizer: build it with `Accelerator(step_scheduler_with_optimizer=True, ...)`."
        )


def resolve_checkpoint(config: LoopConfig) -> str | None:
    """The folder `config.resume_from_checkpoint` names, or `None` to start from the beginning: `"latest"` (or
    `True`) is the newest complete `step_<n>` under `output_dir/checkpoints` ([`hf_r2.checkpoints.resolve_resume`])."""
    return resolve_resume(config.resume_from_checkpoint, os.path.join(config.output_dir, "checkpoints"), loop=True)


def save_checkpoint(accelerator, folder: str, global_step: int = 0, regularizer: R2Regularizer | None = None) -> str:
    """`accelerator.save_state` into a staging folder, renamed to `folder` once every process has written its part,
    so an interrupted save never leaves a `step_<n>` that looks complete. The main process adds the step counter and
    the R2 settings (`loop_state.json`: `R2Config.to_dict()`, or null without R2, which
    [`~hf_r2.checkpoints.check_r2_state`] compares on resume) and R2's learnable parameters
    (`r2_regularizer.safetensors`): data that [`load_checkpoint`] reads without unpickling, where accelerate's
    `register_for_checkpointing` would write pickles."""
    import shutil

    staging = staging_folder(folder)
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(staging)
    if accelerator.is_main_process:
        r2 = None if regularizer is None else regularizer.config.to_dict()
        write_json_atomic(os.path.join(staging, LOOP_STATE_NAME), {"global_step": int(global_step), "r2_config": r2})
        if regularizer is not None:
            save_r2_state(regularizer, staging)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        publish_folder(staging, folder)
    accelerator.wait_for_everyone()
    return folder


def load_checkpoint(accelerator, folder: str, regularizer: R2Regularizer | None = None) -> int:
    """Resume from the loop checkpoint `folder` ([`save_checkpoint`]): accelerate's states (model, optimizer,
    scheduler, random states), R2's learnable parameters into `regularizer`; returns the step counter.

    Nothing is unpickled in full, so a checkpoint from anywhere runs no code: accelerate reads the model from
    safetensors and the other states with `weights_only=True` (tensors and plain values), but the files of
    `register_for_checkpointing` (`custom_checkpoint_<i>.pkl`) with `weights_only=False`, so accelerate is shown the
    folder without them. hf-r2 0.1.0 kept the step counter and R2's parameters in those files: such a checkpoint
    is read with `weights_only=True` instead. The random states, which accelerate skips silently when they do not
    load (a resume that is no longer exact), are read first. A file that holds more than tensors and plain values
    is a [`~hf_r2.checkpoints.CheckpointError`] naming it.
    """
    global_step = _load_loop_state(folder, regularizer)
    random_states = os.path.join(folder, f"random_states_{accelerator.process_index}.pkl")
    if os.path.isfile(random_states):
        safe_torch_load(random_states)
    with _without_custom_pickles(folder) as visible:
        try:
            accelerator.load_state(visible)
        except pickle.UnpicklingError:  # torch's message names no file: find it
            for name in sorted(os.listdir(folder)):
                if name.endswith((".bin", ".pkl", ".pt", ".pth")) and not _CUSTOM_PICKLE.match(name):
                    safe_torch_load(os.path.join(folder, name))
            raise
    return global_step


def _load_loop_state(folder: str, regularizer: R2Regularizer | None) -> int:
    """The step counter of `folder`, with R2's parameters loaded into `regularizer` (see [`load_checkpoint`])."""
    path = os.path.join(folder, LOOP_STATE_NAME)
    if os.path.isfile(path):
        try:
            step = read_json(path).get("global_step")
        except (ValueError, AttributeError):
            step = None
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise CheckpointError(f"{path} does not hold a step count ({{\"global_step\": <n>}}): resume from a "
                                  "checkpoint that train_with_accelerate wrote.")
        if regularizer is not None and not load_r2_state(regularizer, folder):
            raise CheckpointError(f"{folder} holds no {R2_STATE_NAME}: it was saved without R2; resume it without "
                                  "R2, or start over without resume_from_checkpoint.")
        return step
    pickles = sorted((int(m.group(1)), name) for name in os.listdir(folder) if (m := _CUSTOM_PICKLE.match(name)))
    if len(pickles) != (1 if regularizer is None else 2):  # hf-r2 0.1.0 registered (regularizer,) loop state
        raise CheckpointError(f"{folder} holds no {LOOP_STATE_NAME}"
                              + (" and not the state files of an R2 run" if pickles and regularizer is None else "")
                              + ": resume from a checkpoint that train_with_accelerate wrote, with the same R2 "
                              "settings.")
    states = [safe_torch_load(os.path.join(folder, name), map_location="cpu") for _, name in pickles]
    step = states[-1].get("global_step") if isinstance(states[-1], dict) else None
    if not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{os.path.join(folder, pickles[-1][1])} does not hold a step count: resume from a "
                              "checkpoint that train_with_accelerate wrote.")
    if regularizer is not None:
        try:
            regularizer.load_state_dict(states[0])
        except (RuntimeError, TypeError, AttributeError) as err:
            raise CheckpointError(f"{os.path.join(folder, pickles[0][1])} does not hold this run's R2 parameters "
                                  f"({str(err).splitlines()[0]}): resume with the same R2 settings.") from None
    return step


@contextlib.contextmanager
def _without_custom_pickles(folder: str) -> Iterator[str]:
    """`folder`, or, if it holds `custom_checkpoint_<i>.pkl` files, a temporary folder of links to everything else."""
    names = os.listdir(folder)
    if not any(_CUSTOM_PICKLE.match(name) for name in names):
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="hf-r2-resume-") as view:
        for name in names:
            if not _CUSTOM_PICKLE.match(name):
                os.symlink(os.path.abspath(os.path.join(folder, name)), os.path.join(view, name))
        yield view


def tracker_config(config: LoopConfig, r2_config: R2Config | None) -> dict[str, Any]:
    """Both configs (the loop's alone without R2) flattened to the scalar types trackers accept."""
    r2_values = {} if r2_config is None else {f"r2_config.{k}": v for k, v in r2_config.to_dict().items()}
    values = {**config.to_dict(), **r2_values}
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in values.items()}
