"""`hf-r2 export`: write a saved model folder (a float one from `hf-r2 train`, or a low-bit export of `hf-r2 ptq /
qat / compress`) in a deployment format, then check the file against hf-r2. `--format onnx`
([`~hf_r2.quant.export_onnx`]): a QDQ graph for PTQ / QAT, palette + indices for a palettized model,
the float graph for a float one; ONNX Runtime's logits are compared with hf-r2's on random inputs, and the file's
latency in ONNX Runtime (CPU, one thread, batch 1) is measured beside the float file's (`--latency-runs 0` skips
it). `--storage int8` (the default) stores weight codes as INT8 in the layout ONNX Runtime runs with integer kernels
(about float speed or faster); `--storage int4` keeps 1- to 4-bit codes as INT4, the smallest file, many times
slower than float in ONNX Runtime (docs/results.md has the measured table). `--format coreml`
([`~hf_r2.quant.export_coreml`]): an `.mlpackage` whose palettized and quantized weights are Core ML
compressed weights holding hf-r2's palettes, indices and codes (activations stay float); Core ML runs on Apple
systems only, so the check reads the weights back from the package and compares them with hf-r2's.

With `--dataset` (ONNX only), the file's top-1 accuracy is measured in ONNX Runtime on the evaluation split
([`~hf_r2.quant.onnx_accuracy`]) beside hf-r2's own top-1 of the same model on the same images. A file
written inside the model folder is recorded in the folder's `export_results.json` (one entry per format, replaced
by the next export in that format), which the model card's Deploy section reads
([`hf_r2.model_card.build_model_card`]):

```json
{"format_version": 1, "hf_r2_version": "...", "exports": {"onnx": {
  "format": "onnx", "path": "model.onnx", "file_bytes": 48310, "float_bytes": 312464, "bits_per_weight": 2.31,
  "weights": "quantized", "low_bit_layers": 21, "opset": 21, "input_size": [3, 32, 32], "storage": "int8",
  "integer_layers": 8,
  "preprocessing": [{"op": "resize", "size": 32, "interpolation": "bilinear"}, ...],
  "check": {"kind": "logits", "num_images": 8, "seed": 0, "max_abs_diff": 1e-06, "max_abs_logit": 3.1,
            "top1_agreement": 1.0},
  "accuracy": {"onnxruntime": 0.25, "hf_r2": 0.25, "dataset": "cifar10-tiny", "split": "test", "num_images": 200,
               "input_size": 32},
  "latency": {"ms_per_image": 1.46, "batch_size": 1, "threads": 1, "runs": 10, "onnxruntime": "1.32.0",
              "float_ms_per_image": 1.1, "float_file_bytes": 1250000},
  "weights_sha256": "..."}}}
```

A Core ML entry has `precision`, `deployment_target`, `float_file_bytes` (the same network converted with float
weights), `activations` and `input_quantizers_dropped` instead of `opset`, `storage`, `integer_layers` and
`latency`, a `check` of `kind` `"weights"` (`num_layers`, `exact_layers`, `values_match`, `max_abs_diff`,
`max_rel_diff`, `missing`) and `accuracy` `null`. `check` is `null` when no check ran, `latency` when it was skipped
(its `float_*` are `null` for a float model); `integer_layers` counts the layers in ONNX Runtime's integer kernels;
`float_bytes` is the float model's weights (the low-bit export's size report, or the state dict); `weights_sha256`
is [`hf_r2.model_card.weights_digest`] of the folder at export time.
"""

from __future__ import annotations

import argparse
import os

__all__ = ["export_command_parser", "export_command", "default_output"]

_FORMATS = ("onnx", "coreml")
_SUFFIXES = {"onnx": "onnx", "coreml": "mlpackage"}
# hf_r2.quant.export.coreml_export.COREML_PRECISIONS, repeated for the same reason (checked by the same test)
_PRECISIONS = ("float32", "float16")
# hf_r2.quant.export.onnx_export's DEFAULT / MIN / MAX_ONNX_OPSET, repeated so that `hf-r2 --help` imports no torch
# (tests/commands/test_export.py checks that they agree)
_OPSET, _MIN_OPSET, _MAX_OPSET = 21, 13, 23
# and its ONNX_STORAGES (the first the default, DEFAULT_ONNX_STORAGE)
_STORAGES = ("int8", "int4")


class _Int:
    """argparse type of an integer in `[low, high]` (`high=None`: no upper bound)."""

    def __init__(self, low: int, high: int | None = None):
        self.low, self.high = low, high
        self.takes = f"an integer from {low} to {high}" if high is not None else f"an integer >= {low}"
        self.__name__ = "integer"

    def __call__(self, text: str) -> int:
        value = int(text)  # ValueError -> argparse's "invalid value", told as "--x takes ..."
        if value < self.low or (self.high is not None and value > self.high):
            raise ValueError(text)
        return value


def export_command_parser(subparsers=None) -> argparse.ArgumentParser:
    """The `export` sub-command: a saved model folder to an ONNX file or a Core ML package."""
    description = (
        "Write a saved model folder (from `hf-r2 train`, or a low-bit export of `hf-r2 ptq / qat / compress`) as an "
        "ONNX file: quantized layers as QuantizeLinear / DequantizeLinear with hf-r2's integer codes, scales and "
        "zero points, palettized layers as palette + indices, float layers as they are. Then runs the file with "
        "ONNX Runtime on random inputs and compares its logits with hf-r2's. Needs `pip install 'hf-r2[onnx]'`. "
        "With `--format coreml`, writes a Core ML package (iOS 18 / macOS 15) instead: palettized weights and 1- to "
        "3-bit grids as lookup tables with hf-r2's palettes and indices, 4- to 8-bit grids as linear-quantized "
        "weights with hf-r2's codes, scales and zero points, activations in float; then reads the weights back from "
        "the package and compares them with hf-r2's. Needs `pip install 'hf-r2[coreml]'`. With --dataset (onnx "
        "only), also measures the file's top-1 in ONNX Runtime beside hf-r2's on the same images. A file written "
        "inside the model folder is recorded in its export_results.json, which the model card (`hf-r2 push`) shows."
    )
    formatter = argparse.ArgumentDefaultsHelpFormatter
    if subparsers is None:
        parser = argparse.ArgumentParser("hf-r2 export", description=description, formatter_class=formatter)
    else:
        parser = subparsers.add_parser("export", description=description, formatter_class=formatter,
                                       help="Export a saved model folder to ONNX or Core ML.")
    parser.add_argument("model", help="A model folder saved by `hf-r2 train` or a low-bit export (or a Hub id).")
    parser.add_argument("--format", default="onnx", choices=_FORMATS, help="The file format.")
    parser.add_argument("--output", "-o", default=None,
                        help="The file to write (default: model.onnx / model.mlpackage inside the model folder; "
                        "<name>.onnx / <name>.mlpackage in the current folder for a Hub id).")
    parser.add_argument("--opset", type=_Int(_MIN_OPSET, _MAX_OPSET), default=_OPSET,
                        help="ONNX opset (onnx only); from 21 on, 1- to 4-bit weights are stored as INT4.")
    parser.add_argument("--storage", default=_STORAGES[0], choices=_STORAGES,
                        help="ONNX only: how quantized weights are stored. int8: the layout ONNX Runtime runs with "
                        "integer kernels (QLinearConv / QGemm) where the result is hf-r2's, at float speed elsewhere; "
                        "int4: the smallest file (1- to 4-bit codes as INT4 from opset 21), but every weight is "
                        "dequantized again on each run, many times slower than the float file.")
    parser.add_argument("--latency-runs", "--latency_runs", type=_Int(0), default=10,
                        help="ONNX only: time the file and the same network with float weights in ONNX Runtime "
                        "(CPU, one thread, batch 1, the median of this many runs) and print both (0: skip).")
    parser.add_argument("--input-size", "--input_size", type=_Int(1), default=None,
                        help="Side of the example input in pixels (default: the model's saved one).")
    parser.add_argument("--float-palettes", "--float_palettes", action="store_true",
                        help="Store palettized weights as float32 instead of palette + indices (onnx only).")
    parser.add_argument("--precision", default=_PRECISIONS[0], choices=_PRECISIONS,
                        help="Core ML only: the float type of the palettes, scales, float weights and computation "
                        "(float32 keeps hf-r2's weights bit for bit).")
    parser.add_argument("--check-samples", "--check_samples", type=_Int(0), default=8,
                        help="Random inputs on which ONNX Runtime's logits are compared with hf-r2's (0: no check). "
                        "A Core ML package is checked by reading its weights back instead (0: no check).")
    parser.add_argument("--seed", type=int, default=0,
                        help="Seed of the random check inputs (and of the --max-eval-samples subset).")
    parser.add_argument("--dataset", default=None,
                        help="ONNX only: also measure the file's top-1 accuracy in ONNX Runtime on this dataset's "
                        "evaluation split (a name as for `hf-r2 evaluate`, e.g. cifar10, or a local path), beside "
                        "hf-r2's top-1 of the same model on the same images; both are recorded.")
    parser.add_argument("--data-dir", "--data_dir", default=None, help="Folder of the local CIFAR-10 copies.")
    parser.add_argument("--max-eval-samples", "--max_eval_samples", type=_Int(1), default=None,
                        help="With --dataset: evaluate on a seeded random subset of this many images.")
    parser.add_argument("--batch-size", "--batch_size", type=_Int(1), default=128,
                        help="With --dataset: the batch size of both evaluations.")
    parser.set_defaults(func=export_command)
    return parser


def default_output(model: str, fmt: str = "onnx") -> str:
    """`<model folder>/model.<suffix>`, or `<repo name>.<suffix>` in the current folder for a Hub id (`.onnx`,
    `.mlpackage` for Core ML)."""
    suffix = _SUFFIXES[fmt]
    if os.path.isdir(model):
        return os.path.join(model, f"model.{suffix}")
    return f"{os.path.basename(model.rstrip('/'))}.{suffix}"


def export_command(args: argparse.Namespace) -> int:
    import sys

    from .._utils import UsageError

    coreml = args.format == "coreml"
    if coreml and (args.opset != _OPSET or args.float_palettes):
        raise UsageError("--opset and --float-palettes apply to --format onnx only.", prog="hf-r2 export")
    if coreml and args.storage != _STORAGES[0]:
        raise UsageError("--storage applies to --format onnx only.", prog="hf-r2 export")
    if not coreml and args.precision != _PRECISIONS[0]:
        raise UsageError("--precision applies to --format coreml only.", prog="hf-r2 export")
    if coreml and args.dataset is not None:
        raise UsageError("--dataset applies to --format onnx only: hf-r2 cannot run a Core ML package (Apple "
                         "systems only); its weights are checked instead.", prog="hf-r2 export")
    if args.dataset is None and (args.max_eval_samples is not None or args.data_dir is not None):
        raise UsageError("--max-eval-samples and --data-dir need --dataset, e.g. `--dataset cifar10`.",
                         prog="hf-r2 export")
    try:  # before the model loads: a missing package is one line, as the other user errors
        if coreml:
            from ..quant.export.coreml_export import require_coremltools

            require_coremltools()
        else:
            from ..quant.export.onnx_export import require_onnx

            require_onnx(runtime=args.check_samples > 0 or args.dataset is not None)
    except ImportError as err:
        print(f"hf-r2 export: error: {err}", file=sys.stderr)
        return 1
    from ..quant.export.onnx_export import restore_low_bit_weights_
    from .quant_steps import load_any

    output = args.output or default_output(args.model, args.format)
    if coreml:  # a folder of the user's in the way is refused before the model loads
        from ..quant.export.coreml_export import check_coreml_path

        check_coreml_path(output, "--output")
    else:  # and so is a folder where the file would go
        from ..output_folder import check_export_file

        check_export_file(output, "an ONNX file", "--output", "model.onnx")
    model, folder, description = load_any(args.model)
    if description is not None:
        restore_low_bit_weights_(model, folder)
    data = _eval_data(model, args) if args.dataset is not None else None  # before the export: a bad name fails fast
    entry = (_export_coreml if coreml else _export_onnx)(model, output, args, data)
    if os.path.isdir(args.model):
        entry["float_bytes"] = _float_bytes(model, description)
        entry["preprocessing"] = _preprocessing(model, args.input_size)
        recorded = _record(args.model, output, args.format, entry)
        if recorded:
            print(f"Recorded in {recorded}")
    return 0


def _eval_data(model, args: argparse.Namespace) -> tuple[object, dict]:
    """`(batches, what they are)`: the evaluation split of `--dataset` in the model's preprocessing, as a
    `DataLoader` both evaluations iterate in the same order, and its [`data_fields`]."""
    import torch

    from ..data import collate_fn
    from ..models import input_shape
    from .quant_steps import data_fields, load_eval_data

    eval_ds, _, _ = load_eval_data(args, model, calibrate=False)
    on = data_fields(args, eval_ds)
    side = input_shape(model, args.input_size)[-1]
    if len(eval_ds) and on["input_size"] != side:
        raise ValueError(f"The model's preprocessing gives {on['input_size']}-pixel images, but the ONNX file is "
                         f"exported at {side} pixels: pass `--input-size {on['input_size']}` (or the size you want).")
    loader = torch.utils.data.DataLoader(eval_ds, batch_size=args.batch_size, shuffle=False, collate_fn=collate_fn)
    return loader, on


def _export_onnx(model, output: str, args: argparse.Namespace, data: tuple | None) -> dict:
    """Export, check, and only then put the file at `output`: a file that fails the check replaces nothing. An
    existing file keeps its mode, and a link is followed (the file is staged beside the one it points to)."""
    import torch

    from ..output_folder import check_export_file, replace_file
    from ..quant.export.onnx_export import compare_onnx, export_onnx

    target = check_export_file(output, "an ONNX file", "--output", "model.onnx")
    staged = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.unchecked")
    try:
        report = export_onnx(model, staged, input_size=args.input_size, opset=args.opset,
                             palette_lookup=not args.float_palettes, storage=args.storage)
        check = None
        if args.check_samples:
            generator = torch.Generator().manual_seed(args.seed)
            images = torch.randn(args.check_samples, *report["input_size"], generator=generator)
            check = compare_onnx(model, staged, images)
        if check is not None and not check["passed"]:  # NaN / inf logits fail it too
            raise ValueError(
                f"the ONNX file does not compute what hf-r2 computes on {check['num_images']} random inputs: max "
                f"|logit difference| {check['max_abs_diff']:.3g} (largest |logit| {check['max_abs_logit']:.3g}), "
                f"{check['nonfinite_logits']} NaN / inf logits, top-1 agreement "
                f"{100 * check['top1_agreement']:.1f}%; nothing was written to {output} ("
                + ("weights too large for float32 give NaN / inf: a diverged training" if check["nonfinite_logits"]
                   else "an exporter or runtime mismatch: please report it with `hf-r2 env`") + ")")
        replace_file(staged, target)
    finally:
        if os.path.exists(staged):
            os.remove(staged)
    report["path"] = os.path.abspath(output)
    types = ", ".join(f"{count} {name}" for name, count in report["code_types"].items()) or "none"
    print(f"ONNX file: {report['path']} ({report['file_bytes'] / 1024:.1f} KiB, opset {report['opset']}, "
          f"{report['weights']} weights)")
    print(f"Bits per Conv/Linear weight: {report['bits_per_weight']:.2f}; low-bit layers: {report['low_bit_layers']} "
          f"({types}); QuantizeLinear / DequantizeLinear nodes: {report['quantize_linear']} / "
          f"{report['dequantize_linear']}")
    if "quantized" in report["weights"] and report["storage"] == "int8":
        quantized = report["integer_layers"] + len(report["float_layers"])
        print(f"Storage int8: {report['integer_layers']} of {quantized} quantized layers in ONNX Runtime's integer "
              "kernels (QLinearConv / QGemm), the others in float (their output joins a residual Add, a pooling "
              "or the logits, their input grid is below 8 bits, or their grid has no int8 codes)")
    elif "quantized" in report["weights"]:
        print("Storage int4: every weight dequantized in float on each run (the small file; --storage int8 runs "
              "faster)")
    entry = {key: report[key] for key in ("file_bytes", "bits_per_weight", "weights", "low_bit_layers", "opset",
                                          "input_size", "storage", "integer_layers")}
    entry.update(check=None, accuracy=None, latency=None)
    if args.latency_runs:
        entry["latency"] = _latency(model, report, args)
    if check is not None:
        print(f"ONNX Runtime vs hf-r2 on {check['num_images']} random inputs: max |logit difference| "
              f"{check['max_abs_diff']:.3g} (largest |logit| {check['max_abs_logit']:.3g}), top-1 agreement "
              f"{100 * check['top1_agreement']:.1f}%")
        entry["check"] = {"kind": "logits", "num_images": check["num_images"], "seed": args.seed,
                          **{k: check[k] for k in ("max_abs_diff", "max_abs_logit", "top1_agreement")}}
    if data is not None:
        entry["accuracy"] = _accuracy(model, report["path"], *data)
    return entry


def _latency(model, report: dict, args: argparse.Namespace) -> dict:
    """The file's ONNX Runtime latency beside the float file's (the same network with float weights, written to a
    temporary folder); printed and returned."""
    import tempfile

    from ..quant.export.onnx_latency import export_float_reference, ort_latency

    size = report["input_size"]
    timed = ort_latency(report["path"], size, runs=args.latency_runs, seed=args.seed)
    entry = {key: timed[key] for key in ("ms_per_image", "batch_size", "threads", "runs", "onnxruntime")}
    entry.update(float_ms_per_image=None, float_file_bytes=None)
    what = (f"ONNX Runtime latency (CPU, {timed['threads']} thread, batch {timed['batch_size']}, median of "
            f"{timed['runs']} runs): {timed['ms_per_image']:.3g} ms per image")
    if report["weights"] != "float":
        with tempfile.TemporaryDirectory() as folder:
            reference = export_float_reference(model, os.path.join(folder, "float.onnx"), input_size=size[-1],
                                               opset=report["opset"])
            baseline = ort_latency(reference["path"], size, runs=args.latency_runs, seed=args.seed)
        entry.update(float_ms_per_image=baseline["ms_per_image"], float_file_bytes=reference["file_bytes"])
        ratio = timed["ms_per_image"] / baseline["ms_per_image"]
        what += (f"; the float file {baseline['ms_per_image']:.3g} ms ({ratio:.2f}x its time), "
                 f"{reference['file_bytes'] / 1024:.1f} KiB ({reference['file_bytes'] / report['file_bytes']:.1f}x "
                 "this file's size)")
    print(what)
    return entry


def _accuracy(model, path: str, batches, on: dict) -> dict:
    """Top-1 of the file in ONNX Runtime and of `model` in hf-r2 on the same `batches`; printed and returned."""
    from ..metrics import evaluate_accuracy
    from ..quant.export.onnx_export import onnx_accuracy

    ort = onnx_accuracy(path, batches)
    ours = evaluate_accuracy(model, batches)
    print(f"Top-1 on {ort['num_images']} images ({on['split']} split of {on['dataset']}, {on['input_size']} pixels): "
          f"ONNX Runtime {100 * ort['accuracy']:.2f}%, hf-r2 {100 * ours['accuracy']:.2f}% (the same images)")
    return {"onnxruntime": ort["accuracy"], "hf_r2": ours["accuracy"], **on}


def _export_coreml(model, output: str, args: argparse.Namespace, data: tuple | None = None) -> dict:
    from collections import Counter

    from ..quant.export.coreml_export import compare_coreml_weights, export_coreml

    report = export_coreml(model, output, input_size=args.input_size, precision=args.precision)
    size, baseline = report["file_bytes"], report["float_file_bytes"]
    print(f"Core ML package: {report['path']} ({size / 1024:.1f} KiB, float conversion {baseline / 1024:.1f} KiB: "
          f"{baseline / size:.1f}x smaller; {report['precision']}, {report['deployment_target']}, "
          f"{report['weights']} weights)")
    kinds = Counter(f"{info['kind']} {info['storage']}" for info in report["layers"].values() if info["op"])
    print(f"Bits per Conv/Linear weight: {report['bits_per_weight']:.2f}; low-bit layers: {report['low_bit_layers']} "
          f"({', '.join(f'{count} {kind}' for kind, count in sorted(kinds.items())) or 'none'})")
    if report["input_quantizers_dropped"]:
        print(f"Activations: float ({report['input_quantizers_dropped']} input quantizers not exported: Core ML "
              "stores compressed weights only)")
    entry = {key: report[key] for key in ("file_bytes", "float_file_bytes", "bits_per_weight", "weights",
                                          "low_bit_layers", "precision", "deployment_target", "activations",
                                          "input_quantizers_dropped", "input_size")}
    entry.update(check=None, accuracy=None)
    if args.check_samples and report["low_bit_layers"]:
        check = compare_coreml_weights(model, report["path"])
        codes = "equal hf-r2's" if check["values_match"] else "DIFFER from hf-r2's"
        missing = f"; missing layers: {check['missing']}" if check["missing"] else ""
        print(f"Weights read back from the package: {check['exact_layers']} / {check['num_layers']} layers decode to "
              f"hf-r2's weights bit for bit, indices and codes {codes}; max |difference| {check['max_abs_diff']:.3g} "
              f"(relative {check['max_rel_diff']:.3g}){missing}")
        entry["check"] = {"kind": "weights", **{k: check[k] for k in ("num_layers", "exact_layers", "values_match",
                                                                       "max_abs_diff", "max_rel_diff", "missing")}}
    return entry


def _float_bytes(model, description: dict | None) -> int:
    """The float model's weights in bytes: the low-bit export's own figure (its size report), else the state dict."""
    size = (description or {}).get("size") or {}
    if size.get("float_bytes"):
        return int(size["float_bytes"])
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def _preprocessing(model, input_size: int | None) -> list[dict]:
    """The model's evaluation transform ([`hf_r2.data.build_transform`], what hf-r2 measures with) as plain data."""
    from torchvision import transforms as T

    from ..data import build_transform

    steps: list[dict] = []
    for step in build_transform(model, train=False, input_size=input_size).transforms:
        if isinstance(step, T.Resize):
            size = step.size if isinstance(step.size, int) else list(step.size)
            steps.append({"op": "resize", "size": size, "interpolation": str(getattr(step.interpolation, "value",
                                                                                      step.interpolation))})
        elif isinstance(step, T.CenterCrop):
            steps.append({"op": "center_crop", "size": list(step.size)})
        elif isinstance(step, T.ToTensor):
            steps.append({"op": "to_tensor"})
        elif isinstance(step, T.Normalize):
            steps.append({"op": "normalize", "mean": [round(float(v), 4) for v in step.mean],
                          "std": [round(float(v), 4) for v in step.std]})
        else:
            steps.append({"op": type(step).__name__, "repr": repr(step)})
    return steps


def _record(folder: str, output: str, fmt: str, entry: dict) -> str | None:
    """Put `entry` under `fmt` in `folder`'s `export_results.json` (atomically) when `output` lies inside `folder`;
    returns the JSON's path, or `None` for a file written elsewhere (which a push of the folder would not carry)."""
    from .._utils import read_json, write_json_atomic
    from ..model_card import EXPORT_RESULTS_NAME, weights_digest
    from ..version import __version__

    relative = os.path.relpath(os.path.abspath(output), os.path.abspath(folder))
    if relative == os.pardir or relative.startswith(os.pardir + os.sep):
        return None
    path = os.path.join(folder, EXPORT_RESULTS_NAME)
    try:
        data = read_json(path)
    except ValueError:  # not JSON (a hand edit gone wrong): this export starts the file afresh
        data = None
    exports = data.get("exports") if isinstance(data, dict) else None
    exports = dict(exports) if isinstance(exports, dict) else {}
    exports[fmt] = {"format": fmt, "path": relative.replace(os.sep, "/"), **entry,
                    "weights_sha256": weights_digest(folder)}
    return write_json_atomic(path, {"format_version": 1, "hf_r2_version": __version__, "exports": exports})
