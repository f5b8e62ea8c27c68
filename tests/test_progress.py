"""Tests of hf_r2.progress: the readable log lines, the plain progress lines outside a terminal, the callback in
place of the Trainer's own printer, the logging routed above bars."""

import logging
from types import SimpleNamespace

from transformers.trainer_callback import PrinterCallback, ProgressCallback

from hf_r2.progress import (
    ReadableProgress,
    bars_wanted,
    format_logs,
    format_seconds,
    quiet_info,
    readable_logging,
    use_readable_progress,
)


def test_format_logs_one_readable_line():
    logs = {"loss": 1.98213, "grad_norm": 3.9, "learning_rate": 0.0029991, "task_loss": 1.95, "r2_loss": 0.03,
            "r2_lambda": 3.0, "r2_max_abs": 0.4521, "r2_mean_max_over_std": 4.312, "r2_max_max_over_std": 6.0,
            "r2_mean_kurtosis": 2.9, "epoch": 0.3185}
    assert format_logs(logs, 50, 785) == ("step 50/785 (epoch 0.319): loss 1.982, task 1.95, r2 0.03, lr 0.002999, "
                                          "lambda 3, max|w| 0.4521, max/std 4.312")
    end = {"train_runtime": 143.2, "train_samples_per_second": 350.0, "train_steps_per_second": 5.5,
           "train_loss": 1.52, "task_loss": 1.5, "r2_loss": 0.02, "epoch": 5.0}
    assert format_logs(end, 785, 785) == "trained 785 steps in 2 min 23 s: loss 1.52, task 1.5, r2 0.02"
    evaluation = {"eval_loss": 1.1, "eval_accuracy": 0.612, "eval_runtime": 3.0, "eval_samples_per_second": 600.0,
                  "eval_task_loss": 1.1, "epoch": 1.0}
    assert format_logs(evaluation, 157) == "eval at step 157 (epoch 1): accuracy 0.612, loss 1.1, task 1.1"
    assert format_logs({"custom": 2, "loss": float("nan")}, 3) == "step 3: loss nan, custom 2"
    assert [format_seconds(s) for s in (4.4, 65, 3725)] == ["4 s", "1 min 05 s", "1 h 02 min"]


def test_no_bars_outside_a_terminal(capsys):
    # pytest captures stdout: not a terminal, so no bar whatever `progress` asks
    assert not bars_wanted(True) and not bars_wanted(False)


def _state(step, max_steps=20, epoch=None):
    return SimpleNamespace(global_step=step, max_steps=max_steps, epoch=epoch, is_world_process_zero=True)


def test_plain_progress_lines_each_tenth(capsys):
    """Without a bar: a line at each tenth of the steps (with the last logged loss), never a carriage return;
    training logs printed only with `log_lines`; the end of training always."""
    callback = ReadableProgress(bar=False, log_lines=False, indent="  ")
    callback.on_train_begin(None, _state(0), None)
    for step in range(1, 21):
        if step == 5:
            callback.on_log(None, _state(5), None, logs={"loss": 2.5, "epoch": 0.25})
        callback.on_step_end(None, _state(step, epoch=step / 20), None)
    callback.on_log(None, _state(20), None, logs={"train_runtime": 3.0, "train_loss": 2.0, "epoch": 1.0,
                                                  "total_flos": 1.0})
    callback.on_train_end(None, _state(20), None)
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "\r" not in out and "\x1b" not in out
    assert [line.split(" (")[0] for line in lines[:10]] == [f"  step {2 * i}/20" for i in range(1, 11)]
    assert lines[0].startswith("  step 2/20 (10%, epoch 0.1), ") and "left" in lines[0] and "loss" not in lines[0]
    assert lines[2].endswith("; loss 2.5")  # step 6: after the log of step 5
    assert lines[10] == "  trained 20 steps in 3 s: loss 2"
    assert len(lines) == 11  # the log of step 5 is not a line of its own without `log_lines`

    # with log lines, and resumed at step 10: a line for each log, the tenths from there on, but none where a log
    # line follows at the same step
    callback = ReadableProgress(bar=False, log_lines=True)
    callback.on_train_begin(None, _state(10), None)
    callback.on_log(None, _state(11), None, logs={"loss": 2.0, "epoch": 0.55})
    callback.on_step_end(None, _state(12), SimpleNamespace(should_log=False))
    callback.on_step_end(None, _state(14), SimpleNamespace(should_log=True))
    callback.on_log(None, _state(14), None, logs={"loss": 1.5})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "step 11/20 (epoch 0.55): loss 2"
    assert lines[1].startswith("step 12/20 (60%") and lines[1].endswith("; loss 2")
    assert lines[2:] == ["step 14/20: loss 1.5"]


def test_use_readable_progress_replaces_the_trainers_printer(tmp_path):
    import torch

    from hf_r2 import R2Trainer, R2TrainingArguments

    args = R2TrainingArguments(output_dir=str(tmp_path), report_to="none", disable_tqdm=True)
    trainer = R2Trainer(model=torch.nn.Linear(2, 2), args=args)
    kinds = [type(c) for c in trainer.callback_handler.callbacks]
    assert PrinterCallback in kinds
    callback = use_readable_progress(trainer, log_lines=False)
    kinds = [type(c) for c in trainer.callback_handler.callbacks]
    assert PrinterCallback not in kinds and ProgressCallback not in kinds and ReadableProgress in kinds
    assert not callback.bar_wanted and not callback.log_lines


def test_quiet_info_and_readable_logging(caplog):
    logger = logging.getLogger("hf_r2.quant.some_step")
    logging.getLogger("hf_r2").setLevel(logging.INFO)
    try:
        with caplog.at_level(logging.INFO, logger="hf_r2"):
            with quiet_info("hf_r2.quant"):
                logger.info("hidden")
                logger.warning("kept")
            logger.info("shown again")
    finally:
        logging.getLogger("hf_r2").setLevel(logging.NOTSET)
    assert [r.getMessage() for r in caplog.records] == ["kept", "shown again"]
    with readable_logging(bars=True):  # handlers swapped for tqdm's and back
        logging.getLogger("hf_r2.x").warning("through tqdm")
    import datasets

    assert not datasets.are_progress_bars_disabled()
    with readable_logging(bars=False):  # no bar of the datasets library in a pipe either
        assert datasets.are_progress_bars_disabled()
    assert not datasets.are_progress_bars_disabled()
