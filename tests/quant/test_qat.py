"""`hf_r2.quant.qat`: what `prepare_qat` builds, that training moves the LSQ step sizes, that QAT at 2 bits beats
PTQ at 2 bits from the same weights, and that a prepared model trains with `R2Trainer` and R2-Loss."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import TinyImages
from torch import nn

from hf_r2 import R2Trainer, R2TrainingArguments
from hf_r2.models import classification_loss
from hf_r2.quant.layers import FakeQuantizer, quantized_layers
from hf_r2.quant.ptq import PTQConfig, post_training_quantize_
from hf_r2.quant.qat import QATConfig, prepare_qat
from hf_r2.regularizer import find_target_modules


def batches(n: int, batch: int = 4, seed: int = 1) -> list[dict]:
    data = TinyImages(n * batch, seed)
    return [
        {"pixel_values": data.x[i : i + batch], "labels": data.y[i : i + batch]} for i in range(0, n * batch, batch)
    ]


def scales(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, m in quantized_layers(model):
        for kind in ("weight_quantizer", "input_quantizer"):
            q = getattr(m, kind)
            if q is not None:
                out[f"{name}.{kind}"] = q.scale.detach().clone()
    return out


def ref_symmetric_error(row: torch.Tensor, bits: int, ratios) -> float:
    """Brute force, float64: the least squared rounding error of `row` over the symmetric `bits`-bit grids
    `c * (2k + 1) / n` (n = 2^bits - 1, c = ratio * max |w|) of the given clip ratios (as in test_uniform.py)."""
    row = row.double()
    n = 2**bits - 1
    best = float("inf")
    for ratio in ratios:
        levels = row.abs().max() * ratio * torch.arange(-n, n + 1, 2, dtype=torch.float64) / n
        nearest = levels[(row[:, None] - levels[None, :]).abs().argmin(1)]
        best = min(best, ((nearest - row) ** 2).sum().item())
    return best


def grid_error(row: torch.Tensor, scale: float, zero_point: float, bits: int) -> float:
    """Squared rounding error of `row` on the grid `(q - zero_point) * scale`, q = 0 .. 2^bits - 1."""
    row = row.double()
    levels = (torch.arange(2**bits, dtype=torch.float64) - zero_point) * scale
    nearest = levels[(row[:, None] - levels[None, :]).abs().argmin(1)]
    return ((nearest - row) ** 2).sum().item()


# ---- prepare_qat ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weight_init", ["mse", "maxabs"])
def test_prepare_qat_builds_learnable_quantizers(timm_cnn, weight_init):
    model = timm_cnn
    targets = find_target_modules(model)
    originals = [m.weight.detach().clone() for _, m in targets]
    params_before = {id(p) for p in model.parameters()}
    prepare_qat(model, QATConfig(w_bits=2, a_bits=2, weight_init=weight_init), calibration_data=batches(2))
    layers = quantized_layers(model)
    assert [n for n, _ in layers] == [n for n, _ in targets]
    for i, ((name, m), w) in enumerate(zip(layers, originals)):
        bits = 8 if i in (0, len(layers) - 1) else 2
        wq, iq = m.weight_quantizer, m.input_quantizer
        assert wq.bits == bits and iq.bits == bits and wq.symmetric and not iq.symmetric and wq.per_channel
        assert wq.learnable and wq.scale.requires_grad and iq.learnable and iq.scale.requires_grad
        assert bool(wq.initialized) and bool(iq.initialized) and iq.enabled  # calibrated
        # each channel's grid is the symmetric grid of least error (mse: over clip ratios 1.0 .. 0.2; maxabs: 1.0)
        ratios = torch.linspace(1.0, 0.2, 100).tolist() if weight_init == "mse" else [1.0]
        for c, row in enumerate(w.reshape(w.shape[0], -1)):
            scale, zero = wq.scale[c].item(), wq.zero_point[c].item()
            assert zero == pytest.approx((2**bits - 1) / 2)  # symmetric: mid-rise, no level at 0
            assert grid_error(row, scale, zero, bits) == pytest.approx(
                ref_symmetric_error(row, bits, ratios), rel=1e-4, abs=1e-10)
        assert torch.equal(m.weight.detach(), w)
    # the old parameters are all still there, plus one step-size tensor per quantizer
    new = [n for n, p in model.named_parameters() if id(p) not in params_before]
    assert sorted(new) == sorted(f"{n}.{k}.scale" for n, _ in layers for k in ("weight_quantizer", "input_quantizer"))


def test_prepare_qat_without_calibration_initialises_on_the_first_batch(timm_cnn):
    model = timm_cnn
    prepare_qat(model, QATConfig(w_bits=4, a_bits=4, learn_scales=False))
    iqs = [m.input_quantizer for _, m in quantized_layers(model)]
    assert not any(bool(q.initialized) for q in iqs)
    assert not any(q.scale.requires_grad for q in iqs)
    x = batches(1)[0]["pixel_values"]
    model.train()(x)
    assert all(bool(q.initialized) for q in iqs)
    # the stem's grid is the MSE grid of that batch: never a larger error than its min-max grid
    iq = iqs[0]
    lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    assert iq.zero_point.item() > 0 and iq.scale.item() <= (hi - lo) / 255 * (1 + 1e-6)
    with pytest.raises(ValueError, match="gave no batch"):
        prepare_qat(copy.deepcopy(model), QATConfig(), calibration_data=[])
    with pytest.raises(TypeError, match="`config` must be a `QATConfig`, got PTQConfig"):
        prepare_qat(model, PTQConfig())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(w_bits=0), "`w_bits` must be an integer from 1 to 8, got 0"),
        (dict(a_bits=1), r"`a_bits` must be an integer from 2 to 8 or `None`, got 1"),
        (dict(first_last_bits=16), "`first_last_bits` must be an integer from 1 to 8 or `None`"),
        (dict(learn_scales=1), "`learn_scales` must be `True` or `False`, got 1"),
        (dict(per_channel=None), "`per_channel` must be `True` or `False`"),
        (dict(weight_init="percentile"), "`weight_init` must be one of 'maxabs', 'mse', got 'percentile'"),
        (dict(act_observer="max"), "`act_observer` must be one of 'minmax', 'percentile', 'mse'"),
        (dict(calibration_batches=-1), "`calibration_batches` must be a positive integer, got -1"),
        (dict(include=["["]), "`include` holds an invalid regular expression"),
    ],
)
def test_bad_config_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QATConfig(**kwargs)


# ---- training -------------------------------------------------------------------------------------------------------


def test_training_on_tiny_cifar_moves_the_step_sizes(timm_cnn, tiny_cifar_dir):
    from hf_r2.data import collate_fn, load_image_dataset, with_transforms

    model = timm_cnn
    data = load_image_dataset(str(tiny_cifar_dir), max_train_samples=24)
    train = with_transforms(data["train"], model, train=False)
    loader = torch.utils.data.DataLoader(train, batch_size=8, collate_fn=collate_fn)
    prepare_qat(model, QATConfig(w_bits=2, a_bits=2), calibration_data=loader)
    before = scales(model)
    weights_before = {n: m.weight.detach().clone() for n, m in quantized_layers(model)}
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)  # built after prepare_qat: it sees the step sizes
    model.train()
    losses = []
    for batch in loader:
        loss, _ = classification_loss(model, batch["pixel_values"], batch["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    after = scales(model)
    for name in before:
        assert not torch.equal(before[name], after[name]), name
        assert torch.isfinite(after[name]).all() and (after[name] != 0).all(), name
    for name, m in quantized_layers(model):
        assert not torch.equal(weights_before[name], m.weight.detach()), name


def _teacher_task(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 16, generator=g)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        y = teacher(x).argmax(1)
    return x, y


def _fit(model: nn.Module, x, y, steps: int, lr: float) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def _loss_acc(model: nn.Module, x, y) -> tuple[float, float]:
    with torch.no_grad():
        out = model(x)
    return F.cross_entropy(out, y).item(), (out.argmax(1) == y).float().mean().item()


@pytest.mark.parametrize("a_bits", [None, 2])
def test_qat_at_2_bits_beats_ptq_at_2_bits(a_bits):
    x, y = _teacher_task()
    torch.manual_seed(0)
    float_model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    _fit(float_model, x, y, steps=300, lr=1e-2)
    float_loss, float_acc = _loss_acc(float_model, x, y)
    assert float_acc > 0.97

    ptq = post_training_quantize_(
        copy.deepcopy(float_model), PTQConfig(w_bits=2, a_bits=a_bits, bn="keep", first_last_bits=None), [x]
    )
    ptq_loss, ptq_acc = _loss_acc(ptq, x, y)
    qat = prepare_qat(copy.deepcopy(float_model), QATConfig(w_bits=2, a_bits=a_bits, first_last_bits=None), [x])
    # same start: prepare_qat's grids are PTQ's (MSE weights, MSE activation observer)
    assert _loss_acc(qat, x, y) == (ptq_loss, ptq_acc)
    assert ptq_loss > 10 * float_loss  # 2 bits hurts
    _fit(qat, x, y, steps=60, lr=3e-3)
    qat_loss, qat_acc = _loss_acc(qat, x, y)
    assert qat_loss < 0.5 * ptq_loss, (qat_loss, ptq_loss)
    assert qat_acc > ptq_acc, (qat_acc, ptq_acc)
    # still 2 bits: at most 4 distinct values per output channel of every weight
    for _, m in quantized_layers(qat):
        with torch.no_grad():
            w = m.quantized_weight()
        assert max(row.unique().numel() for row in w) <= 4


# ---- with R2Trainer -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["timm_cnn", "hf_convnext"])
def test_prepared_model_trains_with_r2_trainer(request, tmp_path, fixture):
    model = request.getfixturevalue(fixture)
    prepare_qat(model, QATConfig(w_bits=2, a_bits=4), calibration_data=batches(1))
    before = scales(model)
    weights_before = {n: m.weight.detach().clone() for n, m in quantized_layers(model)}
    args = R2TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        logging_steps=1,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        seed=0,
        dataloader_num_workers=0,
        r2_loss="linf",
        r2_weight=0.1,
    )
    trainer = R2Trainer(model=model, args=args, train_dataset=TinyImages(8))
    # R2 acts on the quantized layers' float weights
    assert trainer.regularizer.names == [n for n, _ in quantized_layers(model)]
    trainer.train()
    logs = [log for log in trainer.state.log_history if "r2_loss" in log]
    assert len(logs) == 2 and all(log["r2_loss"] > 0 for log in logs)
    # the step sizes were optimised (and are not weight-decayed)
    step_params = {id(q.scale) for _, m in quantized_layers(model) for q in (m.weight_quantizer, m.input_quantizer)}
    in_opt = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert step_params <= in_opt
    assert not any(n.endswith("_quantizer.scale") for n in trainer.get_decay_parameter_names(model))
    after = scales(model)
    assert all(not torch.equal(before[n], after[n]) for n in before)
    for name, m in quantized_layers(model):
        assert isinstance(m.weight_quantizer, FakeQuantizer)
        assert not torch.equal(weights_before[name], m.weight.detach()), name
