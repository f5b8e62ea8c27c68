"""A plain 🤗 Accelerate training loop for timm and transformers image classifiers, with R2-Loss or without a
regularizer ([`train_with_accelerate`], [`finetune`]); its settings are [`~hf_r2.loop_config.LoopConfig`].

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
- Without an R2 config there is no regularizer: the loss is the task loss, and the optimizer and the logs hold no
  R2 parameters or statistics (the QAT and DKM fine-tunes).
- A NaN / inf loss stops the training before the optimizer steps on it, and non-finite weights are never written
  as a checkpoint or the run's model ([`hf_r2.divergence`]: one line naming the step, the likely cause and the last
  good checkpoint).
- `accelerator.save_state` checkpoints the model, optimizer, scheduler and RNG states (into a staging folder renamed
  into place when complete), with the step counter as JSON and R2's learnable parameters as safetensors beside them
  ([`~hf_r2.loop_config.save_checkpoint`]), so a resumed run continues exactly (augmentation included, with a
  training set whose draws depend only on `(seed, epoch, index)`, [`hf_r2.data.SeededTransformDataset`]), and
  resuming unpickles nothing in full: a checkpoint from anywhere runs no code
  ([`~hf_r2.loop_config.load_checkpoint`]).
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader, Dataset

from .checkpoints import check_r2_state, resumable_on_interrupt
from .config import R2Config
from .divergence import check_step_loss, check_weights
from .loop_config import (
    LoopConfig,
    check_accelerator,
    create_accelerator,
    create_lr_scheduler,
    create_optimizer,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
    tracker_config,
)
from .metrics import evaluate_accuracy
from .models import classification_loss
from .regularizer import R2Regularizer
from .saving import save_model_folder

__all__ = [
    "LoopState",
    "evaluate",
    "finetune",
    "train_one_epoch",
    "train_with_accelerate",
]

logger = logging.getLogger(__name__)

class LoopState:
    """Training progress saved with every checkpoint (its `loop_state.json`).

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
    regularizer: R2Regularizer | None,
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
    step_loss = torch.zeros((), device=device)  # this step's micro-batch losses: NaN / inf stays so in the sum
    checkpoints = os.path.join(config.output_dir, "checkpoints")
    reduce = accelerator.reduce if accelerator.num_processes > 1 else None
    lam = regularizer.lambda_at(state.global_step) if regularizer is not None else 0.0
    for batch in dataloader:
        with accelerator.accumulate(model):
            step_ends = accelerator.sync_gradients
            # a parametrized weight (DKM clustering) is computed once for the model and R2 alike
            with parametrize.cached():
                task_loss, _ = classification_loss(model, batch["pixel_values"], batch["labels"])
                loss = task_loss
                if step_ends:
                    lam = regularizer.lambda_at(state.global_step) if regularizer is not None else 0.0
                    # R is not computed at lambda = 0 (the baseline) nor without a regularizer
                    r2 = regularizer() if lam > 0 else task_loss.new_zeros(())
                    # `backward` divides by `ga`; R is the same on every micro-batch, so it enters once, times `ga`
                    loss = loss + (lam * ga) * r2
            accelerator.backward(loss)
            step_loss += loss.detach().float()
            if step_ends:  # a NaN / inf loss stops the training before the optimizer steps on its gradient
                check_step_loss(step_loss, state.global_step + 1, checkpoints, loop=True, reduce=reduce)
                step_loss.zero_()
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
            means = _reduce_means(accelerator, window, regularizer is not None)
            window.zero_()
            logs = {**means, **_r2_logs(regularizer, lam), "lr": lr_scheduler.get_last_lr()[0]}
            if steps_per_epoch:
                logs["epoch"] = state.global_step / steps_per_epoch
            accelerator.log(logs, step=state.global_step)
            if progress_bar is not None:
                postfix = {"loss": f"{means['loss']:.4f}"}
                if "r2_max_abs" in logs:
                    postfix["r2_max_abs"] = f"{logs['r2_max_abs']:.4g}"
                progress_bar.set_postfix(**postfix)
        if config.checkpointing_steps and state.global_step % config.checkpointing_steps == 0:
            check_weights(accelerator.unwrap_model(model), state.global_step, checkpoints, loop=True)
            save_checkpoint(accelerator, os.path.join(checkpoints, f"step_{state.global_step}"), state.global_step,
                            regularizer)
        if stop:
            break
    epoch_sums += window
    if epoch_sums[3] == 0:
        return {}
    means = _reduce_means(accelerator, epoch_sums, regularizer is not None)
    return means if regularizer is None else {**means, "r2_lambda": lam}


def _reduce_means(accelerator: Any, sums: torch.Tensor, with_r2: bool = True) -> dict[str, float]:
    """Means of the running sums; the task loss averaged over processes too (all have the same counts), the R2
    term is the same on every process (and left out without a regularizer)."""
    task = accelerator.reduce(sums[0] / sums[1].clamp_min(1), reduction="mean").item()
    if not with_r2:
        return {"loss": task, "task_loss": task}
    r2_term = (sums[2] / sums[3].clamp_min(1)).item()
    return {"loss": task + r2_term, "task_loss": task, "r2_loss": r2_term}


def _r2_logs(regularizer: R2Regularizer | None, lam: float) -> dict[str, float]:
    """`r2_lambda` and the range statistics of a logging step; nothing without a regularizer."""
    return {} if regularizer is None else {"r2_lambda": lam, **regularizer.logged_stats()}


@torch.no_grad()
def evaluate(model: nn.Module, dataloader: DataLoader, accelerator: Any) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy of `model` over a prepared `dataloader`, across all processes:
    [`hf_r2.metrics.evaluate_accuracy`] with `accelerator.gather_for_metrics` (which drops the samples a prepared
    dataloader repeats to give every process a full last batch, so the numbers are those of one pass).

    Returns:
        `dict[str, float]`: `{"accuracy": ..., "loss": ...}`.
    """
    out = evaluate_accuracy(model, dataloader, device=accelerator.device, gather=accelerator.gather_for_metrics)
    return {"accuracy": out["accuracy"], "loss": out["loss"]}


# ----------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------


@resumable_on_interrupt  # SIGTERM as Ctrl-C; either says where the run can resume
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
    from `r2_config` (`r2_lambda` and `warmup_steps`, counted in optimizer steps).

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
            The R2 settings; `None` (and no `regularizer`) trains without R2.
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
        `r2_mean_max_over_std`, `r2_max_max_over_std`, `r2_mean_kurtosis` (the R2 entries only with a regularizer),
        and `eval_accuracy` / `eval_loss` when `eval_dataset` is given.

    Ctrl-C, or SIGTERM (a scheduler's stop, raised as [`~hf_r2.checkpoints.Terminated`], a `KeyboardInterrupt`), logs
    one line with the last complete checkpoint and how to resume, then goes on up; no checkpoint is left half-written.

    ```python
    >>> # accelerate launch --multi_gpu --num_processes 2 train.py
    >>> from hf_r2 import LoopConfig, R2Config, create_model, train_with_accelerate
    >>> model = create_model("resnet18", num_classes=10)
    >>> metrics = train_with_accelerate(
    ...     model, train_ds, eval_ds, r2_config=R2Config(loss="margin", r2_lambda=0.01),
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
    if accelerator is None:
        accelerator = create_accelerator(config)
    else:
        check_accelerator(accelerator, config)
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        logger.warning("`mixed_precision='fp16'` has no effect on the CPU (accelerate runs float32 there); "
                       "use `mixed_precision='bf16'` for CPU autocast.")
    set_seed(config.seed)
    if hasattr(train_dataset, "set_default_seed"):  # a SeededTransformDataset built without a seed: augment with ours
        train_dataset.set_default_seed(config.seed)
    if accelerator.is_main_process:
        config.save_pretrained(config.output_dir)

    # The model goes to its device before anything refers to its weights; R2 is built on the unwrapped model
    # after `prepare`, so that its margins start from the weights DDP has just made identical on every process.
    model = accelerator.prepare(model.to(accelerator.device))
    if regularizer is None and r2_config is not None:
        regularizer = R2Regularizer(accelerator.unwrap_model(model), r2_config)
    if regularizer is not None:
        regularizer.to(accelerator.device)
    optimizer = create_optimizer(accelerator.unwrap_model(model), regularizer, config)

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
    lr_scheduler = create_lr_scheduler(optimizer, config, max_steps, scheduler_scale)
    optimizer, lr_scheduler = accelerator.prepare(optimizer, lr_scheduler)

    state = LoopState()
    checkpoint = resolve_checkpoint(config)
    if checkpoint is not None:
        accelerator.print(f"Resuming from {checkpoint}")
        # one line, not accelerate's optimizer mismatch, nor a silent resume with another R2 objective
        check_r2_state(checkpoint, regularizer, main_process=accelerator.is_main_process)
        state.global_step = load_checkpoint(accelerator, checkpoint, regularizer)
    if accelerator.log_with:
        accelerator.init_trackers(config.tracker_project_name, config=tracker_config(config, r2_config))

    progress_bar = tqdm(
        total=max_steps, initial=state.global_step, disable=not accelerator.is_local_main_process, desc="train"
    )
    start_epoch = state.global_step // steps_per_epoch
    metrics: dict[str, float] = {}
    for epoch in range(start_epoch, num_epochs):
        if state.global_step >= max_steps:
            break
        train_dataloader.set_epoch(epoch)
        if hasattr(train_dataset, "set_epoch"):  # a SeededTransformDataset: augmentation draws of this epoch
            train_dataset.set_epoch(epoch)
        active_dataloader = train_dataloader
        resume_batches = (state.global_step - epoch * steps_per_epoch) * config.gradient_accumulation_steps
        if resume_batches > 0:
            active_dataloader = accelerator.skip_first_batches(train_dataloader, resume_batches)
        train_metrics = train_one_epoch(
            model, regularizer, active_dataloader, optimizer, lr_scheduler, accelerator, state, config,
            max_steps=max_steps, steps_per_epoch=steps_per_epoch, progress_bar=progress_bar,
        )
        if train_metrics:
            metrics.update({f"train_{k}": v for k, v in train_metrics.items() if k != "r2_lambda"})
            if "r2_lambda" in train_metrics:
                metrics["r2_lambda"] = train_metrics["r2_lambda"]
        if eval_dataloader is not None:
            eval_metrics = {f"eval_{k}": v for k, v in evaluate(model, eval_dataloader, accelerator).items()}
            metrics.update(eval_metrics)
            accelerator.log({**eval_metrics, "epoch": epoch + 1}, step=state.global_step)
            accelerator.print(f"epoch {epoch}: " + ", ".join(f"{k}={v:.4f}" for k, v in eval_metrics.items()))
    progress_bar.close()

    metrics.update(global_step=state.global_step, epoch=state.global_step / steps_per_epoch)
    if regularizer is not None:
        metrics.update(regularizer.logged_stats())
    accelerator.wait_for_everyone()
    if config.save_model and accelerator.is_main_process:
        checkpoints = os.path.join(config.output_dir, "checkpoints")
        check_weights(accelerator.unwrap_model(model), state.global_step, checkpoints, loop=True)
        save_model_folder(accelerator.unwrap_model(model), os.path.join(config.output_dir, "model"), r2_config,
                          None if regularizer is None else regularizer.stats())
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

    `r2_config=None` trains without R2 (no regularizer: no R2 term, parameters or range statistics). Returns the
    loop's metrics.
    """
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
