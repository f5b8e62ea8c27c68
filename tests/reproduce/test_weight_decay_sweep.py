"""`hf-r2 reproduce` with a tuned baseline: the baseline's weight-decay sweep (`weight_decay_sweep`), chosen on the
validation split by the lambda sweeps' own rule, and the variants that train at its choice (`weight_decay: chosen`:
the tuned baseline, R2 and its lambda sweep); several processes of one config share its trainings."""

import json
import os
import re
import subprocess
import sys

import pytest

from hf_r2.reproduce import ReproduceConfig, run_reproduce
from hf_r2.reproduce.plan import plan, train_spec
from hf_r2.reproduce.sweep import choose_weight_decay

W2 = "W2A8 per-tensor maxabs"
K1 = "W1 k-means"
WD = 1e-4
VARIANTS = [
    {"name": "baseline", "loss": "baseline"},
    {"name": "baseline_tuned", "loss": "baseline", "weight_decay": "chosen"},
    {"name": "linf_tuned", "loss": "linf", "weight": "chosen", "weight_decay": "chosen", "per_channel": True,
     "compare_to": "baseline_tuned"},
]


def _config(out, data_dir, **changes) -> ReproduceConfig:
    values = dict(
        output_dir=str(out), dataset="cifar10-tiny", data_dir=str(data_dir), input_size=32, max_train_samples=64,
        max_eval_samples=32, validation_size=100, models=["test_resnet"], variants=VARIANTS, epochs=1,
        batch_size=32, optimizer="sgd", lr=0.05, recipes={"test_resnet": {"weight_decay": WD}}, seeds=[0, 1],
        weight_decay_sweep={"factors": [1, 3, 10], "settings": [W2, K1]},
        # tiny lambdas: each R2 run stays within a point of its reference, so the rule has lambdas to choose from
        lambda_sweep={"variant": "linf_tuned", "lambdas": [1e-6, 2e-6, 4e-6], "settings": [W2]},
        low_bit=[{"method": "ptq", "w_bits": 2, "a_bits": 8, "per_channel": False, "weight_range": "maxabs"},
                 {"method": "kmeans", "w_bits": 1}],
        calibration_samples=32,
    )
    return ReproduceConfig(**{**values, **changes})


def test_choose_weight_decay_rule():
    """Written out: among the factors whose validation FP is at least the default's minus one point (the default
    included), the highest mean validation low-bit top-1; a NaN never wins."""
    rows = [
        {"factor": 1.0, "weight_decay": 1e-4, "val_accuracy": {"FP": 0.80, "W2": 0.40, "K1": 0.30}},
        {"factor": 3.0, "weight_decay": 3e-4, "val_accuracy": {"FP": 0.792, "W2": 0.50, "K1": 0.40}},
        {"factor": 10.0, "weight_decay": 1e-3, "val_accuracy": {"FP": 0.785, "W2": 0.90, "K1": 0.90}},  # FP -1.5
        {"factor": 30.0, "weight_decay": 3e-3, "val_accuracy": {"FP": float("nan"), "W2": 0.95, "K1": 0.95}},
    ]
    assert choose_weight_decay(rows, ["W2", "K1"]) == {"factor": 3.0, "weight_decay": 3e-4,
                                                       "score": pytest.approx(0.45)}
    # the default wins when no other factor is better at low bit
    rows[1]["val_accuracy"].update(W2=0.30, K1=0.30)
    assert choose_weight_decay(rows, ["W2", "K1"])["factor"] == 1.0
    assert choose_weight_decay([{"factor": 1.0, "weight_decay": 1e-4, "accuracy": {}}], ["W2"]) is None


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"weight_decay_sweep": {"factors": [3, 10, 30]}}, "with 1 among them"),
        ({"weight_decay_sweep": {"factors": [1, 3]}}, "at least 3 positive multiples"),
        ({"weight_decay_sweep": {"factors": [1, 3, 10], "lambdas": [1]}}, r"unknown key\(s\) \['lambdas'\]"),
        ({"weight_decay_sweep": None}, "needs a `validation_size` and a `weight_decay_sweep`"),
        ({"validation_size": None}, "needs a `validation_size`"),
        ({"recipes": {"test_resnet": {"weight_decay": 0}}}, "which is 0 for"),
        ({"variants": [{"loss": "baseline", "weight_decay": -1}]}, "`weight_decay` must be a number >= 0"),
    ],
)
def test_config_errors(changes, message, tmp_path, data_dir):
    with pytest.raises(ValueError, match=message):
        _config(tmp_path, data_dir, **changes)


def test_plan_trains_the_sweep_first_and_the_default_once(tmp_path, data_dir):
    config = _config(tmp_path / "out", data_dir)
    runs = plan(config)
    # before any choice: the default baseline (also the sweep's factor 1) and the sweep's other factors only
    assert sorted(r.variant.get("weight_decay") or WD for r in runs if r.seed == 0) == pytest.approx([WD, 3 * WD,
                                                                                                     10 * WD])
    assert [r.seed for r in runs] == [0, 1, 0, 0]
    base = next(r for r in runs if r.seed == 0 and "headline" in r.roles)
    assert base.roles == ["headline", "wd_sweep:1"] and base.run_dir.endswith(os.path.join("baseline", "seed0"))
    specs = {r.run_dir: train_spec(r, config)["weight_decay"] for r in runs}
    assert sorted(specs.values()) == pytest.approx([WD, WD, 3 * WD, 10 * WD])
    # the sweep chose the default: the tuned baseline is the default baseline's training, not a second one
    chosen = plan(config, {"linf_tuned": {"test_resnet": 2e-6}}, {"test_resnet": WD})
    assert len({r.run_dir for r in chosen}) == len(chosen) == 4 + 3 + 1  # + 3 lambdas (seed 0 is one) + seed 1
    # the sweep chose 10x: R2 and its lambda sweep train at it
    tuned = plan(config, {"linf_tuned": {"test_resnet": 2e-6}}, {"test_resnet": 10 * WD})
    r2 = [r for r in tuned if r.variant["loss"] == "linf"]
    assert [train_spec(r, config)["weight_decay"] for r in r2] == pytest.approx([10 * WD] * 4)
    assert len(r2) == 4


def test_the_baseline_is_tuned_before_r2_and_r2_trains_at_its_choice(tmp_path, data_dir):
    config = _config(tmp_path / "out", data_dir)
    results = run_reproduce(config, progress=False, print_fn=None)
    table = results["weight_decay_sweep"]["models"]["test_resnet"]
    assert [row["factor"] for row in table["rows"]] == [1.0, 3.0, 10.0]
    # the choice follows the rule, recomputed here from the rows' validation numbers
    floor = table["rows"][0]["val_accuracy"]["FP"] - 0.01
    kept = [row for row in table["rows"] if row["val_accuracy"]["FP"] >= floor]
    best = max(kept, key=lambda row: (row["val_accuracy"][W2] + row["val_accuracy"][K1]) / 2)
    assert table["chosen"]["factor"] == best["factor"]
    wd = best["weight_decay"]
    assert results["chosen_weight_decays"] == {"test_resnet": pytest.approx(wd)}
    for run in results["runs"]:  # every run of the tuned variants trained at the chosen weight decay
        spec = json.load(open(os.path.join(run["run_dir"], "reproduce_run.json")))["spec"]
        if {"baseline_tuned", "linf_tuned"} & set(run["variant_names"]) or any(
                role.startswith("sweep:") for role in run["roles"]):
            assert spec["weight_decay"] == pytest.approx(wd), run["run_dir"]
    summary = results["summary"]["test_resnet"]["FP"]
    assert summary["baseline_tuned"]["seeds"] == summary["linf_tuned"]["seeds"] == [0, 1]
    # the lambda sweep's reference is the tuned baseline
    sweep = results["lambda_sweep"][0]
    assert sweep["reference"] == "baseline_tuned" and sweep["models"]["test_resnet"]["rows"][0]["lambda"] == 0
    report = open(os.path.join(config.output_dir, "results.md")).read()
    assert "## Weight-decay sweep: baseline on test_resnet (seed 0)" in report
    assert "Chosen on the validation split" in report and f"{wd:g} (x{best['factor']:g})." in report
    assert f"baseline_tuned (wd {wd:g} chosen, no R2)" in report
    again = run_reproduce(config, progress=False, print_fn=None)
    assert again["timing"]["trained_now"] == 0 and again["timing"]["rows_computed"] == 0


def test_two_processes_share_the_trainings(tmp_path, data_dir):
    """Two `hf-r2 reproduce` processes of one config at once: each run is trained once, by one of them (its lock),
    and both end with the same results."""
    config = _config(tmp_path / "out", data_dir, variants=VARIANTS[:2], lambda_sweep=None, seeds=[0])
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "hf_r2", "reproduce", str(path), "--no-progress"]
    procs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    runs = plan(config)
    infos = [json.load(open(os.path.join(r.run_dir, "reproduce_run.json"))) for r in runs]
    assert len(infos) == 3 and all(info["spec"] == train_spec(r, config) for r, info in zip(runs, infos))
    # each run was trained once, by one process: the two reports' counts of trainings run add up to the plan's
    trained = [int(re.search(r"\((\d+) trainings run", text).group(1)) for text in outputs]
    assert sum(trained) == 3, outputs
    again = run_reproduce(config, progress=False, print_fn=None)
    assert again["timing"]["trained_now"] == 0 and again["timing"]["rows_computed"] == 0


def test_status_reads_the_cache_without_training(tmp_path, data_dir, capsys):
    """`hf-r2 reproduce CONFIG --status`: missing before, done after (with the rows measured and the choices the run
    made), interrupted with the epoch of its last checkpoint, running while another process holds its lock; it
    trains and measures nothing."""
    import fcntl

    from hf_r2.cli import main
    from hf_r2.reproduce.status import run_states

    config = _config(tmp_path / "out", data_dir, seeds=[0])
    states = run_states(config)
    assert {r["state"] for r in states["runs"]} == {"missing"} and len(states["runs"]) == 3
    assert states["chosen_weight_decays"] == {"test_resnet": None}
    assert states["waiting"] == ["baseline_tuned on test_resnet", "linf_tuned on test_resnet"]
    assert not os.path.exists(os.path.join(config.output_dir, "runs"))  # nothing trained or written

    results = run_reproduce(config, progress=False, print_fn=None)
    states = run_states(config)
    assert len(states["runs"]) == len(results["runs"]) and {r["state"] for r in states["runs"]} == {"done"}
    assert all(r["rows"] == r["rows_total"] for r in states["runs"])
    assert states["chosen_weight_decays"] == results["chosen_weight_decays"]
    assert states["chosen_lambdas"] == results["chosen_lambdas"] and not states["waiting"]

    run = next(r for r in states["runs"] if r["roles"] == ["wd_sweep:3"])
    os.remove(os.path.join(run["run_dir"], "reproduce_run.json"))  # as if cut after its first epoch
    os.makedirs(os.path.join(run["run_dir"], "checkpoint-2"))
    with open(os.path.join(run["run_dir"], "checkpoint-2", "trainer_state.json"), "w") as f:
        json.dump({"epoch": 1.0}, f)
    state = next(r for r in run_states(config)["runs"] if r["run_dir"] == run["run_dir"])
    assert (state["state"], state["epoch"]) == ("interrupted", 1.0)
    with open(run["run_dir"] + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process training it
        config_path = tmp_path / "config.json"
        config_path.write_text(json.dumps(config.to_dict()))
        assert main(["reproduce", str(config_path), "--status"]) == 0
    out = capsys.readouterr().out
    assert "baseline wd=0.0003" in out and "running (epoch 1 of 1 done)" in out
    assert "5 done, 1 running, 0 interrupted, 0 missing of 6 trainings" in out
