"""`hf-r2 export`: write a saved model folder (a float one from `hf-r2 train`, or a low-bit export of `hf-r2 ptq /
qat / compress`) in a deployment format, then check the file against hf-r2. `--format onnx`
([`~hf_r2.quant.onnx_export.export_onnx`]): a QDQ graph for PTQ / QAT, palette + indices for a palettized model,
the float graph for a float one; ONNX Runtime's logits are compared with hf-r2's on random inputs.
"""

from __future__ import annotations

import argparse
import os

__all__ = ["export_command_parser", "export_command", "default_output"]

_FORMATS = ("onnx",)
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
    """The `export` sub-command: a saved model folder to an ONNX file."""
    description = (
        "Write a saved model folder (from `hf-r2 train`, or a low-bit export of `hf-r2 ptq / qat / compress`) as an "
        "ONNX file: quantized layers as QuantizeLinear / DequantizeLinear with hf-r2's integer codes, scales and "
        "zero points, palettized layers as palette + indices, float layers as they are. Then runs the file with "
        "ONNX Runtime on random inputs and compares its logits with hf-r2's. Needs `pip install 'hf-r2[onnx]'`."
    )
    formatter = argparse.ArgumentDefaultsHelpFormatter
    if subparsers is None:
        parser = argparse.ArgumentParser("hf-r2 export", description=description, formatter_class=formatter)
    else:
        parser = subparsers.add_parser("export", description=description, formatter_class=formatter,
                                       help="Export a saved model folder to ONNX.")
    parser.add_argument("model", help="A model folder saved by `hf-r2 train` or a low-bit export (or a Hub id).")
    parser.add_argument("--format", default="onnx", choices=_FORMATS, help="The file format.")
    parser.add_argument("--output", "-o", default=None,
                        help="The file to write (default: model.onnx inside the model folder; <name>.onnx in the "
                        "current folder for a Hub id).")
    parser.add_argument("--opset", type=_Int(_MIN_OPSET, _MAX_OPSET), default=_OPSET,
                        help="ONNX opset; from 21 on, 1- to 4-bit weights are stored as INT4.")
    parser.add_argument("--input-size", "--input_size", type=_Int(1), default=None,
                        help="Side of the example input in pixels (default: the model's saved one).")
    parser.add_argument("--float-palettes", "--float_palettes", action="store_true",
                        help="Store palettized weights as float32 instead of palette + indices.")
    parser.add_argument("--check-samples", "--check_samples", type=_Int(0), default=8,
                        help="Random inputs on which ONNX Runtime's logits are compared with hf-r2's (0: no check).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random check inputs.")
    parser.set_defaults(func=export_command)
    return parser


def default_output(model: str, fmt: str = "onnx") -> str:
    """`<model folder>/model.<fmt>`, or `<repo name>.<fmt>` in the current folder for a Hub id."""
    if os.path.isdir(model):
        return os.path.join(model, f"model.{fmt}")
    return f"{os.path.basename(model.rstrip('/'))}.{fmt}"


def export_command(args: argparse.Namespace) -> int:
    import sys

    import torch

    from ..quant.onnx_export import compare_onnx, export_onnx, require_onnx, restore_low_bit_weights_
    from .quant_steps import load_any

    try:  # before the model loads: a missing package is one line, as the other user errors
        require_onnx(runtime=args.check_samples > 0)
    except ImportError as err:
        print(f"hf-r2 export: error: {err}", file=sys.stderr)
        return 1
    model, folder, description = load_any(args.model)
    if description is not None:
        restore_low_bit_weights_(model, folder)
    output = args.output or default_output(args.model, args.format)
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
    return 0
