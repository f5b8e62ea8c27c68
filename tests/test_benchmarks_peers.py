"""`benchmarks/peers.py` without running a comparison: its arguments, the plan of rows (every hf-r2 row has its peer
rows at the same setting), the settings each toolkit gets, the honest reading, the line that skips a missing peer,
the palette check, and the subprocess helper it shares with `benchmarks/dkm_memory.py`. coremltools is imported
only to validate its configs, and that test skips without it; Brevitas is never imported."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def peers():
    return _load("peers")


def _args(peers, *extra: str):
    args = peers._parser().parse_args(["--model-dir", "m", "--adaround-iters", "7", "--adaround-lr", "0.01", *extra])
    args.runnable = list(args.only)
    return args


def test_defaults_and_choices(peers):
    args = peers._parser().parse_args([])
    assert args.only == list(peers.COMPARISONS)
    assert (args.threads, args.allocator, args.brevitas_grid) == (1, "default", "both")
    assert (args.eval_samples, args.calibration_samples, args.dkm_steps) == (10000, 512, 100)
    with pytest.raises(SystemExit):
        peers._parser().parse_args(["--only", "qat"])


def test_plan_pairs_every_hf_row_with_its_peer_at_the_same_setting(peers):
    args = _args(peers)
    rows = peers.plan(args)
    assert rows[0]["comparison"] == "float"
    counts = {c: sum(r["comparison"] == c for r in rows) for c in peers.COMPARISONS}
    # palettize: 3 bits x (per tensor, grouped) x 2 impls; dkm: 1 bits x 2; adaround: 2 bits x 2 roundings x 3
    assert counts == {"palettize": 12, "dkm": 2, "adaround": 12}
    fields = ("bits", "group_size", "rounding", "adaround_iters", "dkm_steps", "calibration_samples", "eval_samples")
    for comparison in peers.COMPARISONS:
        for label, _ in peers._pairs(comparison, args):
            same = [r for r in rows if r["comparison"] == comparison and r["setting"] == label]
            impls = [r["impl"] for r in same]
            assert impls.count("hf-r2") == 1 and len(impls) >= 2, (label, impls)
            assert len({tuple(r.get(f) for f in fields) for r in same}) == 1, label
    assert {r["peer_variant"] for r in rows if r["impl"] == "brevitas"} == {"narrow", "full"}


def test_only_and_brevitas_grid_shrink_the_plan(peers):
    rows = peers.plan(_args(peers, "--only", "adaround", "--brevitas-grid", "narrow", "--ptq-bits", "2"))
    assert [(r["impl"], r["peer_variant"], r["setting"]) for r in rows[1:]] == [
        ("hf-r2", None, "W2A8 nearest"),
        ("brevitas", "narrow", "W2A8 nearest"),
        ("hf-r2", None, "W2A8 AdaRound"),
        ("brevitas", "narrow", "W2A8 AdaRound"),
    ]


def test_palettize_settings_match(peers):
    from hf_r2.quant import PalettizeConfig

    for group_size in (None, 16):
        hf = [PalettizeConfig(**fields) for fields in peers.hf_palettize_configs(2, group_size, "stem", "head")]
        ct = peers.coreml_ptp_config(2, group_size, "stem", "head")
        assert (hf[0].bits, hf[0].group_size) == (8, None)
        assert (hf[1].bits, hf[1].group_size) == (ct["global_config"]["n_bits"], ct["global_config"].get("group_size"))
        assert ct["global_config"]["granularity"] == ("per_tensor" if group_size is None else "per_grouped_channel")
        ends = {"n_bits": 8, "granularity": "per_tensor"}
        assert ct["module_name_configs"] == {"stem": ends, "head": ends}
    dkm = PalettizeConfig(**peers.hf_dkm_config(1))
    ct = peers.coreml_dkm_config(1, "stem", "head")
    assert (dkm.bits, dkm.first_last_bits, dkm.group_size) == (1, 8, None)
    assert ct["global_config"]["n_bits"] == 1 and ct["module_name_configs"]["head"]["n_bits"] == 8
    assert ct["global_config"]["weight_threshold"] == 0 and ct["global_config"]["kmeans_init"] == "opt1d"


def test_ptq_settings_match(peers):
    from hf_r2.quant import PTQConfig

    for rounding in ("nearest", "adaround"):
        hf = PTQConfig(**peers.hf_ptq_config(2, rounding, 7, 3))
        for grid in peers.BREVITAS_GRIDS:
            bv = peers.brevitas_ptq_settings(2, rounding, 7, hf.adaround_config().lr, grid)
            assert (bv["w_bits"], bv["a_bits"], bv["first_last_bits"]) == (hf.w_bits, hf.a_bits, hf.first_last_bits)
            assert bv["narrow_range"] is peers.BREVITAS_GRIDS[grid]
            if rounding == "adaround":
                ada = hf.adaround_config()
                lr = bv["learned_round"]
                assert (lr["iters"], lr["lr"], lr["reg"]["weight"]) == (ada.iters, ada.lr, ada.reg_weight)
                assert lr["reg"]["b_range"] == (ada.beta_start, ada.beta_end) and lr["reg"]["warmup"] == ada.warmup
            else:
                assert "learned_round" not in bv
        assert (hf.per_channel, hf.weight_range, hf.bn, hf.calibration_batches) == (True, "mse", "reestimate", 3)
    with pytest.raises(ValueError, match="`grid`"):
        peers.brevitas_ptq_settings(2, "nearest", 7, 0.01, "mid-rise")


def test_coreml_configs_load():
    pytest.importorskip("coremltools")
    palettization = pytest.importorskip("coremltools.optimize.torch.palettization")
    peers = _load("peers")
    for group_size in (None, 16):
        config = palettization.PostTrainingPalettizerConfig.from_dict(peers.coreml_ptp_config(4, group_size, "a", "b"))
        assert config.global_config.n_bits == 4 and config.module_name_configs["a"].n_bits == 8
    config = palettization.DKMPalettizerConfig.from_dict(peers.coreml_dkm_config(2, "a", "b"))
    assert config.global_config.n_bits == 2 and config.global_config.weight_threshold == 0


def test_differences_are_listed_for_each_comparison(peers):
    args = _args(peers)
    for comparison in peers.COMPARISONS:
        lines = peers.differences(comparison, args)
        assert lines and all(isinstance(line, str) and line for line in lines)
    with pytest.raises(ValueError, match="`comparison`"):
        peers.differences("qat", args)


def test_verdict(peers):
    row = {"seconds": 2.0, "growth_mib": 100.0}
    same = "1100" * 50
    assert peers.verdict({**row, "correct": same}, {**row, "correct": same}, "peer").startswith(
        "hf-r2 matches peer (+0.00 pp"
    )
    better = "1" * 150 + "0" * 50
    worse = "1" * 100 + "0" * 100
    text = peers.verdict({**row, "correct": better}, {**row, "correct": worse, "seconds": 4.0}, "peer")
    assert text.startswith("hf-r2 beats peer by 25.00 pp") and "0.50x its time" in text
    assert peers.verdict({**row, "correct": worse}, {**row, "correct": better}, "peer").startswith("hf-r2 trails")
    with pytest.raises(ValueError, match="different images"):
        peers.verdict({**row, "correct": "1"}, {**row, "correct": "10"}, "peer")


def test_missing_peer_is_skipped_with_a_clear_line(peers, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(peers, "peer_available", lambda peer: peer != "brevitas")
    argv = ["--dry-run", "--model-dir", str(tmp_path), "--dataset", "cifar10", "--adaround-iters", "5",
            "--adaround-lr", "0.01"]
    assert peers.main(argv) == 0
    out = capsys.readouterr().out
    assert "SKIPPED adaround: brevitas is not installed" in out and 'pip install -e ".[bench]"' in out
    assert "| adaround |" not in out and "| palettize | coremltools" in out


def test_unclustered_flags_layers_off_their_palette(peers):
    from hf_r2.quant import palettize_

    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.Flatten(), nn.LazyLinear(4))
    model(torch.randn(1, 3, 8, 8))
    spec = {"bits": 1, "group_size": 8}
    assert peers._unclustered(model, spec) == ["0", "2", "4"]
    for fields in peers.hf_palettize_configs(1, 8, "0", "4"):
        palettize_(model, **fields)
    assert peers._unclustered(model, spec) == []


def test_worker_helper(tmp_path):
    helper = _load("_peak_memory")
    code = "import json, os; print('noise'); print(json.dumps({'t': os.environ['OMP_NUM_THREADS']}))"
    ok = [sys.executable, "-c", code]
    assert helper.run_json_worker(ok, threads=3, allocator="exact") == {"t": "3"}
    with pytest.raises(helper.WorkerError, match="exited with 2: boom"):
        helper.run_json_worker([sys.executable, "-c", "import sys; sys.stderr.write('boom'); sys.exit(2)"],
                               threads=1, allocator="default")
    with pytest.raises(ValueError, match="`allocator`"):
        helper.worker_env(1, "jemalloc")
    before = helper.reset_peak()
    assert helper.peak_kib() >= before > 0
