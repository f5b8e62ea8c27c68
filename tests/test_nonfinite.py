"""Non-finite values are never a silent result (issue 35): through the real entry points (the `hf-r2` command line
via `hf_r2.cli.main`, the public API), NaN / inf in a number the user typed, in a training's loss, in a model's
weights or in a numeric self-check is refused or reported in one line, and nothing non-finite is saved as a result."""

import json
import math

import pytest
import torch

from hf_r2 import R2Config, R2TrainingArguments
from hf_r2.cli import main


def _one_error_line(err: str, command: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith(f"hf-r2 {command}: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---- numbers the user types -------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("name", ["weight", "margin_penalty", "soft_min_max_penalty", "kurtosis_target"])
def test_r2_config_refuses_non_finite_numbers(name, value):
    with pytest.raises(ValueError, match=rf"^`{name}` must be a finite number, got {value!r}\.$"):
        R2Config(**{name: value})


def test_r2_config_refuses_a_string_in_one_line():
    with pytest.raises(ValueError, match=r"^`weight` must be a number, got str '0\.1'\.$"):
        R2Config(weight="0.1")
    with pytest.raises(ValueError, match=r"^`warmup_steps` must be an integer, got float 2\.5\.$"):
        R2Config(warmup_steps=2.5)
    assert R2Config(weight=1).weight == 1.0  # an int is a number


def test_training_arguments_refuse_non_finite_numbers(tmp_path):
    with pytest.raises(ValueError, match=r"`r2_weight` must be a finite number, got nan"):
        R2TrainingArguments(output_dir=str(tmp_path), r2_weight=float("nan"))
    with pytest.raises(ValueError, match=r"`learning_rate` must be a finite number, got inf"):
        R2TrainingArguments(output_dir=str(tmp_path), learning_rate=float("inf"))


@pytest.mark.parametrize("flag,value", [("--r2_weight", "nan"), ("--r2-weight", "inf"), ("--learning_rate", "nan")])
def test_train_refuses_a_non_finite_flag_before_any_work(tmp_path, capsys, flag, value):
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="^2$"):
        main(["train", "--model", "test_resnet", "--output_dir", str(out), flag, value])
    line = _one_error_line(capsys.readouterr().err, "train")
    assert f"must be a finite number, got {value}" in line
    assert not out.exists()


def test_loop_config_refuses_non_finite_numbers(tmp_path):
    from hf_r2 import LoopConfig

    for kwargs in ({"learning_rate": float("inf")}, {"weight_decay": float("nan")}, {"momentum": float("nan")}):
        with pytest.raises(ValueError, match="must be a finite number"):
            LoopConfig(output_dir=str(tmp_path), **kwargs)


@pytest.mark.parametrize("command,flags,message", [
    ("ptq", ["--first-last-bits", "0"], "--first-last-bits got '0': --first-last-bits takes 2 to 8 or 'none'"),
    ("ptq", ["--first-last-bits", "fp"], "--first-last-bits takes 2 to 8 or 'none'"),
    ("qat", ["--r2-weight", "nan"], "--r2-weight got 'nan': --r2-weight takes a finite number >= 0"),
    ("qat", ["--learning-rate", "inf"], "--learning-rate takes a finite number > 0"),
    ("compress", ["--method", "dkm", "--epochs", "nan"], "--epochs takes a finite number > 0"),
])
def test_low_bit_flags_refuse_what_their_help_does_not_allow(model_dir, tmp_path, capsys, monkeypatch, command,
                                                                flags, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="^2$"):
        main([command, model_dir, *flags])
    assert message in _one_error_line(capsys.readouterr().err, command)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no export folder


def test_ptq_first_last_bits_none_still_means_like_the_others():
    from hf_r2.commands.quant import ptq_command_parser

    parser = ptq_command_parser()
    assert parser.parse_args(["m", "--first-last-bits", "none"]).first_last_bits is None
    assert parser.parse_args(["m", "--a-bits", "0"]).a_bits is None  # an activation width of 0 is float


# ---- JSON --------------------------------------------------------------------------------------------------------


def test_json_files_hold_no_nan_tokens(tmp_path):
    from hf_r2.saving import save_r2_files

    stats = {"max_abs": float("inf"), "per_layer": {"fc": {"kurtosis": float("nan"), "max_abs": 1.5}}}
    save_r2_files(str(tmp_path), R2Config(), stats)
    text = (tmp_path / "r2_stats.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    loaded = json.loads(text, parse_constant=lambda token: pytest.fail(f"non-standard JSON token {token}"))
    assert loaded == {"max_abs": None, "per_layer": {"fc": {"kurtosis": None, "max_abs": 1.5}}}
    assert not math.isnan(stats["per_layer"]["fc"]["max_abs"])  # the caller's dict is left as it was
    assert math.isnan(stats["per_layer"]["fc"]["kurtosis"])


def _nan_(model: torch.nn.Module, name: str) -> None:
    with torch.no_grad():
        dict(model.named_parameters())[name].view(-1)[0] = float("nan")
