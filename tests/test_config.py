"""R2Config: validation errors, JSON round trip."""

import json

import pytest

from hf_r2 import R2_CONFIG_NAME, R2Config, R2LossType, __version__


@pytest.mark.parametrize(
    "config",
    [
        R2Config(),
        R2Config(loss="margin", r2_lambda=0.1, per_channel=True, margin_penalty=0.5, warmup_steps=100),
        R2Config(loss=R2LossType.SOFT_MIN_MAX, include=["layer"], exclude=[r"fc$"], skip_first_last=True),
        R2Config(loss="kurtosis", kurtosis_target=2.0),
    ],
)
def test_round_trip(config, tmp_path):
    path = config.save_pretrained(tmp_path)
    assert path.endswith(R2_CONFIG_NAME)
    loaded = R2Config.from_pretrained(tmp_path)
    assert loaded == config
    assert loaded.to_dict() == config.to_dict()
    on_disk = json.loads((tmp_path / R2_CONFIG_NAME).read_text())
    assert on_disk["hf_r2_version"]
    assert R2Config.from_pretrained(tmp_path / R2_CONFIG_NAME) == config
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_enum_and_string_are_the_same():
    assert R2Config(loss=R2LossType.MARGIN) == R2Config(loss="margin")
    assert R2Config(loss="margin").loss_type is R2LossType.MARGIN


def test_unknown_loss_names_the_choices():
    with pytest.raises(ValueError, match=r"`loss` must be one of 'linf', 'margin', 'soft_min_max', 'kurtosis'"):
        R2Config(loss="l2")
    with pytest.raises(ValueError, match=r"Did you mean `loss='soft_min_max'`"):
        R2Config(loss="soft-min-max")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"r2_lambda": -1.0}, "`r2_lambda` must be >= 0"),
        ({"warmup_steps": -5}, "`warmup_steps` must be >= 0"),
        ({"margin_penalty": -0.1}, "`margin_penalty` must be >= 0"),
        ({"include": ["conv("]}, "`include` holds an invalid regular expression"),
    ],
)
def test_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        R2Config(**kwargs)


def test_single_pattern_string_becomes_list():
    assert R2Config(include="conv").include == ["conv"]


def test_unknown_field_is_an_error():
    with pytest.raises(ValueError, match=r"Unknown `R2Config` field\(s\) \['wieght'\]"):
        R2Config.from_dict({"loss": "linf", "wieght": 0.1})


@pytest.mark.parametrize("writer", [__version__, "0.0.1", None])
def test_unknown_field_of_a_same_or_older_version_is_still_an_error(writer):
    data = {"loss": "linf", "wieght": 0.1, **({"hf_r2_version": writer} if writer else {})}
    with pytest.raises(ValueError, match=r"Unknown `R2Config` field\(s\) \['wieght'\]"):
        R2Config.from_dict(data)


def test_fields_of_a_newer_version_are_dropped_with_one_warning(tmp_path):
    data = {**R2Config(loss="margin", warmup_steps=10).to_dict(), "hf_r2_version": "99.0.0", "new_knob": 3}
    (tmp_path / R2_CONFIG_NAME).write_text(json.dumps(data))
    with pytest.warns(UserWarning, match=r"written by hf-r2 99\.0\.0 .*\['new_knob'\].*upgrade hf-r2") as caught:
        loaded = R2Config.from_pretrained(tmp_path)
    assert len(caught) == 1
    assert loaded == R2Config(loss="margin", warmup_steps=10)


def test_weight_is_the_older_name_of_r2_lambda():
    assert R2Config(weight=0.1) == R2Config(r2_lambda=0.1)
    assert R2Config(r2_lambda=0.1).weight == 0.1
    with pytest.raises(AttributeError):
        R2Config().weight = 0.2  # read-only: one name to set


def test_an_older_r2_config_json_with_weight_still_loads(tmp_path):
    old = {"loss": "margin", "weight": 0.3, "warmup_steps": 5, "per_channel": True, "include": None, "exclude": None,
           "skip_first_last": False, "skip_frozen": True, "margin_penalty": 1.0, "soft_min_max_penalty": 1.0,
           "kurtosis_target": 1.8, "version": 1, "hf_r2_version": "0.1.0"}
    (tmp_path / R2_CONFIG_NAME).write_text(json.dumps(old))
    assert R2Config.from_pretrained(tmp_path) == R2Config(loss="margin", r2_lambda=0.3, warmup_steps=5,
                                                          per_channel=True)
    assert R2Config.resolve(None, {"weight": 0.2}) == R2Config(r2_lambda=0.2)


@pytest.mark.parametrize("flag", ["--r2_lambda", "--r2-lambda", "--weight"])
def test_a_parser_built_from_r2config_takes_the_older_flag(flag):
    from transformers import HfArgumentParser

    (config,) = HfArgumentParser(R2Config).parse_args_into_dataclasses([flag, "0.2"])
    assert config == R2Config(r2_lambda=0.2)


@pytest.mark.parametrize("build", [lambda: R2Config(weight=0.1, r2_lambda=0.2),
                                   lambda: R2Config.from_dict({"weight": 0.1, "r2_lambda": 0.2})])
def test_weight_and_r2_lambda_together_is_an_error(build):
    with pytest.raises(ValueError, match=r"^`R2Config` got both `r2_lambda` and `weight` \(its older name\): give "
                                         r"only `r2_lambda`\.$"):
        build()


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="No r2_config.json"):
        R2Config.from_pretrained(tmp_path)
