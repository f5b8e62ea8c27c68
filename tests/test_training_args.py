"""R2TrainingArguments: the R2 fields, their errors, HfArgumentParser (CLI, JSON, YAML)."""

import dataclasses
import json

import pytest
from transformers import HfArgumentParser, TrainingArguments

from hf_r2.config import R2Config
from hf_r2.training_args import R2TrainingArguments

R2_FIELDS = [
    "loss", "r2_lambda", "warmup_steps", "per_channel", "include", "exclude", "skip_first_last", "skip_frozen",
    "margin_penalty", "soft_min_max_penalty", "kurtosis_target",
]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# R2TrainingArguments


def test_training_args_build_r2_config(tmp_path):
    values = dict(
        loss="margin", r2_lambda=0.2, warmup_steps=5, per_channel=True, include=["layer"], exclude=["fc"],
        skip_first_last=True, margin_penalty=0.5, soft_min_max_penalty=2.0, kurtosis_target=2.5,
    )  # fmt: skip
    args = R2TrainingArguments(output_dir=str(tmp_path), **{k if k.startswith("r2_") else f"r2_{k}": v
                                                            for k, v in values.items()})
    assert args.r2_config.to_dict() == R2Config(**values).to_dict()
    # defaults match R2Config's, and the one TrainingArguments default we change
    default = R2TrainingArguments(output_dir=str(tmp_path))
    assert default.r2_config.to_dict() == R2Config().to_dict()
    assert default.remove_unused_columns is False and TrainingArguments(str(tmp_path)).remove_unused_columns
    assert R2TrainingArguments(output_dir=str(tmp_path), r2_include="conv").r2_include == ["conv"]


def test_training_args_fields_documented_in_order():
    own = [f for f in dataclasses.fields(R2TrainingArguments) if f.name.startswith("r2_")]
    assert [f.name for f in own] == [name if name.startswith("r2_") else f"r2_{name}" for name in R2_FIELDS]
    assert all(f.metadata.get("help") for f in own)
    doc = R2TrainingArguments.__doc__
    positions = [doc.index(f"    {f.name} (`") for f in own]
    assert positions == sorted(positions)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(r2_loss="Margin"), r"`r2_loss` must be one of .*Did you mean `r2_loss='margin'`"),
        (dict(r2_loss="none"), r"`r2_loss` must be one of .*set `r2_lambda=0`"),
        (dict(r2_lambda=-1.0), r"`r2_lambda` must be >= 0, got -1.0"),
        (dict(r2_weight=-1.0), r"`r2_lambda` must be >= 0, got -1.0"),
        (dict(r2_weight=0.1, r2_lambda=0.1), r"got both `r2_lambda` and `r2_weight` \(its older name\): give only"),
        (dict(r2_warmup_steps=-3), r"`r2_warmup_steps` must be >= 0, got -3"),
        (dict(r2_margin_penalty=-1.0), r"`r2_margin_penalty` must be >= 0"),
        (dict(r2_exclude=["("]), r"`r2_exclude` holds an invalid regular expression '\('"),
    ],
)
def test_training_args_errors(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        R2TrainingArguments(output_dir=str(tmp_path), **kwargs)


def test_r2_weight_is_the_older_name_of_r2_lambda(tmp_path):
    args = R2TrainingArguments(output_dir=str(tmp_path), r2_weight=0.3)
    assert args.r2_lambda == args.r2_weight == args.r2_config.r2_lambda == 0.3
    assert args == R2TrainingArguments(output_dir=str(tmp_path), r2_lambda=0.3)


def test_training_args_hf_argument_parser(tmp_path):
    parser = HfArgumentParser(R2TrainingArguments)
    help_text = parser.format_help()  # raises if a help string has a bare `%`
    assert "--r2_margin_penalty" in help_text and "--r2_loss {linf,margin,soft_min_max,kurtosis}" in help_text
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--r2_loss", "soft_min_max", "--r2_weight", "0.05", "--r2_per_channel",
         "--r2_include", "conv", "fc", "--r2-warmup-steps", "7"]
    )  # fmt: skip
    assert args.r2_config.to_dict() == R2Config(
        loss="soft_min_max", r2_lambda=0.05, per_channel=True, include=["conv", "fc"], warmup_steps=7
    ).to_dict()
    with pytest.raises(SystemExit, match="^2$"):  # argparse's usage error
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--r2_loss", "l2"])
    path = tmp_path / "args.json"
    path.write_text(json.dumps({"output_dir": str(tmp_path), "r2_loss": "kurtosis", "r2_kurtosis_target": 2.0}))
    (args,) = parser.parse_json_file(str(path))
    assert (args.r2_config.loss, args.r2_config.kurtosis_target) == ("kurtosis", 2.0)
    yaml = pytest.importorskip("yaml")
    path = tmp_path / "args.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path), "r2_loss": "margin", "r2_exclude": ["head"]}))
    (args,) = parser.parse_yaml_file(str(path))
    assert (args.r2_config.loss, args.r2_config.exclude) == ("margin", ["head"])




def test_no_pinned_memory_without_an_accelerator(tmp_path, monkeypatch):
    """Pinned memory needs a CUDA / MPS device: without one, the default is False (torch warns at every DataLoader
    otherwise); with one, the Trainer's default (True) stays."""
    import hf_r2.training_args as training_args

    monkeypatch.setattr(training_args, "_has_accelerator", lambda: False)
    assert R2TrainingArguments(output_dir=str(tmp_path)).dataloader_pin_memory is False
    monkeypatch.setattr(training_args, "_has_accelerator", lambda: True)
    assert R2TrainingArguments(output_dir=str(tmp_path)).dataloader_pin_memory is True


def test_hub_token_is_in_no_saved_file(tmp_path, data_dir):
    """`hf-r2 train --hub_token T`: no file of the run or of its checkpoints holds T (training_args.bin is pickled
    without it); the arguments in memory, and their copies, keep it for the Trainer's own push."""
    import copy
    import os

    import torch
    from conftest import tiny_train_argv

    from hf_r2.cli import main

    token = "hf_trainingtoken0123456789"
    out = tmp_path / "run"
    assert main(["train", *tiny_train_argv(data_dir, out, "--hub_token", token, "--save_strategy", "steps",
                                           "--save_steps", "1")]) == 0
    saved = [os.path.join(root, name) for root, _, names in os.walk(out) for name in names]
    args_files = [p for p in saved if p.endswith("training_args.bin")]
    assert len(args_files) >= 2  # the run's and a checkpoint's
    for path in saved:
        with open(path, "rb") as f:
            assert token.encode() not in f.read(), path
    loaded = torch.load(args_files[0], weights_only=False)  # our own file, written just now
    assert isinstance(loaded, R2TrainingArguments) and loaded.hub_token is None
    assert loaded.max_steps == 2 and loaded.output_dir == str(out)
    args = R2TrainingArguments(output_dir=str(tmp_path), hub_token=token, report_to="none")
    assert copy.deepcopy(args).hub_token == token and copy.copy(args).hub_token == token
    assert args.hub_token == token and torch.load(_saved(args, tmp_path), weights_only=False).hub_token is None


def _saved(args, tmp_path):
    import torch

    path = tmp_path / "args.bin"
    torch.save(args, path)
    return path
