"""Tests of hf_r2.reproduce.apply: one low-bit config applied to a float model equals the per-method verbs run by
hand (PTQ; k-means + BN re-estimation; DKM prepare + fine-tune + finalize + BN re-estimation), and a config that
fine-tunes without its data is a clear error."""

import copy

import pytest
import torch
from conftest import TinyImages, conv_net

from hf_r2.quant import (
    PalettizeConfig,
    PTQConfig,
    QATConfig,
    finalize_dkm,
    palettize_,
    post_training_quantize_,
    prepare_dkm,
    reestimate_bn_stats,
)
from hf_r2.reproduce import ReproduceConfig, apply_low_bit_, apply_setting, quant_config


def _batches(n=3, seed=0):
    data = TinyImages(8 * n, seed=seed)
    return [{"pixel_values": data.x[i : i + 8], "labels": data.y[i : i + 8]} for i in range(0, 8 * n, 8)]


@pytest.fixture
def model():
    torch.manual_seed(0)
    net = conv_net(10)
    with torch.no_grad():  # BN statistics far from the data's, so that re-estimation shows
        net[1].running_mean.fill_(3.0)
    return net.eval()


def _logits(net, batch):
    with torch.no_grad():
        return net(batch["pixel_values"])


def test_ptq_is_the_ptq_verb(model):
    calibration = _batches()
    config = PTQConfig(w_bits=2, a_bits=8, per_channel=False, weight_range="maxabs", bn="reestimate")
    by_hand = post_training_quantize_(copy.deepcopy(model), config, calibration)
    applied = apply_low_bit_(copy.deepcopy(model), config, calibration)
    torch.testing.assert_close(_logits(applied, calibration[0]), _logits(by_hand, calibration[0]), rtol=0, atol=0)


@pytest.mark.parametrize("bn_reestimate", [True, False])
def test_kmeans_is_palettize_then_bn_reestimation(model, bn_reestimate):
    calibration = _batches()
    config = PalettizeConfig(bits=1, method="kmeans", first_last_bits=8)
    by_hand = palettize_(copy.deepcopy(model), config)
    if bn_reestimate:
        reestimate_bn_stats(by_hand, calibration, num_batches=None)
    applied = apply_low_bit_(copy.deepcopy(model), config, calibration, bn_reestimate=bn_reestimate)
    torch.testing.assert_close(_logits(applied, calibration[0]), _logits(by_hand, calibration[0]), rtol=0, atol=0)
    assert (applied[1].running_mean != 3.0).all() == bn_reestimate
    # one inner layer: two shared values (1 bit); the first and last keep up to 256
    assert applied[4].weight.unique().numel() <= 2


def test_dkm_fine_tunes_then_finalizes_then_reestimates(model):
    calibration = _batches()
    train = TinyImages(16, seed=1)
    config = PalettizeConfig(bits=1, method="dkm", first_last_bits=8)
    finetune = {"learning_rate": 1e-3, "per_device_batch_size": 8, "max_steps": 2, "seed": 0}

    by_hand = prepare_dkm(copy.deepcopy(model), config)
    from hf_r2.data import collate_fn
    from hf_r2.loop import finetune as run_finetune

    run_finetune(by_hand, train, collate_fn=collate_fn, **finetune)
    by_hand.eval()
    finalize_dkm(by_hand)
    reestimate_bn_stats(by_hand, calibration, num_batches=None)

    applied = apply_low_bit_(copy.deepcopy(model), config, calibration, train_dataset=train, finetune=finetune)
    torch.testing.assert_close(_logits(applied, calibration[0]), _logits(by_hand, calibration[0]))
    assert applied[4].weight.unique().numel() <= 2 and not torch.nn.utils.parametrize.is_parametrized(applied[4])


@pytest.mark.parametrize("config", [QATConfig(w_bits=2, a_bits=2), PalettizeConfig(bits=2, method="dkm")])
def test_fine_tuning_configs_need_their_data(model, config):
    with pytest.raises(ValueError, match="fine-tunes the model: pass `train_dataset` and the `finetune`"):
        apply_low_bit_(model, config, _batches())


def test_apply_setting_uses_the_settings_quant_config(model):
    config = ReproduceConfig(models=["x"], variants=["baseline"], seeds=[0], adaround_iters=3, lambda_sweep=None,
                             low_bit=[{"method": "ptq", "w_bits": 4, "a_bits": 8, "rounding": "adaround"}])
    setting = config.low_bit[0]
    qconfig = quant_config(setting, config.adaround_iters)
    assert isinstance(qconfig, PTQConfig) and qconfig.adaround == {"iters": 3} and qconfig.bn == "reestimate"
    calibration = _batches()
    torch.manual_seed(0)
    by_hand = apply_low_bit_(copy.deepcopy(model), qconfig, calibration)
    torch.manual_seed(0)
    applied = apply_setting(copy.deepcopy(model), setting, config, 0, calibration=calibration)
    torch.testing.assert_close(_logits(applied, calibration[0]), _logits(by_hand, calibration[0]), rtol=0, atol=0)


def test_a_settings_pre_steps_run_first_in_their_order(model):
    """`pre: [cle, magr]`: equalize_ then magr_ on the float model, then the PTQ, as done by hand; named after them."""
    from hf_r2.quant import EqualizeConfig, MagRConfig, equalize_, magr_
    from hf_r2.reproduce.plan import row_spec

    ptq = {"method": "ptq", "w_bits": 2, "a_bits": 8, "per_channel": False, "weight_range": "maxabs"}
    config = ReproduceConfig(models=["x"], variants=["baseline"], seeds=[0], lambda_sweep=None,
                             low_bit=[ptq, {**ptq, "pre": ["cle", "magr"]}, {"method": "kmeans", "w_bits": 1,
                                                                             "pre": "magr"}])
    plain, both, kmeans = config.low_bit
    assert (plain["name"], both["name"], kmeans["name"]) == (
        "W2A8 per-tensor maxabs", "W2A8 per-tensor maxabs + CLE + MagR", "W1 k-means + MagR")
    assert "pre" not in row_spec(plain, config)["setting"]  # rows cached before `pre` existed stay valid
    assert row_spec(both, config)["setting"]["pre"] == ["cle", "magr"]
    calibration = _batches()
    by_hand = copy.deepcopy(model)
    equalize_(by_hand, EqualizeConfig(), calibration)
    magr_(by_hand, MagRConfig(), calibration)
    by_hand = apply_low_bit_(by_hand, quant_config(both), calibration)
    applied = apply_setting(copy.deepcopy(model), both, config, 0, calibration=calibration)
    torch.testing.assert_close(_logits(applied, calibration[0]), _logits(by_hand, calibration[0]), rtol=0, atol=0)
    without = apply_setting(copy.deepcopy(model), plain, config, 0, calibration=calibration)
    assert not torch.equal(_logits(without, calibration[0]), _logits(applied, calibration[0]))
    for bad in ({**ptq, "pre": ["awq"]}, {"method": "qat", "w_bits": 2, "pre": ["cle"]}):
        with pytest.raises(ValueError, match="`pre` is a list of range reductions"):
            ReproduceConfig(models=["x"], variants=["baseline"], lambda_sweep=None, low_bit=[bad])


def test_a_settings_bias_correction_runs_last_and_is_named(model):
    """`bias_correction: true` on a PTQ row: the same model as the PTQ with `PTQConfig(bias_correction=True)`; named
    " + BC"; absent from the cache spec when unset; rejected on other methods and for non-bool values."""
    from hf_r2.reproduce.plan import row_spec

    ptq = {"method": "ptq", "w_bits": 2, "a_bits": 8, "per_channel": False, "weight_range": "maxabs"}
    config = ReproduceConfig(models=["x"], variants=["baseline"], seeds=[0], lambda_sweep=None,
                             low_bit=[ptq, {**ptq, "pre": ["cle"], "bias_correction": True}])
    plain, corrected = config.low_bit
    assert corrected["name"] == "W2A8 per-tensor maxabs + CLE + BC"
    assert "bias_correction" not in row_spec(plain, config)["setting"]
    assert row_spec(corrected, config)["setting"]["bias_correction"] is True
    qconfig = quant_config(corrected)
    assert qconfig.bias_correction and not quant_config(plain).bias_correction
    calibration = _batches()
    from hf_r2.quant import EqualizeConfig, equalize_

    by_hand = copy.deepcopy(model)
    equalize_(by_hand, EqualizeConfig(), calibration)
    by_hand = apply_low_bit_(by_hand, qconfig, calibration)
    applied = apply_setting(copy.deepcopy(model), corrected, config, 0, calibration=calibration)
    torch.testing.assert_close(_logits(applied, calibration[0]), _logits(by_hand, calibration[0]), rtol=0, atol=0)
    for bad in ({**ptq, "bias_correction": "yes"}, {"method": "kmeans", "w_bits": 1, "bias_correction": True}):
        with pytest.raises(ValueError, match="`bias_correction` \\(true / false\\) corrects the biases"):
            ReproduceConfig(models=["x"], variants=["baseline"], lambda_sweep=None, low_bit=[bad])



def test_a_settings_finetune_steps_is_its_budget_and_its_cache_key(model, monkeypatch):
    """`finetune_steps` on a DKM / QAT row overrides the config's fine-tune length for that row only (the run's
    `max_steps`), enters its cache spec only when set, and is refused on rows that do not fine-tune."""
    import hf_r2.loop
    from hf_r2.reproduce.plan import row_spec

    seen = []
    monkeypatch.setattr(hf_r2.loop, "finetune", lambda model, data, **kwargs: seen.append(kwargs["max_steps"]))
    config = ReproduceConfig(models=["x"], variants=["baseline"], seeds=[0], lambda_sweep=None, finetune_max_steps=5,
                             low_bit=[{"method": "dkm", "w_bits": 1, "finetune_steps": 3},
                                      {"method": "qat", "w_bits": 2, "a_bits": 2}])
    train = TinyImages(16, seed=1)
    for setting in config.low_bit:
        apply_setting(copy.deepcopy(model), setting, config, 0, calibration=_batches(), train_dataset=train)
    assert seen == [3, 5]
    assert row_spec(config.setting("W1 DKM"), config)["setting"]["finetune_steps"] == 3
    assert "finetune_steps" not in row_spec(config.setting("W2A2 QAT"), config)["setting"]  # old caches stay valid
    with pytest.raises(ValueError, match="`finetune_steps` .* is the fine-tune budget of a 'qat' or 'dkm' row"):
        ReproduceConfig(models=["x"], lambda_sweep=None, low_bit=[{"method": "kmeans", "w_bits": 1,
                                                                   "finetune_steps": 3}])
