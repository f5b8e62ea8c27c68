"""One schema per low-bit method (issue 33): `hf-r2 ptq / qat / compress` flags are generated from their quant configs'
fields (`hf_r2/commands/_low_bit_flags.py`, written by `hf_r2.commands.gen_low_bit_flags`), so `--help` and the
config cannot disagree: every field has its flag (or a listed reason), every flag is a field (or listed), and the
defaults build the config's defaults."""

import argparse
import dataclasses
from pathlib import Path

import pytest

from hf_r2 import quant
from hf_r2.cli import main
from hf_r2.commands import quant as quant_command
from hf_r2.commands.gen_low_bit_flags import CLI_ONLY, CONFIGS, EXTRA_CHOICES, NOT_FLAGS, render

PARSERS = {"ptq": quant_command.ptq_command_parser, "qat": quant_command.qat_command_parser,
           "compress": quant_command.compress_command_parser}


def _actions(verb: str) -> dict[str, argparse.Action]:
    return {option: action for action in PARSERS[verb]()._actions for option in action.option_strings}


def test_flag_table_is_generated_from_the_configs():
    committed = (Path(quant_command.__file__).parent / "_low_bit_flags.py").read_text(encoding="utf-8")
    assert committed == render(), "the quant configs changed: run python -m hf_r2.commands.gen_low_bit_flags"


@pytest.mark.parametrize("config_name", sorted(CONFIGS))
def test_every_config_field_has_its_flag(config_name):
    """Each field is a flag of its verb, with the field's default, its enum's choices and its help; or it is in
    NOT_FLAGS with the reason."""
    verb, prefix = CONFIGS[config_name]
    actions = _actions(verb)
    for f in dataclasses.fields(getattr(quant, config_name)):
        if (config_name, f.name) in NOT_FLAGS or ("*", f.name) in NOT_FLAGS:
            assert NOT_FLAGS.get((config_name, f.name)) or NOT_FLAGS[("*", f.name)]
            continue
        rows = [row for row in quant_command.FLAG_ROWS if row[:2] == (config_name, f.name)]
        assert rows and rows[0][3] in actions, f"{config_name}.{f.name} has no flag in `hf-r2 {verb}`"
        action = actions[rows[0][3]]
        assert action.dest == rows[0][2] and action.dest in (f.name, f"{prefix}_{f.name}"), (config_name, f.name)
        assert action.default == f.default, (config_name, f.name)
        if "choices" in f.metadata:
            extra = EXTRA_CHOICES.get((config_name, f.name), ((), ""))[0]
            assert list(action.choices) == [m.value for m in f.metadata["choices"]] + list(extra)
        shared = config_name == "BlockReconstructionConfig" and f.name in {g.name for g in dataclasses.fields(
            quant.PTQConfig)}
        if not shared:  # a shared grid flag has PTQConfig's help
            assert f.metadata.get("flag_help", f.metadata["help"]) in action.help, (config_name, f.name)


@pytest.mark.parametrize("verb", sorted(PARSERS))
def test_every_flag_is_a_field_or_listed(verb):
    data = argparse.ArgumentParser()
    quant_command._add_data_args(data, train=verb != "ptq")
    shared = {o for a in data._actions for o in a.option_strings}
    table = {row[3] for row in quant_command.FLAG_ROWS}
    for option, action in _actions(verb).items():
        flag = "--" + option[2:].replace("_", "-")
        if option in shared or flag in table or option in ("-h", "--help"):
            continue
        assert flag in CLI_ONLY[verb], f"`hf-r2 {verb} {option}` sets no config field and is not in CLI_ONLY"


@pytest.mark.parametrize("config_name", sorted(CONFIGS))
def test_the_default_flags_build_the_default_config(config_name):
    verb = CONFIGS[config_name][0]
    args = PARSERS[verb]().parse_args(["m"])
    cls = getattr(quant, config_name)
    assert cls(**quant_command._config_fields(args, config_name)) == cls()


def _built(monkeypatch, argv):
    """The config and the row names `hf-r2 <argv>` would run with (the step itself is not run)."""
    built = []
    monkeypatch.setattr(quant_command, "run_step", lambda args, command, config, **kw: built.append((config, kw)) or 0)
    assert main(argv) == 0
    return built[0]


def test_ptq_flags_build_the_config(monkeypatch):
    config, kw = _built(monkeypatch, ["ptq", "m", "--per-tensor", "--rounding", "adaround", "--adaround-iters", "4",
                                      "--adaround_lr", "0.05", "--exclude", "fc$", "--act-percentile", "99.9"])
    assert isinstance(config, quant.PTQConfig) and not config.per_channel and config.exclude == ["fc$"]
    assert config.adaround == {"iters": 4, "lr": 0.05}  # only what the flags change, as before
    assert (config.act_percentile, config.calibration_batches) == (99.9, 10**6)
    assert (kw["method"], kw["tag"]) == ("ptq-adaround", "w2a8-ptq-adaround")
    config, kw = _built(monkeypatch, ["ptq", "m"])
    assert config.adaround is None and (kw["method"], kw["tag"]) == ("ptq-nearest", "w2a8-ptq")


def test_ptq_rounding_brecq_builds_block_reconstruction(monkeypatch):
    config, kw = _built(monkeypatch, ["ptq", "m", "--rounding", "brecq", "--a-bits", "4", "--brecq-iters", "7"])
    assert isinstance(config, quant.BlockReconstructionConfig)
    assert (config.a_bits, config.iters, config.drop_prob, config.calibration_batches) == (4, 7, 0.0, 10**6)
    assert (kw["method"], kw["tag"]) == ("ptq-brecq", "w2a4-ptq-brecq")
    config, kw = _built(monkeypatch, ["ptq", "m", "--rounding", "brecq", "--drop-prob", "0.5"])
    assert config.drop_prob == 0.5 and (kw["method"], kw["tag"]) == ("ptq-qdrop", "w2a8-ptq-qdrop")


@pytest.mark.parametrize("flags,message", [
    (["--rounding", "brecq", "--bias-correction"], "--rounding brecq does not read --bias-correction (block "
     "reconstruction has its own --brecq-* flags and keeps the batch norms as trained): leave it out."),
    (["--rounding", "brecq", "--bn", "fold", "--adaround-iters", "3"], "does not read --adaround-iters, --bn"),
    (["--drop-prob", "0.5"], "--drop-prob set block reconstruction: add --rounding brecq, or leave it out."),
])
def test_ptq_refuses_flags_its_rounding_ignores(monkeypatch, capsys, flags, message):
    monkeypatch.setattr(quant_command, "run_step", lambda *a, **k: pytest.fail("ran"))
    with pytest.raises(SystemExit, match="^2$"):
        main(["ptq", "m", *flags])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_a_config_check_is_one_line_before_any_work(monkeypatch, capsys):
    monkeypatch.setattr(quant_command, "run_step", lambda *a, **k: pytest.fail("ran"))
    assert main(["ptq", "m", "--rounding", "brecq", "--brecq-lr", "0"]) == 1
    assert "`lr` and `act_lr` must be positive" in capsys.readouterr().err


def test_qat_and_compress_flags_build_their_configs(monkeypatch):
    config, kw = _built(monkeypatch, ["qat", "m", "--no-learn-scales", "--weight-init", "maxabs", "--a-bits", "4"])
    assert isinstance(config, quant.QATConfig) and not config.learn_scales and config.weight_init == "maxabs"
    assert (config.a_bits, config.calibration_batches) == (4, quant.QATConfig().calibration_batches)
    argv = ["compress", "m", "--method", "dkm", "--first-last-bits", "8", "--dkm-iters", "2"]
    config, kw = _built(monkeypatch, argv)
    assert isinstance(config, quant.PalettizeConfig) and (config.method, config.first_last_bits) == ("dkm", 8)
    assert config.dkm_iters == 2 and kw["method"] == "dkm"


@pytest.mark.parametrize("flag", ["--r2-lambda", "--r2_lambda", "--r2-weight", "--r2_weight"])
def test_r2_lambda_keeps_its_older_name(flag):
    """`--r2-lambda` is the public name of the R2 coefficient; `--r2-weight` still works, out of `--help`."""
    assert quant_command.qat_command_parser().parse_args(["m", flag, "0.5"]).r2_lambda == 0.5
    text = quant_command.compress_command_parser().format_help()
    assert "--r2-lambda" in text and "--r2-weight" not in text
