"""`hf-r2 train`: its flags are built with [`~transformers.HfArgumentParser`] from [`~hf_r2.data.ModelArguments`],
[`~hf_r2.data.DataArguments`] and [`~hf_r2.training_args.R2TrainingArguments`] (so `hf-r2 train --help` shows each
field's help and every flag is spelled both `--foo_bar` and `--foo-bar`), or read from a JSON / YAML file; the
training itself is [`hf_r2.train.run_train`]."""

from __future__ import annotations

import argparse
from typing import Sequence

__all__ = ["train_command_parser", "train_command"]


def _train_parser():
    from transformers import HfArgumentParser

    from ..data import DataArguments, ModelArguments
    from ..training_args import R2TrainingArguments

    return HfArgumentParser(
        (ModelArguments, DataArguments, R2TrainingArguments),
        prog="hf-r2 train",
        description="Train an image classifier with R2-Loss (R2Trainer), evaluate it and save the model folder. "
        "Flags come from the fields below; alternatively pass one JSON or YAML file of the same fields, "
        "optionally followed by flags that override it.",
    )


def _parse_train_args(argv: Sequence[str]):
    """`(ModelArguments, DataArguments, R2TrainingArguments)` from flags, or from a config file plus override flags."""
    from .._utils import CONFIG_FILE_SUFFIXES, read_config_file

    parser = _train_parser()
    argv = list(argv)
    if argv and not argv[0].startswith("-") and argv[0].lower().endswith(CONFIG_FILE_SUFFIXES):
        path, argv = argv[0], argv[1:]
        try:
            values = read_config_file(path)
        except FileNotFoundError:
            parser.error(f"config file {path!r} does not exist.")
        except ValueError:
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
    from ..train import run_train

    model_args, data_args, training_args = _parse_train_args(getattr(args, "extra_args", []))
    results = run_train(model_args, data_args, training_args)
    print(f"Saved the model to {training_args.output_dir} (eval accuracy "
          f"{results['eval'].get('eval_accuracy', float('nan')):.4f}).")
    return 0
