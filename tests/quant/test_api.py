"""`quantize_weights` / `WeightQuantConfig` (hf_r2.quant.api) and `reestimate_bn_stats` (hf_r2.quant.bn)."""

import json

import pytest
import torch
from conftest import conv_net

from hf_r2 import find_target_modules
from hf_r2.quant import WeightQuantConfig, fake_quantize, quantize_weights, quantize_weights_
from hf_r2.quant.uniform import ScaleMethod


def _distinct_per_channel(w: torch.Tensor) -> int:
    return max(row.unique().numel() for row in w.reshape(w.shape[0], -1))


# ---- quantize_weights --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_quantize_weights_copy(bits):
    model = conv_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qmodel = quantize_weights(model, WeightQuantConfig(bits=bits))
    assert qmodel is not model
    for k, v in model.state_dict().items():  # the original is untouched
        assert torch.equal(v, before[k]), k
    targets = {f"{name}.weight" for name, _ in find_target_modules(model)}
    assert targets == {"0.weight", "3.weight", "4.weight", "7.weight"}
    for k, v in qmodel.state_dict().items():
        if k in targets:
            assert _distinct_per_channel(v) <= 2**bits, k
            torch.testing.assert_close(v, fake_quantize(before[k], bits), rtol=0, atol=0)
        else:  # biases, BN affine and running stats stay in float
            assert torch.equal(v, before[k]), k
    assert torch.isfinite(qmodel(torch.randn(2, 3, 8, 8))).all()


def test_quantize_weights_in_place_and_kwargs():
    model = conv_net()
    ref = quantize_weights(model, WeightQuantConfig(bits=3, symmetric=False, scale_method="mse"))
    via_kwargs = quantize_weights(model, bits=3, symmetric=False, scale_method="mse")
    via_override = quantize_weights(model, WeightQuantConfig(bits=8), bits=3, symmetric=False, scale_method="mse")
    same = quantize_weights_(model, bits=3, symmetric=False, scale_method="mse")
    assert same is model
    for other in (via_kwargs, via_override, model):
        for (k, a), b in zip(ref.state_dict().items(), other.state_dict().values()):
            assert torch.equal(a, b), k
    with pytest.raises(ValueError, match=r"Unknown `WeightQuantConfig` field\(s\) \['bitz'\]"):
        quantize_weights(model, bitz=2)
    with pytest.raises(TypeError, match="`config` must be a `WeightQuantConfig`"):
        quantize_weights(model, {"bits": 2})


def test_layer_selection():
    model = conv_net()
    first_last = quantize_weights(model, skip_first_last=True)
    assert torch.equal(first_last[0].weight, model[0].weight)
    assert torch.equal(first_last[7].weight, model[7].weight)
    assert not torch.equal(first_last[3].weight, model[3].weight)
    assert _distinct_per_channel(first_last[4].weight) <= 4
    only_dw = quantize_weights(model, include=[r"^3$"])
    changed = [i for i in (0, 3, 4, 7) if not torch.equal(only_dw[i].weight, model[i].weight)]
    assert changed == [3]
    no_head = quantize_weights(model, exclude=["7"])
    assert torch.equal(no_head[7].weight, model[7].weight)
    assert not torch.equal(no_head[0].weight, model[0].weight)
    with pytest.raises(ValueError, match="No target layer left"):
        quantize_weights(model, include=["nothing_matches"])


def test_timm_and_transformers_models(timm_cnn, hf_convnext):
    for model in (timm_cnn, hf_convnext):
        qmodel = quantize_weights(model, bits=2, per_channel=False)
        n = 0
        for name, module in find_target_modules(qmodel):
            assert module.weight.unique().numel() <= 4, name
            n += 1
        assert n >= 4
        for (k, a), b in zip(model.named_parameters(), qmodel.parameters()):
            if k.endswith("bias") or "norm" in k or ".bn" in k:
                assert torch.equal(a, b), k


# ---- WeightQuantConfig -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        WeightQuantConfig(),
        WeightQuantConfig(bits=1, per_channel=False, skip_first_last=True),
        WeightQuantConfig(bits=4, symmetric=False, scale_method=ScaleMethod.MSE, include=["layer"], exclude="fc"),
    ],
)
def test_config_round_trip(config, tmp_path):
    data = config.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert "hf_r2_version" in data and data["version"] == 1
    assert WeightQuantConfig.from_dict(data) == config
    path = config.save_pretrained(tmp_path)
    assert path.endswith("quantization_config.json")
    loaded = WeightQuantConfig.from_pretrained(tmp_path)
    assert loaded == config and loaded.to_dict() == data
    assert WeightQuantConfig.from_pretrained(path) == config


def test_config_normalises():
    config = WeightQuantConfig(scale_method=ScaleMethod.MSE, include="conv", exclude=("head",))
    assert config.scale_method == "mse" and config.include == ["conv"] and config.exclude == ["head"]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"bits": 0}, r"`bits` must be an integer from 1 to 8, got 0"),
        ({"bits": 9}, r"`bits` must be an integer from 1 to 8, got 9"),
        ({"bits": 2.0}, r"`bits` must be an integer from 1 to 8, got 2.0"),
        ({"bits": True}, r"`bits` must be an integer from 1 to 8, got True"),
        ({"bits": 1, "symmetric": False}, r"`bits=1` is binary.*WeightQuantConfig\(bits=1, symmetric=True\)"),
        ({"symmetric": "yes"}, r"`symmetric` must be `True` or `False`, got 'yes'"),
        ({"per_channel": 1}, r"`per_channel` must be `True` or `False`"),
        ({"scale_method": "percentile"}, r"`scale_method` must be one of 'maxabs', 'mse', got 'percentile'\.$"),
        ({"scale_method": "max_abs"}, r"Did you mean `scale_method='maxabs'`\?"),
        ({"scale_method": "MSE"}, r"Did you mean `scale_method='mse'`\?"),
        ({"include": ["conv("]}, r"`include` holds an invalid regular expression 'conv\('"),
        ({"exclude": 3}, r"`exclude` must be a list of regular expressions or `None`, got 3"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WeightQuantConfig(**kwargs)


def test_config_from_dict_unknown_key(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown `WeightQuantConfig` field\(s\) \['bit'\]"):
        WeightQuantConfig.from_dict({"bit": 2})
    with pytest.raises(FileNotFoundError, match="No quantization_config.json"):
        WeightQuantConfig.from_pretrained(tmp_path)
