"""Progress of the PTQ methods that run for minutes one unit at a time (AdaRound's layers, block reconstruction's
blocks), the same whether they are called from Python (`quantize_`, `adaround_`) or from the command line.

Each finished unit gives one line, what it gave followed by where the run is:
`AdaRound conv1: reconstruction error 0.012 (...); layer 3/52, 41 s, about 6 min 10 s left`. The line goes one way
only, so nothing is ever shown twice:

- as an INFO record of the method's logger, where hf-r2's INFO records are shown (`hf-r2 ptq`, or a script that ran
  `logging.basicConfig(level=logging.INFO)`): the record is the progress and no bar is drawn;
- nowhere, where a caller holds an `hf_r2` logger above INFO on purpose
  (`logging.getLogger("hf_r2").setLevel(logging.WARNING)`; `hf-r2 reproduce`, whose rows say what they gave);
- otherwise (Python's defaults: hf-r2, a library, configures no logging handler) to stderr, as `transformers` and
  `huggingface_hub` show a user who configured nothing their progress: a bar in a terminal, the line itself
  anywhere else (a notebook, a pipe, a log file), flushed. `HF_R2_DISABLE_PROGRESS_BARS=1` turns this off (named
  after `HF_HUB_DISABLE_PROGRESS_BARS`).

Like [`~hf_r2.progress`] (which the quant layer below it cannot import): a bar only in a terminal, plain lines
elsewhere.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

from ..._utils import format_seconds

__all__ = ["DISABLE_PROGRESS_ENV", "UnitProgress", "progress_disabled"]

#: Set to `1` / `true` / `yes` to turn off the progress written to stderr (log records are the logging's to show).
DISABLE_PROGRESS_ENV = "HF_R2_DISABLE_PROGRESS_BARS"


def progress_disabled() -> bool:
    """Whether `$HF_R2_DISABLE_PROGRESS_BARS` turns the stderr progress off."""
    return os.environ.get(DISABLE_PROGRESS_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _route(logger: logging.Logger) -> str:
    """`"log"`, `"off"`, `"bar"` or `"lines"`: where the progress goes (see the module docstring)."""
    if logger.isEnabledFor(logging.INFO) and logger.hasHandlers():
        return "log"
    current: logging.Logger | None = logger
    while current is not None and current.name.split(".")[0] == "hf_r2":
        if current.level != logging.NOTSET:  # the nearest level set on purpose decides
            if current.level > logging.INFO:
                return "off"
            break
        current = current.parent
    if progress_disabled():
        return "off"
    return "bar" if _isatty(sys.stderr) else "lines"


class UnitProgress:
    """Reports `total` units (layers, blocks) as they end, one way only (see the module docstring).

    Args:
        logger (`logging.Logger`):
            The method's module logger; its INFO records carry the lines where they are shown.
        desc (`str`):
            The bar's label (`"AdaRound"`).
        total (`int`):
            The number of units.
        unit (`str`, *optional*, defaults to `"layer"`):
            What a unit is called in the lines (`"layer 3/52"`).
    """

    def __init__(self, logger: logging.Logger, desc: str, total: int, unit: str = "layer") -> None:
        self.logger, self.total, self.unit = logger, total, unit
        self.route = _route(logger)
        self.count = 0
        self.start = time.perf_counter()
        self.bar = None
        if self.route == "bar":
            try:
                from tqdm.auto import tqdm
            except ImportError:  # pragma: no cover - tqdm comes with transformers
                self.route = "lines"
            else:
                self.bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)

    def __enter__(self) -> UnitProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def where(self) -> str:
        """`layer 3/52, 41 s, about 6 min 10 s left` after the `count`-th unit."""
        elapsed = time.perf_counter() - self.start
        left = self.total - self.count
        eta = f", about {format_seconds(elapsed * left / self.count)} left" if 0 < self.count and left > 0 else ""
        return f"{self.unit} {self.count}/{self.total}, {format_seconds(elapsed)}{eta}"

    def step(self, line: str | None = None) -> None:
        """One more unit ended; `line` says what it gave (`None`: it was skipped, which a warning said)."""
        self.count += 1
        if self.bar is not None:
            self.bar.update(1)
            return
        if line is None or self.route == "off":
            return
        text = f"{line}; {self.where()}"
        if self.route == "log":
            self.logger.info(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
