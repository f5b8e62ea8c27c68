"""`benchmarks/gpu_check.sh`, the prepared GPU check, run with DEVICE=cpu on a tiny model: it runs the device tests
and the overhead benchmark, writes its log, and fails when a step fails."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path, **env):
    env = {**os.environ, "DEVICE": "cpu", "MODELS": "test_resnet", "REPEATS": "2", "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", "benchmarks/gpu_check.sh", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_gpu_check_runs_the_device_tests_and_the_benchmark(tmp_path):
    proc = _run(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (tmp_path / "gpu_check.txt").read_text()
    assert "device=cpu" in log and "tests: rc=0" in log and "benchmark: rc=0" in log
    assert re.search(r"^\d+ passed in", log, re.M) and not re.search(r"^\d+ failed", log, re.M)
    assert sum(line.split()[:1] == ["linf"] for line in log.splitlines()) == 2  # per tensor and per channel
    # a failing step fails the script
    assert _run(tmp_path / "bad", MODELS="no_such_model").returncode != 0
