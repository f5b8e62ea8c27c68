"""`hf-r2 train`: its flags are built with [`~transformers.HfArgumentParser`] from [`~hf_r2.data.ModelArguments`],
[`~hf_r2.data.DataArguments`] and [`~hf_r2.training_args.R2TrainingArguments`] (so `hf-r2 train --help` shows each
field's help and every flag is spelled both `--foo_bar` and `--foo-bar`), or read from a JSON / YAML file; the
training itself is [`hf_r2.train.run_train`].

`--help` lists hf-r2's own flags first, in their own groups (model, data, R2-Loss), and the Trainer's after them.
Building that parser imports transformers and torch (seconds), so the help text is cached once per hf-r2 /
transformers version and source of the flags ([`_cached_help`]): later `--help` calls print it without importing them.
Ctrl-C (or SIGTERM, a scheduler's stop: status 143) stops the training with one line: where the last complete
checkpoint is, and the command that resumes. The last line says where the model went, and whether its accuracy is at
chance level (it learnt nothing).
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from typing import Sequence

__all__ = ["train_command_parser", "train_command", "resume_command"]

_GROUPS = (
    ("model", "Which model to train."),
    ("data", "Which data, and how it is preprocessed."),
    ("R2-Loss", "The R2 term added to the task loss (see hf_r2.R2Config)."),
    ("training (transformers.TrainingArguments)", "The Trainer's own settings."),
)


def _group_flags(parser) -> None:
    """Move every flag into its group (model, data, R2-Loss, Trainer), shown in that order after `-h`."""
    from ..data import DataArguments, ModelArguments

    model_fields = {f.name for f in dataclasses.fields(ModelArguments)}
    data_fields = {f.name for f in dataclasses.fields(DataArguments)}
    groups = [parser.add_argument_group(title, description) for title, description in _GROUPS]
    default = next(g for g in parser._action_groups if g._group_actions and g.title not in (t for t, _ in _GROUPS)
                   and any(a.dest == "model_name_or_path" for a in g._group_actions))
    for action in list(default._group_actions):
        if action.dest == "help":
            continue
        dest = action.dest
        index = 0 if dest in model_fields else 1 if dest in data_fields else 2 if dest.startswith("r2_") else 3
        default._group_actions.remove(action)
        groups[index]._group_actions.append(action)
    rest = [g for g in parser._action_groups if g not in groups]
    parser._action_groups[:] = rest + groups


def _train_parser():
    from transformers import HfArgumentParser

    from ..data import DataArguments, ModelArguments
    from ..training_args import R2TrainingArguments
    from .parsing import one_line_errors

    parser = HfArgumentParser(
        (ModelArguments, DataArguments, R2TrainingArguments),
        prog="hf-r2 train",
        usage="hf-r2 train [CONFIG.json|yaml] --model_name_or_path NAME [model / data / R2 flags] [Trainer flags]",
        description="Train an image classifier with R2-Loss (R2Trainer), evaluate it and save the model folder. "
        "Flags come from the fields below; alternatively pass one JSON or YAML file of the same fields, "
        "optionally followed by flags that override it. Ctrl-C prints the command that resumes from the last "
        "complete checkpoint (`--resume_from_checkpoint latest`).",
    )
    _group_flags(parser)
    return one_line_errors(parser)


def _parse_train_args(argv: Sequence[str]):
    """`(ModelArguments, DataArguments, R2TrainingArguments)` from flags, or from a config file plus override flags."""
    from .._utils import CONFIG_FILE_SUFFIXES, read_config_file
    from .parsing import resolve_aliases

    parser = _train_parser()
    argv = list(argv)
    if argv and not argv[0].startswith("-") and argv[0].lower().endswith(CONFIG_FILE_SUFFIXES):
        path, argv = argv[0], argv[1:]
        try:
            values = resolve_aliases(parser, read_config_file(path))  # `model:` as `--model`
        except FileNotFoundError:
            parser.error(f"config file {path!r} does not exist.")
        except ValueError as err:  # JSON / YAML syntax errors or tags, or not a mapping: one line naming the file
            parser.error(str(err))
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


def resume_command(argv: Sequence[str]) -> str:
    """The `hf-r2 train` command line of `argv` with `--resume_from_checkpoint latest` (replacing any given)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in ("--resume_from_checkpoint", "--resume-from-checkpoint"):
            skip = "=" not in arg
            continue
        kept.append(arg)
    return shlex.join(["hf-r2", "train", *kept, "--resume_from_checkpoint", "latest"])


def _interrupted(argv: Sequence[str], output_dir: str, err: KeyboardInterrupt) -> int:
    """Ctrl-C's or SIGTERM's one line (what stopped it, the last complete checkpoint, the command that resumes);
    returns the status, 130 or 143."""
    from ..checkpoints import interrupt_exit_code, interrupted_line

    print(f"hf-r2 train: {interrupted_line(err, output_dir)}; resume with: {resume_command(argv)}", file=sys.stderr,
          flush=True)
    return interrupt_exit_code(err)


def _help_cache_path() -> str:
    """Where the help text of this hf-r2 (its flag-defining sources), transformers version and terminal width (which
    argparse wraps the text to) is cached."""
    import hashlib
    import os
    import shutil
    from importlib.metadata import PackageNotFoundError, version

    from ..version import __version__

    try:
        transformers_version = version("transformers")
    except PackageNotFoundError:  # pragma: no cover - transformers is a dependency
        transformers_version = "none"
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    width = shutil.get_terminal_size().columns
    digest = hashlib.sha1(f"{__version__} {transformers_version} {width}".encode())
    for source in ("commands/train.py", "commands/parsing.py", "data/arguments.py", "training_args.py"):
        with open(os.path.join(package, source), "rb") as f:
            digest.update(f.read())
    cache = os.environ.get("HF_R2_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "hf-r2")
    return os.path.join(cache, f"train-help-{digest.hexdigest()[:16]}.txt")


def _cached_help() -> str:
    """The text of `hf-r2 train --help`: read from the cache, else built (importing transformers) and cached."""
    from .._utils import write_text_atomic

    path = _help_cache_path()
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError:
        pass
    text = _train_parser().format_help()
    try:
        write_text_atomic(path, text)
    except OSError:  # a read-only home: no cache, the help is still printed
        pass
    return text


def train_command(args: argparse.Namespace) -> int:
    argv = list(getattr(args, "extra_args", []))
    if any(arg in ("-h", "--help") for arg in argv):
        print(_cached_help(), end="")
        return 0
    from ..progress import bars_wanted, readable_logging
    from ..train import run_train

    model_args, data_args, training_args = _parse_train_args(argv)
    try:
        with readable_logging(bars_wanted(not training_args.disable_tqdm)):  # log lines above the bar, not through it
            results = run_train(model_args, data_args, training_args)
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM (hf_r2.checkpoints.Terminated)
        return _interrupted(argv, training_args.output_dir, err)
    print(_final_line(training_args.output_dir, results["eval"]))
    return 0


def _final_line(output_dir: str, metrics: dict) -> str:
    """`Saved the model to ... (eval accuracy ...).`, or, for a model no better than always guessing the most frequent
    class ([`hf_r2.metrics.at_chance`]), the line that says so and what to try."""
    from ..metrics import at_chance

    accuracy = metrics.get("eval_accuracy", float("nan"))
    line = f"Saved the model to {output_dir} (eval accuracy {accuracy:.4f})"
    chance, n = metrics.get("eval_chance_accuracy"), metrics.get("eval_samples", 0)
    if chance is None or not at_chance(accuracy, chance, n):
        return line + "."
    one_class = " and it predicts one class for every image" if metrics.get("eval_predicted_classes") == 1 else ""
    return (f"{line}, but that is chance level: always guessing the most frequent class scores {chance:.4f} on these "
            f"{n} images{one_class}; the model learnt nothing: train longer (more steps or epochs), or lower the "
            "learning rate or the R2 lambda (--r2_lambda) if the loss did not fall.")
