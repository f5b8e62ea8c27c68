"""Tests of hf_r2.commands.parsing: one-line parser errors with the closest flag, bit-width errors in words, and
config-file keys that are the flags' aliases."""

import argparse

import pytest

from hf_r2._utils import UsageError
from hf_r2.commands.parsing import one_line_errors, resolve_aliases, suggest_flag, unknown_flags_message


def _parser():
    parser = one_line_errors(argparse.ArgumentParser("hf-r2 x"))
    parser.add_argument("--r2_weight", "--r2-weight", type=float)
    parser.add_argument("--model_name_or_path", "--model", dest="model_name_or_path")
    parser.add_argument("--dataset_name", "--dataset", dest="dataset_name")
    return parser


def test_suggest_flag():
    options = ["--r2_weight", "--r2-weight", "--learning_rate", "--model"]
    assert suggest_flag("--r2_wieght", options) == "--r2_weight"
    assert suggest_flag("--learning-rate=0.1", options) == "--learning_rate"
    assert suggest_flag("--zzz", options) is None
    assert unknown_flags_message(["--zzz", "1"], options, "hf-r2 x") == (
        "unrecognized argument --zzz (see `hf-r2 x --help`)")


def test_parser_errors_are_one_line_usage_errors():
    parser = _parser()
    with pytest.raises(UsageError, match=r"^unrecognized argument --r2_wieght; did you mean --r2_weight\?"):
        parser.parse_args(["--r2_wieght", "1"])
    with pytest.raises(UsageError, match=r"^--r2_weight got 'abc': expected a float"):
        parser.parse_args(["--r2_weight", "abc"])
    # transformers' HfArgumentParser reports leftovers as a ValueError that hf-r2 train passes to parser.error
    with pytest.raises(UsageError, match=r"did you mean --model\?"):
        parser.error("Some specified arguments are not used by the HfArgumentParser: ['--modle', 'x']")


def test_config_file_aliases():
    parser = _parser()
    assert resolve_aliases(parser, {"model": "m", "dataset": "d", "r2-weight": 1, "other": 2}) == {
        "model_name_or_path": "m", "dataset_name": "d", "r2_weight": 1, "other": 2}
    with pytest.raises(UsageError, match="sets 'model_name_or_path' twice"):
        resolve_aliases(parser, {"model_name_or_path": "a", "model": "b"})
