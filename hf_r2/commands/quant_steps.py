"""What `hf-r2 ptq / qat / compress / evaluate` share ([`hf_r2.commands.quant`] holds their flags): loading the model
([`load_any`]) and the data, checked against the model's classes ([`load_eval_data`]), the export's folder, the
result rows (each keyed by the data it was measured on: dataset, split, number of images, input size) and the
step itself ([`run_step`]).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from typing import Any

__all__ = [
    "load_any",
    "load_eval_data",
    "export_dir_for",
    "finish",
    "run_step",
    "setting_of",
    "data_fields",
]


def load_any(model: str, **download_kwargs: Any):
    """`(model, folder, low_bit_config)` for a float folder, a low-bit export, or a Hub id of either: what every
    verb on a saved model loads. A name that looks like a path (`out/nosuch`, `./m`) and does not exist is a
    `FileNotFoundError`, not a Hub lookup; a model with a NaN / inf weight or buffer is refused, naming it."""
    from .._finite import check_finite_model
    from .._utils import check_safetensors_files
    from ..data import check_local_path
    from ..hub import download, from_pretrained
    from ..quant.export import is_low_bit_folder, load_low_bit

    check_local_path(model, "model folder")
    if os.path.exists(model) and not os.path.isdir(model):
        raise NotADirectoryError(f"{model!r} is a file: pass the model folder (the one holding config.json).")
    if os.path.isdir(model):
        folder = model
    else:
        try:
            folder = download(model, **download_kwargs)
        except (OSError, ValueError) as err:  # not on the Hub, offline without a cached copy, network
            raise FileNotFoundError(f"{model!r} is no local folder, and the Hub model of that name could not be "
                                    f"loaded: {err}") from err
    description = None
    if is_low_bit_folder(folder):
        check_safetensors_files(folder)
        loaded, description = load_low_bit(folder)
    else:
        loaded = from_pretrained(folder).model
    check_finite_model(loaded, f"the model {model!r}")  # NaN / inf would pass every step and give a chance result
    return loaded, folder, description


def load_eval_data(args: argparse.Namespace, model, train: bool = False, calibrate: bool = True):
    """`(eval_ds, calibration batches or None, train_ds or None)`: the data of `args`, checked against the model's
    classes ([`hf_r2.data.match_labels`]) before any work."""
    from ..data import DataArguments, calibration_batches, load_data, match_labels, with_transforms

    data_args = DataArguments(
        dataset_name=args.dataset,
        data_dir=args.data_dir,
        input_size=args.input_size,
        max_eval_samples=args.max_eval_samples,
        max_train_samples=getattr(args, "max_train_samples", None),
        skip_bad_images=getattr(args, "skip_bad_images", False),
    )
    raw = load_data(data_args, seed=args.seed)
    raw = match_labels(model, raw, args.dataset, map_by_name=getattr(args, "map_labels_by_name", False))
    size = {"input_size": args.input_size} if args.input_size else {}
    eval_ds = with_transforms(raw["test"], model, train=False, **size)
    calibration = None
    if calibrate:
        calibration = calibration_batches(raw["train"], model, args.calibration_samples, seed=args.seed,
                                          batch_size=min(args.batch_size, 64), **size)
    train_ds = with_transforms(raw["train"], model, train=True, seed=args.seed, **size) if train else None
    return eval_ds, calibration, train_ds


def data_fields(args: argparse.Namespace, eval_ds) -> dict[str, Any]:
    """What a row was measured on ([`hf_r2.quant.results.DATA_FIELDS`]): the dataset (absolute path when local),
    its evaluation split, the number of images and the input side actually fed to the model."""
    from ..data import canonical_dataset

    side = int(eval_ds[0]["pixel_values"].shape[-1]) if len(eval_ds) else args.input_size
    return {"dataset": canonical_dataset(args.dataset), "split": "test", "num_images": len(eval_ds),
            "input_size": side}


def export_dir_for(args: argparse.Namespace, tag: str) -> str:
    """`--output-dir`, else `<model folder>-<tag>` beside the model folder (named from the resolved path, so
    `hf-r2 ptq .` writes `../<folder>-w2a8-ptq`), else `<repo name>-<tag>` for a Hub id."""
    if args.output_dir:
        return args.output_dir
    if os.path.isdir(args.model):
        return f"{os.path.abspath(args.model)}-{tag}"
    return f"{os.path.basename(args.model.rstrip('/'))}-{tag}"


def finish(args, rows: list[dict[str, Any]], folder: str, export_dir: str, title: str) -> int:
    """Record `rows` (in the model folder, and the export), copy the R2 settings into the export, print."""
    import shutil

    from ..config import R2_CONFIG_NAME
    from ..quant.results import format_table, update_results

    if os.path.isfile(os.path.join(folder, R2_CONFIG_NAME)):
        shutil.copy2(os.path.join(folder, R2_CONFIG_NAME), os.path.join(export_dir, R2_CONFIG_NAME))
    results_dir = folder if os.path.isdir(args.model) else export_dir
    path = update_results(results_dir, rows)
    if export_dir != results_dir:
        update_results(export_dir, rows)
    print(format_table(rows, title))
    print(f"\nMeasured on {rows[0]['num_images']} images of {rows[0]['dataset']}.")
    print(f"Low-bit export: {export_dir}\nResults: {path}")
    return 0


def _finetune_kwargs(train_ds, args, folder: str) -> dict[str, Any]:
    """The keyword arguments of the QAT / DKM fine-tune ([`hf_r2.loop.finetune`]): AdamW at `--learning-rate`, R2
    (the model's own loss) on with `--r2-lambda`, off (no regularizer) without."""
    from ..config import R2_CONFIG_NAME, R2Config

    r2 = None
    if args.r2_lambda:
        r2 = R2Config.from_pretrained(folder) if os.path.isfile(os.path.join(folder, R2_CONFIG_NAME)) else R2Config()
        r2 = R2Config.from_dict({**r2.to_dict(), "r2_lambda": args.r2_lambda, "warmup_steps": 0})
    # whole epochs, or a fraction of one as a step count
    steps = -1 if args.epochs >= 1 else max(1, int(args.epochs * len(train_ds) / args.batch_size))
    return {"learning_rate": args.learning_rate, "per_device_batch_size": args.batch_size,
            "num_epochs": max(1, round(args.epochs)), "max_steps": steps, "weight_decay": args.weight_decay,
            "seed": args.seed, "r2_config": r2}


def run_step(args: argparse.Namespace, command: str, config: Any, *, setting: str, tag: str, method: str,
             train: bool = False, pre: list[str] | None = None, **row_fields: Any) -> int:
    """What `ptq`, `qat` and `compress` share: load the model and data (any user error is raised before work
    starts), measure FP, run the `pre` range reductions
    ([`~hf_r2.reproduce.apply.apply_pre_steps`]) and apply `config`
    ([`~hf_r2.reproduce.apply.apply_low_bit_`], with the fine-tune if `train`; both timed), export (the `pre` steps
    recorded in the method config), measure the low-bit model, record and print both rows."""
    from ..metrics import evaluate_accuracy
    from ..quant.export import save_low_bit
    from ..quant.export.low_bit import check_low_bit_folder
    from ..quant.results import float_row
    from ..reproduce.apply import apply_low_bit_, apply_pre_steps

    export_dir = export_dir_for(args, tag)
    check_low_bit_folder(export_dir, "--output-dir")  # a folder of the user's is refused before the work, not after
    model, folder, _ = load_any(args.model)
    eval_ds, calibration, train_ds = load_eval_data(args, model, train=train)
    on = data_fields(args, eval_ds)
    rows = [float_row(evaluate_accuracy(model, eval_ds, batch_size=args.batch_size)["accuracy"], **on)]
    start = time.perf_counter()
    finetune = _finetune_kwargs(train_ds, args, folder) if train else None
    method_config = config.to_dict()
    if pre:
        method_config["pre"] = apply_pre_steps(model, pre, calibration)
    apply_low_bit_(model, config, calibration, train_dataset=train_ds, finetune=finetune,
                   bn_reestimate=getattr(args, "bn_reestimate", True))
    seconds = time.perf_counter() - start
    method_name = method.split("-")[0] if command != "compress" else method
    description = save_low_bit(
        model, export_dir, method=method_name, method_config=method_config, base_model=args.model
    )
    accuracy = evaluate_accuracy(model, eval_ds, batch_size=args.batch_size)["accuracy"]
    size = description["size"]
    rows.append({"setting": setting, "method": method, "accuracy": accuracy,
                 "bits_per_weight": size["bits_per_weight"], "low_bit_bytes": size.get("low_bit_bytes"),
                 "export": os.path.abspath(export_dir), "config": description.get("method_config"),
                 "seconds": seconds, **row_fields, **on})
    return finish(args, rows, folder, export_dir, f"{command} of {args.model}")


def setting_of(description: dict[str, Any]) -> str:
    """`W2A8` for a PTQ / QAT export, `W1` for a palettized one, from its `low_bit_config.json`."""
    from ..quant.results import format_setting

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
