"""`hf_r2.quant.export`: bit packing against a brute-force bit loop, `save_low_bit` -> `load_low_bit` giving the
same logits (timm and transformers, PTQ and QAT), the saved codes decoding to exactly the fake-quantized weights,
`size_report` against a hand count, atomic saving, and load errors."""

import json
import math
import os

import pytest
import safetensors.torch
import torch
from conftest import make_timm
from torch import nn

from hf_r2.models import classification_loss, forward_logits
from hf_r2.quant.export import (
    LOW_BIT_CONFIG_NAME,
    LOW_BIT_WEIGHTS_NAME,
    is_low_bit_folder,
    load_low_bit,
    low_bit_layers,
    pack_bits,
    save_low_bit,
    size_report,
    unpack_bits,
)
from hf_r2.quant.layers import QuantLayerMixin, quantized_layers
from hf_r2.quant.ptq import PTQConfig, post_training_quantize_
from hf_r2.quant.qat import QATConfig, prepare_qat

# ---- bit packing ----------------------------------------------------------------------------------------------------


def ref_pack(codes: list[int], bits: int) -> list[int]:
    """Bit `j` of code `i` goes to bit `(i * bits + j) % 8` of byte `(i * bits + j) // 8`."""
    out = [0] * math.ceil(len(codes) * bits / 8)
    for i, code in enumerate(codes):
        for j in range(bits):
            pos = i * bits + j
            out[pos // 8] |= ((code >> j) & 1) << (pos % 8)
    return out


def ref_unpack(packed: list[int], bits: int, numel: int) -> list[int]:
    codes = []
    for i in range(numel):
        code = 0
        for j in range(bits):
            pos = i * bits + j
            code |= ((packed[pos // 8] >> (pos % 8)) & 1) << j
        codes.append(code)
    return codes


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("numel", [0, 1, 7, 37, 64])
def test_pack_unpack_match_a_bit_loop(bits, numel):
    g = torch.Generator().manual_seed(bits * 100 + numel)
    codes = torch.randint(0, 2**bits, (numel,), generator=g, dtype=torch.int64).to(torch.uint8)
    if numel:
        codes[0] = 2**bits - 1  # the top code survives
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == math.ceil(numel * bits / 8)
    assert packed.tolist() == ref_pack(codes.tolist(), bits)
    unpacked = unpack_bits(packed, bits, numel)
    assert unpacked.dtype == torch.uint8 and torch.equal(unpacked, codes)
    assert ref_unpack(packed.tolist(), bits, numel) == codes.tolist()


def test_pack_bits_flattens_any_shape():
    codes = torch.randint(0, 8, (4, 3, 2, 5), dtype=torch.int64).to(torch.uint8)
    packed = pack_bits(codes, 3)
    assert packed.tolist() == ref_pack(codes.flatten().tolist(), 3)
    assert torch.equal(unpack_bits(packed, 3, codes.numel()).reshape(codes.shape), codes)


# ---- building models to export --------------------------------------------------------------------------------------


def images(n: int, batch: int = 4, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "pixel_values": torch.randn(batch, 3, 32, 32, generator=g),
            "labels": torch.randint(0, 10, (batch,), generator=g),
        }
        for _ in range(n)
    ]


def _train(model: nn.Module, steps: int = 2) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for batch in images(steps, seed=11):
        loss, _ = classification_loss(model, batch["pixel_values"], batch["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()


def build(request, fixture: str, method: str, config):
    model = request.getfixturevalue(fixture)
    if method == "ptq":
        post_training_quantize_(model, config, images(2))
    else:
        prepare_qat(model, config, images(1))
        _train(model)
    return model.eval()


CASES = [
    ("timm_cnn", "ptq", PTQConfig(w_bits=2, a_bits=8, calibration_batches=2)),
    ("timm_vit", "ptq", PTQConfig(w_bits=4, a_bits=8, bn="keep", weight_range="maxabs")),
    ("hf_convnext", "ptq", PTQConfig(w_bits=3, a_bits=None, bn="keep", per_channel=False, first_last_bits=None)),
    ("timm_cnn", "qat", QATConfig(w_bits=2, a_bits=None)),
    ("hf_resnet", "qat", QATConfig(w_bits=2, a_bits=2, first_last_bits=4)),
]


def _saved_tensors(folder) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(os.path.join(folder, LOW_BIT_WEIGHTS_NAME))


# ---- save -> load ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture,method,config", CASES, ids=[f"{f}-{m}" for f, m, _ in CASES])
def test_save_load_gives_identical_logits_and_exact_codes(request, tmp_path, fixture, method, config):
    model = build(request, fixture, method, config)
    x = images(1, seed=3)[0]["pixel_values"]
    with torch.no_grad():
        y = forward_logits(model, x)
    folder = tmp_path / "export"
    description = save_low_bit(model, folder, method=method, method_config=config.to_dict(), base_model="tiny")
    assert is_low_bit_folder(folder)
    on_disk = json.loads((folder / LOW_BIT_CONFIG_NAME).read_text())
    assert on_disk == json.loads(json.dumps(description))
    assert on_disk["format_version"] == 1 and on_disk["method"] == method and on_disk["base_model"] == "tiny"
    assert on_disk["library"] == ("transformers" if fixture.startswith("hf_") else "timm")
    assert type(config).from_dict(on_disk["method_config"]) == config
    assert not (folder / "model.safetensors").exists()  # no float weights of the low-bit layers

    # the saved codes, decoded with the reference bit loop, are exactly the weights the model used
    tensors = _saved_tensors(folder)
    assert not any("_quantizer." in k for k in tensors)
    layers = dict(quantized_layers(model))
    assert set(on_disk["layers"]) == set(layers)
    for name, m in layers.items():
        info = on_disk["layers"][name]
        bits, shape = info["bits"], info["shape"]
        assert bits == m.weight_quantizer.bits and shape == list(m.weight.shape)
        assert f"{name}.weight" not in tensors
        packed = tensors[f"{name}.weight.codes"]
        assert packed.numel() == math.ceil(m.weight.numel() * bits / 8)
        codes = torch.tensor(ref_unpack(packed.tolist(), bits, m.weight.numel()), dtype=torch.float32).reshape(shape)
        assert codes.max() <= 2**bits - 1
        view = [-1] + [1] * (codes.dim() - 1)
        scale, zero_point = tensors[f"{name}.weight.scale"], tensors[f"{name}.weight.zero_point"]
        per_channel = getattr(config, "per_channel", True)
        assert scale.numel() == (shape[0] if per_channel else 1)
        with torch.no_grad():
            expected = m.quantized_weight()
        assert torch.equal((codes - zero_point.reshape(view)) * scale.reshape(view), expected), name
        if m.input_quantizer is not None:
            assert info["input_bits"] == m.input_quantizer.bits
            assert tensors[f"{name}.input.scale"].item() == m.input_quantizer.scale.abs().item()
        else:
            assert "input_bits" not in info

    loaded, loaded_description = load_low_bit(folder)
    assert loaded_description == on_disk
    assert not loaded.training
    with torch.no_grad():
        y2 = forward_logits(loaded, x)
    torch.testing.assert_close(y2, y, rtol=0, atol=0)
    loaded_modules = dict(loaded.named_modules())
    for name, m in layers.items():
        lm = loaded_modules[name]
        with torch.no_grad():
            assert torch.equal(lm.weight, m.quantized_weight())
        assert isinstance(lm, QuantLayerMixin) == (m.input_quantizer is not None)
        if m.input_quantizer is not None:
            assert lm.weight_quantizer is None and not lm.input_quantizer.learnable


def test_size_report_matches_a_hand_count(request, tmp_path):
    model = build(request, "timm_cnn", "ptq", PTQConfig(w_bits=2, a_bits=8, calibration_batches=2))
    float_model = make_timm("test_resnet")
    float_bytes = sum(t.numel() * t.element_size() for t in float_model.state_dict().values())
    layers = low_bit_layers(model)
    report = size_report(layers)
    numel = bits = side = 0
    for name, m in quantized_layers(model):
        c = m.weight.shape[0]  # per channel: one scale and one zero point per output channel
        numel += m.weight.numel()
        bits += m.weight.numel() * m.weight_quantizer.bits
        side += 32 * (c + c)
        assert layers[name].bits == m.weight_quantizer.bits
    assert report["low_bit_layers"] == len(quantized_layers(model))
    assert report["low_bit_weights"] == numel
    assert report["code_bits_per_weight"] == pytest.approx(bits / numel, rel=1e-12)
    assert report["bits_per_weight"] == pytest.approx((bits + side) / numel, rel=1e-12)
    assert 2 < report["bits_per_weight"] < 2.5  # mostly 2-bit layers, 8-bit stem and head
    full = size_report(layers, model)
    assert full["float_bytes"] == float_bytes  # the float architecture, quantizers not counted
    # the low-bit size is what the export holds: every tensor of low_bit.safetensors
    save_low_bit(model, tmp_path / "out")
    saved = sum(t.numel() * t.element_size() for t in _saved_tensors(tmp_path / "out").values())
    assert full["low_bit_bytes"] == saved
    assert full["compression"] == pytest.approx(float_bytes / saved)


# ---- atomic saving --------------------------------------------------------------------------------------------------


def _snapshot(folder) -> dict[str, bytes]:
    return {
        os.path.relpath(os.path.join(root, f), folder): open(os.path.join(root, f), "rb").read()
        for root, _, files in os.walk(folder)
        for f in files
    }


def test_save_over_an_existing_folder_keeps_other_files(request, tmp_path):
    model = build(request, "hf_convnext", "ptq", PTQConfig(w_bits=2, a_bits=None, bn="keep"))
    folder = tmp_path / "export"
    save_low_bit(model, folder, method="ptq")
    (folder / "README.md").write_text("card")
    (folder / "results").mkdir()
    (folder / "results" / "eval.json").write_text("{}")
    post_training_quantize_(model, PTQConfig(w_bits=4, a_bits=None, bn="keep"))  # re-quantize at 4 bits, save again
    save_low_bit(model, folder, method="ptq4")
    assert (folder / "README.md").read_text() == "card"
    assert (folder / "results" / "eval.json").read_text() == "{}"
    description = json.loads((folder / LOW_BIT_CONFIG_NAME).read_text())
    assert description["method"] == "ptq4"
    assert {info["bits"] for info in description["layers"].values()} == {4, 8}
    assert sorted(os.listdir(tmp_path)) == ["export"]  # no temporary folder left behind
    loaded, _ = load_low_bit(folder)
    x = images(1)[0]["pixel_values"]
    with torch.no_grad():
        torch.testing.assert_close(forward_logits(loaded, x), forward_logits(model, x), rtol=0, atol=0)


def test_a_failed_save_leaves_the_old_export_intact(request, tmp_path, monkeypatch):
    model = build(request, "timm_cnn", "ptq", PTQConfig(w_bits=2, a_bits=None, bn="keep"))
    folder = tmp_path / "export"
    save_low_bit(model, folder)
    (folder / "README.md").write_text("card")
    before = _snapshot(folder)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    post_training_quantize_(model, PTQConfig(w_bits=4, a_bits=None, bn="keep"))
    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_low_bit(model, folder)
    assert _snapshot(folder) == before
    with pytest.raises(OSError, match="disk full"):
        save_low_bit(model, tmp_path / "new")
    assert sorted(os.listdir(tmp_path)) == ["export"]  # no partial folder, no temporary folder
    monkeypatch.undo()
    loaded, description = load_low_bit(folder)  # still the old, 2-bit export
    assert {info["bits"] for info in description["layers"].values()} == {2, 8}


# ---- errors ---------------------------------------------------------------------------------------------------------


def test_load_errors(request, tmp_path):
    with pytest.raises(FileNotFoundError, match="has no low_bit_config.json"):
        load_low_bit(tmp_path)
    model = build(request, "timm_cnn", "ptq", PTQConfig(w_bits=2, a_bits=None, bn="keep"))
    folder = tmp_path / "export"
    save_low_bit(model, folder)
    path = folder / LOW_BIT_CONFIG_NAME
    description = json.loads(path.read_text())
    path.write_text(json.dumps({**description, "format_version": 2}))
    with pytest.raises(ValueError, match="holds low-bit format version 2; this hf-r2 reads version 1"):
        load_low_bit(folder)
    path.write_text(json.dumps({k: v for k, v in description.items() if k != "format_version"}))
    with pytest.raises(ValueError, match="format version None"):
        load_low_bit(folder)
    path.write_text(json.dumps(description))
    tensors = _saved_tensors(folder)
    tensors["not.a.weight"] = torch.zeros(1)
    safetensors.torch.save_file(tensors, str(folder / LOW_BIT_WEIGHTS_NAME))
    with pytest.raises(
        ValueError, match=r"does not match its architecture: missing \[\], unexpected \['not.a.weight'\]"
    ):
        load_low_bit(folder)


def test_export_errors(tmp_path):
    with pytest.raises(ValueError, match="no quantized or palettized layer"):
        low_bit_layers(make_timm("test_resnet"))
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 30 * 30, 10))
    post_training_quantize_(plain, PTQConfig(w_bits=2, a_bits=None, bn="keep"))
    assert set(low_bit_layers(plain)) == {"0", "2"}
    with pytest.raises(ValueError, match="needs a timm or transformers model"):
        save_low_bit(plain, tmp_path / "unused")
    assert os.listdir(tmp_path) == []  # the temporary folder is removed too


def test_convert_codes_of_an_all_zero_channel(tmp_path):
    model = make_timm("test_resnet").eval()
    with torch.no_grad():
        model.fc.weight[3] = 0
    post_training_quantize_(model, PTQConfig(w_bits=2, a_bits=None, bn="keep", first_last_bits=None))
    layer = low_bit_layers(model)["fc"]
    assert layer.scale[3] == 0
    assert torch.equal(layer.dequantize()[3], torch.zeros_like(model.fc.weight[3]))
    save_low_bit(model, tmp_path / "z")
    loaded, _ = load_low_bit(tmp_path / "z")
    assert torch.equal(loaded.fc.weight[3], torch.zeros_like(model.fc.weight[3]))
    x = images(1)[0]["pixel_values"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_loaded_model_is_independent_of_the_exported_one(request, tmp_path):
    model = build(request, "timm_cnn", "ptq", PTQConfig(w_bits=2, a_bits=8, calibration_batches=2))
    save_low_bit(model, tmp_path / "e")
    loaded, _ = load_low_bit(tmp_path / "e")
    x = images(1)[0]["pixel_values"]
    with torch.no_grad():
        ref = forward_logits(loaded, x)
        for p in model.parameters():
            p.add_(1.0)
    with torch.no_grad():
        torch.testing.assert_close(forward_logits(loaded, x), ref, rtol=0, atol=0)


def test_negative_step_sizes_export_as_their_magnitude(request, tmp_path):
    # an optimizer may push an LSQ step below 0; the layer uses |s|, and so must the export
    model = build(request, "timm_cnn", "qat", QATConfig(w_bits=2, a_bits=4))
    with torch.no_grad():
        for _, m in quantized_layers(model)[::2]:
            m.weight_quantizer.scale[::2] *= -1
            m.input_quantizer.scale.neg_()
    save_low_bit(model, tmp_path / "neg")
    tensors = _saved_tensors(tmp_path / "neg")
    assert all((t >= 0).all() for k, t in tensors.items() if k.endswith(".scale"))
    loaded, _ = load_low_bit(tmp_path / "neg")
    x = images(1)[0]["pixel_values"]
    with torch.no_grad():
        torch.testing.assert_close(forward_logits(loaded, x), forward_logits(model, x), rtol=0, atol=0)


def test_save_load_after_bn_folding(request, tmp_path):
    """The folded (conv, bn) pairs are recorded in the JSON and the loader rebuilds that structure."""
    model = build(request, "timm_cnn", "ptq", PTQConfig(w_bits=2, a_bits=8, bn="fold", calibration_batches=2))
    description = save_low_bit(model, tmp_path / "folded")
    assert description["folded_bn"] and all(len(pair) == 2 for pair in description["folded_bn"])
    loaded, _ = load_low_bit(tmp_path / "folded")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in loaded.modules())
    x = images(1)[0]["pixel_values"]
    with torch.no_grad():
        torch.testing.assert_close(forward_logits(loaded, x), forward_logits(model, x), rtol=0, atol=0)
