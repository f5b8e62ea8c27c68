"""R2Trainer's checkpoints record the run's R2 settings (`r2_state.json`), and resuming with another R2 objective is
refused in one line by the loop's own check ([`hf_r2.checkpoints.check_r2_state`]), never a silent change."""

import json
import logging

import pytest
from conftest import TinyImages, make_timm

from hf_r2.checkpoints import R2_RECORD_NAME, CheckpointError
from hf_r2.trainer import R2Trainer
from hf_r2.training_args import R2TrainingArguments

FIX = r"resume with the R2 settings it was saved with, or start a new run without resume_from_checkpoint\.$"


def _args(folder, **kwargs) -> R2TrainingArguments:
    defaults = dict(output_dir=str(folder), use_cpu=True, report_to="none", disable_tqdm=True, save_strategy="steps",
                    save_steps=1, logging_steps=1, per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2,
                    dataloader_num_workers=0, seed=0)
    return R2TrainingArguments(**{**defaults, **kwargs})


def _trainer(folder, **kwargs) -> R2Trainer:
    return R2Trainer(make_timm("test_resnet"), _args(folder, **kwargs), train_dataset=TinyImages(8))


@pytest.fixture
def saved(tmp_path):
    """`saved(**r2)`: checkpoint-2 of a 2-step run with the R2 arguments `r2`."""

    def save(**r2):
        _trainer(tmp_path / "saved", **r2).train()
        return tmp_path / "saved" / "checkpoint-2"

    return save


def _resume(tmp_path, checkpoint, **r2):
    trainer = _trainer(tmp_path / "resumed", max_steps=3, **r2)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    return trainer


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name.startswith("hf_r2")]


def test_each_checkpoint_records_the_r2_settings(tmp_path):
    """Every checkpoint-<n>/ holds the record (R2Config.to_dict(); null for `r2_lambda=0`, the run without R2), and
    no temp file beside it."""
    trainer = _trainer(tmp_path / "on", r2_loss="kurtosis", r2_lambda=0.1, r2_per_channel=True)
    trainer.train()
    for step in (1, 2):
        folder = tmp_path / "on" / f"checkpoint-{step}"
        assert json.loads((folder / R2_RECORD_NAME).read_text()) == {"r2_config": trainer.regularizer.config.to_dict()}
        assert not [p.name for p in folder.iterdir() if "tmp" in p.name]
    _trainer(tmp_path / "off", r2_lambda=0).train()
    assert json.loads((tmp_path / "off" / "checkpoint-2" / R2_RECORD_NAME).read_text()) == {"r2_config": None}


@pytest.mark.parametrize("saved_r2, resumed_r2, match", [
    (dict(r2_loss="linf", r2_lambda=0.1), dict(r2_loss="linf", r2_lambda=0),
     r"was saved with R2-Loss \(loss='linf', r2_lambda=0\.1\) \(its r2_state\.json\) but this run has no R2 "
     r"\(r2_lambda=0\): "),
    (dict(r2_loss="linf", r2_lambda=0), dict(r2_loss="linf", r2_lambda=0.1),
     r"was saved without R2-Loss \(r2_lambda=0\) \(its r2_state\.json\) but this run has R2-Loss \(loss='linf', "
     r"r2_lambda=0\.1\): "),
    (dict(r2_loss="kurtosis"), dict(r2_loss="linf"),
     r"was saved with R2-Loss loss='kurtosis' \(its r2_state\.json\) but this run has loss='linf': "),
    (dict(r2_loss="linf"), dict(r2_loss="linf", r2_exclude=["fc"]),
     r"was saved with R2-Loss exclude=None \(its r2_state\.json\) but this run has exclude=\['fc'\]: "),
])
def test_resume_with_another_r2_objective_is_one_line(tmp_path, saved, monkeypatch, saved_r2, resumed_r2, match):
    """Another objective (R2 on / off, loss, target layers) is refused in one line naming the checkpoint, before any
    state is loaded."""
    checkpoint = saved(**saved_r2)

    def loads(*args, **kwargs):
        raise AssertionError("state loaded before the R2 check")

    monkeypatch.setattr(R2Trainer, "_load_from_checkpoint", loads)
    with pytest.raises(CheckpointError, match=f"^checkpoint {checkpoint} {match}{FIX}") as refused:
        _resume(tmp_path, checkpoint, **resumed_r2)
    assert "\n" not in str(refused.value)


def test_resume_with_another_lambda_warns_once(tmp_path, saved, caplog):
    """Another lambda may be meant (transformers resumes with changed arguments): it resumes, with one line."""
    checkpoint = saved(r2_loss="linf", r2_lambda=0.1)
    with caplog.at_level(logging.WARNING, logger="hf_r2"):
        trainer = _resume(tmp_path, checkpoint, r2_loss="linf", r2_lambda=0.2)
    assert trainer.state.global_step == 3
    assert _warnings(caplog) == [f"Resuming {checkpoint} with R2 r2_lambda=0.2 where it was saved with r2_lambda=0.1: "
                                 "the rest of the run uses the new value."]


@pytest.mark.parametrize("resumed_r2", [dict(r2_loss="linf", r2_lambda=0), dict(r2_loss="kurtosis")])
def test_checkpoint_without_the_record_resumes_as_before(tmp_path, saved, caplog, resumed_r2):
    """A checkpoint of an older hf-r2 (no r2_state.json) resumes as it did: linf learns nothing, so nothing is
    compared, and nothing is said."""
    checkpoint = saved(r2_loss="linf", r2_lambda=0.1)
    (checkpoint / R2_RECORD_NAME).unlink()
    with caplog.at_level(logging.WARNING, logger="hf_r2"):
        assert _resume(tmp_path, checkpoint, **resumed_r2).state.global_step == 3
    assert _warnings(caplog) == []


def test_plain_trainer_checkpoint_resumed_with_r2_warns(tmp_path, saved, caplog):
    """A checkpoint without any R2 file (a plain transformers Trainer's) resumed with R2 goes on, with one line."""
    checkpoint = saved(r2_loss="linf", r2_lambda=0)
    for name in (R2_RECORD_NAME, "r2_config.json", "r2_stats.json"):
        (checkpoint / name).unlink(missing_ok=True)
    with caplog.at_level(logging.WARNING, logger="hf_r2"):
        assert _resume(tmp_path, checkpoint, r2_loss="linf", r2_lambda=0.1).state.global_step == 3
    assert _warnings(caplog) == [f"Resuming {checkpoint}, a checkpoint without R2 (no r2_state.json), with R2-Loss "
                                 "(loss='linf', r2_lambda=0.1): the rest of the run adds the R2 term."]


def test_unreadable_record_is_one_line(tmp_path, saved):
    """A damaged r2_state.json is named, not skipped (nothing else reads it: skipping would resume unchecked)."""
    checkpoint = saved(r2_loss="linf")
    (checkpoint / R2_RECORD_NAME).write_text("{")
    with pytest.raises(CheckpointError, match=f"^{checkpoint / R2_RECORD_NAME} is not readable JSON: resume from a "
                                              "checkpoint R2Trainer wrote\\.$"):
        _resume(tmp_path, checkpoint, r2_loss="linf")


def test_cli_resume_without_r2_is_one_line(data_dir, tmp_path, capsys):
    """`hf-r2 train --resume_from_checkpoint latest --r2_lambda 0` on a linf run: one error line, status 1."""
    from conftest import tiny_train_argv

    from hf_r2.cli import main

    out = tmp_path / "run"
    steps = ("--save_strategy", "steps", "--save_steps", "2", "--r2_loss", "linf")
    assert main(["train", *tiny_train_argv(data_dir, out, *steps)]) == 0
    capsys.readouterr()
    resume = ("--max_steps", "3", "--resume_from_checkpoint", "latest", "--r2_lambda", "0")
    assert main(["train", *tiny_train_argv(data_dir, out, *steps, *resume)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith(f"hf-r2 train: error: checkpoint {out / 'checkpoint-2'} was saved with R2-Loss "
                                "(loss='linf', r2_lambda=0.01)")
