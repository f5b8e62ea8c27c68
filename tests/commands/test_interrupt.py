"""`hf-r2 train` interrupted at any moment (the real entry point, in a subprocess): SIGINT and SIGKILL at seeded random
moments, some of them while a checkpoint is being written; each time the run is resumed with the default flags
(`--resume_from_checkpoint latest`, the command Ctrl-C prints), and the final weights equal those of an
uninterrupted run, bit for bit, with augmentation on. SIGTERM (a cluster scheduler's stop) is handled as Ctrl-C in
`hf-r2 train`, the accelerate loop (`examples/train_accelerate.py`), `hf-r2 reproduce` and `hf-r2 demo`: one line,
the last complete checkpoint kept, status 143."""

import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

CLI = [sys.executable, "-m", "hf_r2", "train"]


def _argv(data_dir, out):
    # 16 images, 4 a step: 4 steps an epoch, 6 in all (the resume crosses an epoch); the default augmentation
    return ["--model", "test_resnet", "--dataset", "cifar10-tiny", "--data_dir", str(data_dir), "--input_size", "32",
            "--max_train_samples", "16", "--max_eval_samples", "8", "--per_device_train_batch_size", "4",
            "--max_steps", "6", "--save_steps", "1", "--learning_rate", "0.05", "--disable_tqdm", "true",
            "--report_to", "none", "--output_dir", str(out)]


def _env():
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


def _staged(out):
    try:
        return {n for n in os.listdir(out) if n.startswith(".tmp-checkpoint-")}
    except FileNotFoundError:
        return set()


def _interrupt(cmd, out, sig, when, arg):
    """Start `cmd`, send `sig` at the moment `when` says, return `(returncode, stderr, what happened)`.

    `when="time"`: `arg` seconds after the start. `when="save"`: while the `arg`-th checkpoint of this run is being
    written (its staging folder exists). `when="training"`: `arg` seconds after the run's first new checkpoint."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    start, before, saves, sent = time.monotonic(), _staged(out), 0, "finished first"
    first_checkpoint = None
    try:
        while proc.poll() is None and time.monotonic() - start < 60:
            now = time.monotonic()
            if when == "time" and now - start >= arg:
                fire = True
            elif when == "save":
                new = _staged(out) - before
                if new:
                    saves += 1
                    before |= new
                fire = saves >= arg
            else:
                if first_checkpoint is None and _staged(out) - before:
                    first_checkpoint = now
                fire = first_checkpoint is not None and now - first_checkpoint >= arg
            if fire:
                sent = f"{sig.name} ({when} {arg:g}) with {sorted(_staged(out))} staged"
                proc.send_signal(sig)
                break
            time.sleep(0.0005)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err, sent


def test_interrupt_at_any_moment_then_resume_equals_uninterrupted(data_dir, tmp_path):
    straight = tmp_path / "straight"
    done = subprocess.run(CLI + _argv(data_dir, straight), env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]

    out = tmp_path / "interrupted"
    rng = random.Random(13)  # the moments are drawn, but the same at every run of the test
    events = [(signal.SIGKILL, "time", round(rng.uniform(0.5, 4.0), 2)),
              (signal.SIGINT, "save", rng.randint(1, 3)),
              (signal.SIGKILL, "save", rng.randint(1, 3)),
              (signal.SIGINT, "training", round(rng.uniform(0.0, 0.5), 2)),
              (signal.SIGKILL, "save", rng.randint(1, 2))]
    cmd, history = CLI + _argv(data_dir, out), []
    for sig, when, arg in events:
        code, err, sent = _interrupt(cmd, out, sig, when, arg)
        history.append(sent)
        if "finished" in sent or code == 0:
            # no signal sent, or one that landed as the run was exiting (after its last save: on a loaded machine
            # the poll sees the last staging folder late): the run completed
            assert code == 0 and (out / "model.safetensors").is_file(), err[-3000:]
        elif sig == signal.SIGINT:
            # Ctrl-C: one line, naming the last complete checkpoint and the command that resumes; status 130
            assert code == 130, err[-3000:]
            line = err.strip().splitlines()[-1]
            assert line.startswith("hf-r2 train: interrupted; the last complete checkpoint is "), err[-3000:]
            assert "Traceback" not in err
            checkpoint = line.split("the last complete checkpoint is ", 1)[1].split(";", 1)[0]
            assert os.path.isfile(os.path.join(checkpoint, "trainer_state.json")), line
            resume = shlex.split(line.split("resume with: ", 1)[1])
            assert resume[:2] == ["hf-r2", "train"] and resume[-2:] == ["--resume_from_checkpoint", "latest"]
            cmd = CLI + resume[2:]
            continue
        else:
            assert code == -signal.SIGKILL
        cmd = CLI + _argv(data_dir, out) + ["--resume_from_checkpoint", "latest"]
    assert any("staged" in h and "'.tmp-checkpoint-" in h for h in history), history  # a kill hit a save
    final = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
    assert final.returncode == 0, final.stderr[-3000:]

    a, b = load_file(straight / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] == b[name]).all(), (name, history)


# ----------------------------------------------------------------------------------------------------------------
# SIGTERM (what a cluster scheduler sends) is handled as Ctrl-C: one line, the last complete checkpoint kept, 143
# ----------------------------------------------------------------------------------------------------------------


def _terminate_after_first_checkpoint(cmd, checkpoints, first, timeout=120):
    """Start `cmd`, wait (bounded) until the complete checkpoint `checkpoints/first` exists, send SIGTERM; returns
    `(returncode, stderr)`."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + timeout
        while not (checkpoints / first).is_dir():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, f"no {first} after {timeout} s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err


def _slow_steps(*argv):
    # many steps, each checkpointed: the run is still training when its first checkpoint appears
    return [*argv, "--max_steps", "400"]


def test_sigterm_stops_hf_r2_train_like_ctrl_c_and_it_resumes(data_dir, tmp_path):
    out = tmp_path / "run"
    code, err = _terminate_after_first_checkpoint(CLI + _slow_steps(*_argv(data_dir, out)), out, "checkpoint-1")
    assert code == 143, err[-3000:]
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]  # Ctrl-C's line, naming the signal
    assert line.startswith("hf-r2 train: terminated (SIGTERM); the last complete checkpoint is "), err[-3000:]
    checkpoint = line.split("the last complete checkpoint is ", 1)[1].split(";", 1)[0]
    from hf_r2.checkpoints import is_complete_trainer_checkpoint

    assert is_complete_trainer_checkpoint(checkpoint), os.listdir(checkpoint)
    resume = shlex.split(line.split("resume with: ", 1)[1])
    assert resume[:2] == ["hf-r2", "train"] and resume[-2:] == ["--resume_from_checkpoint", "latest"]
    step = int(checkpoint.rsplit("-", 1)[1])
    done = subprocess.run(CLI + resume[2:] + ["--max_steps", str(step + 1)], env=_env(), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == step + 1 and (out / "model.safetensors").is_file()


def test_sigterm_stops_the_accelerate_loop_like_ctrl_c_and_it_resumes(data_dir, tmp_path):
    example = [sys.executable, str(Path(__file__).resolve().parents[2] / "examples" / "train_accelerate.py")]
    argv = ["--model", "test_resnet", "--dataset", "cifar10-tiny", "--data_dir", str(data_dir), "--input_size", "32",
            "--max_train_samples", "16", "--max_eval_samples", "8", "--per_device_batch_size", "4",
            "--checkpointing_steps", "1", "--use_cpu", "--output_dir", str(tmp_path)]
    checkpoints = tmp_path / "checkpoints"
    code, err = _terminate_after_first_checkpoint(example + _slow_steps(*argv), checkpoints, "step_1")
    assert code == 143, err[-3000:]
    assert "Traceback" not in err
    said = [line for line in err.splitlines() if "train_with_accelerate: " in line]  # among the progress bar's
    assert len(said) == 1, err[-3000:]
    line = said[0][said[0].index("train_with_accelerate: "):]
    assert line.startswith("train_with_accelerate: terminated (SIGTERM); the last complete checkpoint is "), line
    assert "resume_from_checkpoint" in line
    checkpoint = line.split("the last complete checkpoint is ", 1)[1].split(";", 1)[0]
    from hf_r2.checkpoints import is_complete_loop_checkpoint

    assert is_complete_loop_checkpoint(checkpoint), os.listdir(checkpoint)
    step = int(checkpoint.rsplit("_", 1)[1])
    done = subprocess.run(example + argv + ["--max_steps", str(step + 1), "--resume_from_checkpoint", "latest"],
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics, _ = json.JSONDecoder().raw_decode(done.stdout[done.stdout.index("{"):])  # then "Saved the model to ..."
    assert metrics["global_step"] == step + 1


@pytest.mark.parametrize("command", ["reproduce", "demo"])
def test_sigterm_stops_reproduce_and_demo_like_ctrl_c(command):
    """The command line's handler (every command): SIGTERM mid-command is the Ctrl-C line, with status 143, and the
    default handler is back once the command returned."""
    argv = [command, "tiny"] if command == "reproduce" else [command]
    body = (f"import os, signal, sys, time\nimport hf_r2.commands.reproduce as commands\nfrom hf_r2.cli import main\n"
            f"def command(args):\n    os.kill(os.getpid(), signal.SIGTERM)\n    time.sleep(30)\n"
            f"commands.{command}_command = command\ncode = main({argv!r})\n"
            f"assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL\nsys.exit(code)\n")
    done = subprocess.run([sys.executable, "-c", body], env=_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 143, done.stderr[-3000:]
    kept = "(finished rows and trainings are kept; run it again to continue)"
    assert done.stderr.strip() == f"hf-r2 {command}: terminated (SIGTERM) {kept}"
