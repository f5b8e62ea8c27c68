"""`benchmarks/onnx_latency.py` on a tiny model: one table row per model, size and batch, with the three files'
latencies and sizes, the int8 file's integer layers and both files' top-1 agreement with hf-r2."""

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("onnx", reason="the ONNX benchmark needs `pip install 'hf-r2[onnx]'` (onnx)")
pytest.importorskip("onnxruntime", reason="the ONNX benchmark needs `pip install 'hf-r2[onnx]'` (onnxruntime)")

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_one_row_per_setting_with_three_files(capsys, tmp_path):
    spec = importlib.util.spec_from_file_location("_bench_onnx_latency", BENCHMARKS / "onnx_latency.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(["--models", "test_resnet", "--sizes", "32", "--batches", "1,2", "--runs", "1",
                        "--warmup", "0", "--check-images", "4", "--output-dir", str(tmp_path)])
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("| test_resnet W2A8 | 32 |")]
    assert len(rows) == len(table) == 2 and "load average" in out and "ONNX Runtime 1." in out
    for row, line in zip(rows, table):
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells[2] == str(row["batch"]) and float(cells[3]) == pytest.approx(row["float"], abs=1e-3)
        assert cells[4].endswith(f"({row['int8'] / row['float']:.2f}x)")
        assert [float(v) for v in cells[6].split(" / ")][0] > [float(v) for v in cells[6].split(" / ")][2]
        assert cells[8] == "6 of 16"  # test_resnet's integer layers (tests/quant/test_onnx_int8.py)
        assert (cells[10] == "") == (row["int8"] <= row["float"])  # a reason wherever int8 is slower
    assert {path.name for path in tmp_path.iterdir()} >= {"test_resnet-32-float.onnx", "test_resnet-32-int8.onnx",
                                                          "test_resnet-32-int4.onnx"}
