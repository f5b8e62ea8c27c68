"""`benchmarks/block_reconstruction.py` on a tiny saved model: every row (float, then setting x method per model)
lands in results.json and a results.md table, a second run measures nothing, and a changed iteration count
measures again only the rows that learn."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("_bench_brecq", BENCHMARKS / "block_reconstruction.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _argv(model_dir, out, *extra):
    return ["--models", f"a={model_dir}", f"b={model_dir}-copy", "--dataset", "cifar10-tiny", "--settings", "W2A8",
            "--eval-samples", "16", "--calibration-samples", "16", "--batch-size", "8", "--iters", "2",
            "--threads", "1", "--output-dir", str(out), *extra]


def test_rows_tabled_and_resumed(bench, model_dir, tmp_path, capsys):
    out = tmp_path / "results"
    shutil.copytree(model_dir, f"{model_dir}-copy")
    assert bench.main(_argv(model_dir, out)) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["model"], r["setting"], r["method"]) for r in rows[:4]] == [
        ("a", "FP", "float"), ("b", "FP", "float"), ("a", "W2A8", "nearest"), ("b", "W2A8", "nearest")]
    assert len(rows) == 2 * 5 and all(0 <= r["top1"] <= 100 and r["seconds"] >= 0 for r in rows)
    assert {r["iters"] for r in rows if r["method"] in ("adaround", "brecq", "qdrop")} == {2}
    table = (out / "results.md").read_text()
    assert "| setting | method | a | b |" in table
    assert "Calibration: 16 training images" in table and "AdaRound 2 Adam steps per layer" in table
    assert table.count("| W2A8 |") == 4 and "–" not in table
    printed = capsys.readouterr().out
    assert printed.count("top-1") == 10 and "0 of 10 rows already" in printed

    before = (out / "results.json").read_text()
    assert bench.main(_argv(model_dir, out)) == 0
    assert "10 of 10 rows already" in capsys.readouterr().out
    assert (out / "results.json").read_text() == before  # nothing measured again

    assert bench.main(_argv(model_dir, out, "--methods", "nearest", "qdrop", "--iters", "3")) == 0
    printed = capsys.readouterr().out
    assert "4 of 6 rows already" in printed and printed.count("qdrop (3 iters)") == 2
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert len(rows) == 12  # the 2-iteration rows are kept beside the new ones


def test_missing_cells_and_bad_models(bench, tmp_path, capsys):
    row = {"model": "a", "model_dir": "/m", "setting": "W2A4", "method": "brecq", "iters": 5,
           "calibration_samples": 8, "eval_samples": 8, "batch_size": 8, "dataset": "d", "seed": 0}
    meta = {"model_dirs": {"a": "m"}, "iters": 5, "adaround_iters": 5, "calibration_samples": 8, "eval_samples": 8,
            "batch_size": 8, "dataset": "d", "seed": 0, "threads": 1, "cpus": 2, "command": "x"}
    assert "| W2A4 | brecq | – |" in bench.results_table([row], {}, meta)
    done = {bench.row_key(row): {**row, "top1": 12.345, "seconds": 7.2}}
    assert "| W2A4 | brecq | 12.35 (7 s) |" in bench.results_table([row], done, meta)
    for models, message in ((["nofolder"], "--models takes NAME=DIR"), ([f"a={tmp_path}"], "has no config.json"),
                            ([f"a={tmp_path}", f"b={tmp_path}/"], "a model folder is given twice")):
        with pytest.raises(SystemExit):
            bench.main(["--models", *models, "--output-dir", str(tmp_path)])
        assert message in capsys.readouterr().err
