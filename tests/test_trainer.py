"""Tests for `hf_r2.trainer` (`R2Trainer`) and `hf_r2.training_args` (`R2TrainingArguments`)."""

import copy
import json
import logging
import math

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from conftest import TinyImages, make_timm
from transformers import TrainerCallback, TrainingArguments

from hf_r2._targets import find_target_modules
from hf_r2.config import R2Config
from hf_r2.losses import kurtosis_r2, linf_r2, margin_r2, soft_min_max_r2
from hf_r2.metrics import compute_accuracy
from hf_r2.models import create_model, forward_logits
from hf_r2.trainer import R2_STATE_NAME, R2_STATS_NAME, R2Trainer
from hf_r2.training_args import R2TrainingArguments

R2_LOG_KEYS = {"task_loss", "r2_loss", "r2_lambda", "r2_max_abs", "r2_mean_max_over_std", "r2_max_max_over_std"}


def _args(tmp_path, **kwargs) -> R2TrainingArguments:
    defaults = dict(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        save_strategy="no",
        logging_steps=1,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        max_steps=2,
        learning_rate=1e-2,
        seed=0,
    )
    return R2TrainingArguments(**{**defaults, **kwargs})


def _train_logs(trainer):
    return [log for log in trainer.state.log_history if "task_loss" in log]


def _hf_timm_wrapper():
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    return TimmWrapperForImageClassification(TimmWrapperConfig(architecture="test_resnet", num_labels=10))


def _hf_convnext():
    from transformers import ConvNextConfig, ConvNextForImageClassification

    cfg = ConvNextConfig(num_labels=10, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, patch_size=2)
    return ConvNextForImageClassification(cfg)


# ---------------------------------------------------------------------------------------------------------------
# R2Trainer: construction


def test_trainer_picks_r2_config(tmp_path, timm_cnn):
    trainer = R2Trainer(timm_cnn, _args(tmp_path, r2_loss="margin", r2_weight=0.3))
    assert trainer.regularizer.config.to_dict() == R2Config(loss="margin", weight=0.3).to_dict()
    # an explicit r2_config wins; plain TrainingArguments work with it
    plain = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", remove_unused_columns=False)
    trainer = R2Trainer(timm_cnn, plain, r2_config=R2Config(loss="kurtosis", weight=0.2))
    assert trainer.regularizer.config.loss == "kurtosis"
    # model weights are referenced, not copied, and stay out of the regularizer's state
    assert trainer.regularizer.weights()[0] is next(timm_cnn.parameters())
    assert "hf-r2" in R2Trainer._tag_names


def test_trainer_errors(tmp_path, timm_cnn):
    with pytest.raises(ValueError, match="needs a `model`"):
        R2Trainer(None, _args(tmp_path))
    with pytest.raises(ValueError, match="`label_smoothing_factor=0.1` is not supported"):
        R2Trainer(timm_cnn, _args(tmp_path, label_smoothing_factor=0.1))
    trainer = R2Trainer(timm_cnn, _args(tmp_path))
    with pytest.raises(ValueError, match=r"needs batches with `pixel_values` and `labels`, got keys \['image', 'l"):
        trainer.compute_loss(timm_cnn, {"image": torch.zeros(1, 3, 32, 32), "label": torch.zeros(1, dtype=torch.long)})


def test_create_optimizer_adds_r2_group(tmp_path, timm_cnn, caplog):
    trainer = R2Trainer(timm_cnn, _args(tmp_path, r2_loss="margin", weight_decay=0.05, learning_rate=3e-3))
    optimizer = trainer.create_optimizer()
    margin = trainer.regularizer.margin
    (group,) = [g for g in optimizer.param_groups if any(p is margin for p in g["params"])]
    assert group["weight_decay"] == 0.0 and group["lr"] == 3e-3 and len(group["params"]) == 1
    model_params = {id(p) for g in optimizer.param_groups if g is not group for p in g["params"]}
    assert model_params == {id(p) for p in timm_cnn.parameters()}
    assert any(g["weight_decay"] == 0.05 for g in optimizer.param_groups)
    # a user's own optimizer is left alone, with a warning that the margins are not trained
    own = torch.optim.SGD(timm_cnn.parameters(), lr=0.1)
    trainer = R2Trainer(timm_cnn, _args(tmp_path, r2_loss="margin"), optimizers=(own, None))
    with caplog.at_level(logging.WARNING, logger="hf_r2.trainer"):
        assert trainer.create_optimizer() is own
    assert len(own.param_groups) == 1 and "does not hold R2's learnable parameters (margin)" in caplog.text


# ---------------------------------------------------------------------------------------------------------------
# R2Trainer: gradient accumulation gives the same step as one big batch


def _reference_sgd_step(model, data, loss_kind, weight, lr):
    """One hand-written SGD step on `mean_i CE_i + weight * sum_l R(W_l)` (functional losses, float32)."""
    model = copy.deepcopy(model)
    layers = [m for _, m in find_target_modules(model)]
    margins = [m.weight.detach().abs().amax().clone().requires_grad_(True) for m in layers]
    logits = forward_logits(model, data.x)
    if loss_kind == "linf":
        r2 = sum(linf_r2(m.weight) for m in layers)
    else:
        r2 = sum(margin_r2(m.weight, mg) for m, mg in zip(layers, margins))
    loss = F.cross_entropy(logits, data.y) + weight * r2
    params = list(model.parameters())
    grads = torch.autograd.grad(loss, params + margins, allow_unused=True)
    with torch.no_grad():
        new = [p - lr * g if g is not None else p.detach() for p, g in zip(params + margins, grads)]
    return new[: len(params)], torch.stack(new[len(params) :])


@pytest.mark.parametrize("loss_kind", ["linf", "margin"])
def test_gradient_accumulation_matches_one_batch(tmp_path, loss_kind):
    """GA=1 x 7, GA=2 x (4+3) and GA=4 x (2+2+2+1) give the step of the hand-written full-batch loss."""
    base = _hf_convnext()  # layer norm, no batch norm: the step does not depend on how the batch is split
    data = TinyImages(n=7)
    weight, lr = 1.0, 0.5
    ref_params, ref_margins = _reference_sgd_step(base, data, loss_kind, weight, lr)
    no_r2_params, _ = _reference_sgd_step(base, data, loss_kind, 0.0, lr)
    for ga, bs in [(1, 7), (2, 4), (4, 2)]:
        model = copy.deepcopy(base)
        args = _args(
            tmp_path / f"ga{ga}", max_steps=1, per_device_train_batch_size=bs, gradient_accumulation_steps=ga,
            optim="sgd", learning_rate=lr, lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0,
            r2_loss=loss_kind, r2_weight=weight,
        )  # fmt: skip
        trainer = R2Trainer(model, args, train_dataset=data)
        trainer.train()
        assert trainer.state.global_step == 1
        for p, ref in zip(model.parameters(), ref_params):
            torch.testing.assert_close(p.detach(), ref, rtol=1e-5, atol=1e-6, msg=f"GA={ga}")
        if loss_kind == "margin":
            torch.testing.assert_close(trainer.regularizer.margin.detach(), ref_margins, rtol=1e-5, atol=1e-6)
        (log,) = _train_logs(trainer)
        # the Trainer's `loss` sums the micro-batch losses: the full-batch objective, whatever the split
        with torch.no_grad():
            expected = F.cross_entropy(forward_logits(base, data.x), data.y).item() + log["r2_loss"]
        assert log["loss"] == pytest.approx(expected, rel=1e-5)
    # the R2 term really moved something (so a wrongly scaled R2 term would have failed above)
    if loss_kind == "linf":
        assert max((a - b).abs().max().item() for a, b in zip(ref_params, no_r2_params)) > 0.1
    else:
        init = torch.stack([m.weight.abs().amax() for _, m in find_target_modules(base)]).detach()
        assert (init - ref_margins).abs().min().item() > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# R2Trainer: train, log, evaluate, save and load back, for each kind of model


MODELS = {
    "timm_cnn": lambda: make_timm("test_resnet"),  # batch norm
    "timm_vit": lambda: make_timm("test_vit", img_size=32),
    "hf_resnet": None,  # the conftest fixture
    "hf_timm_wrapper": _hf_timm_wrapper,
}


def _reference_r2(model, regularizer, loss_kind) -> float:
    """`sum_l R(W_l)` layer by layer with the functional losses of `hf_r2.losses` (not the regularizer's batched
    kernels), summed in float64; only the learned margins / temperatures come from the regularizer."""
    config = regularizer.config
    layers = [m.weight.detach() for _, m in find_target_modules(model)]
    if loss_kind == "linf":
        values = [linf_r2(w) for w in layers]
    elif loss_kind == "margin":
        values = [margin_r2(w, m, config.margin_penalty) for w, m in zip(layers, regularizer.margin.detach())]
    elif loss_kind == "soft_min_max":
        alphas = regularizer.log_alpha.detach().exp()
        values = [soft_min_max_r2(w, a, config.soft_min_max_penalty) for w, a in zip(layers, alphas)]
    else:
        values = [kurtosis_r2(w, config.kurtosis_target) for w in layers]
    return float(sum(v.double() for v in values))


@pytest.mark.parametrize(
    "model_name, r2_loss",
    [("timm_cnn", "margin"), ("timm_vit", "soft_min_max"), ("hf_resnet", "linf"), ("hf_timm_wrapper", "kurtosis")],
)
def test_train_log_evaluate_save(tmp_path, request, model_name, r2_loss):
    model = request.getfixturevalue(model_name) if MODELS[model_name] is None else MODELS[model_name]()
    weight = 0.5
    args = _args(tmp_path / "run", max_steps=3, r2_loss=r2_loss, r2_weight=weight, r2_warmup_steps=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train, val = TinyImages(16), TinyImages(8, seed=1)
    trainer = R2Trainer(model, args, train_dataset=train, eval_dataset=val, compute_metrics=compute_accuracy)
    r2_before = [p.detach().clone() for p in trainer.regularizer.parameters()]
    trainer.train()

    logs = _train_logs(trainer)
    assert [log["step"] for log in logs] == [1, 2, 3]
    for log in logs:
        assert R2_LOG_KEYS <= set(log) and "loss" in log
        # the Trainer's own `loss` is the sum of the two parts we log (GA=1: one micro-batch per step)
        assert log["loss"] == pytest.approx(log["task_loss"] + log["r2_loss"], rel=1e-5, abs=1e-6)
        assert math.isfinite(log["r2_max_abs"]) and log["r2_max_abs"] > 0
    # lambda ramps from 0 over the 2 warm-up steps: steps 0, 1, 2 -> 0, w/2, w
    assert [log["r2_lambda"] for log in logs] == pytest.approx([0.0, weight / 2, weight])
    assert logs[0]["r2_loss"] == 0.0 and logs[1]["r2_loss"] > 0
    changed = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert any(k.endswith("weight") for k in changed)
    for p, p0 in zip(trainer.regularizer.parameters(), r2_before):
        assert not torch.equal(p.detach(), p0), "R2's learnable parameters were not trained"
        assert p.grad is None, "R2's gradients must be cleared after each optimizer step, as the model's are"

    # evaluation, on every kind of model (a timm model returns no loss of its own)
    other_data = TinyImages(8, seed=2)
    predicted = trainer.predict(other_data)  # must not leak into the next evaluate()'s R2 metrics
    metrics = trainer.evaluate()
    model.eval()
    with torch.no_grad():
        logits = forward_logits(model, val.x)
        r2 = _reference_r2(model, trainer.regularizer, r2_loss) * weight
        torch.testing.assert_close(torch.as_tensor(predicted.predictions), forward_logits(model, other_data.x))
    assert metrics["eval_accuracy"] == pytest.approx((logits.argmax(-1) == val.y).float().mean().item())
    assert metrics["eval_task_loss"] == pytest.approx(F.cross_entropy(logits, val.y).item(), rel=1e-5)
    assert metrics["eval_r2_loss"] == pytest.approx(r2, rel=1e-5)
    expected_loss = F.cross_entropy(logits.double(), val.y).item() + r2
    assert metrics["eval_loss"] == pytest.approx(expected_loss, rel=1e-5)

    # save: the model's own files, loadable by timm / transformers, plus the R2 side files
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    saved = safetensors.torch.load_file(str(out / "model.safetensors"))
    assert set(saved) == set(model.state_dict())
    assert R2Config.from_pretrained(str(out)).to_dict() == trainer.regularizer.config.to_dict()
    stats = json.loads((out / R2_STATS_NAME).read_text())
    assert set(stats["per_layer"]) == set(trainer.regularizer.names)
    assert stats["overall"]["max_abs"] == pytest.approx(trainer.regularizer.stats()["overall"]["max_abs"])
    config = json.loads((out / "config.json").read_text())
    if model_name.startswith("timm"):
        import timm

        assert config["architecture"] == model.pretrained_cfg["architecture"] and config["num_classes"] == 10
        reloaded = [create_model(str(out), pretrained=True), timm.create_model(f"local-dir:{out}", pretrained=True)]
    else:
        from transformers import AutoModelForImageClassification

        reloaded = [AutoModelForImageClassification.from_pretrained(str(out))]
    for other in reloaded:
        with torch.no_grad():
            torch.testing.assert_close(forward_logits(other.eval(), val.x), logits)


def test_baseline_weight_zero_skips_r2(tmp_path, hf_convnext, monkeypatch):
    trainer = R2Trainer(hf_convnext, _args(tmp_path, r2_loss="margin", r2_weight=0.0), train_dataset=TinyImages(8))

    def fail():
        raise AssertionError("R2 computed with r2_weight=0")

    monkeypatch.setattr(trainer.regularizer, "forward", fail)
    trainer.train()
    logs = _train_logs(trainer)
    assert len(logs) == 2 and R2_LOG_KEYS <= set(logs[0])
    assert all(log["r2_loss"] == 0.0 and log["r2_lambda"] == 0.0 for log in logs)
    assert all(log["loss"] == pytest.approx(log["task_loss"], rel=1e-6) for log in logs)


def test_logs_reach_tensorboard(tmp_path, timm_cnn):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = _args(tmp_path, report_to=["tensorboard"], max_steps=2)  # logs under output_dir/runs/
    trainer = R2Trainer(timm_cnn, args, train_dataset=TinyImages(8))
    trainer.train()
    runs = list(tmp_path.rglob("events.out.tfevents.*"))
    assert runs
    tags = set()
    for run in runs:
        acc = EventAccumulator(str(run.parent))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"train/task_loss", "train/r2_loss", "train/r2_max_abs"} <= tags


# ---------------------------------------------------------------------------------------------------------------
# R2Trainer: checkpoint and resume


class _StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resume_from_checkpoint_is_exact(tmp_path):
    """4 steps straight == 2 steps, checkpoint, a new trainer (on a new random model) resuming to 4."""
    data = TinyImages(16)
    kwargs = dict(
        max_steps=4, r2_loss="margin", r2_weight=0.5, r2_warmup_steps=2, r2_margin_penalty=5.0, learning_rate=3e-2,
        weight_decay=0.01,
    )  # fmt: skip
    torch.manual_seed(0)
    straight = make_timm("test_resnet")
    init = copy.deepcopy(straight.state_dict())
    t_straight = R2Trainer(straight, _args(tmp_path / "straight", **kwargs), train_dataset=data)
    t_straight.train()

    first = make_timm("test_resnet")
    first.load_state_dict(init)
    args = _args(tmp_path / "resumed", save_strategy="steps", save_steps=2, **kwargs)
    R2Trainer(first, args, train_dataset=data, callbacks=[_StopAt(2)]).train()
    ckpt = tmp_path / "resumed" / "checkpoint-2"
    assert {R2_STATE_NAME, "optimizer.pt", "model.safetensors", "config.json", "r2_config.json"} <= {
        p.name for p in ckpt.iterdir()
    }
    assert "margin" not in safetensors.torch.load_file(str(ckpt / "model.safetensors"))
    saved_margin = safetensors.torch.load_file(str(ckpt / R2_STATE_NAME))["margin"]
    optimizer_state = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert len(optimizer_state["param_groups"]) == 3  # decay, no decay, R2
    r2_group = optimizer_state["param_groups"][2]
    assert r2_group["weight_decay"] == 0.0 and len(r2_group["params"]) == 1
    assert r2_group["params"][0] in optimizer_state["state"]  # Adam moments of the margins round-trip

    torch.manual_seed(123)
    second = make_timm("test_resnet")  # a different init: everything must come from the checkpoint
    t_resumed = R2Trainer(second, args, train_dataset=data)
    assert not torch.equal(t_resumed.regularizer.margin.detach(), saved_margin)
    t_resumed.train(resume_from_checkpoint=str(ckpt))
    assert t_resumed.state.global_step == 4

    for (name, a), b in zip(straight.state_dict().items(), second.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=name)
    torch.testing.assert_close(t_resumed.regularizer.margin, t_straight.regularizer.margin, rtol=1e-6, atol=1e-7)
    assert not torch.equal(t_straight.regularizer.margin.detach(), saved_margin)  # and it kept training


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("model_name", ["timm", "transformers"])
def test_resume_with_augmentation_after_an_interrupted_save_is_exact(tmp_path, data_dir, model_name, monkeypatch,
                                                                     caplog):
    """Augmented cifar10-tiny, 5 steps over two epochs. A run killed while writing checkpoint-4 leaves no
    `checkpoint-4` (only its hidden staging folder); a left-over incomplete `checkpoint-9` is skipped with a warning;
    `resume_from_checkpoint=True` on a new random model picks checkpoint-2 and ends equal, bit for bit, to the
    uninterrupted run."""
    from hf_r2.data import collate_fn, load_image_dataset, with_transforms

    make = (lambda: make_timm("test_resnet")) if model_name == "timm" else _hf_convnext
    ds = load_image_dataset("cifar10-tiny", data_dir=data_dir, max_train_samples=12, max_eval_samples=4, seed=0)
    torch.manual_seed(0)
    init = make().state_dict()
    kwargs = dict(max_steps=5, r2_loss="margin", r2_weight=0.5, learning_rate=3e-2, save_strategy="steps",
                  save_steps=2, per_device_train_batch_size=4)  # 3 steps per epoch: the resume crosses an epoch

    def run(folder, resume=None):
        model = make()
        if resume is None:
            model.load_state_dict(init)
        train = with_transforms(ds["train"], model, train=True, input_size=32, augment="cifar", seed=0)
        trainer = R2Trainer(model, _args(folder, **kwargs), train_dataset=train, data_collator=collate_fn)
        trainer.train(resume_from_checkpoint=resume)
        return model

    straight = run(tmp_path / "straight")
    original = R2Trainer._save_rng_state

    def dies_at_step_4(self, output_dir):
        if self.state.global_step == 4:
            raise _Interrupt
        original(self, output_dir)

    monkeypatch.setattr(R2Trainer, "_save_rng_state", dies_at_step_4)
    with pytest.raises(_Interrupt):
        run(tmp_path / "resumed")
    monkeypatch.undo()
    out = tmp_path / "resumed"
    assert sorted(p.name for p in out.iterdir()) == [".tmp-checkpoint-4", "checkpoint-2"]
    (out / "checkpoint-9").mkdir()
    (out / "checkpoint-9" / "model.safetensors").write_bytes(b"")  # an incomplete checkpoint of an older version
    torch.manual_seed(123)
    with caplog.at_level(logging.WARNING, logger="hf_r2"):
        resumed = run(out, resume="True")
    assert "checkpoint-9: an incomplete checkpoint" in caplog.text and ".tmp-checkpoint-4" in caplog.text
    assert (out / "checkpoint-4").is_dir() and not (out / ".tmp-checkpoint-4").exists()
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)


def test_training_set_without_a_seed_takes_the_trainer_seed(tmp_path, timm_cnn):
    """A `SeededTransformDataset` built without a seed augments with `args.seed`: the same images as one built with
    that seed (the autouse fixture's `torch.manual_seed(0)` would have given 0 before)."""
    import datasets
    import numpy as np
    from PIL import Image

    from hf_r2.data import collate_fn, with_transforms

    rng = np.random.default_rng(0)
    raw = datasets.Dataset.from_dict({"image": [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
                                                for _ in range(8)], "label": list(range(8))})  # fmt: skip
    kw = dict(input_size=32, augment="cifar")
    train = with_transforms(raw, timm_cnn, train=True, **kw)
    R2Trainer(timm_cnn, _args(tmp_path, max_steps=1, seed=5), train_dataset=train, data_collator=collate_fn).train()
    assert train.seed is None
    for seed, same in ((5, True), (0, False)):
        own = with_transforms(raw, timm_cnn, train=True, seed=seed, **kw)
        assert all(torch.equal(train[i]["pixel_values"], own[i]["pixel_values"]) for i in range(8)) is same


# ---------------------------------------------------------------------------------------------------------------
# R2Trainer: two processes (DDP on the CPU) x gradient accumulation give the full-batch step

_DDP_WORKER = '''
import os, sys
import torch
from transformers import ConvNextConfig, ConvNextForImageClassification
from hf_r2.trainer import R2Trainer
from hf_r2.training_args import R2TrainingArguments

out, loss_kind = sys.argv[1], sys.argv[2]
rank = int(os.environ["RANK"])
torch.manual_seed(100 + rank)  # each process starts from its own random model: rank 0's must win everywhere
cfg = ConvNextConfig(num_labels=10, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, patch_size=2)
model = ConvNextForImageClassification(cfg)
init = {k: v.clone() for k, v in model.state_dict().items()}
g = torch.Generator().manual_seed(0)
x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
data = [{"pixel_values": x[i], "labels": y[i]} for i in range(8)]
args = R2TrainingArguments(
    output_dir=out, use_cpu=True, report_to="none", disable_tqdm=True, save_strategy="no", max_steps=1, seed=0,
    per_device_train_batch_size=2, gradient_accumulation_steps=2, optim="sgd", learning_rate=0.5,
    lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, r2_loss=loss_kind, r2_weight=1.0,
    dataloader_num_workers=0,
)
trainer = R2Trainer(model, args, train_dataset=data)
trainer.train()
if rank == 0:
    torch.save({"init": init, "final": model.state_dict(), "r2": trainer.regularizer.state_dict(),
                "x": x, "y": y}, os.path.join(out, "result.pt"))
# leave together: a rank that exits while the other still tears down gloo can abort it (SIGABRT)
torch.distributed.barrier()
torch.distributed.destroy_process_group()
# and skip the interpreter's teardown, where gloo's threads could still abort a rank ("terminate called without an
# active exception", seen once under load): everything this test reads is written above
sys.stdout.flush()
os._exit(0)
'''


@pytest.mark.multiprocess
@pytest.mark.parametrize("loss_kind", ["linf", "margin"])
def test_ddp_two_processes_match_one_batch(tmp_path, loss_kind):
    import os
    import signal
    import socket
    import subprocess
    import sys

    script = tmp_path / "worker.py"
    script.write_text(_DDP_WORKER)
    with socket.socket() as sock:  # a free port (torchrun's `--master_port 0` hangs in the rendezvous)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # a fresh environment for the children: no ACCELERATE_* settings of the parent (a launcher, a CI config)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), str(script), str(tmp_path), loss_kind]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the workers too, not only the launcher
        output, _ = proc.communicate()
        pytest.fail(f"2-process run timed out:\n{output[-3000:]}")
    assert proc.returncode == 0, output[-3000:]
    result = torch.load(tmp_path / "result.pt", weights_only=True)
    base = _hf_convnext()
    base.load_state_dict(result["init"])
    data = TinyImages(n=8)
    data.x, data.y = result["x"], result["y"]
    ref_params, ref_margins = _reference_sgd_step(base, data, loss_kind, 1.0, 0.5)
    final = dict(result["final"])
    for (name, _), ref in zip(base.named_parameters(), ref_params):
        torch.testing.assert_close(final[name], ref, rtol=1e-5, atol=1e-6, msg=name)
    if loss_kind == "margin":
        torch.testing.assert_close(result["r2"]["margin"], ref_margins, rtol=1e-5, atol=1e-6)
