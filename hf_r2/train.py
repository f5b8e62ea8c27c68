"""The one training recipe of hf-r2: [`train_model`] (an [`R2Trainer`] trained, saved, and its training data
recorded), used by `hf-r2 train` ([`run_train`]), `hf-r2 reproduce` and the demo."""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from torch import nn

    from .data import DataArguments, ModelArguments
    from .trainer import R2Trainer
    from .training_args import R2TrainingArguments

__all__ = ["prepare_output_dir", "clear_previous_run", "train_model", "run_train"]


def prepare_output_dir(training_args: R2TrainingArguments) -> str | None:
    """Check `output_dir` before a run (nothing is changed here) and resolve `resume_from_checkpoint`; returns the
    checkpoint to resume from.

    Resuming (`resume_from_checkpoint` a folder, or `latest` / `True`: the newest complete checkpoint of
    `output_dir`) continues the run the folder holds; `latest` with no checkpoint yet starts from the beginning,
    unless the folder holds another (finished, or never checkpointed) run. Otherwise
    [`hf_r2.output_folder.check_output_folder`]: a folder that holds another run is refused unless
    `overwrite_output_dir` ([`clear_previous_run`] then removes what that run wrote, once the data and model
    loaded); a folder of the user's (other files, no run) is refused unless `add_to_output_dir`, and then refused
    still if a file of theirs has a name the run writes.
    """
    from .checkpoints import resolve_resume, wants_latest
    from .output_folder import check_output_folder, run_files

    out = training_args.output_dir
    resume = training_args.resume_from_checkpoint
    path = None
    if resume is not None and str(resume).strip().lower() not in ("", "false", "no"):
        path = resolve_resume(resume, out)
        if path is not None or not wants_latest(resume):
            return path
        found = run_files(out)
        if found and not training_args.overwrite_output_dir:
            listed = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
            raise ValueError(f"`--output_dir {out}` has no complete checkpoint to resume from ({listed}): pass "
                             "`--overwrite_output_dir` to replace that run, or choose another folder.")
    check_output_folder(out, replace=training_args.overwrite_output_dir, add=training_args.add_to_output_dir)
    return path


def clear_previous_run(training_args: R2TrainingArguments) -> list[str]:
    """Unless resuming: with `overwrite_output_dir`, remove what the previous run wrote to `output_dir`
    ([`hf_r2.output_folder.clear_run`]; the user's files stay), then record the new run
    ([`~hf_r2.output_folder.start_run`]: every entry left is the user's, and stays); on the main process, the
    others waiting. Returns the removed names."""
    import logging

    from .output_folder import clear_run, run_files, start_run

    if training_args.resume_from_checkpoint:
        return []
    removed: list[str] = []
    with training_args.main_process_first(desc="clearing the previous run"):
        if training_args.process_index == 0:
            if training_args.overwrite_output_dir and run_files(training_args.output_dir):
                removed = clear_run(training_args.output_dir)
                logging.getLogger(__name__).warning("--overwrite_output_dir: removed the previous run's %s from %s.",
                                                    ", ".join(removed), training_args.output_dir)
            start_run(training_args.output_dir)
    return removed


def train_model(
    model: nn.Module,
    training_args: R2TrainingArguments,
    train_dataset: Any,
    eval_dataset: Any = None,
    *,
    dataset: str | None = None,
    compute_metrics: Callable | None = None,
    log_lines: bool = True,
    indent: str = "",
) -> tuple[R2Trainer, Any]:
    """Train `model` with [`R2Trainer`] and save it: the recipe every hf-r2 training follows.

    Builds `R2Trainer(model, training_args, train_dataset, eval_dataset, data_collator=collate_fn,
    compute_metrics=compute_metrics)`, trains (resuming from `training_args.resume_from_checkpoint`), saves the
    model folder to `training_args.output_dir` (`model.safetensors` + `config.json`, `r2_config.json`,
    `r2_stats.json`) and records `dataset` and its Hub id in `r2_training.json` (which the model card cites).

    Its output is readable in a terminal and in a file ([`hf_r2.progress.use_readable_progress`]): a bar in a
    terminal (unless `disable_tqdm`), else a plain line at each tenth of the steps; one line per log instead of the
    Trainer's raw dicts; a last line with the time and the final loss.

    Args:
        model (`nn.Module`):
            A timm or transformers image classifier.
        training_args ([`R2TrainingArguments`]):
            The Trainer's and R2's settings.
        train_dataset, eval_dataset:
            Rows `{"pixel_values", "labels"}` ([`hf_r2.data.with_transforms`]); `eval_dataset` is optional.
        dataset (`str`, *optional*):
            The dataset's name as [`hf_r2.data.load_image_dataset`] takes it, for `r2_training.json`.
        compute_metrics (`Callable`, *optional*):
            The Trainer's `compute_metrics`, e.g. [`hf_r2.metrics.compute_accuracy`].
        log_lines (`bool`, *optional*, defaults to `True`):
            Print one line per logging step (`False`: the progress and the last line only, for callers that
            report on their own, such as `hf-r2 reproduce`).
        indent (`str`, *optional*, defaults to `""`):
            Put before each of those lines.

    Returns:
        `tuple`: the trainer and the `TrainOutput` of `trainer.train()`.
    """
    from .data import collate_fn, hub_dataset_id
    from .progress import use_readable_progress
    from .saving import update_training_info
    from .trainer import R2Trainer

    trainer = R2Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collate_fn,
        compute_metrics=compute_metrics,
    )
    use_readable_progress(trainer, log_lines=log_lines, indent=indent)
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if trainer.args.should_save:
        update_training_info(training_args.output_dir, dataset=dataset, dataset_id=hub_dataset_id(dataset))
    return trainer, train_result


def run_train(
    model_args: ModelArguments, data_args: DataArguments, training_args: R2TrainingArguments
) -> dict[str, Any]:
    """Load the data, create the model, train it with [`train_model`], evaluate it: what `hf-r2 train` runs.

    First, before anything is loaded or written: [`prepare_output_dir`] (an `output_dir` holding another run is
    refused without `overwrite_output_dir`, one holding the user's files without `add_to_output_dir`;
    `resume_from_checkpoint="latest"` or `True` is the newest complete checkpoint); the previous run's files go
    ([`clear_previous_run`]) only once the data and the model loaded. The run records what it writes in the
    folder's manifest ([`hf_r2.output_folder`]), so that a later `overwrite_output_dir` removes only that. A run
    that stops before writing anything (a refusal, an interrupt) leaves no empty `output_dir` it created behind.
    Augmentation draws depend only on `(seed, epoch, index)`, so a resumed run ends with the same weights as an
    uninterrupted one.

    Returns `{"train": train metrics, "eval": eval metrics, "trainer": the R2Trainer}`; the eval metrics hold
    `eval_accuracy`, `eval_chance_accuracy` and `eval_predicted_classes`
    ([`hf_r2.metrics.compute_accuracy_and_chance`]).

    Writes to `training_args.output_dir`: the model (`model.safetensors` + `config.json`, loadable with
    [`hf_r2.models.create_model`]`(output_dir, pretrained=True)`), `r2_config.json`, `train_results.json`,
    `eval_results.json`, `all_results.json`, `trainer_state.json`, `r2_training.json` (the training arguments
    that matter and the dataset, which the model card cites) and the manifest `.hf-r2-output.json`.
    """
    from transformers import set_seed

    from .checkpoints import remove_if_empty
    from .data import describe_data, label_names, load_data, record_data_config, with_transforms
    from .metrics import compute_accuracy_and_chance
    from .models import create_model
    from .output_folder import MANIFEST_NAME, finish_run
    from .saving import update_training_info

    created = not os.path.exists(training_args.output_dir)
    training_args.resume_from_checkpoint = prepare_output_dir(training_args)
    set_seed(training_args.seed)
    ds = load_data(data_args, seed=training_args.seed)
    names = label_names(ds)
    model = create_model(model_args.model_name_or_path, pretrained=model_args.pretrained, label_names=names)
    transform_kw = {"input_size": data_args.input_size, "augment": data_args.augment}
    train_rows = with_transforms(ds["train"], model, train=True, seed=training_args.seed, **transform_kw)
    record_data_config(model, data_args)
    clear_previous_run(training_args)
    try:
        trainer, train_result = train_model(
            model,
            training_args,
            train_rows,
            with_transforms(ds["test"], model, train=False, **transform_kw),
            dataset=data_args.dataset_name,
            compute_metrics=compute_accuracy_and_chance,
        )
    except BaseException:  # a refusal (a diverged loss) or an interrupt: the manifest says what was written
        if training_args.process_index == 0 and not finish_run(training_args.output_dir) and created:
            with contextlib.suppress(OSError):
                os.remove(os.path.join(training_args.output_dir, MANIFEST_NAME))
            remove_if_empty(training_args.output_dir)  # hf-r2 made the folder: no empty one is left behind
        raise
    if trainer.args.should_save:  # what the data really was (source, splits, image counts), for the model card
        update_training_info(training_args.output_dir, data=describe_data(data_args, ds))
    train_metrics = dict(train_result.metrics, train_samples=ds["train"].num_rows)
    trainer.log_metrics("train", train_metrics)
    trainer.save_metrics("train", train_metrics)
    trainer.save_state()
    eval_metrics = dict(trainer.evaluate(), eval_samples=ds["test"].num_rows)
    trainer.log_metrics("eval", eval_metrics)
    trainer.save_metrics("eval", eval_metrics)
    if training_args.process_index == 0:
        finish_run(training_args.output_dir)
    return {"train": train_metrics, "eval": eval_metrics, "trainer": trainer}
