"""What the low-bit toolkit gives an R2-trained model over a baseline, and what it costs, on the CPU.

On CIFAR-10 small (the local JPEG copy: 5,000 training / 1,000 test images at 32x32) it trains two timm
`resnet10t` from scratch with the demo preset ([`hf_r2.reproduce.presets.demo_config`]: the same data, seed, AdamW
recipe and weight decay; one with R2-Loss, L-inf per output channel, lambda 3), or takes two folders saved by
`hf-r2 train` (`--baseline DIR --r2 DIR`), and prints the top-1 accuracy of both, and their difference, at

| row | what is done to a copy of the float model |
|---|---|
| FP | nothing |
| W4A8 RTN, W2A8 RTN | `quantize_`: per-channel MSE-range weights, nearest rounding, BN re-estimated, 8-bit inputs |
| W2A8 AdaRound | the same with `rounding="adaround"` (`--adaround-iters` Adam steps per layer) |
| W2A2 QAT | `prepare_qat` (LSQ step sizes) + a short fine-tune (`--ft-epochs`, AdamW, lr `--ft-lr`, cosine) |
| W2 / W1 k-means | `palettize_`: one 1-D k-means palette of 4 / 2 values per tensor, BN re-estimated |
| W2 / W1 DKM | `prepare_dkm` + the same fine-tune as QAT + `finalize_dkm`, BN re-estimated |

Each low-bit row is made by `hf_r2.reproduce.apply_setting`, as `hf-r2 reproduce` makes its rows. First and last
layer: every low-bit row keeps the first conv and the classifier at 8 bits, as the paper's baselines do: PTQ and QAT
through their `first_last_bits=8` (8-bit weights and inputs), k-means and DKM through
`PalettizeConfig(first_last_bits=8)` (256-entry palettes on those two layers, which DKM trains too). The fine-tunes
of QAT and DKM are the same for both models and run without R2 (`r2_weight=0`), so the R2 column measures the
trained weights only.

Calibration and BN re-estimation use `--calibration-samples` training images (evaluation transform, batches of
64). Every low-bit model is exported with `save_low_bit` (packed codes + scales, or palette + indices), loaded back
with `load_low_bit`, and its logits on a test batch and its test accuracy are checked against the in-memory model:
the benchmark fails (exit code 1, after printing everything) if they differ.

It then times PTQ of a timm `resnet18` (10 classes, random weights) at 32x32 and at 224x224 on
`--timing-batches` calibration batches of `--timing-batch-size` images: W2A8 round-to-nearest and W2A8 AdaRound
with AdaRound's default iterations; and runs `benchmarks/dkm_memory.py` (peak memory of one resnet18 training step
with DKM at 2 bits, over the same step without DKM) if it is there.

Numbers go to `<output-dir>/quant_toolkit_results.json` and `.md`; low-bit exports to `<output-dir>/exports/`.

    OMP_NUM_THREADS=2 python benchmarks/quant_toolkit.py                 # 51 minutes on 2 cores shared at load 2-3
    python benchmarks/quant_toolkit.py --quick                           # smoke run, about 2 minutes
    python benchmarks/quant_toolkit.py --baseline outputs/a --r2 outputs/b   # models from `hf-r2 train`
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

if TYPE_CHECKING:
    from hf_r2.reproduce import ReproduceConfig

__all__ = ["SETTINGS", "main"]

_HERE = os.path.dirname(os.path.abspath(__file__))

#: The low-bit rows, as `hf-r2 reproduce` settings (`hf_r2.reproduce.ReproduceConfig`'s `low_bit`).
_LOW_BIT: dict[str, dict[str, Any]] = {
    "W4A8 RTN": {"method": "ptq", "w_bits": 4, "a_bits": 8, "per_channel": True, "weight_range": "mse",
                 "rounding": "nearest"},
    "W2A8 RTN": {"method": "ptq", "w_bits": 2, "a_bits": 8, "per_channel": True, "weight_range": "mse",
                 "rounding": "nearest"},
    "W2A8 AdaRound": {"method": "ptq", "w_bits": 2, "a_bits": 8, "per_channel": True, "weight_range": "mse",
                      "rounding": "adaround"},
    "W2A2 QAT (LSQ)": {"method": "qat", "w_bits": 2, "a_bits": 2, "per_channel": True},
    "W2 k-means": {"method": "kmeans", "w_bits": 2},
    "W1 k-means": {"method": "kmeans", "w_bits": 1},
    "W2 DKM": {"method": "dkm", "w_bits": 2},
    "W1 DKM": {"method": "dkm", "w_bits": 1},
}

#: The rows of the accuracy table: (label, method).
SETTINGS: list[tuple[str, str]] = [("FP", "float")] + [(label, s["method"]) for label, s in _LOW_BIT.items()]

# Logits of an exported-and-reloaded model may differ from the in-memory one by float rounding only.
_LOGIT_RTOL = 1e-4


def _log(message: str) -> None:
    print(message, flush=True)


def _load_text() -> str:
    try:
        one, five, fifteen = os.getloadavg()
        return f"load average {one:.2f} {five:.2f} {fifteen:.2f}"
    except OSError:  # pragma: no cover - not on every OS
        return "load average n/a"


# ---- data ---------------------------------------------------------------------------------------------------------


def _batches(dataset, batch_size: int) -> list[dict[str, torch.Tensor]]:
    from hf_r2.data import collate_fn

    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
    return list(loader)


def _prepare_data(model: nn.Module, args: argparse.Namespace) -> dict[str, Any]:
    """Test batches, calibration batches (train split, evaluation transform) and the augmented training set."""
    from hf_r2.data import calibration_batches, load_image_dataset, with_transforms

    ds = load_image_dataset(args.dataset, seed=args.seed)
    size = {"input_size": args.input_size}
    eval_batches = _batches(with_transforms(ds["test"], model, train=False, **size), 250)
    calibration = calibration_batches(ds["train"], model, args.calibration_samples, seed=args.seed, **size)
    train_ds = with_transforms(ds["train"], model, train=True, **size)
    return {"eval": eval_batches, "calibration": calibration, "train": train_ds,
            "num_train": ds["train"].num_rows, "num_eval": ds["test"].num_rows}


# ---- the models ---------------------------------------------------------------------------------------------------


def _train_models(args: argparse.Namespace) -> tuple[str, str, dict[str, Any]]:
    from hf_r2.reproduce import run_reproduce
    from hf_r2.reproduce.presets import demo_config

    out = os.path.join(args.output_dir, "train")
    _log(f"Training baseline and R2 {args.model} on {args.dataset}, {args.epochs:g} epochs each (the demo preset)")
    start = time.perf_counter()
    config = demo_config(
        output_dir=out,
        model=args.model,
        dataset=args.dataset,
        input_size=args.input_size,
        epochs=args.epochs,
        max_train_samples=None,
        max_eval_samples=None,
        seed=args.seed,
    )
    results = run_reproduce(config, progress=False, print_fn=_log)
    seconds = time.perf_counter() - start
    runs = {run["variant"]["name"]: run for run in results["runs"]}
    baseline, r2 = runs["baseline"], runs[results["config"]["variants"][1]["name"]]
    info = {
        "seconds": seconds,
        "settings": results["config"],
        "train_runtime": {"baseline": baseline["train_seconds"], "r2": r2["train_seconds"]},
    }
    _log(f"Training both models took {seconds:.0f} s.")
    return baseline["run_dir"], r2["run_dir"], info


def _load_float(folder: str) -> nn.Module:
    from hf_r2.models import create_model

    return create_model(folder, pretrained=True).eval()


# ---- one setting --------------------------------------------------------------------------------------------------


def _reproduce_config(args: argparse.Namespace) -> ReproduceConfig:
    """A `ReproduceConfig` holding the rows of `_LOW_BIT` (normalised: every setting has every key) and the AdaRound
    and fine-tune settings of `args`, the fields `apply_setting` reads (the fine-tune's batch is 64)."""
    from hf_r2.reproduce import ReproduceConfig

    return ReproduceConfig(
        seeds=[args.seed],
        data_seed=args.seed,
        batch_size=64,
        low_bit=[{"name": label, **setting} for label, setting in _LOW_BIT.items()],
        lambda_sweep=None,
        calibration_samples=args.calibration_samples,
        adaround_iters=args.adaround_iters or None,
        finetune_epochs=args.ft_epochs,
        finetune_max_steps=args.ft_max_steps or None,
        finetune_lr=args.ft_lr,
    )


def _apply(
    label: str, model: nn.Module, data: dict[str, Any], args: argparse.Namespace
) -> tuple[nn.Module, str, dict[str, Any]]:
    """Apply setting `label` to `model` (a copy, changed in place) with `hf_r2.reproduce.apply_setting`, as
    `hf-r2 reproduce` makes its rows: `(model, method, method_config)`."""
    from hf_r2.reproduce import apply_setting, quant_config

    if label not in _LOW_BIT:
        raise ValueError(f"Unknown setting {label!r}; the low-bit settings are {list(_LOW_BIT)}.")
    config = _reproduce_config(args)
    setting = config.setting(label)
    apply_setting(model, setting, config, args.seed, calibration=data["calibration"], train_dataset=data["train"])
    return model, setting["method"], quant_config(setting, config.adaround_iters).to_dict()


@torch.no_grad()
def _export_check(
    model: nn.Module,
    folder: str,
    method: str,
    method_config: dict[str, Any],
    base_model: str,
    data: dict[str, Any],
    accuracy: float,
) -> dict[str, Any]:
    """Save with `save_low_bit`, load with `load_low_bit`, compare logits and accuracy with `model`."""
    from hf_r2.metrics import evaluate_accuracy
    from hf_r2.models import forward_logits
    from hf_r2.quant import load_low_bit, save_low_bit

    description = save_low_bit(model, folder, method=method, method_config=method_config, base_model=base_model)
    loaded, _ = load_low_bit(folder)
    pixels = data["eval"][0]["pixel_values"]
    model.eval()
    ref = forward_logits(model, pixels).float()
    got = forward_logits(loaded, pixels).float()
    max_diff = (ref - got).abs().max().item()
    tolerance = _LOGIT_RTOL * max(1.0, ref.abs().max().item())
    loaded_accuracy = evaluate_accuracy(loaded, data["eval"])["accuracy"]
    ok = max_diff <= tolerance and loaded_accuracy == accuracy
    size = description["size"]
    return {
        "export": os.path.abspath(folder),
        "export_ok": ok,
        "export_max_logit_diff": max_diff,
        "export_accuracy": loaded_accuracy,
        "bits_per_weight": size["bits_per_weight"],
        "low_bit_bytes": size.get("low_bit_bytes"),
        "float_bytes": size.get("float_bytes"),
    }


def _run_model(name: str, folder: str, args: argparse.Namespace, data_cache: dict[str, Any]) -> dict[str, Any]:
    from hf_r2.metrics import evaluate_accuracy

    float_model = _load_float(folder)
    if "data" not in data_cache:
        data_cache["data"] = _prepare_data(float_model, args)
    data = data_cache["data"]
    rows: dict[str, Any] = {}
    for label, _ in SETTINGS:
        if args.settings and label not in args.settings:
            continue
        start = time.perf_counter()
        if label == "FP":
            accuracy = evaluate_accuracy(float_model, data["eval"])["accuracy"]
            rows[label] = {"accuracy": accuracy, "seconds": time.perf_counter() - start}
            _log(f"  [{name}] {label:<16} {100 * accuracy:6.2f} %")
            continue
        torch.manual_seed(args.seed)
        model, method, method_config = _apply(label, copy.deepcopy(float_model), data, args)
        seconds = time.perf_counter() - start
        accuracy = evaluate_accuracy(model, data["eval"])["accuracy"]
        slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
        check = _export_check(
            model, os.path.join(args.output_dir, "exports", name, slug), method, method_config, folder, data, accuracy
        )
        rows[label] = {"accuracy": accuracy, "seconds": seconds, "method": method, "config": method_config, **check}
        status = "export ok" if check["export_ok"] else (
            f"EXPORT MISMATCH: reloaded {100 * check['export_accuracy']:.2f} %, "
            f"max logit diff {check['export_max_logit_diff']:.3g}"
        )
        _log(
            f"  [{name}] {label:<16} {100 * accuracy:6.2f} %  ({seconds:6.1f} s, "
            f"{check['bits_per_weight']:.2f} bits/weight, {status})"
        )
        del model
    return rows


# ---- PTQ wall time ------------------------------------------------------------------------------------------------


def _ptq_timing(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Seconds of `quantize_` (W2A8, round to nearest and AdaRound) on a random-weight timm resnet18."""
    import timm

    from hf_r2.data import load_image_dataset, with_transforms
    from hf_r2.quant import AdaRoundConfig, PTQConfig, quantize_

    torch.manual_seed(args.seed)
    base = timm.create_model("resnet18", num_classes=10, pretrained=False).eval()
    ds = load_image_dataset(args.dataset, seed=args.seed)
    count = args.timing_batches * args.timing_batch_size
    rows_ds = ds["train"].select(range(min(count, ds["train"].num_rows)))
    results = []
    for size in args.timing_sizes:
        calibration = _batches(with_transforms(rows_ds, base, train=False, input_size=size), args.timing_batch_size)
        calibration = calibration[: args.timing_batches]
        iters = args.timing_adaround_iters or AdaRoundConfig().iters
        for rounding in ("nearest", "adaround"):
            config = PTQConfig(
                w_bits=2,
                a_bits=8,
                rounding=rounding,
                adaround={"iters": iters} if rounding == "adaround" else None,
                calibration_batches=len(calibration),
            )
            model = copy.deepcopy(base)
            start = time.perf_counter()
            quantize_(model, config, calibration)
            seconds = time.perf_counter() - start
            row = {
                "model": "resnet18",
                "input_size": size,
                "setting": "W2A8",
                "rounding": rounding,
                "adaround_iters": iters if rounding == "adaround" else None,
                "calibration_images": sum(len(b["labels"]) for b in calibration),
                "seconds": seconds,
            }
            results.append(row)
            method = f"AdaRound ({iters} iters/layer)" if rounding == "adaround" else "RTN"
            _log(f"  resnet18 {size}x{size} W2A8 {method}: {seconds:.1f} s on {row['calibration_images']} images")
            del model
    return results


# ---- DKM memory ---------------------------------------------------------------------------------------------------


def _dkm_memory(args: argparse.Namespace) -> dict[str, Any]:
    """Run `benchmarks/dkm_memory.py` (written beside this script) and pass its output through."""
    script = os.path.join(_HERE, "dkm_memory.py")
    if not os.path.isfile(script):
        _log(f"  {script} is not there: DKM peak memory not measured.")
        return {"available": False}
    command = [sys.executable, script, *args.dkm_memory_args]
    _log(f"  $ {' '.join(command)}")
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    for line in proc.stdout.rstrip().splitlines():
        _log(f"  | {line}")
    if proc.returncode != 0:
        _log(f"  dkm_memory.py failed (exit {proc.returncode}); its stderr ends with:")
        for line in proc.stderr.rstrip().splitlines()[-15:]:
            _log(f"  ! {line}")
    # its table rows: "<size>x<size>x<batch> <variant> <peak growth MiB> <x none> <step s> <x none>"
    ratios = {}
    for match in re.finditer(r"^\s*(\d+x\d+x\d+)\s+(\w+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*$",
                             proc.stdout, re.M):
        ratios[f"{match.group(1)} {match.group(2)}"] = {
            "peak_growth_mib": float(match.group(3)),
            "memory_ratio": float(match.group(4)),
            "step_s": float(match.group(5)),
            "time_ratio": float(match.group(6)),
        }
    return {
        "available": True,
        "returncode": proc.returncode,
        "seconds": seconds,
        "command": command,
        "stdout": proc.stdout,
        "rows": ratios,
    }


# ---- report -------------------------------------------------------------------------------------------------------


def _table(results: dict[str, Any]) -> str:
    base, r2 = results["models"]["baseline"], results["models"]["r2"]
    lines = [
        "| setting | baseline top-1 (%) | R2 top-1 (%) | R2 - baseline (pp) | bits / weight | seconds (base / R2) |",
        "|---|---|---|---|---|---|",
    ]
    for label, _ in SETTINGS:
        if label not in base or label not in r2:
            continue
        b, r = base[label], r2[label]
        bpw = r.get("bits_per_weight")
        lines.append(
            f"| {label} | {100 * b['accuracy']:.2f} | {100 * r['accuracy']:.2f} | "
            f"{100 * (r['accuracy'] - b['accuracy']):+.2f} | {'32' if bpw is None else f'{bpw:.2f}'} | "
            + ("- |" if label == "FP" else f"{b['seconds']:.1f} / {r['seconds']:.1f} |")
        )
    return "\n".join(lines)


def _timing_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | input | setting | rounding | calibration images | seconds |", "|---|---|---|---|---|---|"]
    for row in rows:
        rounding = row["rounding"] if row["rounding"] == "nearest" else f"adaround ({row['adaround_iters']} iters)"
        lines.append(
            f"| {row['model']} | {row['input_size']}x{row['input_size']} | {row['setting']} | {rounding} | "
            f"{row['calibration_images']} | {row['seconds']:.1f} |"
        )
    return "\n".join(lines)


# ---- entry point --------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default=os.path.join("outputs", "bench_quant"), help="Where everything goes.")
    parser.add_argument("--quick", action="store_true", help="Tiny settings for a smoke run (about 2 minutes).")
    parser.add_argument("--model", default="resnet10t", help="timm model trained from scratch.")
    parser.add_argument("--dataset", default="cifar10-small", help="Dataset (hf_r2.data.load_image_dataset).")
    parser.add_argument("--input-size", type=int, default=32, help="Input side in pixels.")
    parser.add_argument("--epochs", type=float, default=15.0, help="Training epochs of each model.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of training, fine-tuning and subsets.")
    parser.add_argument("--skip-train", action="store_true",
                        help="Do not train: use --baseline/--r2, or the models of an earlier run in --output-dir.")
    parser.add_argument("--baseline", default=None, help="Baseline model folder (from `hf-r2 train`).")
    parser.add_argument("--r2", default=None, help="R2 model folder (from `hf-r2 train`).")
    parser.add_argument("--calibration-samples", type=int, default=512,
                        help="Training images for calibration, AdaRound and BN re-estimation.")
    parser.add_argument("--adaround-iters", type=int, default=None,
                        help="AdaRound iterations per layer in the table (default: AdaRoundConfig's default).")
    parser.add_argument("--ft-epochs", type=int, default=2, help="Fine-tuning epochs of QAT and DKM.")
    parser.add_argument("--ft-max-steps", type=int, default=None, help="Fine-tuning steps (overrides --ft-epochs).")
    parser.add_argument("--ft-lr", type=float, default=1e-3, help="Fine-tuning learning rate (AdamW).")
    parser.add_argument("--settings", nargs="*", default=None, help="Only these rows (labels as in the table).")
    parser.add_argument("--timing-sizes", type=int, nargs="*", default=[32, 224], help="Inputs of the PTQ timing.")
    parser.add_argument("--timing-batches", type=int, default=4, help="Calibration batches of the PTQ timing.")
    parser.add_argument("--timing-batch-size", type=int, default=32, help="Images per batch of the PTQ timing.")
    parser.add_argument("--timing-adaround-iters", type=int, default=None,
                        help="AdaRound iterations of the timing (default: AdaRoundConfig's default).")
    parser.add_argument("--skip-timing", action="store_true", help="Skip the resnet18 PTQ timing.")
    parser.add_argument("--skip-dkm-memory", action="store_true", help="Skip benchmarks/dkm_memory.py.")
    parser.add_argument("--dkm-memory-args", nargs=argparse.REMAINDER, default=["--threads", "2"],
                        help="Arguments for benchmarks/dkm_memory.py (must come last).")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's).")
    return parser


def _apply_quick(args: argparse.Namespace, given: set[str]) -> None:
    quick = {
        "dataset": "cifar10-tiny",
        "epochs": 1.0,
        "calibration_samples": 128,
        "adaround_iters": 20,
        "ft_max_steps": 4,
        "timing_batches": 1,
        "timing_batch_size": 8,
        "timing_adaround_iters": 10,
        "output_dir": os.path.join("outputs", "bench_quant_quick"),
    }
    for key, value in quick.items():
        if key not in given:
            setattr(args, key, value)
    if "dkm_memory_args" not in given:
        args.dkm_memory_args = ["--sizes", "32x8", "--variants", "none,dkm", "--repeats", "1"]


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    given = {a.dest for a in parser._actions if a.dest != "help" and getattr(args, a.dest) != a.default}
    if args.quick:
        _apply_quick(args, given)
    if args.threads:
        torch.set_num_threads(args.threads)
    if (args.baseline is None) != (args.r2 is None):
        parser.error("--baseline and --r2 go together.")
    if args.settings:
        unknown = sorted(set(args.settings) - {s for s, _ in SETTINGS})
        if unknown:
            parser.error(f"unknown --settings {unknown}; choose from {[s for s, _ in SETTINGS]}.")
    import logging

    logging.getLogger("hf_r2").setLevel(logging.WARNING)
    os.makedirs(args.output_dir, exist_ok=True)

    start = time.perf_counter()
    _log(f"hf-r2 quantization toolkit benchmark ({'quick' if args.quick else 'full'}); torch {torch.__version__}, "
         f"{torch.get_num_threads()} threads, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; {_load_text()}")
    _log("Settings: " + json.dumps({k: v for k, v in vars(args).items()}, default=str))
    results: dict[str, Any] = {"args": vars(args), "load_start": _load_text()}

    # 1. the two models
    if args.baseline is not None:
        folders = {"baseline": args.baseline, "r2": args.r2}
    elif args.skip_train:
        train_dir = os.path.join(args.output_dir, "train")
        r2_dirs = sorted(d for d in os.listdir(train_dir) if d.startswith("r2_")) if os.path.isdir(train_dir) else []
        if not r2_dirs or not os.path.isdir(os.path.join(train_dir, "baseline")):
            parser.error(f"--skip-train without --baseline/--r2 needs an earlier run's models in {train_dir}.")
        folders = {"baseline": os.path.join(train_dir, "baseline"), "r2": os.path.join(train_dir, r2_dirs[0])}
    else:
        baseline, r2, info = _train_models(args)
        folders = {"baseline": baseline, "r2": r2}
        results["training"] = info
    results["folders"] = folders

    # 2. the accuracy table
    _log(f"\nLow-bit accuracy on {args.dataset} ({_load_text()})")
    data_cache: dict[str, Any] = {}
    results["models"] = {}
    for name, folder in folders.items():
        results["models"][name] = _run_model(name, folder, args, data_cache)
    data = data_cache["data"]
    results["data"] = {"dataset": args.dataset, "train_images": data["num_train"], "test_images": data["num_eval"],
                       "calibration_images": sum(len(b["labels"]) for b in data["calibration"])}

    # 3. PTQ wall time, 4. DKM memory
    if not args.skip_timing:
        _log(f"\nPTQ wall time, timm resnet18 (10 classes, random weights) ({_load_text()})")
        results["ptq_timing"] = _ptq_timing(args)
    if not args.skip_dkm_memory:
        _log(f"\nDKM peak memory ({_load_text()})")
        results["dkm_memory"] = _dkm_memory(args)

    from hf_r2.quant import AdaRoundConfig

    results["seconds"] = time.perf_counter() - start
    results["load_end"] = _load_text()
    failures = [
        f"{name}/{label}" for name, rows in results["models"].items() for label, row in rows.items()
        if row.get("export_ok") is False
    ]
    results["export_failures"] = failures

    title = (
        f"{args.model} on {args.dataset} ({data['num_train']} train / {data['num_eval']} test images, "
        f"{args.input_size}x{args.input_size}), top-1 on the test split; trained "
        + (
            f"{args.epochs:g} epochs each by the demo preset (AdamW, R2 L-inf per channel, lambda 3)"
            if "training" in results
            else f"elsewhere (baseline {folders['baseline']}, R2 {folders['r2']})"
        )
        + f"; calibration / BN re-estimation on {results['data']['calibration_images']} training images; "
        f"AdaRound {args.adaround_iters or AdaRoundConfig().iters} iterations per layer; QAT and DKM fine-tuned "
        + (f"{args.ft_max_steps} steps" if args.ft_max_steps else f"{args.ft_epochs} epochs")
        + f" (AdamW lr {args.ft_lr:g}, batch 64, R2 off); first and last layer at 8 bits in every low-bit row."
    )
    report = [f"## Low-bit top-1\n\n{title}\n", _table(results)]
    if results.get("ptq_timing"):
        report += ["\n## PTQ wall time\n", _timing_table(results["ptq_timing"])]
    dkm = results.get("dkm_memory") or {}
    if dkm.get("available"):
        report += ["\n## DKM peak memory (benchmarks/dkm_memory.py)\n", "```", dkm["stdout"].rstrip(), "```"]
        for key, row in dkm.get("rows", {}).items():
            if key.endswith(" dkm"):
                verdict = "met" if row["memory_ratio"] <= 1.5 else "MISSED"
                report.append(f"DKM {key.split()[0]}: peak memory {row['memory_ratio']:.2f}x the step without DKM "
                              f"(target <= 1.5x: {verdict}); step time {row['time_ratio']:.1f}x.")
    report.append(f"\nTotal {results['seconds']:.0f} s; {results['load_start']} at the start, "
                  f"{results['load_end']} at the end.")
    if failures:
        report.append(f"\nEXPORT CHECK FAILED for: {', '.join(failures)}")
    text = "\n".join(report)
    _log("\n" + text)

    with open(os.path.join(args.output_dir, "quant_toolkit_results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, default=str)
    with open(os.path.join(args.output_dir, "quant_toolkit_results.md"), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    _log(f"\nResults: {os.path.join(args.output_dir, 'quant_toolkit_results.json')} (and .md)")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
