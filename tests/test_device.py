"""hf-r2 on the device named by `HF_R2_TEST_DEVICE` (default `cpu`; `cuda` on a GPU machine, see
`benchmarks/gpu_check.sh`): R2's batched kernels, a bf16 training step, DKM, PTQ and R2Trainer, each against a
reference computed on the CPU. On the CPU this is the same code path as elsewhere in the suite; on a GPU it is the
check that nothing assumes the CPU (every tensor made on the weights' device, no hidden host copies)."""

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import TinyImages, conv_net, make_timm, perturb_r2_params, r2_reference_total

from hf_r2 import R2Config, R2Regularizer, R2Trainer, R2TrainingArguments
from hf_r2.models import forward_logits
from hf_r2.quant import PalettizeConfig, PTQConfig, prepare_dkm, quantize_

DEVICE = torch.device(os.environ.get("HF_R2_TEST_DEVICE", "cpu"))


@pytest.fixture
def device(monkeypatch) -> torch.device:
    if DEVICE.type == "cuda":
        if not torch.cuda.is_available():
            pytest.fail("HF_R2_TEST_DEVICE=cuda but torch.cuda.is_available() is False")
        # full float32 convolutions and matmuls: the comparisons with the CPU test hf-r2's code, not TF32
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    return DEVICE


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("loss", ["linf", "margin", "soft_min_max", "kurtosis"])
def test_regularizer_on_device_matches_the_functional_losses(device, loss, per_channel):
    model = make_timm("test_efficientnet").to(device)  # many small layers: every kernel path
    reg = R2Regularizer(model, R2Config(loss=loss, per_channel=per_channel, margin_penalty=0.5)).to(device)
    perturb_r2_params(reg)
    # the functional losses, layer by layer, on float64 CPU copies
    ref_weights = [w.detach().cpu().double().requires_grad_() for w in reg.weights()]
    expected, _, _ = r2_reference_total(reg, ref_weights)
    grads = torch.autograd.grad(expected, ref_weights)
    value = reg()
    value.backward()
    assert value.device.type == device.type and value.dtype == torch.float32
    assert value.item() == pytest.approx(expected.item(), rel=1e-4)
    tol = dict(rtol=1e-3, atol=1e-6) if loss in ("soft_min_max", "kurtosis") else dict(rtol=1e-5, atol=1e-7)
    for w, ref in zip(reg.weights(), grads):
        got = torch.zeros_like(w) if w.grad is None else w.grad
        assert got.device.type == device.type and got.layout == torch.strided
        torch.testing.assert_close(got.cpu().double(), ref, **tol)


def test_a_bf16_training_step_on_device(device):
    """Task loss + lambda R2 under bf16 autocast, one SGD step: R2 stays float32, every gradient is dense and finite,
    and the step equals the same step on the CPU (bf16 rounding apart)."""
    results = []
    for dev in dict.fromkeys([torch.device("cpu"), device]):
        torch.manual_seed(0)
        model = make_timm("test_resnet").to(dev)
        reg = R2Regularizer(model, R2Config(loss="linf", per_channel=True, weight=0.5)).to(dev)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        x, y = torch.randn(4, 3, 32, 32).to(dev), torch.arange(4, device=dev)  # the same images on both
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            r2 = reg()
            loss = F.cross_entropy(forward_logits(model, x).float(), y) + 0.5 * r2
        assert r2.dtype == torch.float32
        loss.backward()
        assert all(p.grad.layout == torch.strided and torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
        results.append([p.detach().cpu() for p in model.parameters()])
    for a, b in zip(results[0], results[-1]):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_dkm_and_ptq_on_device_match_the_cpu(device):
    base = conv_net().eval()
    x = torch.randn(2, 3, 16, 16)
    outs = {}
    for dev in dict.fromkeys([torch.device("cpu"), device]):
        dkm = prepare_dkm(copy.deepcopy(base).to(dev), PalettizeConfig(bits=2, method="dkm"))
        y = forward_logits(dkm, x.to(dev))
        y.square().sum().backward()
        grads = [p.grad.detach().cpu() for p in dkm.parameters() if p.grad is not None]
        calib = [{"pixel_values": torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(i))}
                 for i in range(2)]
        ptq = quantize_(copy.deepcopy(base).to(dev), PTQConfig(w_bits=2, a_bits=8, calibration_batches=2), calib)
        with torch.no_grad():
            outs[dev.type] = (y.detach().cpu(), grads, forward_logits(ptq, x.to(dev)).cpu())
    cpu, dev = outs["cpu"], outs[device.type]
    torch.testing.assert_close(dev[0], cpu[0], rtol=1e-4, atol=1e-5)
    assert len(dev[1]) == len(cpu[1]) > 0
    for a, b in zip(dev[1], cpu[1]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(dev[2], cpu[2], rtol=1e-3, atol=1e-3)


def test_r2trainer_on_device(device, tmp_path):
    """A few R2Trainer steps on the device (bf16 on a GPU): R2 logged, finite, the weights moved and stayed there."""
    model = make_timm("test_resnet")
    before = [p.detach().clone() for p in model.parameters()]
    on_gpu = device.type == "cuda"
    args = R2TrainingArguments(output_dir=str(tmp_path), use_cpu=not on_gpu, bf16=on_gpu, report_to="none",
                               disable_tqdm=True, dataloader_num_workers=0, save_strategy="no", logging_steps=1,
                               per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2, seed=0,
                               r2_loss="margin", r2_weight=0.5)
    trainer = R2Trainer(model, args, train_dataset=TinyImages(16))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "r2_loss" in h]
    assert len(logs) == 3 and all(torch.isfinite(torch.tensor([h["loss"], h["r2_loss"]])).all() for h in logs)
    assert all(p.device.type == device.type for p in model.parameters())
    assert max((p.detach().cpu() - b).abs().max().item() for p, b in zip(model.parameters(), before)) > 0
