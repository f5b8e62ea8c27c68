"""A plain 🤗 Accelerate training loop with R2-Loss, for timm and transformers image classifiers.

Paper: "R2 Loss: Range Restriction Loss for Model Compression and Quantization", Kundu et al., 2023
(https://huggingface.co/papers/2303.08253).

Modelled on `huggingface/accelerate:examples/complete_cv_example.py`: one `Accelerator` handles devices, DDP,
mixed precision, gradient accumulation, checkpoints and trackers, and the loop reads top to bottom. The same code
runs on one CPU, under `accelerate launch` on several GPUs, or on several CPU processes
(`accelerate launch --multi_gpu --num_processes 2 ...` with `LoopConfig(use_cpu=True)`).

How R2 fits into the loop:

- The learnable R2 parameters (margins, temperatures) live in the [`R2Regularizer`], outside the DDP module, so
  their gradients are not all-reduced. They stay identical on every process because R2 depends only on the model
  weights (identical after every DDP step) and on themselves.
- Per optimizer step the loss is `mean_task_loss + lambda(step) * R`, whatever `gradient_accumulation_steps`:
  the weights do not change between micro-batches, so R is computed once, on the micro-batch that ends the step
  (`accelerator.sync_gradients`), and multiplied by `gradient_accumulation_steps` to cancel the division that
  `accelerator.backward` applies to every micro-batch. `lambda` warms up with the optimizer-step count.
- `accelerator.save_state` checkpoints the model, optimizer, scheduler and RNG states; the regularizer and the
  step counter are registered with `accelerator.register_for_checkpointing`, so a resumed run continues exactly.
"""

from __future__ import annotations

import enum
import functools
import logging
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader, Dataset

from ._utils import JsonConfigMixin, check_choice, format_choices
from .config import R2Config
from .models import classification_loss, forward_logits
from .regularizer import R2Regularizer, find_target_modules
from .saving import save_model_folder

__all__ = [
    "LOOP_CONFIG_NAME",
    "LRSchedulerType",
    "LoopConfig",
    "finetune",
    "LoopState",
    "OptimizerType",
    "evaluate",
    "train_one_epoch",
    "train_with_accelerate",
]

logger = logging.getLogger(__name__)

LOOP_CONFIG_NAME = "loop_config.json"
_CHECKPOINT_RE = re.compile(r"^step_(\d+)$")


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
        Seed of the RNGs (`accelerate.utils.set_seed`) and of the per-epoch shuffling: epoch `e` is shuffled with
        `torch.randperm` seeded by `seed + e`, the same on every process, so that runs are reproducible and resumable.

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
        Optimizer steps of linear learning-rate warm-up from 0 (the R2 weight has its own warm-up, in `R2Config`).

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
        A checkpoint folder to resume from, or `"latest"` for the newest one under `output_dir/checkpoints`.
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
    seed: int = field(default=42, metadata={"help": "Seed of the RNGs and of the per-epoch shuffling."})
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


class LoopState:
    """Training progress saved with every checkpoint (registered with `accelerator.register_for_checkpointing`).

    `global_step` counts the optimizer steps done; the epoch and the position inside it follow from it.
    """

    def __init__(self) -> None:
        self.global_step = 0

    def state_dict(self) -> dict[str, int]:
        return {"global_step": self.global_step}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.global_step = int(state_dict["global_step"])


# ----------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------


def train_one_epoch(
    model: nn.Module,
    regularizer: R2Regularizer,
    dataloader: DataLoader,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    accelerator: Any,
    state: LoopState,
    config: LoopConfig,
    *,
    max_steps: int | None = None,
    steps_per_epoch: int | None = None,
    progress_bar: Any = None,
) -> dict[str, float]:
    """One pass over `dataloader` (or until `max_steps`), with R2-Loss, logging and checkpoints.

    Every object must have gone through `accelerator.prepare`, except `regularizer`, which is built on the
    unwrapped model and whose parameters are in `optimizer`. Per optimizer step the loss is
    `mean_task_loss + lambda(state.global_step) * R`, with `R = regularizer()` computed once, on the last
    micro-batch of the step (see the module docstring).

    Args:
        model (`torch.nn.Module`): the prepared model.
        regularizer ([`R2Regularizer`]): built on the unwrapped model.
        dataloader (`torch.utils.data.DataLoader`): the prepared training dataloader (or a `skip_first_batches` view).
        optimizer (`torch.optim.Optimizer`): the prepared optimizer, holding the R2 parameters too.
        lr_scheduler: the prepared scheduler.
        accelerator (`accelerate.Accelerator`): the accelerator that prepared them.
        state ([`LoopState`]): the step counter, updated in place.
        config ([`LoopConfig`]): for `logging_steps`, `checkpointing_steps` and `output_dir`.
        max_steps (`int`, *optional*): stop once `state.global_step` reaches it.
        steps_per_epoch (`int`, *optional*): optimizer steps per epoch, to log a fractional `epoch`.
        progress_bar (`tqdm.tqdm`, *optional*): advanced by one per optimizer step.

    Logged every `config.logging_steps` optimizer steps with `accelerator.log`: `loss = task_loss + r2_loss`,
    `task_loss` (mean over micro-batches and processes), `r2_loss` (`lambda * R`), `r2_lambda`, `lr`, `epoch` and the
    range statistics of [`R2Regularizer.stats`] (`r2_max_abs`, `r2_mean_max_over_std`, `r2_max_max_over_std`,
    `r2_mean_kurtosis`).

    Returns:
        `dict[str, float]`: the epoch's means of `loss`, `task_loss` and `r2_loss`, and the last `r2_lambda`;
        empty if no step was taken.
    """
    model.train()
    ga = accelerator.gradient_accumulation_steps
    device = accelerator.device
    # running sums: [task loss over micro-batches, micro-batches, lambda * R over steps, steps]
    window = torch.zeros(4, device=device)
    epoch_sums = torch.zeros(4, device=device)
    lam = regularizer.weight_at(state.global_step)
    for batch in dataloader:
        with accelerator.accumulate(model):
            step_ends = accelerator.sync_gradients
            # a parametrized weight (DKM clustering) is computed once for the model and R2 alike
            with parametrize.cached():
                task_loss, _ = classification_loss(model, batch["pixel_values"], batch["labels"])
                loss = task_loss
                if step_ends:
                    lam = regularizer.weight_at(state.global_step)
                    # R is not computed at lambda = 0 (the baseline, a fine-tune without R2)
                    r2 = regularizer() if lam > 0 else task_loss.new_zeros(())
                    # `backward` divides by `ga`; R is the same on every micro-batch, so it enters once, times `ga`
                    loss = loss + (lam * ga) * r2
            accelerator.backward(loss)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
        window[0] += task_loss.detach().float()
        window[1] += 1
        if not step_ends:
            continue
        window[2] += lam * r2.detach()
        window[3] += 1
        state.global_step += 1
        if progress_bar is not None:
            progress_bar.update(1)
        stop = max_steps is not None and state.global_step >= max_steps
        if state.global_step % config.logging_steps == 0 or stop:
            epoch_sums += window
            means = _reduce_means(accelerator, window)
            window.zero_()
            logs = {**means, "r2_lambda": lam, "lr": lr_scheduler.get_last_lr()[0], **_range_stats(regularizer)}
            if steps_per_epoch:
                logs["epoch"] = state.global_step / steps_per_epoch
            accelerator.log(logs, step=state.global_step)
            if progress_bar is not None:
                progress_bar.set_postfix(loss=f"{means['loss']:.4f}", r2_max_abs=f"{logs['r2_max_abs']:.4g}")
        if config.checkpointing_steps and state.global_step % config.checkpointing_steps == 0:
            accelerator.save_state(os.path.join(config.output_dir, "checkpoints", f"step_{state.global_step}"))
        if stop:
            break
    epoch_sums += window
    if epoch_sums[3] == 0:
        return {}
    return {**_reduce_means(accelerator, epoch_sums), "r2_lambda": lam}


def _reduce_means(accelerator: Any, sums: torch.Tensor) -> dict[str, float]:
    """Means of the running sums; the task loss averaged over processes too (all have the same counts), the R2
    term is the same on every process."""
    task = accelerator.reduce(sums[0] / sums[1].clamp_min(1), reduction="mean").item()
    r2_term = (sums[2] / sums[3].clamp_min(1)).item()
    return {"loss": task + r2_term, "task_loss": task, "r2_loss": r2_term}


def _range_stats(regularizer: R2Regularizer) -> dict[str, float]:
    """`regularizer.stats()["overall"]` as `r2_max_abs`, `r2_mean_max_over_std`, ... (the names R2Trainer logs)."""
    return {f"r2_{k}": v for k, v in regularizer.stats()["overall"].items()}


@torch.no_grad()
def evaluate(model: nn.Module, dataloader: DataLoader, accelerator: Any) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy of `model` over a prepared `dataloader`, across all processes.

    Predictions, labels and per-sample losses go through `accelerator.gather_for_metrics`, which drops the samples
    that a prepared dataloader repeats to give every process a full last batch, so the numbers are those of one
    pass over the dataset. The model is put in eval mode, and back in its previous mode at the end.

    Returns:
        `dict[str, float]`: `{"accuracy": ..., "loss": ...}`.
    """
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=accelerator.device)
    loss_sum = torch.zeros((), device=accelerator.device)
    count = 0
    for batch in dataloader:
        logits = forward_logits(model, batch["pixel_values"]).float()
        losses = F.cross_entropy(logits, batch["labels"], reduction="none")
        preds, labels, losses = accelerator.gather_for_metrics((logits.argmax(-1), batch["labels"], losses))
        correct += (preds == labels).sum()
        loss_sum += losses.sum()
        count += labels.numel()
    model.train(was_training)
    if count == 0:
        raise ValueError("`evaluate` got an empty dataloader: the evaluation dataset has no samples.")
    return {"accuracy": correct.item() / count, "loss": loss_sum.item() / count}


# ----------------------------------------------------------------------------------------------------------------
# Private builders
# ----------------------------------------------------------------------------------------------------------------


def _param_groups(model: nn.Module, regularizer: R2Regularizer, weight_decay: float) -> list[dict[str, Any]]:
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
        {"params": list(regularizer.parameters()), "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def _create_optimizer(model: nn.Module, regularizer: R2Regularizer, config: LoopConfig) -> torch.optim.Optimizer:
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


def _create_scheduler(
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


def _create_accelerator(config: LoopConfig):
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


def _check_accelerator(accelerator, config: LoopConfig) -> None:
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


def _resolve_checkpoint(config: LoopConfig) -> str:
    path = config.resume_from_checkpoint
    if path == "latest":
        root = os.path.join(config.output_dir, "checkpoints")
        steps = sorted(
            (int(m.group(1)), name)
            for name in (os.listdir(root) if os.path.isdir(root) else [])
            if (m := _CHECKPOINT_RE.match(name))
        )
        if not steps:
            raise FileNotFoundError(f"`resume_from_checkpoint='latest'` but there is no step_<n> folder in {root!r}.")
        return os.path.join(root, steps[-1][1])
    if not os.path.isdir(path):
        raise FileNotFoundError(f"`resume_from_checkpoint={path!r}` is not a folder.")
    return path


def _tracker_config(config: LoopConfig, r2_config: R2Config) -> dict[str, Any]:
    """Both configs flattened to the scalar types trackers accept."""
    values = {**config.to_dict(), **{f"r2_config.{k}": v for k, v in r2_config.to_dict().items()}}
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in values.items()}


# ----------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------


def train_with_accelerate(
    model: nn.Module,
    train_dataset: Dataset,
    eval_dataset: Dataset | None = None,
    *,
    r2_config: R2Config | None = None,
    config: LoopConfig,
    collate_fn: Callable | None = None,
    accelerator: Any = None,
    regularizer: R2Regularizer | None = None,
) -> dict[str, float]:
    """Train an image classifier with R2-Loss in a plain Accelerate loop; run it under `accelerate launch`.

    Batches are dicts `{"pixel_values": (B, 3, H, W) float, "labels": (B,) long}`; the task loss is
    [`~hf_r2.models.classification_loss`], so timm and transformers models train the same way. The model is
    trained in place. Each optimizer step minimises `mean_task_loss + lambda(step) * sum_l R(W_l)`, with `lambda`
    from `r2_config` (`weight` and `warmup_steps`, counted in optimizer steps).

    Args:
        model (`torch.nn.Module`):
            A timm or transformers image classifier (not yet prepared). Avoid batch norm if the result must not
            depend on the number of processes (each process normalises its own micro-batch).
        train_dataset (`torch.utils.data.Dataset`):
            Map-style dataset of examples that `collate_fn` turns into batches. On several processes, accelerate
            repeats the first samples to fill the last global batch when the length does not divide evenly.
        eval_dataset (`torch.utils.data.Dataset`, *optional*):
            Evaluated with [`evaluate`] at the end of every epoch.
        r2_config ([`R2Config`], *optional*):
            The R2 settings; required unless `regularizer` is given.
        config ([`LoopConfig`]):
            The loop settings.
        collate_fn (`Callable`, *optional*):
            Batches examples (default: `torch.utils.data.default_collate`), e.g. [`hf_r2.data.collate_fn`].
        accelerator (`accelerate.Accelerator`, *optional*):
            Built from `config` if omitted. If given, its `gradient_accumulation_steps` and `mixed_precision` must
            match `config`'s. Build it with `dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True)`
            for the shuffling to be the same on every process and after a resume.
        regularizer ([`R2Regularizer`], *optional*):
            An existing regularizer built on `model` (useful to read its parameters afterwards). It must start
            identical on every process (build the model after `accelerate.utils.set_seed`). By default one is
            built from `r2_config` after `accelerator.prepare(model)`, once DDP has synchronised the weights.

    Returns:
        `dict[str, float]`: `global_step`, `epoch`, the last epoch's `train_loss`, `train_task_loss` and
        `train_r2_loss` (`lambda * R`), the last `r2_lambda`, the final range statistics `r2_max_abs`,
        `r2_mean_max_over_std`, `r2_max_max_over_std`, `r2_mean_kurtosis`, and `eval_accuracy` / `eval_loss` when
        `eval_dataset` is given.

    ```python
    >>> # accelerate launch --multi_gpu --num_processes 2 train.py
    >>> from hf_r2 import LoopConfig, R2Config, create_model, train_with_accelerate
    >>> model = create_model("resnet18", num_classes=10)
    >>> metrics = train_with_accelerate(
    ...     model, train_ds, eval_ds, r2_config=R2Config(loss="margin", weight=0.01),
    ...     config=LoopConfig(output_dir="out", num_epochs=3, learning_rate=0.05), collate_fn=collate_fn,
    ... )
    ```
    """
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    if regularizer is not None:
        if r2_config is not None and r2_config != regularizer.config:
            raise ValueError("`r2_config` differs from `regularizer.config`: pass only one of them.")
        r2_config = regularizer.config
    if r2_config is None:
        raise ValueError("Pass `r2_config=R2Config(...)` (or an existing `regularizer=`).")
    if accelerator is None:
        accelerator = _create_accelerator(config)
    else:
        _check_accelerator(accelerator, config)
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        logger.warning("`mixed_precision='fp16'` has no effect on the CPU (accelerate runs float32 there); "
                       "use `mixed_precision='bf16'` for CPU autocast.")
    set_seed(config.seed)
    if accelerator.is_main_process:
        config.save_pretrained(config.output_dir)

    # The model goes to its device before anything refers to its weights; R2 is built on the unwrapped model
    # after `prepare`, so that its margins start from the weights DDP has just made identical on every process.
    model = accelerator.prepare(model.to(accelerator.device))
    if regularizer is None:
        regularizer = R2Regularizer(accelerator.unwrap_model(model), r2_config)
    regularizer.to(accelerator.device)
    optimizer = _create_optimizer(accelerator.unwrap_model(model), regularizer, config)

    # With `split_batches`, accelerate cuts every loader batch in `num_processes` pieces: scale it to keep the
    # per-device size.
    loader_scale = accelerator.num_processes if accelerator.split_batches else 1
    train_dataloader = DataLoader(
        train_dataset, batch_size=config.per_device_batch_size * loader_scale, shuffle=True,
        collate_fn=collate_fn, num_workers=config.dataloader_num_workers,
    )
    dataloaders = [train_dataloader]
    if eval_dataset is not None:
        dataloaders.append(DataLoader(
            eval_dataset, batch_size=config.eval_batch_size * loader_scale, shuffle=False,
            collate_fn=collate_fn, num_workers=config.dataloader_num_workers,
        ))
    dataloaders = accelerator.prepare(*dataloaders)
    train_dataloader, eval_dataloader = (dataloaders, None) if eval_dataset is None else dataloaders

    steps_per_epoch = math.ceil(len(train_dataloader) / config.gradient_accumulation_steps)
    if config.max_steps > 0:
        max_steps, num_epochs = config.max_steps, math.ceil(config.max_steps / steps_per_epoch)
    else:
        max_steps, num_epochs = config.num_epochs * steps_per_epoch, config.num_epochs
    scheduler_scale = 1 if accelerator.split_batches else accelerator.num_processes
    lr_scheduler = _create_scheduler(optimizer, config, max_steps, scheduler_scale)
    optimizer, lr_scheduler = accelerator.prepare(optimizer, lr_scheduler)

    state = LoopState()
    accelerator.register_for_checkpointing(regularizer, state)
    if config.resume_from_checkpoint:
        checkpoint = _resolve_checkpoint(config)
        accelerator.print(f"Resuming from {checkpoint}")
        accelerator.load_state(checkpoint)
    if accelerator.log_with:
        accelerator.init_trackers(config.tracker_project_name, config=_tracker_config(config, r2_config))

    progress_bar = tqdm(
        total=max_steps, initial=state.global_step, disable=not accelerator.is_local_main_process, desc="train"
    )
    start_epoch = state.global_step // steps_per_epoch
    metrics: dict[str, float] = {}
    for epoch in range(start_epoch, num_epochs):
        if state.global_step >= max_steps:
            break
        train_dataloader.set_epoch(epoch)
        active_dataloader = train_dataloader
        resume_batches = (state.global_step - epoch * steps_per_epoch) * config.gradient_accumulation_steps
        if resume_batches > 0:
            active_dataloader = accelerator.skip_first_batches(train_dataloader, resume_batches)
        train_metrics = train_one_epoch(
            model, regularizer, active_dataloader, optimizer, lr_scheduler, accelerator, state, config,
            max_steps=max_steps, steps_per_epoch=steps_per_epoch, progress_bar=progress_bar,
        )
        if train_metrics:
            metrics.update({f"train_{k}": v for k, v in train_metrics.items() if k != "r2_lambda"},
                           r2_lambda=train_metrics["r2_lambda"])
        if eval_dataloader is not None:
            eval_metrics = {f"eval_{k}": v for k, v in evaluate(model, eval_dataloader, accelerator).items()}
            metrics.update(eval_metrics)
            accelerator.log({**eval_metrics, "epoch": epoch + 1}, step=state.global_step)
            accelerator.print(f"epoch {epoch}: " + ", ".join(f"{k}={v:.4f}" for k, v in eval_metrics.items()))
    progress_bar.close()

    metrics.update(global_step=state.global_step, epoch=state.global_step / steps_per_epoch)
    metrics.update(_range_stats(regularizer))
    accelerator.wait_for_everyone()
    if config.save_model and accelerator.is_main_process:
        save_model_folder(
            accelerator.unwrap_model(model), os.path.join(config.output_dir, "model"), r2_config, regularizer.stats()
        )
    accelerator.end_training()
    return metrics


def finetune(
    model: nn.Module,
    train_dataset: Dataset,
    *,
    learning_rate: float,
    per_device_batch_size: int,
    num_epochs: int = 1,
    max_steps: int = -1,
    weight_decay: float = 0.0,
    seed: int = 42,
    r2_config: R2Config | None = None,
    eval_dataset: Dataset | None = None,
    collate_fn: Callable | None = None,
) -> dict[str, float]:
    """A short fine-tune of `model` in place, as QAT and DKM need: [`train_with_accelerate`] with AdamW and a cosine
    schedule, on the GPU if there is one, nothing saved (checkpoints and logs go to a temporary folder).

    `r2_config=None` trains without R2; the loop's regularizer then covers the last target layer only, since it
    still logs range statistics, and reading every weight of a DKM-prepared model is a clustering pass each.
    Returns the loop's metrics.
    """
    if r2_config is None:
        last = find_target_modules(model)[-1][0]
        r2_config = R2Config(weight=0.0, warmup_steps=0, include=[f"^{re.escape(last)}$"])
    with tempfile.TemporaryDirectory(prefix="hf-r2-finetune-") as run_dir:
        config = LoopConfig(
            output_dir=run_dir,
            num_epochs=num_epochs,
            max_steps=max_steps,
            seed=seed,
            per_device_batch_size=per_device_batch_size,
            optimizer="adamw",
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            lr_scheduler_type="cosine",
            save_model=False,
            use_cpu=not torch.cuda.is_available(),
            logging_steps=50,
        )
        return train_with_accelerate(
            model, train_dataset, eval_dataset, r2_config=r2_config, config=config, collate_fn=collate_fn
        )
