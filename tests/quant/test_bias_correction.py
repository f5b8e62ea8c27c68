"""`quant.ptq.bias_correction`: `correct_bias_` zeroes the mean output error of a quantized layer on its calibration
data; `PTQConfig(bias_correction=True)` is PTQ followed by `correct_bias_` on the same batches, and is what CLE's
folded batch norms get instead of re-estimation."""

import copy
import dataclasses

import pytest
import torch
from torch import nn

from hf_r2.quant import PTQConfig, correct_bias_, equalize_, post_training_quantize_


def test_bias_correction_zeroes_the_mean_error():
    torch.manual_seed(0)
    layer = nn.Conv2d(4, 6, 3, padding=1).double()
    model = nn.Sequential(layer, nn.Conv2d(6, 3, 1, bias=False).double())
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64) * 0.5 + 1.0 for _ in range(3)]  # mean 1
    reference = copy.deepcopy(layer)
    post_training_quantize_(model, PTQConfig(w_bits=2, a_bits=None, per_channel=False, first_last_bits=None,
                                             bn="keep"))

    def mean_error():
        with torch.no_grad():
            return torch.stack([(layer(x) - reference(x)).mean((0, 2, 3)) for x in data]).mean(0)

    assert mean_error().abs().max() > 1e-2
    correct_bias_(model, data)
    torch.testing.assert_close(mean_error(), torch.zeros(6, dtype=torch.float64), rtol=0, atol=1e-10)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()


def test_ptq_config_bias_correction_is_ptq_then_correct_bias():
    g = torch.Generator().manual_seed(1)
    data = [{"pixel_values": torch.randn(4, 3, 8, 8, generator=g) + 0.5} for _ in range(3)]
    config = PTQConfig(w_bits=2, a_bits=8, per_channel=False, first_last_bits=None, bn="fold")
    by_hand = post_training_quantize_(copy.deepcopy(_net()), config, data)
    correct_bias_(by_hand, data, num_batches=len(data))
    corrected = post_training_quantize_(_net(), dataclasses.replace(config, bias_correction=True), data)
    plain = post_training_quantize_(_net(), config, data)
    x = data[0]["pixel_values"]
    with torch.no_grad():
        torch.testing.assert_close(corrected(x), by_hand(x), rtol=0, atol=0)
        assert not torch.equal(corrected(x), plain(x))


def test_after_cle_the_folded_biases_are_corrected():
    """CLE folds BN, so a PTQ after it has no BN to re-estimate: bias correction takes that role."""
    g = torch.Generator().manual_seed(2)
    data = [{"pixel_values": torch.randn(4, 3, 8, 8, generator=g)} for _ in range(3)]
    model = equalize_(_net(), calibration_data=data)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    before = {n: m.bias.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    post_training_quantize_(model, PTQConfig(w_bits=2, a_bits=8, bias_correction=True), data)
    changed = [n for n, m in model.named_modules() if n in before and not torch.equal(m.bias, before[n])]
    assert changed  # the quantized convs (the first stays at 8 bits, but is corrected too) got new biases


def test_bias_correction_must_be_a_bool():
    with pytest.raises(ValueError, match="`bias_correction` must be True or False"):
        PTQConfig(bias_correction="yes")
