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
_FORMATTER = argparse.ArgumentDefaultsHelpFormatter


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
        add("--r2-weight", "--r2_weight", type=_Number(), default=0.0,
            help="Keep R2-Loss on during fine-tuning with this lambda (the model's own R2 loss).")


def _add_grid_args(parser: argparse.ArgumentParser, a_bits: int) -> None:
    """The grid flags `ptq` and `qat` share."""
    parser.add_argument("--w-bits", "--w_bits", type=_Bits(1, 8, False), default=2, help="Weight bits, 1 to 8.")
    parser.add_argument("--a-bits", "--a_bits", type=_Bits(2, 8, True), default=a_bits,
                        help="Activation bits, 2 to 8, or 'none' for weight-only.")
    parser.add_argument("--per-tensor", "--per_tensor", action="store_true",
                        help="One weight scale per tensor (default: one per output channel).")
    parser.add_argument("--first-last-bits", "--first_last_bits", type=_Bits(2, 8, True, ("none",)), default=8,
                        help="Bits of the first and last layer, 2 to 8 ('none': like the others).")


# ----------------------------------------------------------------------------------------------------------------
# ptq


def ptq_command_parser(subparsers=None) -> argparse.ArgumentParser:
    description = (
        "Post-training quantization of a saved model: weights to --w-bits (per channel, MSE range by default), "
        "inputs of quantized layers to --a-bits, round to nearest or AdaRound, BN re-estimated or folded, after "
        "optional range reduction (--pre); evaluates FP and the quantized model, exports integer codes + scales."
    )
    parser = _subparser(subparsers, "ptq", description, "Post-training quantization.")
    _add_data_args(parser)
    _add_grid_args(parser, a_bits=8)
    parser.add_argument("--weight-range", "--weight_range", default="mse", choices=["maxabs", "mse"],
                        help="How each weight scale is chosen: maxabs (the largest |w|, nothing clipped) or mse (the "
                        "clipping that minimises the squared quantization error).")
    parser.add_argument("--act-observer", "--act_observer", default="mse", choices=["minmax", "percentile", "mse"],
                        help="How each activation range is calibrated: minmax (observed min / max), percentile "
                        "(clip the extreme 0.01%%) or mse (the clipping with the least squared error).")
    parser.add_argument("--rounding", default="nearest", choices=["nearest", "adaround"],
                        help="Weight rounding: nearest, or adaround (learned up / down rounding per weight, layer "
                        "by layer on the calibration images; slower, better at 2 bits).")
    parser.add_argument("--adaround-iters", "--adaround_iters", type=_Positive(), default=None,
                        help="AdaRound iterations per layer (default: AdaRoundConfig's).")
    parser.add_argument("--bn", default="reestimate", choices=["reestimate", "fold", "keep"],
                        help="Batch norm after quantizing: reestimate its statistics on the calibration images, fold "
                        "it into the preceding conv before quantizing, or keep it as trained.")
    parser.add_argument("--bias-correction", "--bias_correction", action="store_true",
                        help="Correct each quantized layer's bias for the mean shift its quantization causes, last, "
                        "on the calibration images (what a BN-folded model has instead of BN re-estimation: with "
                        "`--pre cle` or `--bn fold`).")
    parser.add_argument("--pre", nargs="+", default=[], choices=["cle", "magr"],
                        help="Range reduction of the float model before quantizing, in the order given: cle "
                        "(cross-layer equalization; folds the batch norms first) and / or magr (weight magnitude "
                        "reduction on the calibration images), e.g. `--pre cle magr`.")
    parser.set_defaults(func=ptq_command)
    return parser


def ptq_command(args: argparse.Namespace) -> int:
    from ..quant import PTQConfig
    from ..quant.results import format_setting

    config = PTQConfig(
        w_bits=args.w_bits,
        a_bits=args.a_bits,
        per_channel=not args.per_tensor,
        weight_range=args.weight_range,
        act_observer=args.act_observer,
        rounding=args.rounding,
        bn=args.bn,
        bias_correction=args.bias_correction,
        first_last_bits=args.first_last_bits,
        adaround={"iters": args.adaround_iters} if args.adaround_iters else None,
        calibration_batches=10**6,
    )
    setting = format_setting(config.w_bits, config.a_bits)
    pre = "".join(f"-{step}" for step in args.pre) + ("-bc" if config.bias_correction else "")
    tag = f"{setting.lower()}-ptq" + ("-adaround" if config.rounding == "adaround" else "") + pre
    return run_step(args, "ptq", config, setting=setting, tag=tag, method=f"ptq-{config.rounding}{pre}",
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
    _add_grid_args(parser, a_bits=2)
    parser.set_defaults(func=qat_command)
    return parser


def qat_command(args: argparse.Namespace) -> int:
    from ..quant import QATConfig
    from ..quant.results import format_setting

    config = QATConfig(
        w_bits=args.w_bits,
        a_bits=args.a_bits,
        per_channel=not args.per_tensor,
        first_last_bits=args.first_last_bits,
    )
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
    parser.add_argument("--method", default="kmeans", choices=["kmeans", "dkm"],
                        help="kmeans (cluster the trained weights, no training) or dkm (differentiable k-means, "
                        "fine-tuned for --epochs).")
    parser.add_argument("--bits", type=_Bits(1, 8, False), default=2, help="log2 of the palette size, 1 to 8.")
    parser.add_argument("--group-size", "--group_size", type=_Positive(), default=None,
                        help="One palette per this many output channels (default: one per tensor).")
    parser.add_argument("--skip-first-last", "--skip_first_last", action="store_true",
                        help="Leave the first and last layer in float.")
    parser.add_argument("--no-bn-reestimate", "--no_bn_reestimate", dest="bn_reestimate", action="store_false",
                        help="Do not re-estimate BN statistics after clustering.")
    parser.set_defaults(func=compress_command)
    return parser


def compress_command(args: argparse.Namespace) -> int:
    from ..quant import PalettizeConfig
    from ..quant.results import format_setting

    config = PalettizeConfig(
        bits=args.bits, method=args.method, group_size=args.group_size, skip_first_last=args.skip_first_last
    )
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
