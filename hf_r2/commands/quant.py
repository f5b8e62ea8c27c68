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
import os
import sys
import time
from typing import Any

from ..metrics import evaluate_accuracy
from ..quant.results import float_row, format_setting

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


def _optional_int(text: str) -> int | None:
    return None if text.lower() in ("none", "null", "0", "fp", "float") else int(text)


def _add_data_args(parser: argparse.ArgumentParser, train: bool = False) -> None:
    add = parser.add_argument
    add("model", help="A model folder saved by `hf-r2 train` (or a low-bit export), or a Hub id.")
    add("--dataset", default="cifar10", help="Evaluation / calibration data (as `hf-r2 train`).")
    add("--data-dir", "--data_dir", default=None, help="Folder of the local CIFAR-10 copies.")
    add("--input-size", "--input_size", type=int, default=None,
        help="Input side in pixels (default: the model's saved one).")
    add("--max-eval-samples", "--max_eval_samples", type=int, default=None,
        help="Evaluate on a seeded random subset of this many test images.")
    add("--batch-size", "--batch_size", type=int, default=128, help="Batch size.")
    add("--calibration-samples", "--calibration_samples", type=int, default=512,
        help="Training images (no augmentation) for calibration / BN re-estimation.")
    add("--seed", type=int, default=0, help="Seed of the subsets and of training.")
    add("--output-dir", "--output_dir", default=None,
        help="Where the low-bit export goes (default: beside the model, <model>-<setting>).")
    if train:
        add("--epochs", type=float, default=1.0, help="Fine-tuning epochs.")
        add("--max-train-samples", "--max_train_samples", type=int, default=None,
            help="Fine-tune on a seeded random subset of this many training images.")
        add("--learning-rate", "--learning_rate", type=float, default=1e-3, help="Peak LR (AdamW).")
        add("--weight-decay", "--weight_decay", type=float, default=0.0, help="AdamW weight decay.")
        add("--r2-weight", "--r2_weight", type=float, default=0.0,
            help="Keep R2-Loss on during fine-tuning with this lambda (the model's own R2 loss).")


def _add_grid_args(parser: argparse.ArgumentParser, a_bits: int) -> None:
    """The grid flags `ptq` and `qat` share."""
    parser.add_argument("--w-bits", "--w_bits", type=int, default=2, help="Weight bits, 1 to 8.")
    parser.add_argument("--a-bits", "--a_bits", type=_optional_int, default=a_bits,
                        help="Activation bits, 2 to 8, or 'none' for weight-only.")
    parser.add_argument("--per-tensor", "--per_tensor", action="store_true", help="One weight scale per tensor.")
    parser.add_argument("--first-last-bits", "--first_last_bits", type=_optional_int, default=8,
                        help="Bits of the first and last layer ('none': like the others).")


def load_any(model: str, **download_kwargs: Any):
    """`(model, folder, low_bit_config)` for a float folder, a low-bit export, or a Hub id of either."""
    from ..hub import download, from_pretrained
    from ..quant.export import is_low_bit_folder, load_low_bit

    folder = model if os.path.isdir(model) else download(model, **download_kwargs)
    if is_low_bit_folder(folder):
        loaded, description = load_low_bit(folder)
        return loaded, folder, description
    return from_pretrained(folder).model, folder, None


def _data(args: argparse.Namespace, model, train: bool = False):
    """Eval dataset, calibration batches (train split, eval transform) and, if `train`, the training dataset."""
    from ..data import DataArguments, calibration_batches, load_data, with_transforms

    data_args = DataArguments(
        dataset_name=args.dataset,
        data_dir=args.data_dir,
        input_size=args.input_size,
        max_eval_samples=args.max_eval_samples,
        max_train_samples=getattr(args, "max_train_samples", None),
    )
    raw = load_data(data_args, seed=args.seed)
    _check_classes(model, raw, args.dataset)
    size = {"input_size": args.input_size} if args.input_size else {}
    eval_ds = with_transforms(raw["test"], model, train=False, **size)
    calibration = calibration_batches(raw["train"], model, args.calibration_samples, seed=args.seed,
                                      batch_size=min(args.batch_size, 64), **size)
    train_ds = with_transforms(raw["train"], model, train=True, **size) if train else None
    return eval_ds, calibration, train_ds


def _num_classes(model) -> int | None:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "num_labels"):
        return int(config.num_labels)
    return getattr(model, "num_classes", None)


def _check_classes(model, raw, dataset: str) -> None:
    """A clear error when the data has labels the model's head cannot score."""
    from ..data import label_names

    classes, names = _num_classes(model), label_names(raw)
    if classes is not None and len(names) > classes:
        raise ValueError(
            f"The model has {classes} classes but {dataset!r} has {len(names)} classes ({', '.join(names[:5])}, ...): "
            "evaluate and calibrate on the data the model was trained on."
        )


def _output_dir(args: argparse.Namespace, folder: str, tag: str) -> str:
    if args.output_dir:
        return args.output_dir
    base = os.path.normpath(args.model if os.path.isdir(args.model) else os.path.basename(args.model))
    return f"{base}-{tag}"


def _finish(args, rows: list[dict[str, Any]], folder: str, export_dir: str, title: str) -> int:
    """Record `rows` (in the model folder, and the export), copy the R2 settings into the export, print."""
    import shutil

    from ..config import R2_CONFIG_NAME
    from ..quant.results import format_table, update_results

    if os.path.isfile(os.path.join(folder, R2_CONFIG_NAME)):
        shutil.copy2(os.path.join(folder, R2_CONFIG_NAME), os.path.join(export_dir, R2_CONFIG_NAME))
    for row in rows:
        row.setdefault("dataset", args.dataset)

    results_dir = folder if os.path.isdir(args.model) else export_dir
    path = update_results(results_dir, rows)
    if export_dir != results_dir:
        update_results(export_dir, rows)
    print(format_table(rows, title))
    print(f"\nLow-bit export: {export_dir}\nResults: {path}")
    return 0


def _row(setting: str, method: str, accuracy: float, description: dict, export_dir: str, **more) -> dict[str, Any]:
    size = description["size"]
    return {
        "setting": setting,
        "method": method,
        "accuracy": accuracy,
        "bits_per_weight": size["bits_per_weight"],
        "low_bit_bytes": size.get("low_bit_bytes"),
        "export": os.path.abspath(export_dir),
        "config": description.get("method_config"),
        **more,
    }


def _finetune_kwargs(train_ds, args, folder: str) -> dict[str, Any]:
    """The keyword arguments of the QAT / DKM fine-tune ([`hf_r2.loop.finetune`]): AdamW at `--learning-rate`, R2
    (the model's own loss) on with `--r2-weight`, off (no regularizer) without."""
    from ..config import R2_CONFIG_NAME, R2Config

    r2 = None
    if args.r2_weight:
        r2 = R2Config.from_pretrained(folder) if os.path.isfile(os.path.join(folder, R2_CONFIG_NAME)) else R2Config()
        r2 = R2Config.from_dict({**r2.to_dict(), "weight": args.r2_weight, "warmup_steps": 0})
    # whole epochs, or a fraction of one as a step count
    steps = -1 if args.epochs >= 1 else max(1, int(args.epochs * len(train_ds) / args.batch_size))
    return {"learning_rate": args.learning_rate, "per_device_batch_size": args.batch_size,
            "num_epochs": max(1, round(args.epochs)), "max_steps": steps, "weight_decay": args.weight_decay,
            "seed": args.seed, "r2_config": r2}


def _error(command: str, err: Exception) -> int:
    print(f"hf-r2 {command}: error: {err}", file=sys.stderr)
    return 1


def _run_step(
    args: argparse.Namespace,
    command: str,
    config: Any,
    *,
    setting: str,
    tag: str,
    method: str,
    train: bool = False,
    **row_fields: Any,
) -> int:
    """What `ptq`, `qat` and `compress` share: load the model and data, measure FP, apply `config`
    ([`~hf_r2.reproduce.apply.apply_low_bit_`], with the fine-tune if `train`; timed), export, measure the low-bit
    model, record and print both rows."""
    from ..quant.export import save_low_bit
    from ..reproduce.apply import apply_low_bit_

    try:
        model, folder, _ = load_any(args.model)
        eval_ds, calibration, train_ds = _data(args, model, train=train)
    except (ValueError, OSError) as err:
        return _error(command, err)
    rows = [float_row(evaluate_accuracy(model, eval_ds, batch_size=args.batch_size)["accuracy"])]
    start = time.perf_counter()
    finetune = _finetune_kwargs(train_ds, args, folder) if train else None
    apply_low_bit_(model, config, calibration, train_dataset=train_ds, finetune=finetune,
                   bn_reestimate=getattr(args, "bn_reestimate", True))
    seconds = time.perf_counter() - start
    export_dir = _output_dir(args, folder, tag)
    method_name = method.split("-")[0] if command != "compress" else method
    description = save_low_bit(
        model, export_dir, method=method_name, method_config=config.to_dict(), base_model=args.model
    )
    accuracy = evaluate_accuracy(model, eval_ds, batch_size=args.batch_size)["accuracy"]
    rows.append(_row(setting, method, accuracy, description, export_dir, seconds=seconds, **row_fields))
    return _finish(args, rows, folder, export_dir, f"{command} of {args.model}")


# ----------------------------------------------------------------------------------------------------------------
# ptq


def ptq_command_parser(subparsers=None) -> argparse.ArgumentParser:
    description = (
        "Post-training quantization of a saved model: weights to --w-bits (per channel, MSE range by default), "
        "inputs of quantized layers to --a-bits, round to nearest or AdaRound, BN re-estimated or folded; "
        "evaluates FP and the quantized model, exports integer codes + scales."
    )
    parser = (
        argparse.ArgumentParser("hf-r2 ptq", description=description)
        if subparsers is None
        else subparsers.add_parser("ptq", description=description, help="Post-training quantization.")
    )
    _add_data_args(parser)
    _add_grid_args(parser, a_bits=8)
    parser.add_argument("--weight-range", "--weight_range", default="mse", choices=["maxabs", "mse"])
    parser.add_argument("--act-observer", "--act_observer", default="mse", choices=["minmax", "percentile", "mse"])
    parser.add_argument("--rounding", default="nearest", choices=["nearest", "adaround"])
    parser.add_argument("--adaround-iters", "--adaround_iters", type=int, default=None, help="AdaRound iterations.")
    parser.add_argument("--bn", default="reestimate", choices=["reestimate", "fold", "keep"])
    parser.set_defaults(func=ptq_command)
    return parser


def ptq_command(args: argparse.Namespace) -> int:
    from ..quant import PTQConfig

    try:
        config = PTQConfig(
            w_bits=args.w_bits,
            a_bits=args.a_bits,
            per_channel=not args.per_tensor,
            weight_range=args.weight_range,
            act_observer=args.act_observer,
            rounding=args.rounding,
            bn=args.bn,
            first_last_bits=args.first_last_bits,
            adaround={"iters": args.adaround_iters} if args.adaround_iters else None,
            calibration_batches=10**6,
        )
    except ValueError as err:
        return _error("ptq", err)
    setting = format_setting(config.w_bits, config.a_bits)
    tag = f"{setting.lower()}-ptq" + ("-adaround" if config.rounding == "adaround" else "")
    return _run_step(args, "ptq", config, setting=setting, tag=tag, method=f"ptq-{config.rounding}",
                     w_bits=config.w_bits, a_bits=config.a_bits)


# ----------------------------------------------------------------------------------------------------------------
# qat


def qat_command_parser(subparsers=None) -> argparse.ArgumentParser:
    description = (
        "Quantization-aware training (LSQ step sizes) of a saved model at --w-bits / --a-bits, fine-tuned with the "
        "accelerate loop; evaluates FP and the QAT model, exports integer codes + scales."
    )
    parser = (
        argparse.ArgumentParser("hf-r2 qat", description=description)
        if subparsers is None
        else subparsers.add_parser("qat", description=description, help="Quantization-aware training (LSQ).")
    )
    _add_data_args(parser, train=True)
    _add_grid_args(parser, a_bits=2)
    parser.set_defaults(func=qat_command)
    return parser


def qat_command(args: argparse.Namespace) -> int:
    from ..quant import QATConfig

    try:
        config = QATConfig(
            w_bits=args.w_bits,
            a_bits=args.a_bits,
            per_channel=not args.per_tensor,
            first_last_bits=args.first_last_bits,
        )
    except ValueError as err:
        return _error("qat", err)
    setting = format_setting(config.w_bits, config.a_bits)
    return _run_step(args, "qat", config, setting=setting, tag=f"{setting.lower()}-qat", method="qat-lsq",
                     train=True, w_bits=config.w_bits, a_bits=config.a_bits, epochs=args.epochs)


# ----------------------------------------------------------------------------------------------------------------
# compress


def compress_command_parser(subparsers=None) -> argparse.ArgumentParser:
    description = (
        "Weight clustering (palettization) of a saved model to --bits (2^bits shared values per tensor or group): "
        "k-means (no data) or DKM (differentiable k-means, fine-tuned with the accelerate loop); evaluates and "
        "exports palette + indices."
    )
    parser = (
        argparse.ArgumentParser("hf-r2 compress", description=description)
        if subparsers is None
        else subparsers.add_parser("compress", description=description, help="Weight clustering (k-means, DKM).")
    )
    _add_data_args(parser, train=True)
    parser.add_argument("--method", default="kmeans", choices=["kmeans", "dkm"])
    parser.add_argument("--bits", type=int, default=2, help="log2 of the palette size, 1 to 8.")
    parser.add_argument("--group-size", "--group_size", type=int, default=None,
                        help="One palette per this many output channels (default: one per tensor).")
    parser.add_argument("--skip-first-last", "--skip_first_last", action="store_true",
                        help="Leave the first and last layer in float.")
    parser.add_argument("--no-bn-reestimate", "--no_bn_reestimate", dest="bn_reestimate", action="store_false",
                        help="Do not re-estimate BN statistics after clustering.")
    parser.set_defaults(func=compress_command)
    return parser


def compress_command(args: argparse.Namespace) -> int:
    from ..quant import PalettizeConfig

    try:
        config = PalettizeConfig(
            bits=args.bits, method=args.method, group_size=args.group_size, skip_first_last=args.skip_first_last
        )
    except ValueError as err:
        return _error("compress", err)
    setting = format_setting(args.bits)
    return _run_step(args, "compress", config, setting=setting, tag=f"{setting.lower()}-{args.method}",
                     method=args.method, train=args.method == "dkm", w_bits=args.bits, a_bits=None)


# ----------------------------------------------------------------------------------------------------------------
# evaluate


def evaluate_command_parser(subparsers=None) -> argparse.ArgumentParser:
    description = "Top-1 accuracy of a model folder, a low-bit export, or a Hub id of either, on a dataset."
    parser = (
        argparse.ArgumentParser("hf-r2 evaluate", description=description)
        if subparsers is None
        else subparsers.add_parser("evaluate", description=description, help=description)
    )
    _add_data_args(parser)
    parser.set_defaults(func=evaluate_command)
    return parser


def _setting_of(description: dict[str, Any]) -> str:
    """`W2A8` for a PTQ / QAT export, `W1` for a palettized one, from its `low_bit_config.json`."""
    config = description.get("method_config") or {}
    if "w_bits" in config:
        return format_setting(config["w_bits"], config.get("a_bits"))
    if "bits" in config:
        return format_setting(config["bits"])
    # no method config: the bit widths that hold the most weights (first / last layers are often wider)
    w_count: dict[int, int] = {}
    a_count: dict[int, int] = {}
    for info in description["layers"].values():
        size = math.prod(info["shape"])
        w_count[info["bits"]] = w_count.get(info["bits"], 0) + size
        if info.get("input_bits"):
            a_count[info["input_bits"]] = a_count.get(info["input_bits"], 0) + size
    w_bits = max(w_count, key=w_count.get)
    return format_setting(w_bits, max(a_count, key=a_count.get) if a_count else None)


def evaluate_command(args: argparse.Namespace) -> int:
    from ..quant.results import format_table, update_results

    try:
        model, folder, description = load_any(args.model)
        eval_ds, _, _ = _data(args, model)
    except (ValueError, OSError) as err:
        return _error("evaluate", err)
    accuracy = evaluate_accuracy(model, eval_ds, batch_size=args.batch_size)["accuracy"]
    if description is None:
        row = float_row(accuracy)
    else:
        row = {
            "setting": _setting_of(description),
            "method": description.get("method"),
            "accuracy": accuracy,
            "bits_per_weight": description["size"]["bits_per_weight"],
        }
    row.update(dataset=args.dataset, num_samples=len(eval_ds))
    out_dir = folder if os.path.isdir(args.model) else (args.output_dir or ".")
    os.makedirs(out_dir, exist_ok=True)
    path = update_results(out_dir, [row]) if os.path.isdir(args.model) or args.output_dir else None
    print(format_table([row], f"{args.model} on {args.dataset}"))
    if path:
        print(f"\nResults: {path}")
    return 0
