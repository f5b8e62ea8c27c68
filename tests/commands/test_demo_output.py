"""`hf-r2 demo` run twice on a tiny config, each in its own process and folder (nothing reused from a cache): the
measured numbers are the same, byte for byte, and the output through a pipe is plain lines a person can read."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DATA_DIR

TINY = ["--model", "test_resnet", "--dataset", "cifar10-tiny", "--epochs", "1", "--max-train-samples", "64",
        "--max-eval-samples", "32", "--batch-size", "16", "--bn-samples", "32", "--r2-weight", "0.5"]
#: The demo's output on the tiny config is about 70 lines (the trainings' and rows' progress, the table, the gains,
#: the time and the paths); the Trainer's raw dicts and redrawn bars made it hundreds.
MAX_LINES = 100
#: What legitimately differs between two runs of the same config: times, the date, the machine's load.
TIMING_KEYS = {"seconds", "train_seconds", "timing", "finished"}


def _demo(out: Path, *flags: str) -> str:
    """The demo's whole output (stdout and stderr) through a pipe, as a log file gets it; with an empty `datasets`
    cache, as on a first run (its "Generating train split" bars included, if any were drawn)."""
    env = {**os.environ, "HF_R2_DATA_DIR": str(DATA_DIR), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(out.parent / f"{out.name}-datasets-cache")}
    proc = subprocess.run([sys.executable, "-m", "hf_r2", "demo", "--output-dir", str(out), *TINY, *flags],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, check=False)
    text = proc.stdout.decode("utf-8", errors="replace")
    assert proc.returncode == 0, text[-3000:]
    return text


@pytest.fixture(scope="module")
def two_demos(tmp_path_factory):
    if not (DATA_DIR / "cifar10-tiny").is_dir():
        pytest.skip(f"local CIFAR-10 copy not found under {DATA_DIR} (set HF_R2_DATA_DIR)")
    root = tmp_path_factory.mktemp("demo")
    # the default (progress on: bars in a terminal, plain lines in a pipe), then --no-progress
    return [(root / "a", _demo(root / "a")), (root / "b", _demo(root / "b", "--no-progress"))]


def _without_timing(value, out: Path):
    """`value` with the timing keys left out and the output folder written `<out>`."""
    if isinstance(value, dict):
        return {k: _without_timing(v, out) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [_without_timing(v, out) for v in value]
    if isinstance(value, str):
        return value.replace(str(out), "<out>")
    return value


def _measured(out: Path) -> bytes:
    results = json.loads((out / "results.json").read_text())
    return json.dumps(_without_timing(results, out), indent=1).encode()


def test_demo_gives_the_same_numbers_twice(two_demos):
    """Same seed, same thread count, two processes, two folders: results.json is the same but for the times, the
    date and the folder; the table printed is the same, line for line."""
    (a, text_a), (b, text_b) = two_demos
    assert _measured(a) == _measured(b)
    results = json.loads((a / "results.json").read_text())
    assert results["timing"]["trained_now"] == 2 and results["timing"]["rows_cached"] == 0  # nothing reused
    # the differences left out are only those: the rest of each file is what was compared
    raw_a, raw_b = (json.loads((o / "results.json").read_text()) for o in (a, b))
    assert set(raw_a) == set(raw_b) and set(raw_a["timing"]) == set(raw_b["timing"])

    def table(text: str) -> list[str]:
        return [line for line in text.splitlines() if line.startswith("|") or line.startswith("- ONNX")]

    assert table(text_a) and table(text_a) == [line.replace(str(b), str(a)) for line in table(text_b)]
    md = [(o / "results.md").read_text().split("## Time")[0].replace(str(o), "<out>") for o in (a, b)]
    assert md[0] == md[1]


@pytest.mark.parametrize("which", [0, 1], ids=["default", "no-progress"])
def test_demo_output_through_a_pipe_is_plain_lines(two_demos, which):
    """In a pipe (a log file) the demo draws no bar: no carriage return, no escape code, no raw dict of the
    Trainer's logs, a bounded number of lines; it says which training runs, how far it is, and each row's top-1."""
    out, text = two_demos[which]
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert len(lines) < MAX_LINES, text
    assert not any(line.lstrip().startswith("{") for line in lines), text  # no {'loss': '1.982', ...}
    assert not re.search(r" - INFO - ", text), text  # the steps' INFO lines: the demo reports them itself
    assert "Training 1 of 2: test_resnet baseline, seed 0" in text and "Training 2 of 2: test_resnet linf" in text
    assert re.search(r"^  step \d+/\d+ \(\d+%", text, re.M)  # progress as an occasional plain line
    assert re.search(r"^  trained \d+ steps in \d+ s: loss ", text, re.M)
    results = json.loads((out / "results.json").read_text())
    fp = results["runs"][0]["rows"]["FP"]["accuracy"]
    assert f"  FP: top-1 {100 * fp:.2f} (" in text
    assert "| W2A8 per-channel mse |" in text  # the table, as before


def test_demo_threads_default_to_the_readmes_and_are_put_back():
    """The demo runs with 2 threads unless told otherwise (the README's table was measured so), and leaves torch's
    thread count as it found it."""
    import torch

    from hf_r2.cli import main
    from hf_r2.commands.reproduce import DEMO_THREADS, _torch_threads, demo_command_parser

    assert DEMO_THREADS == 2 and demo_command_parser().parse_args([]).threads == 2
    before = torch.get_num_threads()
    with _torch_threads(1):
        assert torch.get_num_threads() == 1
    with _torch_threads(0):
        assert torch.get_num_threads() == before
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="`threads` must be >= 0"):
        with _torch_threads(-1):
            pass
    assert main(["demo", "--threads", "-1", "--no-progress"]) == 1  # one line, before any data is read
