"""ONNX Runtime latency and size of hf-r2's ONNX exports: the float file, the int8 storage and the int4 storage
side by side, on the CPU, for timm models with random weights after PTQ (W2A8 by default, hf-r2's defaults:
per-channel MSE weight grids, first and last layer at 8 bits, BN re-estimated on random calibration images).

Per model and image size, the three files are written once; per batch size the three sessions (CPU provider,
`--threads` intra-op threads, all graph optimizations) run interleaved, one run of each in turn, `--runs` rounds
after a warm-up, so that a change of the machine's load hits all three alike; the table has the median per image.
It also gives the file sizes, the stored bits per weight, how many quantized layers the int8 file runs in ONNX
Runtime's integer kernels (`QLinearConv` / `QGemm`, counted in the graph ONNX Runtime optimizes), and each file's
top-1 agreement with hf-r2's own (PyTorch, fake-quantized) logits on `--check-images` random images. Random
weights make near-ties common (MobileNetV2 with 2-bit weights is close to chaotic: even the int4 file, which holds
hf-r2's computation exactly, agrees on fewer images there); hf-r2 export --dataset measures top-1 on real images.

The last column says, where the int8 file is slower than the float one, why: the share of layers that cannot run
in integer kernels (their output joins a residual Add or a pooling, or their grid is 8-bit), whose inputs still
pass a QuantizeLinear / DequantizeLinear pair in float, and the NCHW <-> NHWC transposes around each run of
integer layers.

    python benchmarks/onnx_latency.py                         # resnet18, mobilenetv2_100; 32, 224 px; batch 1, 32
    python benchmarks/onnx_latency.py --models resnet18 --sizes 32 --batches 1 --runs 5
    python benchmarks/onnx_latency.py --w-bits 4 --ops        # W4A8, and the op counts of the optimized graphs
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections import Counter

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402

from hf_r2.models import forward_logits  # noqa: E402
from hf_r2.quant import PTQConfig, post_training_quantize_  # noqa: E402
from hf_r2.quant.export.onnx_export import export_onnx  # noqa: E402
from hf_r2.quant.export.onnx_latency import export_float_reference  # noqa: E402

__all__ = ["main"]

FILES = ("float", "int8", "int4")
INTEGER_OPS = {"QLinearConv", "QGemm", "QLinearMatMul", "MatMulIntegerToFloat", "ConvInteger", "MatMulInteger"}


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def _session(path: str, threads: int, optimized: str | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if optimized:
        options.optimized_model_filepath = optimized
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _images(n: int, size: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load() -> str:
    try:
        return "load average " + ", ".join(f"{value:.1f}" for value in os.getloadavg())
    except OSError:
        return "load average unknown"


def _time(sessions: dict[str, ort.InferenceSession], feed: dict, runs: int, warmup: int) -> dict[str, float]:
    """Median ms per run of each session, the sessions interleaved run by run."""
    for _ in range(warmup):
        for session in sessions.values():
            session.run(None, feed)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(runs):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feed)
            times[name].append(1e3 * (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in times.items()}


def _files(model_name: str, size: int, args: argparse.Namespace, folder: str) -> dict:
    """PTQ of a random-weight `model_name` at `size` px, its three files, their reports and top-1 agreement."""
    torch.manual_seed(args.seed)
    model = timm.create_model(model_name, num_classes=args.num_classes).eval()
    calibration = [{"pixel_values": _images(args.calibration_images, size, seed)} for seed in (1, 2)]
    config = PTQConfig(w_bits=args.w_bits, a_bits=args.a_bits, calibration_batches=2)
    post_training_quantize_(model, config, calibration)
    stem = os.path.join(folder, f"{model_name}-{size}")
    reports = {
        "float": export_float_reference(model, f"{stem}-float.onnx", input_size=size),
        "int8": export_onnx(model, f"{stem}-int8.onnx", input_size=size, storage="int8"),
        "int4": export_onnx(model, f"{stem}-int4.onnx", input_size=size, storage="int4"),
    }
    images = _images(args.check_images, size, seed=3)
    with torch.no_grad():
        expected = forward_logits(model, images).argmax(-1)
    agreement, ops = {}, {}
    for name in ("int8", "int4"):
        optimized = f"{stem}-{name}.optimized.onnx"
        session = _session(reports[name]["path"], args.threads, optimized)
        got = torch.from_numpy(session.run(None, {"pixel_values": images.numpy()})[0]).argmax(-1)
        agreement[name] = float((got == expected).float().mean())
        ops[name] = Counter(node.op_type for node in onnx.load(optimized).graph.node)
    return {"reports": reports, "agreement": agreement, "ops": ops}


def _note(row: dict) -> str:
    if row["int8"] <= row["float"]:
        return ""
    int8 = row["files"]["reports"]["int8"]
    quantized = int8["integer_layers"] + len(int8["float_layers"])
    return (f"int8 slower: {len(int8['float_layers'])} of {quantized} layers stay float (residual Add / pooling "
            "outputs, 8-bit ends) behind float Q/DQ, plus NCHW<->NHWC transposes around the integer runs")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser("onnx_latency", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", default="resnet18,mobilenetv2_100", help="timm model names, comma-separated.")
    parser.add_argument("--sizes", type=_ints, default=[32, 224], help="Image sides in pixels, comma-separated.")
    parser.add_argument("--batches", type=_ints, default=[1, 32], help="Batch sizes, comma-separated.")
    parser.add_argument("--w-bits", type=int, default=2, help="PTQ weight bits.")
    parser.add_argument("--a-bits", type=int, default=8, help="PTQ input bits.")
    parser.add_argument("--num-classes", type=int, default=10, help="Classifier outputs.")
    parser.add_argument("--runs", type=int, default=7, help="Timed rounds (the median is reported).")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed rounds first.")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads.")
    parser.add_argument("--calibration-images", type=int, default=8, help="Random images per calibration batch "
                        "(two batches).")
    parser.add_argument("--check-images", type=int, default=32, help="Random images for the top-1 agreement.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ops", action="store_true", help="Also print the op counts of the optimized graphs.")
    parser.add_argument("--output-dir", default=None, help="Keep the files here (default: a temporary folder).")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    models = [name for name in args.models.split(",") if name]
    setting = f"W{args.w_bits}A{args.a_bits}"
    print(f"ONNX Runtime {ort.__version__}, CPU provider, {args.threads} thread(s), {_cpu()}; {_load()} at start; "
          f"{setting} PTQ of random weights; median of {args.runs} interleaved runs")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.output_dir or scratch
        os.makedirs(folder, exist_ok=True)
        for model_name in models:
            for size in args.sizes:
                files = _files(model_name, size, args, folder)
                reports = files["reports"]
                sessions = {name: _session(reports[name]["path"], args.threads) for name in FILES}
                if args.ops:
                    for name in ("int8", "int4"):
                        print(f"{model_name} {size} px {name}, optimized graph: {dict(files['ops'][name])}")
                for batch in args.batches:
                    feed = {"pixel_values": _images(batch, size, seed=5).numpy()}
                    timed = _time(sessions, feed, args.runs, args.warmup)
                    row = {"model": model_name, "size": size, "batch": batch, "files": files,
                           **{name: timed[name] / batch for name in FILES}}
                    rows.append(row)
                    print(f"  {model_name} {size} px batch {batch}: " + ", ".join(
                        f"{name} {row[name]:.3f} ms/image" for name in FILES), flush=True)
    print(f"{_load()} at the end\n")
    print("| model | px | batch | float ms/img | int8 ms/img (x float) | int4 ms/img (x float) | MiB float / int8 / "
          "int4 | bits/weight int8 / int4 | integer layers (int8) | top-1 = hf-r2 int8 / int4 | note |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        reports, files = row["files"]["reports"], row["files"]
        int8 = reports["int8"]
        integer = sum(count for op, count in files["ops"]["int8"].items() if op in INTEGER_OPS)
        quantized = int8["integer_layers"] + len(int8["float_layers"])
        sizes = " / ".join(f"{reports[name]['file_bytes'] / 2**20:.2f}" for name in FILES)
        print(f"| {row['model']} {setting} | {row['size']} | {row['batch']} | {row['float']:.3f} | "
              f"{row['int8']:.3f} ({row['int8'] / row['float']:.2f}x) | {row['int4']:.3f} "
              f"({row['int4'] / row['float']:.2f}x) | {sizes} | {int8['bits_per_weight']:.2f} / "
              f"{reports['int4']['bits_per_weight']:.2f} | {integer} of {quantized} | "
              f"{100 * files['agreement']['int8']:.0f}% / {100 * files['agreement']['int4']:.0f}% | {_note(row)} |")
    return rows


if __name__ == "__main__":
    main()
