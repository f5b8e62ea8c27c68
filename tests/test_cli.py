"""Tests of `hf_r2.cli.main`: it registers every sub-command, and `python -m hf_r2` runs it."""

import subprocess
import sys

import pytest

from hf_r2.cli import main


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit, match="^0$"):
        main(["--help"])
    out = capsys.readouterr().out
    assert "hf-r2" in out and all(cmd in out for cmd in ("train", "demo", "env"))
    assert main([]) == 1  # no command: help, non-zero status
    assert "usage: hf-r2" in capsys.readouterr().out


def test_python_m_hf_r2_runs_the_cli():
    done = subprocess.run([sys.executable, "-m", "hf_r2", "--help"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "usage: hf-r2" in done.stdout and "reproduce" in done.stdout
