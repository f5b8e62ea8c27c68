"""`hf-r2 ptq`, `hf-r2 qat`, `hf-r2 compress`, `hf-r2 evaluate`: low-bit steps over a saved model folder.

Each takes a model folder saved by `hf-r2 train` (or a Hub id), runs its step, exports the low-bit model
([`~hf_r2.quant.export.save_low_bit`]) to `--output-dir` (default: beside the model, `<model>-<setting>`),
evaluates it, prints the table and adds its rows to `low_bit_results.json` in the model folder (or in the
export, for a Hub id). `hf-r2 evaluate` measures a float folder, a low-bit export, or a Hub id of either.
"""

from __future__ import annotations

import argparse
import logging
import math
from typing import Any

from .._utils import UsageError
from ._low_bit_flags import FLAG_ROWS, VERBS
from .quant_steps import data_fields, load_any, load_eval_data, run_step, setting_of

__all__ = [
    "ptq_command_parser",
    "ptq_command",
    "qat_command_parser",
    "qat_command",
    "compress_command_parser",
    "compress_command",
    "evaluate_command_parser",
    "evaluate_command",
    "load_any",
]

logger = logging.getLogger(__name__)


class _FORMATTER(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, but for a flag that turns a default-on field off (`--per-tensor`): its help says
    what the default is, and "(default: True)" would read as the flag's."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.nargs == 0 and action.const is False:
            return action.help
        return super()._get_help_string(action)


class _Bits:
    """argparse type of a bit width: an integer in `[low, high]`, or `None` for one of `none_words` (when
    `optional`): `none`, `fp`, `0` (float) for an activation width; `none` alone where it means "like the others"."""

    def __init__(self, low: int, high: int, optional: bool, none_words: tuple[str, ...] = ("none", "null", "0", "fp",
                                                                                          "float")):
        self.low, self.high, self.optional, self.none_words = low, high, optional, none_words
        self.takes = f"{low} to {high}" + (" or 'none'" if optional else "")
        self.__name__ = "bit width"

    def __call__(self, text: str) -> int | None:
        if self.optional and text.lower() in self.none_words:
            return None
        value = int(text)  # ValueError -> argparse's "invalid value", told as "--x takes 2 to 8"
        if not self.low <= value <= self.high:
            raise ValueError(text)
        return value


class _Number:
    """argparse type of a finite real number `>= low` (`> low` when `strict`): NaN and inf are refused, as they pass
    every range check and would train as NaN."""

    def __init__(self, low: float = 0.0, strict: bool = False):
        self.low, self.strict = low, strict
        self.takes = f"a finite number {'>' if strict else '>='} {low:g}"
        self.__name__ = "number"

    def __call__(self, text: str) -> float:
        value = float(text)
        if not (math.isfinite(value) and (value > self.low if self.strict else value >= self.low)):
            raise ValueError(text)
        return value


class _Positive:
    """argparse type of a count or size that must be at least 1."""

    takes = "a positive integer"
    __name__ = "positive integer"

    def __call__(self, text: str) -> int:
        value = int(text)
        if value < 1:
            raise ValueError(text)
        return value


def _subparser(subparsers, name: str, description: str, help: str) -> argparse.ArgumentParser:
    if subparsers is None:
        return argparse.ArgumentParser(f"hf-r2 {name}", description=description, formatter_class=_FORMATTER)
    return subparsers.add_parser(name, description=description, help=help, formatter_class=_FORMATTER)


def _add_data_args(parser: argparse.ArgumentParser, train: bool = False, calibrate: bool = True) -> None:
    add = parser.add_argument
    positive = _Positive()
    add("model", help="A model folder saved by `hf-r2 train` (or a low-bit export), or a Hub id.")
    add("--dataset", default="cifar10", help="Evaluation / calibration data (as `hf-r2 train`).")
    add("--data-dir", "--data_dir", default=None, help="Folder of the local CIFAR-10 copies.")
    add("--input-size", "--input_size", type=positive, default=None,
        help="Input side in pixels (default: the model's saved one).")
    add("--max-eval-samples", "--max_eval_samples", type=positive, default=None,
        help="Evaluate on a seeded random subset of this many test images.")
    add("--batch-size", "--batch_size", type=positive, default=128, help="Batch size.")
    if calibrate:
        add("--calibration-samples", "--calibration_samples", type=positive, default=512,
            help="Training images (no augmentation) for calibration / BN re-estimation.")
    add("--seed", type=int, default=0, help="Seed of the subsets" + (" and of training." if train else "."))
    add("--skip-bad-images", "--skip_bad_images", action="store_true",
        help="Leave out (and count) images that do not decode instead of stopping at the first.")
    add("--map-labels-by-name", "--map_labels_by_name", action="store_true",
        help="When the dataset's classes are the model's in another order (or a subset), score by class name.")
    add("--output-dir", "--output_dir", default=None,
        help="Where the low-bit export goes (default: beside the model, <model>-<setting>)." if calibrate else
        "For a Hub id: the folder low_bit_results.json goes to (default: not recorded).")
    if train:
        add("--epochs", type=_Number(strict=True), default=1.0, help="Fine-tuning epochs.")
        add("--max-train-samples", "--max_train_samples", type=positive, default=None,
            help="Fine-tune on a seeded random subset of this many training images.")
        add("--learning-rate", "--learning_rate", type=_Number(strict=True), default=1e-3, help="Peak LR (AdamW).")
        add("--weight-decay", "--weight_decay", type=_Number(), default=0.0, help="AdamW weight decay.")
        # --r2-weight, the older name, is its own (hidden) flag so that its errors name it
        add("--r2-lambda", "--r2_lambda", dest="r2_lambda", metavar="LAMBDA", type=_Number(), default=0.0,
            help="Keep R2-Loss on during fine-tuning with this lambda (the model's own R2 loss).")
        add("--r2-weight", "--r2_weight", dest="r2_lambda", type=_Number(), default=0.0, help=argparse.SUPPRESS)


_TYPES = {"bits": _Bits(1, 8, False), "act_bits": _Bits(2, 8, True), "first_last_bits": _Bits(2, 8, True, ("none",)),
          "positive": _Positive(), "int": int, "number": _Number()}
_GROUPS = {"AdaRoundConfig": "AdaRound, with --rounding adaround (AdaRoundConfig)",
           "BlockReconstructionConfig": "block reconstruction, with --rounding brecq (BlockReconstructionConfig)"}


def _add_config_flags(parser: argparse.ArgumentParser, verb: str) -> None:
    """One flag per field of the verb's configs, with the field's type, default, choices and help: the table
    [`hf_r2.commands._low_bit_flags`], generated from the configs (`python -m hf_r2.commands.gen_low_bit_flags`)."""
    seen = set()
    for config in VERBS[verb]:
        group = parser.add_argument_group(_GROUPS.get(config, f"the quantization ({config})"))
        for row_config, _, dest, flag, kind, default, choices, help in FLAG_ROWS:
            if row_config != config or dest in seen:  # block reconstruction shares PTQ's grid flags
                continue
            seen.add(dest)
            kwargs = {"dest": dest, "default": default, "help": help}
            if kind in ("store_true", "store_false"):
                kwargs["action"] = kind
            elif kind == "choice":
                kwargs["choices"] = list(choices)
            elif kind == "patterns":
                kwargs.update(nargs="+", metavar="REGEX")
            else:
                kwargs["type"] = _TYPES[kind]
            group.add_argument(flag, *(["--" + flag[2:].replace("-", "_")] if "-" in flag[2:] else []), **kwargs)


def _config_fields(args: argparse.Namespace, config: str, changed: bool = False) -> dict[str, Any]:
    """`{field: value}` of `config` from its flags (`changed`: only those away from the field's default)."""
    return {field: getattr(args, dest) for row_config, field, dest, _, _, default, *_ in FLAG_ROWS
            if row_config == config and not (changed and getattr(args, dest) == default)}


def _refuse_unused(args: argparse.Namespace, verb: str, used: tuple[str, ...], message: str) -> None:
    """A [`UsageError`] (`message`, formatted with `flags` and `it`) for flags of `verb` set away from their defaults
    that the configs `used` do not read: a flag must not be silently ignored."""
    dests = {dest for config, _, dest, *_ in FLAG_ROWS if config in used}
    unused = sorted({flag for config, _, dest, flag, _, default, *_ in FLAG_ROWS if config in VERBS[verb]
                     and dest not in dests and dest != "rounding" and getattr(args, dest) != default})
    if unused:
        raise UsageError(message.format(flags=", ".join(unused), it="it" if len(unused) == 1 else "them"),
                         prog=f"hf-r2 {verb}")


# ----------------------------------------------------------------------------------------------------------------
# ptq


def ptq_command_parser(subparsers=None) -> argparse.ArgumentParser:
    description = (
        "Post-training quantization of a saved model: weights to --w-bits (per channel, MSE range by default), "
        "inputs of quantized layers to --a-bits, round to nearest, AdaRound or block reconstruction (BRECQ / QDrop), "
        "BN re-estimated or folded, after optional range reduction (--pre); evaluates FP and the quantized model, "
        "exports integer codes + scales. The flags are the fields of PTQConfig, AdaRoundConfig and "
        "BlockReconstructionConfig."
    )
    parser = _subparser(subparsers, "ptq", description, "Post-training quantization.")
    _add_data_args(parser)
    _add_config_flags(parser, "ptq")
    parser.add_argument("--pre", nargs="+", default=[], choices=["cle", "magr"],
                        help="Range reduction of the float model before quantizing, in the order given: cle "
                        "(cross-layer equalization; folds the batch norms first) and / or magr (weight magnitude "
                        "reduction on the calibration images), e.g. `--pre cle magr`.")
    parser.set_defaults(func=ptq_command)
    return parser


def ptq_command(args: argparse.Namespace) -> int:
    from ..quant import BlockReconstructionConfig, PTQConfig
    from ..quant.results import format_setting

    if args.rounding == "brecq":
        _refuse_unused(args, "ptq", ("BlockReconstructionConfig",), "--rounding brecq does not read {flags} (block "
                       "reconstruction has its own --brecq-* flags and keeps the batch norms as trained): leave {it} "
                       "out.")
        config = BlockReconstructionConfig(**_config_fields(args, "BlockReconstructionConfig"),
                                           calibration_batches=10**6)  # all: --calibration-samples sets how many
        rounding, bias_correction = "qdrop" if config.drop_prob > 0 else "brecq", False
    else:
        _refuse_unused(args, "ptq", ("PTQConfig", "AdaRoundConfig"),
                       "{flags} set block reconstruction: add --rounding brecq, or leave {it} out.")
        config = PTQConfig(**_config_fields(args, "PTQConfig"),
                           adaround=_config_fields(args, "AdaRoundConfig", changed=True) or None,
                           calibration_batches=10**6)
        rounding, bias_correction = config.rounding, config.bias_correction
    setting = format_setting(config.w_bits, config.a_bits)
    pre = "".join(f"-{step}" for step in args.pre) + ("-bc" if bias_correction else "")
    tag = f"{setting.lower()}-ptq" + (f"-{rounding}" if rounding != "nearest" else "") + pre
    return run_step(args, "ptq", config, setting=setting, tag=tag, method=f"ptq-{rounding}{pre}",
                    pre=args.pre, w_bits=config.w_bits, a_bits=config.a_bits)


# ----------------------------------------------------------------------------------------------------------------
# qat


def qat_command_parser(subparsers=None) -> argparse.ArgumentParser:
    description = (
        "Quantization-aware training (LSQ step sizes) of a saved model at --w-bits / --a-bits, fine-tuned with the "
        "accelerate loop; evaluates FP and the QAT model, exports integer codes + scales."
    )
    parser = _subparser(subparsers, "qat", description, "Quantization-aware training (LSQ).")
    _add_data_args(parser, train=True)
    _add_config_flags(parser, "qat")
    parser.set_defaults(func=qat_command)
    return parser


def qat_command(args: argparse.Namespace) -> int:
    from ..quant import QATConfig
    from ..quant.results import format_setting

    config = QATConfig(**_config_fields(args, "QATConfig"))
    setting = format_setting(config.w_bits, config.a_bits)
    return run_step(args, "qat", config, setting=setting, tag=f"{setting.lower()}-qat", method="qat-lsq",
                    train=True, w_bits=config.w_bits, a_bits=config.a_bits, epochs=args.epochs)


# ----------------------------------------------------------------------------------------------------------------
# compress


def compress_command_parser(subparsers=None) -> argparse.ArgumentParser:
    description = (
        "Weight clustering (palettization) of a saved model to --bits (2^bits shared values per tensor or group): "
        "k-means (no data) or DKM (differentiable k-means, fine-tuned with the accelerate loop); evaluates and "
        "exports palette + indices."
    )
    parser = _subparser(subparsers, "compress", description, "Weight clustering (k-means, DKM).")
    _add_data_args(parser, train=True)
    _add_config_flags(parser, "compress")
    parser.add_argument("--no-bn-reestimate", "--no_bn_reestimate", dest="bn_reestimate", action="store_false",
                        help="Do not re-estimate BN statistics after clustering.")
    parser.set_defaults(func=compress_command)
    return parser


def compress_command(args: argparse.Namespace) -> int:
    from ..quant import PalettizeConfig
    from ..quant.results import format_setting

    config = PalettizeConfig(**_config_fields(args, "PalettizeConfig"))
    setting = format_setting(args.bits)
    return run_step(args, "compress", config, setting=setting, tag=f"{setting.lower()}-{args.method}",
                    method=args.method, train=args.method == "dkm", w_bits=args.bits, a_bits=None)


# ----------------------------------------------------------------------------------------------------------------
# evaluate


def evaluate_command_parser(subparsers=None) -> argparse.ArgumentParser:
    description = "Top-1 accuracy of a model folder, a low-bit export, or a Hub id of either, on a dataset."
    parser = _subparser(subparsers, "evaluate", description, description)
    _add_data_args(parser, calibrate=False)
    parser.set_defaults(func=evaluate_command)
    return parser


def evaluate_command(args: argparse.Namespace) -> int:
    import os

    from ..metrics import evaluate_accuracy
    from ..quant.results import float_row, format_table, update_results

    model, folder, description = load_any(args.model)
    eval_ds, _, _ = load_eval_data(args, model, calibrate=False)
    on = data_fields(args, eval_ds)
    accuracy = evaluate_accuracy(model, eval_ds, batch_size=args.batch_size)["accuracy"]
    if description is None:
        row = float_row(accuracy)
    else:
        row = {
            "setting": setting_of(description),
            "method": description.get("method"),
            "accuracy": accuracy,
            "bits_per_weight": description["size"]["bits_per_weight"],
        }
    row.update(on)
    out_dir = folder if os.path.isdir(args.model) else args.output_dir
    path = None
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        path = update_results(out_dir, [row])
    print(format_table([row], f"{args.model} on {args.dataset}"))
    print(f"\nMeasured on {on['num_images']} images ({on['split']} split of {on['dataset']}, "
          f"{on['input_size']} pixels).")
    if path:
        print(f"Results: {path}")
    return 0
