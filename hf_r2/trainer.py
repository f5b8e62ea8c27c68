"""`R2Trainer`: the 🤗 Transformers [`~transformers.Trainer`] with R2-Loss added to the task loss.

Paper: "R2 Loss: Range Restriction Loss for Model Compression and Quantization", Kundu et al., 2023
(https://huggingface.co/papers/2303.08253).

The Trainer hooks overridden here, and why:

| hook | why |
|---|---|
| `compute_loss` | cross-entropy (timm and transformers alike) plus `lambda * R`, scaled for gradient accumulation |
| `training_step` | a NaN / inf loss stops the training before the optimizer uses it ([`hf_r2.divergence`]) |
| `prediction_step` | a plain timm model returns logits, not a loss: evaluate through `compute_loss` |
| `log` | average and log `task_loss`, `r2_loss`, `r2_lambda` and the weight-range statistics |
| `create_optimizer` | train R2's own margins / temperatures, without weight decay |
| `get_decay_parameter_names` | no weight decay on the LSQ step sizes of a QAT-prepared model |
| `_save_optimizer_and_scheduler`, `_load_optimizer_and_scheduler` | checkpoint R2's parameters and settings, resume |
| `_save` | timm models in timm's own layout; `r2_config.json` and `r2_stats.json` next to the weights |
| `train`, `_save_checkpoint` | resume from `"latest"`, never with another R2 objective; checkpoints staged |
| `create_model_card` | hf-r2's card ([`hf_r2.model_card.build_model_card`]), so `push_to_hub` uploads it |

plus one private callback that clears the gradients of R2's own parameters after each optimizer step (the
Trainer's `model.zero_grad()` does not reach them), drops the R2 metrics of `predict()` (which does not log), and
passes the epoch to a training set with `set_epoch` ([`hf_r2.data.SeededTransformDataset`]).

`_save` and `_save_checkpoint` refuse a model with NaN / inf weights ([`hf_r2.divergence.check_weights`]).
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from typing import Any

import torch
from accelerate.utils import broadcast
from torch import Tensor, nn
from torch.nn.utils import parametrize
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput, rotate_checkpoints

from .checkpoints import (
    R2_STATE_NAME,
    check_r2_state,
    checkpoint_step,
    load_r2_state,
    publish_trainer_checkpoint,
    resolve_resume,
    save_trainer_r2_state,
    staging_folder,
)
from .config import R2Config
from .divergence import check_step_loss, check_weights
from .models import classification_loss, forward_logits, unwrap_model
from .regularizer import R2Regularizer
from .saving import R2_STATS_NAME, is_timm_model, save_r2_files, save_timm_folder, update_training_info

__all__ = ["R2Trainer", "R2_STATE_NAME", "R2_STATS_NAME"]

logger = logging.getLogger(__name__)


class _R2Callback(TrainerCallback):
    """Housekeeping on Trainer events that no overridable method covers (see the module docstring): R2's gradients
    (outside the model, so `model.zero_grad()` misses them), `predict()`'s R2 metrics, the training set's epoch."""

    def __init__(self, trainer: R2Trainer) -> None:
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        # the epoch about to run (`state.epoch` is fractional after a mid-epoch resume), before its iterator starts
        if hasattr(self.trainer.train_dataset, "set_epoch"):
            self.trainer.train_dataset.set_epoch(int(state.epoch + 1e-6))

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer.regularizer.zero_grad(set_to_none=True)

    def on_predict(self, args, state, control, metrics, **kwargs):
        self.trainer._metrics["eval"].clear()


class R2Trainer(Trainer):
    """[`~transformers.Trainer`] for image classifiers that adds R2-Loss to the task loss.

    The loss of one optimizer step is

    `loss = (1 / N) * sum_i CE(f(x_i), y_i) + lambda(t) * R(W)`

    over the `N` examples of the step (all gradient-accumulation micro-batches, and all processes), with `R` the
    [`R2Regularizer`] total `sum_l R(W_l)` and `lambda(t) = regularizer.lambda_at(state.global_step)` (the R2 lambda,
    ramped from 0 over `r2_warmup_steps`). The cross-entropy is [`hf_r2.models.classification_loss`], so timm
    models, [`~transformers.TimmWrapperForImageClassification`] and any `AutoModelForImageClassification` model
    are trained the same way; batches are `{"pixel_values": (B, 3, H, W), "labels": (B,)}`.

    Gradient accumulation (GA) does not change the effective strength of R2: each micro-batch of a step returns
    `sum_(i in micro-batch) CE_i / N + lambda * R / k`, with `N` the `num_items_in_batch` the Trainer counts over
    the `k` micro-batches of the step (so a short last micro-batch weighs right), and the Trainer uses it as is
    (`loss_is_scaled_for_ga`). The summed gradient is that of `loss` above, whatever `k`. With several processes
    and `average_tokens_across_devices=True`, `N` counts every process's examples and the cross-entropy part is
    multiplied by the number of processes, which DDP's gradient mean then cancels, as the Trainer itself does; the
    R2 term is the same on every process, so its mean is itself. R2's own parameters (margins, temperatures) live
    outside the DDP module: they start from rank 0's values on every process and get the same gradient there.
    Gradient clipping (`max_grad_norm`) covers the model's parameters only, as the Trainer clips `model.parameters()`.

    Logged (through the Trainer's own `log`, so every `report_to` integration sees them), as means over the
    (micro-)batches since the last log: `task_loss` (the mean cross-entropy), `r2_loss` (the added term
    `lambda * R`), `r2_lambda`, and at each logging step the weight-range
    statistics of the target layers `r2_max_abs`, `r2_mean_max_over_std`, `r2_max_max_over_std` and
    `r2_mean_kurtosis` (see [`R2Regularizer.stats`]). In evaluation the first two come as `eval_task_loss` and
    `eval_r2_loss` (also in the dict `evaluate()` returns, so `metric_for_best_model="task_loss"` works), and
    `eval_loss` is `eval_task_loss + eval_r2_loss`, the training objective.

    Saving: [`~transformers.Trainer.save_model`] writes the model's own weights in its own format (transformers'
    `save_pretrained`, timm's `config.json` + `model.safetensors`), plus `r2_config.json` and `r2_stats.json`.
    Checkpoints also hold `r2_regularizer.safetensors` and `r2_state.json` (R2's parameters and settings; the
    parameters' optimizer state is in `optimizer.pt`), are renamed into place only when complete, and
    `train(resume_from_checkpoint=...)` (a folder, or `True` / `"latest"`) resumes exactly, augmentation included
    with [`hf_r2.data.SeededTransformDataset`], never with another R2 objective ([`hf_r2.checkpoints.check_r2_state`]).

    Args:
        model (`torch.nn.Module`):
            A timm or transformers image classifier.
        args ([`R2TrainingArguments`] or [`~transformers.TrainingArguments`], *optional*):
            Training arguments; the R2 settings come from [`R2TrainingArguments.r2_config`]. Defaults to
            `R2TrainingArguments(output_dir="tmp_trainer")`.
        data_collator, train_dataset, eval_dataset, processing_class, compute_metrics, callbacks, optimizers, \
        optimizer_cls_and_kwargs, preprocess_logits_for_metrics:
            As for [`~transformers.Trainer`]. Pass [`~hf_r2.metrics.compute_accuracy`] as `compute_metrics` for
            top-1 accuracy.
        r2_config ([`R2Config`], *optional*):
            R2 settings that take precedence over those of `args` (required, in effect, with plain
            `TrainingArguments`, which have none: [`R2Config`]'s defaults are used then).

    ```python
    >>> import timm
    >>> from hf_r2 import R2Trainer, R2TrainingArguments
    >>> model = timm.create_model("resnet18", num_classes=10)
    >>> args = R2TrainingArguments(output_dir="out", r2_loss="margin", r2_lambda=0.01, report_to="tensorboard")
    >>> trainer = R2Trainer(model, args, train_dataset=train, eval_dataset=val, compute_metrics=compute_accuracy)
    >>> trainer.train(); trainer.save_model()
    ```
    """

    _tag_names = ["hf-r2", "r2-loss"]

    def __init__(
        self,
        model: nn.Module,
        args: TrainingArguments | None = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        compute_metrics: Any = None,
        callbacks: list | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, Any] = (None, None),
        optimizer_cls_and_kwargs: tuple[type[torch.optim.Optimizer], dict[str, Any]] | None = None,
        preprocess_logits_for_metrics: Any = None,
        *,
        r2_config: R2Config | None = None,
    ) -> None:
        if model is None:
            # `model_init` would build a new model inside `train()`, after the regularizer has bound the old one.
            raise ValueError("`R2Trainer` needs a `model` (`model_init` is not supported).")
        if args is None:
            from .training_args import R2TrainingArguments

            args = R2TrainingArguments(output_dir="tmp_trainer")
        if args.label_smoothing_factor != 0:
            raise ValueError(f"`label_smoothing_factor={args.label_smoothing_factor}` is not supported by "
                             "`R2Trainer`, which computes the cross-entropy itself; set `label_smoothing_factor=0`.")
        if r2_config is None:
            r2_config = getattr(args, "r2_config", None) or R2Config()
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )
        if self.args.remove_unused_columns:
            logger.warning("`remove_unused_columns=True` makes the Trainer drop the columns of a `datasets.Dataset` "
                           "that the model's forward does not name, such as the `image` column a transform reads, or "
                           "`pixel_values` for a timm model; `R2TrainingArguments` defaults to False.")
        # Built after `Trainer.__init__` has moved the model to its device, so R2's parameters land there too.
        self.regularizer = R2Regularizer(unwrap_model(self.model), r2_config)
        if self.accelerator.num_processes > 1:
            # Margins / temperatures start from each process's own weights, which DDP only syncs later (from rank 0):
            # start every process from rank 0's values, as DDP does for the weights.
            with torch.no_grad():
                for p in self.regularizer.parameters():
                    p.copy_(broadcast(p.detach().clone(), from_process=0))
        self.add_callback(_R2Callback(self))
        # Have the Trainer count `num_items_in_batch` over each step's micro-batches for every model (it does so only
        # for models whose forward takes **kwargs): `compute_loss` normalises by it, see the class docstring.
        # DataParallel (n_gpu > 1 in one process) splits the count per replica, so it keeps per-batch means.
        self.model_accepts_loss_kwargs = self.args.n_gpu <= 1
        self._metrics: dict[str, dict[str, list]] = {"train": defaultdict(list), "eval": defaultdict(list)}

    # ---- loss ----

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Cross-entropy plus `lambda * R` for one (micro-)batch; with `return_outputs`, also the logits.

        Without `num_items_in_batch` (evaluation, or a direct call): `mean_i CE_i + lambda * R`. With it (training):
        `sum_i CE_i / num_items_in_batch + lambda * R / k` for the `k` micro-batches of the step, so that the step's
        gradient is that of the mean cross-entropy over all its examples plus `lambda * R` (see the class docstring).
        """
        if "pixel_values" not in inputs or "labels" not in inputs:
            raise ValueError(f"`R2Trainer` needs batches with `pixel_values` and `labels`, got keys {sorted(inputs)}. "
                             "With a `datasets.Dataset`, set `remove_unused_columns=False` and a transform / collator "
                             "that yields them (`hf_r2.data.with_transforms`, `hf_r2.data.collate_fn`).")
        labels = inputs["labels"]
        lam = self.regularizer.lambda_at(self.state.global_step)
        # a parametrized weight (DKM clustering) is computed once for the model and R2 alike
        with parametrize.cached():
            task_loss, logits = classification_loss(model, inputs["pixel_values"], labels, num_items_in_batch)
            r2_term = lam * self.regularizer() if lam > 0 else task_loss.new_zeros(())

        if num_items_in_batch is None:
            task_mean = task_loss.detach()
            loss = task_loss + r2_term
        else:
            # the mean over this micro-batch alone, for logging
            task_mean = task_loss.detach() * num_items_in_batch / labels.ne(-100).sum().clamp_min(1)
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                task_loss = task_loss * self.accelerator.num_processes
            k = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
            loss = task_loss + r2_term / k

        metrics = self._metrics["train" if model.training else "eval"]
        metrics["task_loss"].append(task_mean)
        metrics["r2_loss"].append(r2_term.detach())
        if model.training:
            metrics["r2_lambda"].append(lam)
        return (loss, logits) if return_outputs else loss

    def training_step(self, model: nn.Module, inputs: dict[str, Tensor], *args: Any, **kwargs: Any) -> Tensor:
        """`Trainer.training_step`, stopped by a NaN / inf loss before the optimizer steps on its gradient
        ([`hf_r2.divergence.check_step_loss`]: one line naming the step, the likely cause, the last checkpoint)."""
        loss = super().training_step(model, inputs, *args, **kwargs)
        reduce = self.accelerator.reduce if self.accelerator.num_processes > 1 else None
        check_step_loss(loss, self.state.global_step + 1, self.args.output_dir, reduce=reduce)
        return loss

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, Tensor],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """`(loss, logits, labels)` for one evaluation batch, the loss from [`~R2Trainer.compute_loss`].

        Overridden because a plain timm model returns logits, not the `(loss, logits)` output the Trainer expects.
        `loss` is `None` for a batch without labels.
        """
        inputs = self._prepare_inputs(inputs)
        labels = inputs.get("labels")
        with torch.no_grad(), self.compute_loss_context_manager():
            if labels is None:
                loss, logits = None, forward_logits(model, inputs["pixel_values"])
            else:
                loss, logits = self.compute_loss(model, inputs, return_outputs=True)
                loss = loss.detach()
        if prediction_loss_only:
            return loss, None, None
        return loss, logits.detach(), labels

    # ---- logging ----

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the averaged R2 metrics since the last log (and, in training, the weight-range statistics)."""
        mode = "train" if self.model.training else "eval"
        metrics: dict[str, float] = {}
        for key, values in self._metrics[mode].items():
            if not values:
                continue
            if isinstance(values[0], Tensor):
                # one collective per key and log, rather than one per micro-batch
                local = torch.stack([v.float() for v in values]).mean().reshape(1)
                metrics[key] = self.accelerator.gather(local).mean().item()
            else:
                metrics[key] = sum(values) / len(values)
        if mode == "train" and metrics:
            metrics.update(self.regularizer.logged_stats())
        if mode == "eval":
            # `evaluate(metric_key_prefix=...)` always logs `<prefix>_runtime`
            prefix = next((k[: -len("_runtime")] for k in logs if k.endswith("_runtime")), "eval")
            metrics = {f"{prefix}_{key}": value for key, value in metrics.items()}
        # in place: `evaluate()` returns this same dict, so `eval_task_loss` can be a `metric_for_best_model`
        logs.update(metrics)
        super().log(logs, start_time)
        self._metrics[mode].clear()

    # ---- optimizer ----

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        """The Trainer's choice, minus the step sizes of quantized layers (QAT's LSQ scales do not decay)."""
        return [n for n in super().get_decay_parameter_names(model) if not n.endswith("_quantizer.scale")]

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer, plus a param group for R2's learnable parameters (same lr, no weight decay)."""
        created_here = self.optimizer is None
        optimizer = super().create_optimizer(model)
        own = [p for p in self.regularizer.parameters() if p.requires_grad]
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [p for p in own if id(p) not in in_optimizer]
        if missing and created_here:
            optimizer.add_param_group({"params": missing, "weight_decay": 0.0})
        elif missing:
            logger.warning(
                "The optimizer passed to `R2Trainer` does not hold R2's learnable parameters (%s), which stay at "
                "their initial values. Add `trainer.regularizer.parameters()` to it to train them.",
                ", ".join(name for name, _ in self.regularizer.named_parameters()),
            )
        return optimizer

    # ---- checkpoints ----

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            save_trainer_r2_state(self.regularizer, output_dir)

    def _load_r2_state(self, checkpoint: str) -> None:
        if not load_r2_state(self.regularizer, checkpoint):
            logger.warning("No %s in %s: R2's parameters start from their initial values.", R2_STATE_NAME, checkpoint)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is not None:
            self._load_r2_state(checkpoint)
        super()._load_optimizer_and_scheduler(checkpoint)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        """`Trainer.train`; `resume_from_checkpoint=True` / `"latest"`: see [`hf_r2.checkpoints.resolve_resume`]. A
        training set built without a seed ([`hf_r2.data.SeededTransformDataset`]) augments with `args.seed`."""
        if hasattr(self.train_dataset, "set_default_seed"):
            self.train_dataset.set_default_seed(self.args.seed)
        resume = resolve_resume(resume_from_checkpoint, self.args.output_dir)
        if resume is not None:  # before any state loads: another R2 objective is one line, never a silent resume
            check_r2_state(resume, self.regularizer, main_process=self.is_world_process_zero())
        if resume is not None and 0 < self.args.max_steps <= checkpoint_step(resume):
            # the run had finished (interrupted while saving or evaluating): the Trainer would train one more step
            self._load_from_checkpoint(resume)
            self._load_r2_state(resume)
            self.state = self.state.load_from_json(os.path.join(resume, "trainer_state.json"))
            return TrainOutput(self.state.global_step, float("nan"), {})
        return super().train(resume, *args, **kwargs)

    def _get_output_dir(self, trial: Any) -> str:
        return getattr(self, "_staging_run_dir", None) or super()._get_output_dir(trial)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """The Trainer's checkpoint, written into `.tmp-checkpoint-<n>/` and renamed to `checkpoint-<n>` once complete
        (the best checkpoint recorded by its final path); then the rotation. With `push_to_hub` (which uploads the
        folder in the background) it is written in place. Non-finite weights are refused first."""
        check_weights(self.accelerator.unwrap_model(model), self.state.global_step, self.args.output_dir)
        if self.args.push_to_hub:
            return super()._save_checkpoint(model, trial)
        run_dir = self._get_output_dir(trial)
        final = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        staging = self._staging_run_dir = staging_folder(final, clear=self.args.should_save)
        self.accelerator.wait_for_everyone()  # cleared before any process writes its part (rng_state_<i>.pth)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_run_dir = None
        self.accelerator.wait_for_everyone()
        publish_trainer_checkpoint(self.state, staging, final, write=self.args.should_save)
        if self.args.should_save:
            rotate_checkpoints(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()

    def _save(self, output_dir: str | None = None, state_dict: dict[str, Tensor] | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        check_weights(model, self.state.global_step, self.args.output_dir)  # a diverged model is no result
        if not is_timm_model(model):
            super()._save(output_dir, state_dict)
        elif self.args.should_save:
            logger.info("Saving model checkpoint to %s", output_dir)
            save_timm_folder(model, output_dir, state_dict)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
        if self.args.should_save:
            save_r2_files(output_dir, self.regularizer.config, self.regularizer.stats())
            update_training_info(output_dir, training_arguments=self.training_summary())

    def training_summary(self) -> dict[str, Any]:
        """The training arguments that matter for reproducing the run (saved in `r2_training.json`, on the card)."""
        names = ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs",
                 "max_steps", "weight_decay", "optim", "lr_scheduler_type", "warmup_steps", "seed")
        training = {name: getattr(self.args, name) for name in names if hasattr(self.args, name)}
        training["world_size"] = self.args.world_size
        return {k: getattr(v, "value", v) for k, v in training.items()}

    # ---- Hub ----

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
    ) -> None:
        """Write hf-r2's model card ([`hf_r2.model_card.build_model_card`]) to `output_dir/README.md`; called by
        [`~transformers.Trainer.push_to_hub`] after `save_model`. The accuracy is the folder's `eval_results.json`,
        else the last `eval_accuracy` logged. `dataset` (or `dataset_tags`) gives the card's `datasets`,
        `finetuned_from` its `base_model`; `language`, `tasks` and `dataset_args` are not used."""
        from .model_card import build_model_card, read_measured_accuracy, write_model_card

        if not self.is_world_process_zero():
            return
        output_dir = self.args.output_dir
        accuracy = read_measured_accuracy(output_dir)
        if accuracy is None:
            logged = [e["eval_accuracy"] for e in self.state.log_history if "eval_accuracy" in e]
            accuracy = float(logged[-1]) if logged else None
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        training = self.training_summary()
        card = build_model_card(
            output_dir,
            self.args.hub_model_id or model_name,
            datasets=dataset or dataset_tags,
            base_model=finetuned_from,
            license=license,
            tags=tags,
            accuracy=accuracy,
            training=training,
        )
        write_model_card(output_dir, card)
