"""Tests of hf_r2.reproduce._rounding: a reproduce row with block reconstruction (`rounding: brecq`, QDrop with
`drop_prob`) is named, cached and built as `hf-r2 ptq --rounding brecq --drop-prob` builds it, AdaRound rows may set
their own `iters`, and every misplaced rounding key is one line that says what to do."""

import copy

import pytest
import torch
from conftest import TinyImages, conv_net

from hf_r2.quant import BlockReconstructionConfig, PTQConfig, quantize_
from hf_r2.reproduce import ReproduceConfig, apply_setting, quant_config
from hf_r2.reproduce.plan import row_spec
from hf_r2.reproduce.variants import normalise_setting

QDROP = {"method": "ptq", "w_bits": 2, "a_bits": 4, "per_channel": True, "weight_range": "mse", "rounding": "brecq",
         "drop_prob": 0.5, "iters": 500}


def _config(*low_bit, **kwargs) -> ReproduceConfig:
    return ReproduceConfig(models=["x"], variants=["baseline"], seeds=[0], lambda_sweep=None, low_bit=list(low_bit),
                           **kwargs)


def test_brecq_and_qdrop_rows_build_block_reconstruction_configs():
    brecq = {k: v for k, v in QDROP.items() if k not in ("drop_prob", "iters")}
    config = _config(QDROP, brecq, {**QDROP, "drop_prob": 0.25, "w_bits": 4, "per_channel": False})
    qdrop, plain, other = config.low_bit
    assert [s["name"] for s in config.low_bit] == ["W2A4 per-channel qdrop", "W2A4 per-channel brecq",
                                                   "W4A4 per-tensor qdrop p=0.25"]
    assert not qdrop["headline"]  # learnt rounding is no cheap headline row
    built = quant_config(qdrop)
    assert isinstance(built, BlockReconstructionConfig)
    assert (built.w_bits, built.a_bits, built.per_channel, built.weight_range, built.iters, built.drop_prob) == (
        2, 4, True, "mse", 500, 0.5)
    assert built.calibration_batches == 10**6  # all: `calibration_samples` sets how many
    defaults = BlockReconstructionConfig()
    assert (plain["iters"], plain["drop_prob"]) == (defaults.iters, 0.0)  # the config's defaults, written out
    assert quant_config(plain).drop_prob == 0.0 and quant_config(other).drop_prob == 0.25
    # the cache spec holds what the row learns with, and no AdaRound budget
    spec = row_spec(qdrop, config)
    assert (spec["setting"]["iters"], spec["setting"]["drop_prob"]) == (500, 0.5) and "adaround_iters" not in spec
    assert spec != row_spec(plain, config)
    # a saved config reads back the same rows
    assert ReproduceConfig.from_dict(config.to_dict()).low_bit == config.low_bit


def test_an_adaround_row_may_set_its_own_iters():
    base = {"method": "ptq", "w_bits": 2, "a_bits": 8, "rounding": "adaround"}
    config = _config(base, {**base, "iters": 7, "name": "W2A8 adaround 7"}, adaround_iters=3)
    plain, own = config.low_bit
    assert plain["name"] == "W2A8 per-channel adaround" and "iters" not in plain and "drop_prob" not in own
    assert quant_config(plain, config.adaround_iters).adaround == {"iters": 3}
    built = quant_config(own, config.adaround_iters)
    assert isinstance(built, PTQConfig) and built.adaround == {"iters": 7}
    assert row_spec(own, config)["setting"]["iters"] == 7


@pytest.mark.parametrize(("item", "match"), [
    ({"method": "ptq", "w_bits": 2, "drop_prob": 0.5}, r"rounds to nearest: add `rounding: adaround` or"),
    ({"method": "ptq", "w_bits": 2, "rounding": "adaround", "drop_prob": 0.5}, r"`drop_prob` is QDrop's"),
    ({"method": "qat", "w_bits": 2, "iters": 10}, r"\['iters'\] set the learnt rounding of a 'ptq' row"),
    ({"method": "ptq", "w_bits": 2, "rounding": "qdrop"}, r"QDrop is `rounding: brecq` with `drop_prob: 0.5`"),
    ({**QDROP, "drop_prob": 1.0}, r"`drop_prob` .* must be in \[0, 1\)"),
    ({**QDROP, "iters": 0}, r"`iters` .* must be a positive integer, got 0"),
    ({**QDROP, "bias_correction": True}, r"takes no `bias_correction`: leave it out"),
    ({**QDROP, "brecq_iters": 10}, r"unknown key\(s\) \['brecq_iters'\]; valid keys are .*'iters', 'drop_prob'"),
])
def test_misplaced_rounding_keys_are_one_clear_line(item, match):
    with pytest.raises(ValueError, match=match) as err:
        normalise_setting(item, 3)
    assert str(err.value).startswith("`low_bit[3]`") and "\n" not in str(err.value)


def test_a_qdrop_row_is_block_reconstruction_on_the_calibration_images():
    """apply_setting of a QDrop row (2 steps) is quantize_ with its BlockReconstructionConfig, done by hand."""
    torch.manual_seed(0)
    model = conv_net(10).eval()
    data = TinyImages(24, seed=0)
    calibration = [{"pixel_values": data.x[i : i + 8], "labels": data.y[i : i + 8]} for i in range(0, 24, 8)]
    config = _config({**QDROP, "iters": 2})
    setting = config.low_bit[0]
    torch.manual_seed(0)
    by_hand = quantize_(copy.deepcopy(model), quant_config(setting), calibration)
    torch.manual_seed(0)
    applied = apply_setting(copy.deepcopy(model), setting, config, 0, calibration=calibration)
    with torch.no_grad():
        expected, got = by_hand(calibration[0]["pixel_values"]), applied(calibration[0]["pixel_values"])
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.equal(applied[4].weight, model[4].weight)
