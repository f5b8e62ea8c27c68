"""The `hf-r2` command line: `hf-r2 train`, `hf-r2 demo`, `hf-r2 env`, `hf-r2 push`, `hf-r2 download`, and the
low-bit steps `hf-r2 ptq`, `hf-r2 qat`, `hf-r2 compress`, `hf-r2 evaluate` (in [`hf_r2.quant.commands`]).

Each sub-command is a `<name>_command_parser(subparsers)` + `<name>_command(args)` pair, as in
`accelerate.commands`. `hf-r2 train` builds its flags with [`~transformers.HfArgumentParser`] from
[`ModelArguments`], [`DataArguments`] and [`R2TrainingArguments`], so `hf-r2 train --help` shows each field's help
and every flag is spelled both `--foo_bar` and `--foo-bar`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
from dataclasses import dataclass, field
from typing import Any, Sequence

__all__ = [
    "ModelArguments",
    "DataArguments",
    "main",
    "train_command_parser",
    "train_command",
    "demo_command_parser",
    "demo_command",
    "env_command_parser",
    "env_command",
    "push_command_parser",
    "push_command",
    "download_command_parser",
    "download_command",
    "run_train",
    "load_data",
    "record_data_config",
]

logger = logging.getLogger(__name__)

_CONFIG_SUFFIXES = (".json", ".yaml", ".yml")


@dataclass
class ModelArguments:
    """Which model `hf-r2 train` trains.

    model_name_or_path (`str`):
        A timm name (`resnet18`), an `hf-hub:` id, a transformers checkpoint (Hub id or folder) or a folder saved by
        `hf-r2 train`. The classifier head is sized to the dataset's classes.
    pretrained (`bool`, *optional*, defaults to `False`):
        Start from the checkpoint's weights instead of a random init.
    """

    model_name_or_path: str = field(
        metadata={
            "help": "A timm name (resnet18), an hf-hub: id, a transformers checkpoint (Hub id or folder) or a folder "
            "saved by hf-r2 train. The classifier head is sized to the dataset's classes.",
            "aliases": ["--model"],
        },
    )
    pretrained: bool = field(
        default=False, metadata={"help": "Start from the checkpoint's weights instead of a random init."}
    )


@dataclass
class DataArguments:
    """Which data `hf-r2 train` trains and evaluates on, and how it is preprocessed (see [`hf_r2.data`]).

    dataset_name (`str`, *optional*, defaults to `"cifar10"`):
        `cifar10`, `cifar10-small`, `cifar10-tiny` (local copy, else `uoft-cs/cifar10`), a Hub dataset id, a folder
        of class sub-folders of images, or a folder / glob of parquet files.
    data_dir (`str`, *optional*):
        Folder of the local CIFAR-10 copies (default: `$HF_R2_DATA_DIR` or `../shared/data`), or the `data_dir` of
        a Hub dataset.
    image_column (`str`, *optional*):
        The image column; found by itself when it is an `Image` feature or named `image`, `img`, ...
    label_column (`str`, *optional*):
        The label column; found by itself when it is a `ClassLabel` or named `label`, `labels`, `fine_label`, ...
    train_split (`str`, *optional*, defaults to `"train"`):
        The split to train on.
    eval_split (`str`, *optional*):
        The split to evaluate on (default: `test`, else `validation`, else 10% of the training split).
    input_size (`int`, *optional*):
        Side of the square input in pixels; default: the model's own (use `32` for CIFAR-10 at native size).
    augment (`str`, *optional*, defaults to `"auto"`):
        Training augmentation: `cifar` (random crop with padding 4 + flip), `timm` (timm's training transform),
        `none`, or `auto` (`cifar` up to 64 pixels, else `timm`).
    max_train_samples (`int`, *optional*):
        Train on this many examples (a seeded random subset).
    max_eval_samples (`int`, *optional*):
        Evaluate on this many examples (a seeded random subset).
    validation_size (`int`, *optional*):
        Hold out this many training images (fixed seed) as the evaluation split instead of the test split.
    """

    dataset_name: str = field(
        default="cifar10",
        metadata={
            "help": "cifar10, cifar10-small, cifar10-tiny (local copy, else uoft-cs/cifar10), a Hub dataset id, a "
            "folder of class sub-folders of images, or a folder / glob of parquet files.",
            "aliases": ["--dataset"],
        },
    )
    data_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder of the local CIFAR-10 copies (default: $HF_R2_DATA_DIR or ../shared/data), or the "
            "data_dir of a Hub dataset."
        },
    )
    image_column: str | None = field(
        default=None,
        metadata={"help": "The image column; found by itself when it is an Image feature or named image, img, ..."},
    )
    label_column: str | None = field(
        default=None,
        metadata={
            "help": "The label column; found by itself when it is a ClassLabel or named label, labels, fine_label, ..."
        },
    )
    train_split: str = field(default="train", metadata={"help": "The split to train on."})
    eval_split: str | None = field(
        default=None,
        metadata={"help": "The split to evaluate on (default: test, else validation, else 10%% of the train split)."},
    )
    input_size: int | None = field(
        default=None,
        metadata={
            "help": "Side of the square input in pixels; default: the model's own (use 32 for CIFAR-10 at native "
            "size)."
        },
    )
    augment: str = field(
        default="auto",
        metadata={
            "help": "Training augmentation: cifar (random crop with padding 4 + flip), timm (timm's training "
            "transform), none, or auto (cifar up to 64 pixels, else timm).",
            "choices": ["auto", "cifar", "timm", "none"],
        },
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Train on this many examples (a seeded random subset)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Evaluate on this many examples (a seeded random subset)."}
    )
    validation_size: int | None = field(
        default=None,
        metadata={"help": "Hold out this many training images (fixed seed) and evaluate on them instead of the test "
                  "split: choose lambdas and epochs on it, keep the test set for the final table."},
    )


# ----------------------------------------------------------------------------------------------------------------
# train


def _train_parser():
    from transformers import HfArgumentParser

    from .training_args import R2TrainingArguments

    return HfArgumentParser(
        (ModelArguments, DataArguments, R2TrainingArguments),
        prog="hf-r2 train",
        description="Train an image classifier with R2-Loss (R2Trainer), evaluate it and save the model folder. "
        "Flags come from the fields below; alternatively pass one JSON or YAML file of the same fields, "
        "optionally followed by flags that override it.",
    )


def _parse_train_args(argv: Sequence[str]):
    """`(ModelArguments, DataArguments, R2TrainingArguments)` from flags, or from a config file plus override flags."""
    parser = _train_parser()
    argv = list(argv)
    if argv and not argv[0].startswith("-") and argv[0].lower().endswith(_CONFIG_SUFFIXES):
        path, argv = argv[0], argv[1:]
        if not os.path.isfile(path):
            parser.error(f"config file {path!r} does not exist.")
        with open(path) as f:
            if path.lower().endswith(".json"):
                values = json.load(f)
            else:
                import yaml

                values = yaml.safe_load(f)
        if not isinstance(values, dict):
            parser.error(f"config file {path!r} must hold a mapping of field names to values.")
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            parser.error(f"config file {path!r} has unknown fields {unknown}; see `hf-r2 train --help`.")
        # The file's values become defaults, so flags after it override them (as `trl` does).
        for action in parser._actions:
            if action.dest in values:
                action.required = False
        parser.set_defaults(**values)
    try:
        return parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    except ValueError as err:  # a dataclass' __post_init__ rejected a value
        parser.error(str(err))


def run_train(model_args: ModelArguments, data_args: DataArguments, training_args) -> dict[str, Any]:
    """Train with [`R2Trainer`], evaluate and save the model folder: what `hf-r2 train` runs.

    Returns `{"train": train metrics, "eval": eval metrics, "trainer": the R2Trainer}`.

    Writes to `training_args.output_dir`: the model (`model.safetensors` + `config.json`, loadable with
    [`hf_r2.models.create_model`]`(output_dir, pretrained=True)`), `r2_config.json`, `train_results.json`,
    `eval_results.json`, `all_results.json`, `trainer_state.json` and `r2_training.json` (the training arguments
    that matter and the dataset, which the model card cites).
    """
    from transformers import set_seed

    from .data import collate_fn, label_names, with_transforms
    from .models import create_model
    from .trainer import R2Trainer, compute_accuracy

    set_seed(training_args.seed)
    ds = load_data(data_args, seed=training_args.seed)
    names = label_names(ds)
    model = create_model(model_args.model_name_or_path, pretrained=model_args.pretrained, label_names=names)
    transform_kw = {"input_size": data_args.input_size, "augment": data_args.augment}
    record_data_config(model, data_args)
    trainer = R2Trainer(
        model=model,
        args=training_args,
        train_dataset=with_transforms(ds["train"], model, train=True, **transform_kw),
        eval_dataset=with_transforms(ds["test"], model, train=False, **transform_kw),
        data_collator=collate_fn,
        compute_metrics=compute_accuracy,
    )
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if trainer.args.should_save:
        from .data import hub_dataset_id
        from .saving import update_training_info

        update_training_info(training_args.output_dir, dataset=data_args.dataset_name,
                             dataset_id=hub_dataset_id(data_args.dataset_name))
    train_metrics = dict(train_result.metrics, train_samples=ds["train"].num_rows)
    trainer.log_metrics("train", train_metrics)
    trainer.save_metrics("train", train_metrics)
    trainer.save_state()
    eval_metrics = dict(trainer.evaluate(), eval_samples=ds["test"].num_rows)
    trainer.log_metrics("eval", eval_metrics)
    trainer.save_metrics("eval", eval_metrics)
    return {"train": train_metrics, "eval": eval_metrics, "trainer": trainer}


def load_data(data_args: DataArguments, seed: int = 0):
    """The [`~datasets.DatasetDict`] that `data_args` describe ([`hf_r2.data.load_image_dataset`]); `seed` draws the
    `max_*_samples` subsets. Shared with `examples/train_accelerate.py`."""
    from .data import load_image_dataset

    return load_image_dataset(
        data_args.dataset_name,
        data_dir=data_args.data_dir,
        image_column=data_args.image_column,
        label_column=data_args.label_column,
        train_split=data_args.train_split,
        eval_split=data_args.eval_split,
        max_train_samples=data_args.max_train_samples,
        max_eval_samples=data_args.max_eval_samples,
        validation_size=data_args.validation_size,
        seed=seed,
    )


def record_data_config(model, data_args: DataArguments) -> None:
    """Store the input size trained at in a timm model's `pretrained_cfg`, so that the saved folder preprocesses
    alike (the whole image for the small-image recipe). Shared with `examples/train_accelerate.py`."""
    cfg = getattr(model, "pretrained_cfg", None)
    if data_args.input_size is None or not isinstance(cfg, dict):
        return
    size = int(data_args.input_size)
    update: dict[str, Any] = {"input_size": (3, size, size)}
    if data_args.augment in ("cifar", "none") or (data_args.augment == "auto" and size <= 64):
        update["crop_pct"] = 1.0  # evaluated on the whole image
    model.pretrained_cfg = {**cfg, **update}


def train_command_parser(subparsers=None) -> argparse.ArgumentParser:
    """The `train` sub-command; its flags are parsed by [`~transformers.HfArgumentParser`] in [`train_command`]."""
    description = "Train an image classifier with R2-Loss, evaluate it and save the model folder."
    if subparsers is None:
        parser = argparse.ArgumentParser("hf-r2 train", description=description, add_help=False)
    else:
        parser = subparsers.add_parser("train", description=description, help=description, add_help=False)
    parser.set_defaults(func=train_command, takes_extra_args=True)
    return parser


def train_command(args: argparse.Namespace) -> int:
    model_args, data_args, training_args = _parse_train_args(getattr(args, "extra_args", []))
    results = run_train(model_args, data_args, training_args)
    print(f"Saved the model to {training_args.output_dir} (eval accuracy "
          f"{results['eval'].get('eval_accuracy', float('nan')):.4f}).")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# demo


def demo_command_parser(subparsers=None) -> argparse.ArgumentParser:
    """The `demo` sub-command: baseline vs R2 training on CIFAR-10, then FP and 2-bit results (see [`hf_r2.demo`])."""
    from .demo import DEMO_DEFAULTS

    description = (
        "The main job, the short version of `hf-r2 reproduce`: train a small timm CNN on CIFAR-10 twice, without "
        "and with R2-Loss, then print FP and low-bit (W8A8, W4A8, W2A8 PTQ, 2-bit k-means) top-1 of both side by "
        "side, and the paths of the plots."
    )
    if subparsers is None:
        parser = argparse.ArgumentParser("hf-r2 demo", description=description)
    else:
        parser = subparsers.add_parser("demo", description=description, help=description)
    d = DEMO_DEFAULTS
    add = parser.add_argument
    add("--output-dir", "--output_dir", default=d["output_dir"], help="Where both runs are saved.")
    add("--model", default=d["model"], help="timm model name, trained from scratch.")
    add("--dataset", default=d["dataset"], help="Dataset name or path (see `hf-r2 train --help`).")
    add("--input-size", "--input_size", type=int, default=d["input_size"], help="Input side in pixels.")
    add("--epochs", type=float, default=d["epochs"], help="Training epochs of each run.")
    add("--max-train-samples", "--max_train_samples", type=int, default=d["max_train_samples"],
        help="Training examples (seeded random subset); 0 or less uses all.")
    add("--max-eval-samples", "--max_eval_samples", type=int, default=d["max_eval_samples"],
        help="Evaluation examples (seeded random subset); 0 or less uses all.")
    add("--batch-size", "--batch_size", type=int, default=d["batch_size"], help="Training batch size.")
    add("--learning-rate", "--learning_rate", type=float, default=d["learning_rate"], help="Peak learning rate.")
    add("--weight-decay", "--weight_decay", type=float, default=d["weight_decay"], help="Weight decay of both runs.")
    add("--r2-loss", "--r2_loss", default=d["r2_loss"], choices=["linf", "margin", "soft_min_max", "kurtosis"],
        help="R2 variant of the R2 run.")
    add("--r2-weight", "--r2_weight", type=float, default=d["r2_weight"], help="R2 coefficient lambda.")
    add("--r2-per-channel", "--r2_per_channel", action=argparse.BooleanOptionalAction, default=d["r2_per_channel"],
        help="Apply R2 per output channel instead of per layer.")
    add("--bits", type=int, default=d["bits"], help="Weight bits of the low-bit rows (W<bits>A8, k-means).")
    add("--bn-samples", "--bn_samples", type=int, default=d["bn_samples"],
        help="Training images that calibrate activations and re-estimate batch norm after quantization.")
    add("--seed", type=int, default=d["seed"], help="Seed of both runs.")
    add("--no-progress", "--no_progress", dest="progress", action="store_false", help="Hide the progress bars.")
    parser.set_defaults(func=demo_command)
    return parser


def demo_command(args: argparse.Namespace) -> int:
    from .demo import run_demo

    options = {k: v for k, v in vars(args).items() if k not in ("func", "command", "extra_args", "takes_extra_args")}
    for key in ("max_train_samples", "max_eval_samples"):
        if options[key] is not None and options[key] <= 0:
            options[key] = None
    try:
        run_demo(**options)
    except (ValueError, OSError) as err:
        print(f"hf-r2 demo: error: {err}", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------------------------------------------
# env


def env_command_parser(subparsers=None) -> argparse.ArgumentParser:
    """The `env` sub-command: versions for bug reports."""
    description = "Print the versions of hf-r2, Python, the platform and the libraries it uses, for bug reports."
    if subparsers is None:
        parser = argparse.ArgumentParser("hf-r2 env", description=description)
    else:
        parser = subparsers.add_parser("env", description=description, help=description)
    parser.set_defaults(func=env_command)
    return parser


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def env_info() -> dict[str, str]:
    """The facts `hf-r2 env` prints, as a dict."""
    from . import __version__

    info = {"hf-r2 version": __version__, "Platform": platform.platform(),
            "Python version": platform.python_version()}
    for package in ("torch", "torchvision", "timm", "transformers", "accelerate", "datasets", "huggingface_hub",
                    "safetensors", "numpy"):
        info[f"{package} version"] = _version(package)
    try:
        import torch

        info["PyTorch accelerator"] = (
            f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "none (CPU)"
        )
        info["torch threads"] = str(torch.get_num_threads())
    except Exception as err:  # pragma: no cover - only for a broken install
        info["PyTorch accelerator"] = f"unknown ({err})"
    info["CPU count"] = str(os.cpu_count())
    return info


def env_command(args: argparse.Namespace) -> int:
    print("\nCopy-and-paste the text below in your GitHub issue\n")
    print("\n".join(f"- `{key}`: {value}" for key, value in env_info().items()))
    return 0


# ----------------------------------------------------------------------------------------------------------------
# push / download


def push_command_parser(subparsers=None) -> argparse.ArgumentParser:
    """The `push` sub-command: upload a saved model folder (with its model card) to the Hub."""
    description = (
        "Write the model card into a saved model folder (from `hf-r2 train` or `save_model`) and upload the folder "
        "to a Hub repo; timm and transformers load it without hf-r2. A failed upload leaves the folder whole: run "
        "the same command again."
    )
    if subparsers is None:
        parser = argparse.ArgumentParser("hf-r2 push", description=description)
    else:
        parser = subparsers.add_parser("push", description=description, help="Upload a saved model folder to the Hub.")
    parser.add_argument("model_dir", help="The saved model folder.")
    parser.add_argument("repo_id", help="The Hub repo, namespace/name (created if missing).")
    parser.add_argument("--dataset", "--datasets", dest="datasets", action="append", default=None,
                        help="Hub id of the training / evaluation data, for the card (repeatable).")
    parser.add_argument("--base-model", "--base_model", default=None, help="The checkpoint it was fine-tuned from.")
    parser.add_argument("--license", default=None, help="License id of the weights, for the card.")
    parser.add_argument("--commit-message", "--commit_message", default="Upload model trained with hf-r2",
                        help="The commit message.")
    parser.add_argument("--revision", default=None, help="The branch to commit to (default: main).")
    parser.add_argument("--private", action="store_true", default=None, help="Create the repo as private.")
    parser.add_argument("--create-pr", "--create_pr", action="store_true", help="Open a pull request instead.")
    parser.add_argument("--no-exist-ok", "--no_exist_ok", dest="exist_ok", action="store_false",
                        help="Fail if the repo already exists.")
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or `hf auth login`'s).")
    parser.set_defaults(func=push_command)
    return parser


def push_command(args: argparse.Namespace) -> int:
    from .hub import HubPushError, push_folder

    try:
        url = push_folder(
            args.model_dir, args.repo_id, commit_message=args.commit_message, token=args.token,
            revision=args.revision, private=args.private, create_pr=args.create_pr, exist_ok=args.exist_ok,
            datasets=args.datasets, base_model=args.base_model, license=args.license,
        )
    except (HubPushError, ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"hf-r2 push: error: {err}", file=sys.stderr)
        return 1
    print(url)
    return 0


def download_command_parser(subparsers=None) -> argparse.ArgumentParser:
    """The `download` sub-command: fetch a Hub repo (into the cache, or a folder) and print its path."""
    description = "Download a model repo from the Hub (into the cache, or --local-dir) and print the folder's path."
    if subparsers is None:
        parser = argparse.ArgumentParser("hf-r2 download", description=description)
    else:
        parser = subparsers.add_parser("download", description=description, help=description)
    parser.add_argument("repo_id", help="The Hub repo, namespace/name.")
    parser.add_argument("--local-dir", "--local_dir", default=None, help="Download into this folder.")
    parser.add_argument("--revision", default=None, help="Branch, tag or commit (default: main).")
    parser.add_argument("--token", default=None, help="Hub token, for private repos.")
    parser.set_defaults(func=download_command)
    return parser


def download_command(args: argparse.Namespace) -> int:
    from .hub import download

    try:
        path = download(args.repo_id, local_dir=args.local_dir, revision=args.revision, token=args.token)
    except (ValueError, OSError) as err:  # invalid id; not found, offline without a cached copy, network errors
        print(f"hf-r2 download: error: {err}", file=sys.stderr)
        return 1
    print(path)
    return 0


# ----------------------------------------------------------------------------------------------------------------
# main


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `hf-r2` console script; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="hf-r2", description="R2-Loss training for timm and Hugging Face vision models."
    )
    from .quant import commands as quant_commands
    from .reproduce import reproduce_command_parser

    subparsers = parser.add_subparsers(
        dest="command", metavar="{train,demo,ptq,qat,compress,evaluate,reproduce,push,download,env}", title="commands"
    )
    train_command_parser(subparsers)
    demo_command_parser(subparsers)
    quant_commands.ptq_command_parser(subparsers)
    quant_commands.qat_command_parser(subparsers)
    quant_commands.compress_command_parser(subparsers)
    quant_commands.evaluate_command_parser(subparsers)
    reproduce_command_parser(subparsers)
    push_command_parser(subparsers)
    download_command_parser(subparsers)
    env_command_parser(subparsers)
    args, extra = parser.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    if not hasattr(args, "func"):
        parser.print_help()
        return 1
    if extra and not getattr(args, "takes_extra_args", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra_args = extra
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.WARNING)
    logging.getLogger("hf_r2").setLevel(logging.INFO)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
