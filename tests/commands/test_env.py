"""Tests of `hf-r2 env`: the versions and machine facts for bug reports."""

import pytest
import torch

from hf_r2.cli import main


def test_env(capsys):
    import timm
    import transformers

    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "`hf-r2 version`" in out
    assert f"`torch version`: {torch.__version__.split('+')[0]}" in out
    assert f"`timm version`: {timm.__version__}" in out
    assert f"`transformers version`: {transformers.__version__}" in out
    with pytest.raises(SystemExit, match="^2$"):
        main(["env", "--bogus"])
    err = capsys.readouterr().err
    assert err.strip() == "hf-r2 env: error: unrecognized argument --bogus (see `hf-r2 env --help`)"


def test_machine_info_has_the_facts_runs_record():
    from hf_r2._utils import machine_info

    info = machine_info()
    for key in ("hf-r2 version", "Python version", "torch version", "PyTorch accelerator", "torch threads",
                "Machine", "CPU count", "Load average"):
        assert isinstance(info[key], str) and info[key], key
