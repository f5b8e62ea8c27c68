"""`hf-r2 export`: write a saved model folder (a float one from `hf-r2 train`, or a low-bit export of `hf-r2 ptq /
qat / compress`) in a deployment format, then check the file against hf-r2. `--format onnx`
([`~hf_r2.quant.onnx_export.export_onnx`]): a QDQ graph for PTQ / QAT, palette + indices for a palettized model,
the float graph for a float one; ONNX Runtime's logits are compared with hf-r2's on random inputs. `--format coreml`
([`~hf_r2.quant.coreml_export.export_coreml`]): an `.mlpackage` whose palettized and quantized weights are Core ML
compressed weights holding hf-r2's palettes, indices and codes (activations stay float); Core ML runs on Apple
systems only, so the check reads the weights back from the package and compares them with hf-r2's.
"""

from __future__ import annotations

import argparse
import os

__all__ = ["export_command_parser", "export_command", "default_output"]

_FORMATS = ("onnx", "coreml")
_SUFFIXES = {"onnx": "onnx", "coreml": "mlpackage"}
# hf_r2.quant.coreml_export.COREML_PRECISIONS, repeated for the same reason (checked by the same test)
_PRECISIONS = ("float32", "float16")
# hf_r2.quant.onnx_export's DEFAULT / MIN / MAX_ONNX_OPSET, repeated so that `hf-r2 --help` imports no torch
# (tests/commands/test_export.py checks that they agree)
_OPSET, _MIN_OPSET, _MAX_OPSET = 21, 13, 23


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
        "the package and compares them with hf-r2's. Needs `pip install 'hf-r2[coreml]'`."
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
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random check inputs.")
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
    if not coreml and args.precision != _PRECISIONS[0]:
        raise UsageError("--precision applies to --format coreml only.", prog="hf-r2 export")
    try:  # before the model loads: a missing package is one line, as the other user errors
        if coreml:
            from ..quant.coreml_export import require_coremltools

            require_coremltools()
        else:
            from ..quant.onnx_export import require_onnx

            require_onnx(runtime=args.check_samples > 0)
    except ImportError as err:
        print(f"hf-r2 export: error: {err}", file=sys.stderr)
        return 1
    from ..quant.onnx_export import restore_low_bit_weights_
    from .quant_steps import load_any

    model, folder, description = load_any(args.model)
    if description is not None:
        restore_low_bit_weights_(model, folder)
    output = args.output or default_output(args.model, args.format)
    (_export_coreml if coreml else _export_onnx)(model, output, args)
    return 0


def _export_onnx(model, output: str, args: argparse.Namespace) -> None:
    import torch

    from ..quant.onnx_export import compare_onnx, export_onnx

    report = export_onnx(model, output, input_size=args.input_size, opset=args.opset,
                         palette_lookup=not args.float_palettes)
    types = ", ".join(f"{count} {name}" for name, count in report["code_types"].items()) or "none"
    print(f"ONNX file: {report['path']} ({report['file_bytes'] / 1024:.1f} KiB, opset {report['opset']}, "
          f"{report['weights']} weights)")
    print(f"Bits per Conv/Linear weight: {report['bits_per_weight']:.2f}; low-bit layers: {report['low_bit_layers']} "
          f"({types}); QuantizeLinear / DequantizeLinear nodes: {report['quantize_linear']} / "
          f"{report['dequantize_linear']}")
    if args.check_samples:
        generator = torch.Generator().manual_seed(args.seed)
        images = torch.randn(args.check_samples, *report["input_size"], generator=generator)
        check = compare_onnx(model, report["path"], images)
        print(f"ONNX Runtime vs hf-r2 on {check['num_images']} random inputs: max |logit difference| "
              f"{check['max_abs_diff']:.3g} (largest |logit| {check['max_abs_logit']:.3g}), top-1 agreement "
              f"{100 * check['top1_agreement']:.1f}%")


def _export_coreml(model, output: str, args: argparse.Namespace) -> None:
    from collections import Counter

    from ..quant.coreml_export import compare_coreml_weights, export_coreml

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
    if args.check_samples and report["low_bit_layers"]:
        check = compare_coreml_weights(model, report["path"])
        codes = "equal hf-r2's" if check["values_match"] else "DIFFER from hf-r2's"
        missing = f"; missing layers: {check['missing']}" if check["missing"] else ""
        print(f"Weights read back from the package: {check['exact_layers']} / {check['num_layers']} layers decode to "
              f"hf-r2's weights bit for bit, indices and codes {codes}; max |difference| {check['max_abs_diff']:.3g} "
              f"(relative {check['max_rel_diff']:.3g}){missing}")
