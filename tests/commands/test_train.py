"""Tests of `hf-r2 train`'s command line: the dataclass flags, their two spellings, config files with override
flags, and argument errors (the training itself: tests/test_train.py)."""

import json

import pytest
from conftest import tiny_train_argv

from hf_r2.cli import main
from hf_r2.commands.train import _parse_train_args


def test_train_help_shows_dataclass_fields(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for flag in ("--model_name_or_path", "--dataset_name", "--input_size", "--augment", "--r2_loss", "--r2_weight",
                 "--learning_rate", "--max-train-samples"):
        assert flag in out
    assert "Which R2 variant" in out  # the fields' metadata help


def test_dash_and_underscore_spellings(data_dir, tmp_path):
    a = _parse_train_args(["--model_name_or_path", "test_resnet", "--max_train_samples", "5", "--r2_warmup_steps",
                           "3", "--output_dir", str(tmp_path)])
    b = _parse_train_args(["--model", "test_resnet", "--max-train-samples", "5", "--r2-warmup-steps", "3",
                           "--output-dir", str(tmp_path)])
    assert a[0] == b[0] and a[1] == b[1]
    assert a[1].max_train_samples == 5 and b[2].r2_warmup_steps == 3 and b[2].output_dir == str(tmp_path)


@pytest.mark.parametrize("suffix", ["json", "yaml"])
def test_train_from_config_file_with_override(data_dir, tmp_path, suffix, capsys):
    import yaml

    argv = tiny_train_argv(data_dir, tmp_path / "run")
    values = {}
    for key, value in zip(argv[::2], argv[1::2]):
        key = key.lstrip("-").replace("-", "_")
        values[{"model": "model_name_or_path", "dataset": "dataset_name"}.get(key, key)] = value
    values.update(max_steps=3, r2_loss="soft_min_max", input_size=32, max_train_samples=64)
    path = tmp_path / f"config.{suffix}"
    path.write_text(json.dumps(values) if suffix == "json" else yaml.safe_dump(values))
    assert main(["train", str(path), "--max-steps", "1"]) == 0  # the flag overrides the file
    state = json.loads((tmp_path / "run" / "trainer_state.json").read_text())
    assert state["global_step"] == 1
    assert json.loads((tmp_path / "run" / "r2_config.json").read_text())["loss"] == "soft_min_max"
    assert "Saved the model to" in capsys.readouterr().out


def test_bad_arguments(capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        main(["train", "--model", "test_resnet", "--r2_loss", "foo"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--r2_loss" in err and "invalid choice: 'foo'" in err and "'linf'" in err

    with pytest.raises(SystemExit) as info:
        main(["train", "--model", "test_resnet", "--r2_weight", "-1", "--output_dir", str(tmp_path)])
    assert info.value.code == 2
    assert "`r2_weight` must be >= 0, got -1" in capsys.readouterr().err

    with pytest.raises(SystemExit):
        main(["train", "--dataset", "cifar10-tiny"])
    assert "--model_name_or_path" in capsys.readouterr().err  # required

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model_name_or_path": "test_resnet", "lerning_rate": 0.1}))
    with pytest.raises(SystemExit):
        main(["train", str(bad)])
    assert "unknown fields ['lerning_rate']" in capsys.readouterr().err
