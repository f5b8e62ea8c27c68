"""How fast ONNX Runtime runs an exported file: [`ort_latency`] times one file (CPU provider, a fixed number of
threads, the median of several runs on random inputs), [`export_float_reference`] writes the same network with its
float weights (quantizers and palettes removed), the file a low-bit export is compared with; `hf-r2 export` prints
both, `benchmarks/onnx_latency.py` tables them for several models, sizes and batches.

Timings are of this machine and its load at that moment: the median of `runs` runs after `warmup` unmeasured ones,
one session per file, `threads` intra-op threads (1 by default: what a small deployment gets, and what is least
disturbed by other processes).
"""

from __future__ import annotations

import copy
import os
import statistics
import time
from typing import Any

import torch
from torch import nn

from ._optional import require_module

__all__ = ["ort_latency", "export_float_reference"]


def ort_latency(
    path: str | os.PathLike,
    input_size: list[int] | tuple[int, ...],
    *,
    batch_size: int = 1,
    runs: int = 10,
    warmup: int = 2,
    threads: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """Time ONNX Runtime (CPU) on the file `path` (input `pixel_values` `(batch, *input_size)`).

    Returns:
        `dict`: `ms_per_image` (the median run's time divided by `batch_size`), `ms_per_batch` (median),
        `min_ms_per_batch`, `batch_size`, `runs`, `threads` and `onnxruntime` (its version).
    """
    ort = require_module("onnxruntime", "Timing an ONNX file")
    if runs < 1 or batch_size < 1 or threads < 1:
        raise ValueError(f"`runs`, `batch_size` and `threads` must be positive, got {runs}, {batch_size}, {threads}.")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(seed)
    feed = {"pixel_values": torch.randn(batch_size, *input_size, generator=generator).numpy()}
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(1e3 * (time.perf_counter() - start))
    median = statistics.median(times)
    return {"ms_per_image": median / batch_size, "ms_per_batch": median, "min_ms_per_batch": min(times),
            "batch_size": batch_size, "runs": runs, "threads": threads, "onnxruntime": ort.__version__}


def export_float_reference(
    model: nn.Module, path: str | os.PathLike, *, input_size: Any = None, opset: int | None = None
) -> dict[str, Any]:
    """Write `model` without its quantizers and palettes (its float weights, as they are) to the ONNX file `path`:
    the float file a low-bit export is timed against. `model` is left as it is. Returns `export_onnx`'s report."""
    from ..layers import dequantize_layers_
    from .onnx_export import DEFAULT_ONNX_OPSET, export_onnx

    float_model = dequantize_layers_(copy.deepcopy(model))
    return export_onnx(float_model, path, input_size=input_size, opset=opset or DEFAULT_ONNX_OPSET,
                       palette_lookup=False)
