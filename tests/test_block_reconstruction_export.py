"""Block reconstruction (BRECQ / QDrop, issue 25): the exported model gives the same top-1 as the in-memory one.

A tiny timm ResNet is reconstructed in a few iterations at W2A8 and W2A4 (below 8 bits the activation step sizes
are learnt, LSQ, so the export must carry the learnt ones, not the calibrated ones), saved with `save_low_bit`,
loaded back with `load_low_bit`, and exported to ONNX (int8 and int4 storage) and run in ONNX Runtime; on a fixed
batch every image keeps its top-1 and the logits stay close (identical for the safetensors round trip).
"""

import copy

import pytest
import torch
from conftest import make_timm

from hf_r2.models import forward_logits
from hf_r2.quant import BlockReconstructionConfig, quantize_
from hf_r2.quant.export import load_low_bit, save_low_bit
from hf_r2.quant.layers import quantized_layers


@pytest.fixture(scope="module")
def float_model():
    """A tiny timm ResNet whose top-1 varies from image to image (fresh from init it names one class for all, which
    an export that computes something else would match too): BN statistics from random images, a wider head."""
    torch.manual_seed(0)
    model = make_timm("test_resnet")
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # the plain mean over the batches below
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(16, 3, 32, 32, generator=g))
        torch.nn.init.normal_(model.get_classifier().weight, std=1.0)
        model.get_classifier().bias.zero_()
    return model.eval()


@pytest.fixture(scope="module")
def batch():
    return torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(7))


_RUNS: dict[int, tuple] = {}


def _reconstructed(float_model, a_bits: int):
    """`float_model` reconstructed at W2A`a_bits` (QDrop) on two random calibration batches (once per `a_bits`:
    the safetensors and the ONNX test check the same model)."""
    if a_bits not in _RUNS:
        config = BlockReconstructionConfig(w_bits=2, a_bits=a_bits, iters=20, batch_size=4, calibration_batches=2,
                                           drop_prob=0.5)
        _RUNS[a_bits] = quantize_(copy.deepcopy(float_model), config, _calibration()).eval(), config
    return _RUNS[a_bits]


def _calibration() -> list[dict]:
    g = torch.Generator().manual_seed(1)
    return [{"pixel_values": torch.randn(8, 3, 32, 32, generator=g)} for _ in range(2)]


def _calibrated_only(float_model, a_bits: int):
    """The same grids before any reconstruction step (round-to-nearest PTQ with the same calibration)."""
    config = BlockReconstructionConfig(w_bits=2, a_bits=a_bits, calibration_batches=2)
    return quantize_(copy.deepcopy(float_model), config.ptq_config(), _calibration()).eval(), config


@pytest.mark.parametrize("a_bits", [8, 4])
def test_low_bit_folder_gives_the_same_logits(tmp_path, float_model, batch, a_bits):
    model, config = _reconstructed(float_model, a_bits)
    if a_bits < 8:  # the case the export must get right: step sizes that reconstruction moved
        calibrated, _ = _calibrated_only(float_model, a_bits)
        moved = [name for name, m in quantized_layers(model) if m.input_quantizer is not None
                 and m.input_quantizer.bits < 8
                 and not torch.equal(m.input_quantizer.scale, dict(quantized_layers(calibrated))[name]
                                     .input_quantizer.scale)]
        assert moved, "no activation step size was learnt: the test would not cover LSQ"
    with torch.no_grad():
        expected = forward_logits(model, batch)
    assert len(set(expected.argmax(-1).tolist())) >= 4  # top-1 that says something
    save_low_bit(model, tmp_path / "export", method="block_reconstruction", method_config=config.to_dict())
    loaded, description = load_low_bit(tmp_path / "export")
    assert description["method"] == "block_reconstruction"
    with torch.no_grad():
        got = forward_logits(loaded, batch)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("storage", ["int8", "int4"])
@pytest.mark.parametrize("a_bits", [8, 4])
def test_onnx_gives_the_same_top1(tmp_path, float_model, batch, a_bits, storage):
    pytest.importorskip("onnx", reason="the ONNX export needs `pip install 'hf-r2[onnx]'` (onnx)")
    pytest.importorskip("onnxruntime", reason="the ONNX check needs `pip install 'hf-r2[onnx]'` (onnxruntime)")
    from hf_r2.quant.export import compare_onnx, export_onnx

    model, _ = _reconstructed(float_model, a_bits)
    path = tmp_path / f"w2a{a_bits}-{storage}.onnx"
    export_onnx(model, path, input_size=32, storage=storage)
    check = compare_onnx(model, path, batch)
    assert check["top1_agreement"] == 1.0, check
    assert check["passed"], check
