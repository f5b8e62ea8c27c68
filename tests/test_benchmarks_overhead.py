"""`benchmarks/r2_overhead.py` on a tiny model: every loss and mode gets a ratio and a verdict, Soft-Min-Max its
floor line and profile table, and the floor's count of weights within reach is the one written out here."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from conftest import make_timm

from hf_r2 import R2Config, R2Regularizer

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def overhead():
    spec = importlib.util.spec_from_file_location("_bench_r2_overhead", BENCHMARKS / "r2_overhead.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_row_has_a_ratio_and_a_verdict(overhead, capsys):
    overhead.main(["--models", "test_resnet", "--no-naive", "--repeats", "3", "--step", "16x16x2"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.split()[:1] in (["linf"], ["margin"], ["soft_min_max"],
                                                                      ["kurtosis"])]
    assert len(rows) == 2 * (1 + 2 + 2 + 1)  # per tensor and per channel; two states for margin and soft_min_max
    assert all(line.split()[7] in ("met", "MISSED") for line in rows)
    assert out.count("floor ") == 2 and out.count("where the time goes") == 2  # soft_min_max, trained
    assert out.count("step 16x16 batch 2") == 8 and "target 1.02" in out


def test_floor_counts_the_weights_within_reach(overhead):
    torch.manual_seed(0)
    model = make_timm("test_resnet")
    reg = R2Regularizer(model, R2Config(loss="soft_min_max"))
    _, frac = overhead._smm_floor(reg, repeats=1)
    near = total = 0
    for w, log_a in zip(reg.weights(), reg.log_alpha.detach()):
        flat = w.detach().flatten()
        reach = (math.log(flat.numel()) + 24.0) / log_a.exp().item()
        near += sum(1 for v in flat.tolist() if v >= flat.max().item() - reach or v <= flat.min().item() + reach)
        total += flat.numel()
    assert frac == pytest.approx(near / total)
    assert 0 < frac < 1
