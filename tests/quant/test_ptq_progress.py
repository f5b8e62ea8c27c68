"""Progress of AdaRound and block reconstruction called from Python (`hf_r2/quant/ptq/_progress.py`, issue 36): with
Python's logging defaults each layer / block prints one line on stderr with its index, the time spent and left;
`HF_R2_DISABLE_PROGRESS_BARS=1` or a quieted `hf_r2` logger silences it; where hf-r2's INFO records are shown (the
CLI) the line is a log record only, never also on stderr; in a terminal it is a bar."""

import logging
import re

import pytest
import torch
from conftest import conv_net

from hf_r2.quant import BlockReconstructionConfig, PTQConfig, quantize_
from hf_r2.quant.ptq import _progress

LINE = re.compile(r"^AdaRound (\S+): reconstruction error .*; layer (\d+)/(\d+), \d+ s(, about .* left)?$")


@pytest.fixture(autouse=True)
def _library_logging_defaults(monkeypatch):
    """No level set on hf-r2's loggers (the CLI sets `hf_r2` to INFO, and it may have run in this process)."""
    monkeypatch.delenv(_progress.DISABLE_PROGRESS_ENV, raising=False)
    loggers = [logging.getLogger(name) for name in ("hf_r2", "hf_r2.quant", "hf_r2.quant.ptq")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.NOTSET)  # setLevel, not an attribute: it clears logging's isEnabledFor cache
    yield
    for logger, level in zip(loggers, levels):
        logger.setLevel(level)


def _adaround() -> None:
    data = [{"pixel_values": torch.randn(2, 3, 8, 8)} for _ in range(2)]
    config = PTQConfig(w_bits=4, a_bits=None, bn="keep", rounding="adaround",
                       adaround={"iters": 3, "batch_size": 8, "num_samples": 64})
    quantize_(conv_net(), config, data)


def test_adaround_from_python_prints_one_line_per_layer(capsys):
    _adaround()
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    matches = [LINE.match(line) for line in lines]
    assert lines and all(matches), lines
    assert [int(m.group(2)) for m in matches] == list(range(1, len(lines) + 1))
    assert {int(m.group(3)) for m in matches} == {len(lines)} == {4}  # conv, depthwise, pointwise, head
    assert all(m.group(4) for m in matches[:-1]) and not matches[-1].group(4)  # time left, but not after the last


def test_env_var_and_a_quieted_logger_silence_it(capsys, monkeypatch):
    monkeypatch.setenv(_progress.DISABLE_PROGRESS_ENV, "1")
    _adaround()
    assert capsys.readouterr().err == ""
    monkeypatch.delenv(_progress.DISABLE_PROGRESS_ENV)
    logging.getLogger("hf_r2").setLevel(logging.WARNING)  # restored by the fixture
    _adaround()
    assert capsys.readouterr().err == ""


def test_shown_log_records_carry_it_once(capsys, caplog):
    """As under `hf-r2 ptq` (hf_r2 at INFO, a handler on the root): the lines are log records, not also on stderr."""
    with caplog.at_level(logging.INFO, logger="hf_r2"):
        _adaround()
    assert capsys.readouterr().err == ""
    records = [r.getMessage() for r in caplog.records if r.name == "hf_r2.quant.ptq.adaround"]
    assert len(records) == 4 and all(LINE.match(m) for m in records), records


def test_a_terminal_gets_a_bar_instead_of_lines(capsys, monkeypatch):
    monkeypatch.setattr(_progress, "_isatty", lambda stream: True)
    _adaround()
    err = capsys.readouterr().err
    assert "AdaRound" in err and "4/4" in err and "reconstruction error" not in err


def test_block_reconstruction_reports_each_block(capsys, monkeypatch):
    data = [{"pixel_values": torch.randn(2, 3, 8, 8)} for _ in range(2)]
    quantize_(conv_net(), BlockReconstructionConfig(iters=2, batch_size=2, a_bits=None, calibration_batches=2), data)
    lines = capsys.readouterr().err.splitlines()
    assert lines and all(re.match(r"^Block reconstruction \S+: error .*; block \d+/\d+, \d+ s", x) for x in lines)
    monkeypatch.setenv(_progress.DISABLE_PROGRESS_ENV, "true")
    quantize_(conv_net(), BlockReconstructionConfig(iters=2, batch_size=2, a_bits=None, calibration_batches=2), data)
    assert capsys.readouterr().err == ""
