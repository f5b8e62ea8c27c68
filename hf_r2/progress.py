"""Output a person can read, in a terminal and in a log file: how `hf-r2 train`, `hf-r2 reproduce` and `hf-r2 demo`
show their progress.

- In a terminal (stdout and stderr both a TTY, progress asked for): one progress bar at a time, and every line
  (log records included, through [`readable_logging`]) printed above it with `tqdm.write`, so no bar is ever torn.
- Otherwise (a pipe, a log file, `--no-progress`): no bar redraws at all; progress is a plain line now and then
  (each tenth of a training) and every line is flushed at once, so `tail -f` follows the run.

[`ReadableProgress`] replaces the Trainer's own [`~transformers.ProgressCallback`] / [`~transformers.PrinterCallback`]
(which print each log as a raw dict, `{'loss': '1.982', 'grad_norm': ...}`) with one readable line per logging
step ([`format_logs`]: `step 50/785 (epoch 0.32): loss 1.982, task 1.982, r2 0, lr 0.002999, max|w| 0.4521`), or
with none where the caller reports on its own (the demo and `hf-r2 reproduce`). [`use_readable_progress`] puts it
on a trainer.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from typing import Any, Iterator

from transformers import TrainerCallback

from ._utils import format_seconds

__all__ = [
    "bars_wanted",
    "say",
    "format_logs",
    "format_seconds",
    "ReadableProgress",
    "use_readable_progress",
    "readable_logging",
    "quiet_info",
]

#: Short names of the Trainer's and R2Trainer's logged values, in the order a line shows them; others follow as
#: they come. `None`: never shown (the Trainer's bookkeeping).
_SHORT = {
    "accuracy": "accuracy", "loss": "loss", "train_loss": "loss", "task_loss": "task", "r2_loss": "r2",
    "learning_rate": "lr", "r2_lambda": "lambda", "r2_max_abs": "max|w|", "r2_mean_max_over_std": "max/std",
    "grad_norm": None, "epoch": None, "total_flos": None, "r2_max_max_over_std": None, "r2_mean_kurtosis": None,
    "runtime": None, "samples_per_second": None, "steps_per_second": None, "train_runtime": None,
    "train_samples_per_second": None, "train_steps_per_second": None,
}


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def bars_wanted(progress: bool | None = True) -> bool:
    """Whether to draw progress bars: `progress` asked for them and both stdout and stderr are a terminal (a bar
    in a pipe or a log file is a stream of carriage returns and escape codes)."""
    return bool(progress) and _isatty(sys.stdout) and _isatty(sys.stderr)


def say(line: str) -> None:
    """Print `line` to stdout above any progress bar, and flush (a log file gets each line when it happens)."""
    from tqdm import tqdm

    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.4g}"


def _values(logs: dict[str, Any], prefix: str = "") -> str:
    """`loss 1.982, task 1.95, ...`: the known values first, in `_SHORT`'s order, then the rest by their names."""
    items = {key[len(prefix):]: value for key, value in logs.items() if key.startswith(prefix)}
    known = [k for k in _SHORT if k in items and _SHORT[k]]
    rest = [k for k in items if k not in _SHORT]
    return ", ".join(f"{_SHORT.get(k) or k} {_number(items[k])}" for k in known + rest)


def format_logs(logs: dict[str, Any], step: int, max_steps: int | None = None) -> str:
    """One line for a log of the Trainer at `step` (of `max_steps`):

    - a training log: `step 50/785 (epoch 0.32): loss 1.982, task 1.982, r2 0, lr 0.002999, max|w| 0.4521`;
    - an evaluation: `eval at step 157 (epoch 1): accuracy 0.612, loss 1.1, task 1.1`;
    - the end of training: `trained 785 steps in 2 min 23 s: loss 1.52, task 1.5, r2 0.02, max|w| 0.112`.
    """
    epoch = logs.get("epoch")
    at = f" (epoch {epoch:.3g})" if isinstance(epoch, (int, float)) else ""
    of = f"/{max_steps}" if max_steps else ""
    if "train_runtime" in logs:
        return f"trained {step} steps in {format_seconds(logs['train_runtime'])}: {_values(logs)}"
    prefix = next((key[: -len("_runtime")] + "_" for key in logs if key.endswith("_runtime")), None)
    if prefix is not None:
        return f"{prefix[:-1]} at step {step}{at}: {_values(logs, prefix)}"
    return f"step {step}{of}{at}: {_values(logs)}"


class ReadableProgress(TrainerCallback):
    """The Trainer's progress and logs, readable in a terminal and in a file (see the module docstring).

    Args:
        bar (`bool`):
            Draw a progress bar (in a terminal); otherwise print a plain line at each `every` of the steps.
        log_lines (`bool`, *optional*, defaults to `True`):
            Print one line per training log ([`format_logs`]); evaluations and the end of training are printed
            either way.
        every (`float`, *optional*, defaults to `0.1`):
            Without a bar: the fraction of the steps between two progress lines.
        indent (`str`, *optional*, defaults to `""`):
            Put before every line (the demo indents its trainings' lines under their heading).
    """

    def __init__(self, bar: bool, log_lines: bool = True, every: float = 0.1, indent: str = "") -> None:
        self.bar_wanted = bar
        self.log_lines = log_lines
        self.every = every
        self.indent = indent
        self.bar = None
        self.prediction_bar = None
        self.last: dict[str, Any] = {}
        self.next_line = 0
        self.start = 0.0
        self.first_step = 0

    def _write(self, line: str) -> None:
        say(self.indent + line)

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()
        self.first_step = state.global_step  # a resumed run starts later
        self.next_line = self._milestone(state.global_step, state.max_steps)
        if state.is_world_process_zero and self.bar_wanted:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, dynamic_ncols=True, leave=False,
                            desc=self.indent.strip() or None)

    def _milestone(self, step: int, max_steps: int) -> int:
        """The first step after `step` that ends a tenth (`every`) of the training."""
        size = max(1, math.ceil(max_steps * self.every))
        return min(max_steps, (step // size + 1) * size)

    def on_step_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        step, total = state.global_step, state.max_steps
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            return
        if step < self.next_line:
            return
        self.next_line = self._milestone(step, total)
        if self.log_lines and getattr(control, "should_log", False):
            return  # this step's log line follows: it says where the training is
        elapsed = time.perf_counter() - self.start
        done = (step - self.first_step) / max(1, total - self.first_step)
        left = f", about {format_seconds(elapsed * (1 - done) / done)} left" if 0 < done < 1 else ""
        loss = f"; loss {_number(self.last['loss'])}" if "loss" in self.last else ""
        epoch = f", epoch {state.epoch:.3g}" if state.epoch is not None else ""
        self._write(f"step {step}/{total} ({100 * step / max(1, total):.0f}%{epoch}), "
                    f"{format_seconds(elapsed)}{left}{loss}")

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if self.bar is None or not state.is_world_process_zero:
            return
        if self.prediction_bar is None:
            from tqdm.auto import tqdm

            total = len(eval_dataloader) if eval_dataloader is not None and hasattr(eval_dataloader, "__len__") \
                else None
            self.prediction_bar = tqdm(total=total, leave=False, dynamic_ncols=True, desc="eval")
        self.prediction_bar.update(1)

    def _close_prediction_bar(self) -> None:
        if self.prediction_bar is not None:
            self.prediction_bar.close()
            self.prediction_bar = None

    def on_evaluate(self, args, state, control, **kwargs):
        self._close_prediction_bar()

    def on_predict(self, args, state, control, **kwargs):
        self._close_prediction_bar()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        logs = {k: v for k, v in logs.items() if k != "total_flos"}
        if "loss" in logs:
            self.last = logs
            if self.bar is not None:
                self.bar.set_postfix_str(f"loss {_number(logs['loss'])}", refresh=False)
        if self.log_lines or "loss" not in logs:  # evaluations and the end of training: always
            self._write(format_logs(logs, state.global_step, state.max_steps))

    def on_train_end(self, args, state, control, **kwargs):
        self._close_prediction_bar()
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def use_readable_progress(trainer, *, bar: bool | None = None, log_lines: bool = True,
                          indent: str = "") -> ReadableProgress:
    """Put [`ReadableProgress`] on `trainer` in place of the Trainer's progress bar / log printer.

    Args:
        trainer ([`~transformers.Trainer`]):
            The trainer, before `train()`.
        bar (`bool`, *optional*):
            Draw a bar; by default when the trainer's `disable_tqdm` is off and [`bars_wanted`] (a terminal).
        log_lines (`bool`, *optional*, defaults to `True`):
            One line per training log (`False`: only the progress, evaluations and the end-of-training line).
        indent (`str`, *optional*):
            Put before every line.
    """
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    if bar is None:
        bar = bars_wanted(not trainer.args.disable_tqdm)
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    callback = ReadableProgress(bar=bar, log_lines=log_lines, indent=indent)
    trainer.add_callback(callback)
    return callback


@contextlib.contextmanager
def readable_logging(bars: bool) -> Iterator[None]:
    """While bars may be drawn, log records (hf-r2's, through the root logger, and transformers') go through
    `tqdm.write`, above the bars instead of through them; without bars, the `datasets` library draws none either
    (its "Generating train split" and "Map" bars). stdout is line-buffered throughout (a log file gets each line
    when it is printed, not in blocks)."""
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    buffered = getattr(sys.stdout, "line_buffering", True)
    if reconfigure is not None and not buffered:
        with contextlib.suppress(ValueError, OSError):
            reconfigure(line_buffering=True)
    try:
        with contextlib.ExitStack() as stack:
            if bars:
                from tqdm.contrib.logging import logging_redirect_tqdm

                stack.enter_context(logging_redirect_tqdm(loggers=[logging.root, logging.getLogger("transformers")]))
            else:
                stack.enter_context(_no_datasets_bars())
            yield
    finally:
        if reconfigure is not None and not buffered:
            with contextlib.suppress(ValueError, OSError):
                reconfigure(line_buffering=False)


@contextlib.contextmanager
def _no_datasets_bars() -> Iterator[None]:
    """The `datasets` library's progress bars off for the block (as they were after it)."""
    try:
        import datasets
    except ImportError:  # pragma: no cover - a dependency of hf-r2
        yield
        return
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


@contextlib.contextmanager
def quiet_info(*names: str) -> Iterator[None]:
    """Hold the loggers `names` at WARNING (their INFO lines off, warnings kept) for the block: a caller that
    reports each step in its own line (the demo, `hf-r2 reproduce`) does without the steps' own INFO lines."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        if logger.getEffectiveLevel() < logging.WARNING:
            logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
