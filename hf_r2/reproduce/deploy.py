"""ONNX checks of `hf-r2 reproduce`: the low-bit model of a setting written as an ONNX file, and its top-1 measured
in ONNX Runtime beside hf-r2's own ([`onnx_check`]), so a table's low-bit figure is shown to hold in a runtime (the
demo ends with one). Needs the `onnx` extra; without it the rows are measured as usual and the check is skipped."""

from __future__ import annotations

import logging
import os
from typing import Any

__all__ = ["onnx_check", "onnx_check_available"]

logger = logging.getLogger(__name__)


def onnx_check_available() -> bool:
    """Whether `onnx` and `onnxruntime` are installed (`pip install 'hf-r2[onnx]'`)."""
    from ..quant.export.onnx_export import is_onnx_available

    return is_onnx_available()


def onnx_check(model: Any, batches: list[dict[str, Any]], path: str, input_size: int) -> dict[str, Any]:
    """Export `model` (quantized, palettized or float) to the ONNX file `path` and count its correct top-1 answers
    on `batches` (`{"pixel_values", "labels"}`) in ONNX Runtime (CPU, default session options), with
    [`~hf_r2.quant.export.onnx_export.onnx_accuracy`] (what `hf-r2 export --dataset` records too).

    Returns:
        `dict`: `path`, `accuracy` (ONNX Runtime's top-1, a fraction), `file_bytes`, `bits_per_weight`, `weights`
        (what [`~hf_r2.quant.export_onnx`] stored) and `opset`.
    """
    from ..quant.export.onnx_export import export_onnx, onnx_accuracy

    report = export_onnx(model, path, input_size=input_size)
    accuracy = onnx_accuracy(path, batches)["accuracy"]
    return {"path": os.fspath(path), "accuracy": accuracy, "file_bytes": report["file_bytes"],
            "bits_per_weight": report["bits_per_weight"], "weights": report["weights"], "opset": report["opset"]}
