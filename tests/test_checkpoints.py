"""Tests of `hf_r2.checkpoints`: publishing a staged checkpoint over an existing one (and an interruption between its
two renames), R2Trainer's staged checkpoints recording the published best checkpoint, and SIGTERM raised as an
interrupt."""

import json
import os

import pytest
from conftest import TinyImages, make_timm

from hf_r2.checkpoints import latest_checkpoint, publish_folder, staging_folder


def _complete(folder, loop):
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_text(folder.name)
    (folder / ("random_states_0.pkl" if loop else "trainer_state.json")).write_text("{}")
    return folder


@pytest.mark.parametrize("loop", [False, True])
def test_publish_interrupted_between_the_renames_loses_no_checkpoint(tmp_path, loop, monkeypatch, caplog):
    """A kill after `final` was moved aside and before the staged folder took its place leaves the complete old
    checkpoint only under `.tmp-<name>.old`: `latest_checkpoint` restores and returns it; a later publish works."""
    name = "step_4" if loop else "checkpoint-4"
    _complete(tmp_path / ("step_2" if loop else "checkpoint-2"), loop)
    final = _complete(tmp_path / name, loop)
    staging = _complete(tmp_path / "new" / name, loop)
    real_replace, calls = os.replace, []

    def killed_at_second_rename(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies between the two renames
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_at_second_rename)
    with pytest.raises(KeyboardInterrupt):
        publish_folder(str(staging), str(final))
    monkeypatch.undo()
    assert not final.exists() and os.path.isdir(staging_folder(str(final)) + ".old")
    with caplog.at_level("WARNING", logger="hf_r2"):
        assert latest_checkpoint(str(tmp_path), loop=loop) == str(final)  # not checkpoint-2: nothing lost
    assert (final / "model.safetensors").read_text() == name and "Restored" in caplog.text
    assert not os.path.exists(staging_folder(str(final)) + ".old")
    assert latest_checkpoint(str(tmp_path), loop=loop) == str(final)
    # the interrupted publish, run again, replaces it and leaves nothing behind
    (staging / "model.safetensors").write_text("new")
    assert publish_folder(str(staging), str(final)) == str(final)
    assert (final / "model.safetensors").read_text() == "new" and not staging.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["new", name, "step_2" if loop else "checkpoint-2"])


def test_orphaned_old_folder_beside_its_checkpoint_is_ignored(tmp_path):
    """Killed after the second rename, before the old copy was removed: the published checkpoint is the one used."""
    final = _complete(tmp_path / "checkpoint-3", loop=False)
    _complete(tmp_path / ".tmp-checkpoint-3.old", loop=False)
    assert latest_checkpoint(str(tmp_path)) == str(final)
    assert (final / "model.safetensors").read_text() == "checkpoint-3"


def test_trainer_checkpoint_records_the_published_best_checkpoint(tmp_path):
    """With `load_best_model_at_end`, each checkpoint's own `trainer_state.json` names the best checkpoint by its
    published path (not the staging folder it was written in), which exists."""
    from transformers import TrainerCallback

    from hf_r2.trainer import R2Trainer
    from hf_r2.training_args import R2TrainingArguments

    class LossGoesDown(TrainerCallback):  # step 2 is the best, then step 3 is worse: best stays checkpoint-2
        def on_evaluate(self, args, state, control, metrics, **kwargs):
            metrics["eval_score"] = {1: 1.0, 2: 0.5, 3: 0.9}[state.global_step]

    args = R2TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", disable_tqdm=True, dataloader_num_workers=0,
        per_device_train_batch_size=4, per_device_eval_batch_size=8, max_steps=3, learning_rate=1e-2, seed=0,
        eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1, save_total_limit=2,
        metric_for_best_model="score", greater_is_better=False, load_best_model_at_end=True,
    )  # fmt: skip
    data = TinyImages(8)
    trainer = R2Trainer(make_timm("test_resnet"), args, train_dataset=data, eval_dataset=data,
                        callbacks=[LossGoesDown()])  # fmt: skip
    trainer.train()
    best = os.path.join(str(tmp_path), "checkpoint-2")
    assert trainer.state.best_model_checkpoint == best
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("checkpoint", ".tmp"))) == [
        "checkpoint-2", "checkpoint-3"]  # fmt: skip
    for step in (2, 3):
        with open(tmp_path / f"checkpoint-{step}" / "trainer_state.json") as f:
            state = json.load(f)
        assert state["best_model_checkpoint"] == best and os.path.isdir(state["best_model_checkpoint"])


def test_trainer_clears_the_staging_folder_before_any_process_writes_into_it(tmp_path, monkeypatch):
    """Under DDP every process writes its `rng_state_<i>.pth` into the staging folder: the saving process must have
    removed a stale one (left by an interrupted save) before, behind a barrier."""
    from hf_r2.trainer import R2Trainer
    from hf_r2.training_args import R2TrainingArguments

    stale = tmp_path / ".tmp-checkpoint-1" / "checkpoint-1" / "rng_state_1.pth"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"stale")
    args = R2TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", disable_tqdm=True,
                               per_device_train_batch_size=4, max_steps=1, save_strategy="steps", save_steps=1)
    trainer = R2Trainer(make_timm("test_resnet"), args, train_dataset=TinyImages(8))
    events = []
    monkeypatch.setattr(trainer.accelerator, "wait_for_everyone", lambda: events.append(("barrier", stale.exists())))
    save_rng_state = R2Trainer._save_rng_state
    monkeypatch.setattr(R2Trainer, "_save_rng_state",
                        lambda self, folder: events.append(("rng", stale.exists())) or save_rng_state(self, folder))
    trainer.train()
    first_write = events.index(("rng", False))
    assert first_write > 0 and events[first_write - 1] == ("barrier", False), events
    assert (tmp_path / "checkpoint-1").is_dir() and not (tmp_path / ".tmp-checkpoint-1").exists()


def test_sigterm_as_interrupt_raises_once_then_restores_the_default():
    """SIGTERM within the block is a `Terminated` (a KeyboardInterrupt, status 143); a second one while the first
    unwinds is ignored; the default handler is back afterwards, and a handler of someone's own is left alone."""
    import signal
    import time

    from hf_r2.checkpoints import Terminated, interrupt_exit_code, sigterm_as_interrupt

    with pytest.raises(Terminated) as info:
        with sigterm_as_interrupt():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(10)  # interrupted at once
            finally:
                os.kill(os.getpid(), signal.SIGTERM)  # a scheduler that insists: ignored while unwinding
                time.sleep(0.2)
    assert isinstance(info.value, KeyboardInterrupt) and interrupt_exit_code(info.value) == 143
    assert interrupt_exit_code(KeyboardInterrupt()) == 130
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda *args: seen.append(1))
    try:
        with sigterm_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)
        assert seen == [1]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_resume_latest_names_the_checkpoint(data_dir, tmp_path, caplog):
    """`hf-r2 train --resume_from_checkpoint latest` says, in one line, which checkpoint it resumes from."""
    import logging

    from conftest import tiny_train_argv

    from hf_r2.cli import main

    out = tmp_path / "run"
    steps = ("--save_strategy", "steps", "--save_steps", "1")
    assert main(["train", *tiny_train_argv(data_dir, out, *steps)]) == 0
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hf_r2"):
        assert main(["train", *tiny_train_argv(data_dir, out, *steps, "--resume_from_checkpoint", "latest")]) == 0
    said = [r.getMessage() for r in caplog.records if "Resuming from" in r.getMessage()]
    assert said == [f"Resuming from {out / 'checkpoint-2'}, the newest complete checkpoint in {out}."]
