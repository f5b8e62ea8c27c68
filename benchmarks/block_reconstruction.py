"""Round-to-nearest against AdaRound against block reconstruction (BRECQ, and QDrop with `drop_prob=0.5`) on
several trained models side by side (issue 25): top-1 and seconds per row, at W2A8, W2A4 and W4A4 by default
(per-channel MSE weight grids, MSE activation ranges, first and last layer at 8 bits, batch norms kept as trained
for every row, so that only the rounding and the activation steps differ).

A measurement, not a test. Each model is a folder saved by `hf-r2 train` (by default the demo's resnet10t baseline,
`make demo`), named with `--models NAME=DIR ...` (or `--model-dir DIR`, repeated: named after the folder, the
run's name for a `.../NAME/seedN` folder), so that one run measures a baseline and its R2 models in the same
columns. Every row is evaluated on the first `--eval-samples` images of the test split (seeded shuffle), with the
same `--calibration-samples` training images (evaluation transform) for every method. `--iters` is the number of
Adam steps per block (BRECQ / QDrop) and, unless `--adaround-iters` says otherwise, per layer (AdaRound); the
papers use 20,000 on a GPU, so state the reduced counts with the numbers (the table's header does).

Results go to `--output-dir` as `results.json` (every row measured, with what it depends on) and `results.md` (a
table: rows setting x method, columns models), both rewritten atomically after every row. A row already in
`results.json` for the same model folder, setting, method, iterations, calibration, evaluation and seed is not
measured again, so the run can be stopped and started again (e.g. in the background over several sessions).

The local CIFAR-10 copy is found through `$HF_R2_DATA_DIR` (the Makefile sets it to `../shared/data`).

    python benchmarks/block_reconstruction.py                       # the demo baseline, 200 steps
    python benchmarks/block_reconstruction.py --iters 500 --threads 1 \\
        --models baseline=outputs/demo/runs/resnet10t/baseline/seed0 r2=outputs/demo/runs/resnet10t/linf-pc-w3/seed0
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import sys
import time
from typing import Any

_DEMO_MODEL = os.path.join("outputs", "demo", "runs", "resnet10t", "baseline", "seed0")
_METHODS = ("nearest", "adaround", "brecq", "qdrop")
_OUTPUT_DIR = os.path.join("docs", "results", "block_reconstruction")
#: The fields of a row that decide whether it can be reused (besides the model folder, setting and method).
_KEY_FIELDS = ("iters", "calibration_samples", "eval_samples", "batch_size", "dataset", "seed")


def _config(method: str, w_bits: int, a_bits: int, iters: int, args: argparse.Namespace) -> Any:
    from hf_r2.quant import BlockReconstructionConfig, PTQConfig

    batches = -(-args.calibration_samples // args.batch_size)
    if method in ("nearest", "adaround"):
        return PTQConfig(w_bits=w_bits, a_bits=a_bits, bn="keep", rounding=method, calibration_batches=batches,
                         adaround={"iters": iters, "seed": args.seed} if method == "adaround" else None)
    return BlockReconstructionConfig(w_bits=w_bits, a_bits=a_bits, iters=iters, calibration_batches=batches,
                                     drop_prob=0.5 if method == "qdrop" else 0.0, seed=args.seed)


def _iters(method: str, args: argparse.Namespace) -> int:
    """The Adam steps a method's row takes: 0 for round-to-nearest and the float model."""
    if method in ("nearest", "float"):
        return 0
    return (args.adaround_iters or args.iters) if method == "adaround" else args.iters


def row_key(row: dict[str, Any]) -> tuple:
    """What a row depends on: rows with the same key are the same measurement."""
    return (row["model_dir"], row["setting"], row["method"]) + tuple(row[k] for k in _KEY_FIELDS)


def planned_rows(models: dict[str, str], settings: list[str], methods: list[str], args: argparse.Namespace
                 ) -> list[dict[str, Any]]:
    """The rows of this run, without results: the float model, then setting x method, each on every model."""
    pairs = [("FP", "float")] + [(s, m) for s in settings for m in methods]
    return [{"model": name, "model_dir": os.path.abspath(folder), "setting": setting, "method": method,
             "iters": _iters(method, args), "calibration_samples": args.calibration_samples,
             "eval_samples": args.eval_samples, "batch_size": args.batch_size, "dataset": args.dataset,
             "seed": args.seed}
            for setting, method in pairs for name, folder in models.items()]


def load_results(path: str) -> list[dict[str, Any]]:
    """The rows of an earlier `results.json` (none if there is none)."""
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return json.load(f)["rows"]


def _cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "–"
    top1 = f"{row['top1']:.2f}"
    return top1 if row["method"] == "float" else f"{top1} ({row['seconds']:.0f} s)"


def results_table(plan: list[dict[str, Any]], done: dict[tuple, dict[str, Any]], meta: dict[str, Any]) -> str:
    """`results.md`: what was measured, then one line per setting x method with a cell per model, "top-1 (seconds)"
    ("–": not measured yet)."""
    models = list(dict.fromkeys(row["model"] for row in plan))
    folders = {row["model"]: meta["model_dirs"][row["model"]] for row in plan}
    adaround = meta["adaround_iters"]
    lines = [
        "# Block reconstruction against AdaRound and round-to-nearest (issue 25)",
        "",
        f"Top-1 (%) on the first {meta['eval_samples']} test images of `{meta['dataset']}` (seeded shuffle, seed "
        f"{meta['seed']}), and in brackets the seconds each row took to quantize (evaluation not included) with "
        f"{meta['threads']} torch thread(s) on a machine with {meta['cpus']} CPUs.",
        "",
        f"- Calibration: {meta['calibration_samples']} training images (evaluation transform), batches of "
        f"{meta['batch_size']}, the same for every method.",
        f"- Iterations, reduced to fit a CPU (the papers: 20,000 on a GPU): AdaRound {adaround} Adam steps per layer, "
        f"BRECQ and QDrop {meta['iters']} per block (QDrop: `drop_prob=0.5`).",
        "- Grids: per-channel MSE weight ranges, MSE activation ranges, first and last layer at 8 bits, batch norms "
        "kept as trained (every row).",
        "- Models: " + "; ".join(f"{name} = `{folders[name]}`" for name in models) + ".",
        f"- Command: `{meta['command']}`",
        "",
        "| setting | method | " + " | ".join(models) + " |",
        "|---|---|" + "---|" * len(models),
    ]
    for setting, method in dict.fromkeys((row["setting"], row["method"]) for row in plan):
        cells = [_cell(done.get(row_key(row))) for row in plan if (row["setting"], row["method"]) == (setting, method)]
        lines.append(f"| {setting} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _models(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, str]:
    """`{name: folder}` from `--models NAME=DIR` and `--model-dir DIR` (default: the demo baseline)."""
    models: dict[str, str] = {}
    for spec in args.models or []:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            parser.error(f"--models takes NAME=DIR (e.g. baseline=outputs/.../seed0), got {spec!r}.")
        models[name] = folder
    for folder in args.model_dir or ([] if models else [_DEMO_MODEL]):
        parts = os.path.normpath(folder).split(os.sep)
        name = parts[-2] if re.fullmatch(r"seed\d+", parts[-1]) and len(parts) > 1 else parts[-1]
        if name in models:
            parser.error(f"two models are named {name!r}: name them with --models NAME=DIR.")
        models[name] = folder
    folders = [os.path.abspath(folder) for folder in models.values()]
    if len(set(folders)) < len(folders):
        parser.error(f"a model folder is given twice in {models}: rows are keyed by folder, so name each once.")
    for name, folder in models.items():
        if not os.path.isfile(os.path.join(folder, "config.json")):
            parser.error(f"model {name!r}: {folder!r} has no config.json: run `make demo` or pass a folder saved by "
                         "`hf-r2 train`.")
    return models


def _parse(argv: list[str] | None) -> tuple[argparse.Namespace, dict[str, str], list[tuple[str, int, int]]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", metavar="NAME=DIR", help="Named model folders, one column each.")
    parser.add_argument("--model-dir", action="append", help="A folder saved by `hf-r2 train` (repeatable).")
    parser.add_argument("--dataset", default="cifar10", help="hf_r2.data.load_image_dataset name or path.")
    parser.add_argument("--settings", nargs="+", default=["W2A8", "W2A4", "W4A4"], help="WxAy settings.")
    parser.add_argument("--methods", nargs="+", default=list(_METHODS), choices=_METHODS)
    parser.add_argument("--iters", type=int, default=200, help="Adam steps per block (and per layer for AdaRound).")
    parser.add_argument("--adaround-iters", type=int, default=None, help="Adam steps per layer (default: --iters).")
    parser.add_argument("--calibration-samples", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=64, help="Calibration batch size.")
    parser.add_argument("--eval-samples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's).")
    parser.add_argument("--output-dir", default=_OUTPUT_DIR, help="Where results.json and results.md go.")
    args = parser.parse_args(argv)
    for name in ("iters", "calibration_samples", "batch_size", "eval_samples"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}.")
    if args.adaround_iters is not None and args.adaround_iters < 1:
        parser.error(f"--adaround-iters must be a positive integer (or left out: --iters), got {args.adaround_iters}.")
    settings = []
    for s in args.settings:
        match = re.fullmatch(r"W(\d)A(\d)", s)
        if not match:
            parser.error(f"--settings takes WxAy (e.g. W2A4), got {s!r}.")
        settings.append((s, int(match[1]), int(match[2])))
    return args, _models(args, parser), settings


class _Inputs:
    """Each model's float copy, evaluation and calibration batches, loaded on first use (a run with every row
    already measured loads nothing)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.dataset, self.models = args, None, {}

    def __call__(self, folder: str) -> tuple[Any, list, list]:
        import torch

        from hf_r2.data import calibration_batches, collate_fn, load_image_dataset, with_transforms
        from hf_r2.models import create_model

        if folder not in self.models:
            args = self.args
            if self.dataset is None:
                self.dataset = load_image_dataset(args.dataset, max_eval_samples=args.eval_samples, seed=args.seed)
            model = create_model(folder, pretrained=True).eval()
            evaluation = list(torch.utils.data.DataLoader(with_transforms(self.dataset["test"], model, train=False),
                                                          batch_size=250, collate_fn=collate_fn))
            calibration = calibration_batches(self.dataset["train"], model, args.calibration_samples, seed=args.seed,
                                              batch_size=args.batch_size)
            self.models[folder] = (model, evaluation, calibration)
        return self.models[folder]


def main(argv: list[str] | None = None) -> int:
    args, models, settings = _parse(argv)
    import torch

    from hf_r2._utils import write_json_atomic, write_text_atomic
    from hf_r2.metrics import evaluate_accuracy
    from hf_r2.quant import quantize_

    if args.threads:
        torch.set_num_threads(args.threads)
    bits = {name: (w, a) for name, w, a in settings}
    plan = planned_rows(models, [name for name, _, _ in settings], args.methods, args)
    json_path, md_path = os.path.join(args.output_dir, "results.json"), os.path.join(args.output_dir, "results.md")
    rows = load_results(json_path)
    done = {row_key(row): row for row in rows}
    meta = {"model_dirs": models, "iters": args.iters, "adaround_iters": args.adaround_iters or args.iters,
            "calibration_samples": args.calibration_samples, "eval_samples": args.eval_samples,
            "batch_size": args.batch_size, "dataset": args.dataset, "seed": args.seed,
            "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "command": " ".join(["python", "benchmarks/block_reconstruction.py", *(sys.argv[1:] if argv is None
                                                                                   else argv)])}
    todo = [row for row in plan if row_key(row) not in done]
    print(f"{len(plan) - len(todo)} of {len(plan)} rows already in {json_path}; measuring {len(todo)} with "
          f"{meta['threads']} thread(s)", flush=True)
    inputs = _Inputs(args)
    os.makedirs(args.output_dir, exist_ok=True)
    for row in todo:
        float_model, evaluation, calibration = inputs(row["model_dir"])
        torch.manual_seed(args.seed)
        model = copy.deepcopy(float_model)
        start = time.perf_counter()
        if row["method"] != "float":
            quantize_(model, _config(row["method"], *bits[row["setting"]], row["iters"], args), calibration)
        seconds = time.perf_counter() - start
        top1 = 100 * evaluate_accuracy(model, evaluation)["accuracy"]
        row = {**row, "top1": top1, "seconds": seconds, "threads": torch.get_num_threads()}
        rows, done[row_key(row)] = [r for r in rows if row_key(r) != row_key(row)] + [row], row
        write_json_atomic(json_path, {"rows": rows})
        write_text_atomic(md_path, results_table(plan, done, meta))
        print(f"{row['model']} {row['setting']} {row['method']} ({row['iters']} iters): top-1 {top1:.2f} in "
              f"{seconds:.1f} s", flush=True)
    write_text_atomic(md_path, results_table(plan, done, meta))
    print(f"table: {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
