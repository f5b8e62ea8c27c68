"""The Makefile's long targets never hold the terminal: they start their workers detached and return, refuse to
start a second set while the first runs, and `make evidence-status` reports from the cache."""

import json
import os
import shutil
import subprocess
import time

import pytest
from conftest import REPO_ROOT

pytestmark = pytest.mark.skipif(shutil.which("make") is None or not (REPO_ROOT / ".venv" / "bin" / "hf-r2").exists(),
                                reason="needs make and the Makefile's .venv")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _make(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300)


def test_make_reproduce_starts_detached_workers_and_returns(tmp_path, data_dir):
    out = tmp_path / "out"
    config = {"output_dir": "unused", "dataset": "cifar10-tiny", "data_dir": str(data_dir), "max_train_samples": 64,
              "max_eval_samples": 32, "models": ["test_resnet"], "variants": ["baseline", "linf"], "epochs": 1,
              "max_steps": 2, "batch_size": 32, "seeds": [0, 1], "lambda_sweep": None,
              "low_bit": [{"method": "kmeans", "w_bits": 1}], "calibration_samples": 32}
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(config))
    done = _make("reproduce", f"REPRODUCE_CONFIG={path}", f"REPRODUCE_OUT={out}")
    assert done.returncode == 0, done.stderr
    pids = [int((out / f"worker-{i}.pid").read_text()) for i in (1, 2)]
    # returned while its workers still run (importing torch alone outlasts make's return), and says where they log
    assert any(_alive(pid) for pid in pids)
    assert f"follow: tail -f {out}/worker-1.log" in done.stdout
    again = _make("reproduce", f"REPRODUCE_CONFIG={path}", f"REPRODUCE_OUT={out}")
    assert again.returncode != 0 and "still runs" in again.stdout
    deadline = time.monotonic() + 600
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(1)
    assert not any(_alive(pid) for pid in pids), "the workers did not finish"
    logs = [(out / f"worker-{i}.log").read_text() for i in (1, 2)]
    # both finished the config; its four trainings were shared, each trained once
    trained = [int(log.split(" trainings run")[0].rsplit("(", 1)[1]) for log in logs]
    assert sum(trained) == 4, logs
    assert (out / "results.md").is_file()


def test_make_evidence_status_reads_the_cache(tmp_path):
    done = _make("evidence-status", f"HEADLINE_OUT={tmp_path / 'headline'}", f"EVIDENCE_OUT={tmp_path / 'e'}",
                 f"REPRODUCE_OUT={tmp_path / 'r'}")
    assert done.returncode == 0, done.stderr
    assert "mobilenetv2_100    baseline wd=0.00012" in done.stdout
    assert "0 done, 0 running, 0 interrupted, 8 missing of 8 trainings" in done.stdout
    assert not (tmp_path / "headline" / "runs").exists()
