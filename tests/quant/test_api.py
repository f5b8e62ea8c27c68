"""`hf_r2.quant.api.quantize_`: the dispatcher against each per-method verb run on a copy of the same model (same
state dict, same layer classes), its registry (every config applied to a model today is registered, a new one is one
registration) and its `TypeError`, and data-free weight-only PTQ (`PTQConfig(a_bits=None,
bn="keep")`) against a brute-force max-abs grid of every weight, through `save_low_bit` / `load_low_bit`."""

import copy

import pytest
import torch
from conftest import make_timm

from hf_r2 import find_target_modules
from hf_r2.models import forward_logits
from hf_r2.quant import (
    AdaRoundConfig,
    BlockReconstructionConfig,
    EqualizeConfig,
    MagRConfig,
    PalettizeConfig,
    PTQConfig,
    QATConfig,
    adaround_,
    equalize_,
    finalize_dkm,
    is_dkm_prepared,
    load_low_bit,
    magr_,
    palettize_,
    post_training_quantize_,
    prepare_dkm,
    prepare_qat,
    quantize_,
    quantized_layers,
    register_quantize_handler,
    registered_quantize_configs,
    save_low_bit,
)
from hf_r2.quant import api as quant_api


def images(n_batches: int, batch: int = 4, seed: int = 1, size: int = 32) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"pixel_values": torch.randn(batch, 3, size, size, generator=g)} for _ in range(n_batches)]


def _assert_same_model(a: torch.nn.Module, b: torch.nn.Module) -> None:
    assert [type(m).__name__ for m in a.modules()] == [type(m).__name__ for m in b.modules()]
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


# ---- dispatch -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, verb, with_data",
    [
        (PTQConfig(w_bits=2, a_bits=8, calibration_batches=2), post_training_quantize_, True),
        (PTQConfig(w_bits=4, a_bits=None, bn="keep"), post_training_quantize_, False),
        (PTQConfig(w_bits=2, a_bits=8, bn="fold", calibration_batches=2), post_training_quantize_, True),
        (QATConfig(w_bits=2, a_bits=2), prepare_qat, True),
        (QATConfig(w_bits=3, a_bits=None), prepare_qat, False),
        (PalettizeConfig(bits=2), palettize_, False),
        (PalettizeConfig(bits=1, group_size=1, first_last_bits=8), palettize_, False),
        (EqualizeConfig(calibration_batches=2), equalize_, True),
        (MagRConfig(iterations=5, calibration_batches=2), magr_, True),
    ],
    ids=["ptq-w2a8", "ptq-weight-only", "ptq-fold", "qat-w2a2", "qat-w3", "kmeans-2", "kmeans-1-per-channel", "cle",
         "magr"],
)
def test_quantize_dispatches_to_the_per_method_verb(config, verb, with_data):
    model = make_timm("test_resnet").eval()
    data = images(2) if with_data else None
    torch.manual_seed(0)
    via_dispatch = quantize_(copy.deepcopy(model), config, data)
    torch.manual_seed(0)
    via_verb = verb(copy.deepcopy(model), config, data) if data is not None else verb(copy.deepcopy(model), config)
    _assert_same_model(via_dispatch, via_verb)
    x = images(1, seed=5)[0]["pixel_values"]
    with torch.no_grad():
        assert torch.equal(forward_logits(via_dispatch.eval(), x), forward_logits(via_verb.eval(), x))


def test_quantize_dkm_prepares_and_finalize_dkm_ends_it():
    model = make_timm("test_resnet").eval()
    config = PalettizeConfig(bits=2, method="dkm")
    via_dispatch = quantize_(copy.deepcopy(model), config)
    via_verb = prepare_dkm(copy.deepcopy(model), config)
    assert is_dkm_prepared(via_dispatch) and is_dkm_prepared(via_verb)
    _assert_same_model(via_dispatch, via_verb)
    finalize_dkm(via_dispatch)
    finalize_dkm(via_verb)
    assert not is_dkm_prepared(via_dispatch)
    _assert_same_model(via_dispatch, via_verb)
    for (_, a), (_, b) in zip(find_target_modules(via_dispatch), find_target_modules(via_verb)):
        assert torch.equal(a.weight_palette, b.weight_palette)


def test_quantize_adaround_rounds_a_quantized_model_as_adaround_does():
    model = post_training_quantize_(make_timm("test_resnet").eval(), PTQConfig(w_bits=2, a_bits=None, bn="keep"))
    config = AdaRoundConfig(iters=3, num_samples=64)
    data = images(2)
    torch.manual_seed(0)
    via_dispatch = quantize_(copy.deepcopy(model), config, data)
    torch.manual_seed(0)
    via_verb = adaround_(copy.deepcopy(model), data, config)
    _assert_same_model(via_dispatch, via_verb)
    with pytest.raises(ValueError, match=r"AdaRound learns each layer's rounding on `calibration_data`"):
        quantize_(copy.deepcopy(model), config)


def test_every_config_applied_today_is_registered():
    assert set(registered_quantize_configs()) == {
        PTQConfig, AdaRoundConfig, BlockReconstructionConfig, EqualizeConfig, MagRConfig, QATConfig, PalettizeConfig}


@pytest.mark.parametrize("config", [{"w_bits": 2}, None, object()])
def test_quantize_rejects_other_configs_naming_the_registered_ones(config):
    model = make_timm("test_resnet")
    with pytest.raises(TypeError, match=r"takes one of the registered configs \(.*`PTQConfig`.*\), got ") as err:
        quantize_(model, config)
    for cls in registered_quantize_configs():
        assert f"`{cls.__name__}`" in str(err.value)


def test_a_new_method_is_one_registration(monkeypatch):
    """A config class and its handler, registered: `quantize_` runs it (for subclasses too), it is listed among the
    registered configs, and registering the class again replaces the handler with a warning."""
    monkeypatch.setattr(quant_api, "_HANDLERS", dict(quant_api._HANDLERS))  # leave the real registry as it was
    calls = []

    class ZeroConfig:
        pass

    class ChildConfig(ZeroConfig):
        pass

    @register_quantize_handler(ZeroConfig)
    def zero_weights_(model, config, calibration_data=None):
        calls.append((type(config).__name__, calibration_data))
        with torch.no_grad():
            for _, module in find_target_modules(model):
                module.weight.zero_()
        return model

    model = make_timm("test_resnet")
    assert quantize_(model, ZeroConfig(), "data") is model
    assert all(float(m.weight.detach().abs().max()) == 0 for _, m in find_target_modules(model))
    quantize_(make_timm("test_resnet"), ChildConfig())
    assert calls == [("ZeroConfig", "data"), ("ChildConfig", None)]
    assert ZeroConfig in registered_quantize_configs()

    def other(model, config, calibration_data=None):
        return model

    with pytest.warns(UserWarning, match=r"handler for ZeroConfig is replaced by other"):
        register_quantize_handler(ZeroConfig)(other)
    with pytest.raises(TypeError, match=r"takes a config class"):
        register_quantize_handler("ZeroConfig")


# ---- data-free weight-only PTQ ------------------------------------------------------------------------------------


def _ref_maxabs_rounding(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute force, float64, per output channel: the symmetric max-abs grid (`c * (2k + 1) / n`, n = 2^bits - 1,
    c = max |w|; 1 bit: `+-mean |w|`) and each weight's distance to its nearest level."""
    out_levels, best = [], []
    for row in w.double().reshape(w.shape[0], -1):
        n = 2**bits - 1
        levels = (torch.stack([-row.abs().mean(), row.abs().mean()]) if bits == 1
                  else row.abs().max() * torch.arange(-n, n + 1, 2, dtype=torch.float64) / n)
        out_levels.append(levels)
        best.append((row[:, None] - levels[None, :]).abs().min(1).values)
    return out_levels, best


def _distinct_per_channel(w: torch.Tensor) -> int:
    return max(row.unique().numel() for row in w.reshape(w.shape[0], -1))


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_weight_only_ptq_is_data_free_and_exports(bits, tmp_path):
    model = make_timm("test_resnet").eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    targets = [name for name, _ in find_target_modules(model)]
    config = PTQConfig(w_bits=bits, a_bits=None, bn="keep", weight_range="maxabs", first_last_bits=None)
    assert not config.needs_data
    assert quantize_(model, config) is model  # no calibration data
    layers = dict(quantized_layers(model))
    assert list(layers) == targets
    for name, module in layers.items():
        assert module.input_quantizer is None
        with torch.no_grad():
            got = module.quantized_weight()
        w = before[f"{name}.weight"]
        # every value lies on the brute-force grid of its channel, and is a nearest level of its weight
        levels, best = _ref_maxabs_rounding(w, bits)
        for c, row in enumerate(got.double().reshape(got.shape[0], -1)):
            tol = 1e-6 * max(levels[c].abs().max().item(), 1e-12)
            assert (row[:, None] - levels[c][None, :]).abs().min(1).values.max() <= tol, name
            assert ((row - w.double().reshape(w.shape[0], -1)[c]).abs() <= best[c] + tol).all(), name
        assert _distinct_per_channel(got) <= 2**bits, name
    for key, value in model.state_dict().items():  # the float weights, biases and BN statistics are untouched
        if key in before:
            assert torch.equal(value, before[key]), key

    save_low_bit(model, tmp_path / "w-only", method="ptq", method_config=config.to_dict())
    loaded, description = load_low_bit(tmp_path / "w-only")
    assert description["method_config"] == config.to_dict()
    assert {info["bits"] for info in description["layers"].values()} == {bits}
    assert all("input_bits" not in info for info in description["layers"].values())
    x = images(1, seed=3)[0]["pixel_values"]
    with torch.no_grad():
        torch.testing.assert_close(forward_logits(loaded, x), forward_logits(model, x), rtol=1e-5, atol=1e-5)
