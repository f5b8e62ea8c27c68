"""Tests of `hf_r2.loop` and `hf_r2.loop_config`: the plain Accelerate loop with R2-Loss (or without a regularizer).

The numbers are checked against a loop written out by hand (plain torch, the functional `margin_r2`, the learning
rate and R2 lambda formulas), against an uninterrupted run (resume), and against one process (two CPU processes
under `accelerate launch`).
"""

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _loop_worker import SyntheticImages, TinyConvNet, build
from safetensors.torch import load_file

from hf_r2.config import R2Config
from hf_r2.loop import evaluate, train_with_accelerate
from hf_r2.loop_config import LoopConfig, resolve_checkpoint
from hf_r2.losses import margin_r2

WORKER = Path(__file__).with_name("_loop_worker.py")


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; every test starts (and leaves) them blank, on one thread
    (restored)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)  # leave the process as it was for the tests that follow
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _load_checkpoint(folder: Path) -> dict:
    """Model weights, R2 parameters, step counter and optimizer state of a loop checkpoint."""
    return {
        "model": load_file(folder / "model.safetensors"),
        "r2": load_file(folder / "r2_regularizer.safetensors"),
        "loop": json.loads((folder / "loop_state.json").read_text()),
        "optimizer": torch.load(folder / "optimizer.bin", weights_only=True),
        "scheduler": torch.load(folder / "scheduler.bin", weights_only=True),
    }


def _as_hf_r2_0_1_0(folder: Path) -> None:
    """Rewrite a loop checkpoint as hf-r2 0.1.0 saved it: the regularizer and the step counter in accelerate's
    `custom_checkpoint_<i>.pkl` files (`register_for_checkpointing`, in that order), not safetensors / JSON."""
    torch.save(dict(load_file(folder / "r2_regularizer.safetensors")), folder / "custom_checkpoint_0.pkl")
    step = json.loads((folder / "loop_state.json").read_text())["global_step"]
    torch.save({"global_step": step}, folder / "custom_checkpoint_1.pkl")
    (folder / "r2_regularizer.safetensors").unlink()
    (folder / "loop_state.json").unlink()


class _WritesMarker:
    """Unpickled in full, it creates the file `path`: what a checkpoint from anywhere could do (run any code)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


# ----------------------------------------------------------------------------------------------------------------
# LoopConfig
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_epochs": 0}, r"`num_epochs` must be an integer >= 1, got 0"),
        ({"per_device_batch_size": 0}, r"`per_device_batch_size` must be an integer >= 1"),
        ({"gradient_accumulation_steps": 0}, r"`gradient_accumulation_steps` must be an integer >= 1"),
        ({"max_steps": 0}, r"`max_steps` must be > 0, or -1"),
        ({"per_device_eval_batch_size": 0}, r"`per_device_eval_batch_size` must be >= 1 or None"),
        ({"checkpointing_steps": 0}, r"`checkpointing_steps` must be >= 1 or None"),
        ({"lr_warmup_steps": -1}, r"`lr_warmup_steps` must be >= 0"),
        ({"learning_rate": 0.0}, r"`learning_rate` must be > 0"),
        ({"weight_decay": -0.1}, r"`weight_decay` must be >= 0"),
        ({"momentum": 1.0}, r"`momentum` must be in \[0, 1\)"),
        ({"optimizer": "adam"}, r"`optimizer` must be one of 'sgd', 'adamw', got 'adam'"),
        ({"optimizer": "AdamW"}, r"Did you mean `optimizer='adamw'`"),
        ({"lr_scheduler_type": "linear"}, r"`lr_scheduler_type` must be one of 'cosine', 'constant'"),
        ({"mixed_precision": "fp32"}, r"Did you mean `mixed_precision='no'`"),
        ({"output_dir": ""}, r"`output_dir` must be a non-empty path"),
    ],
)
def test_loop_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoopConfig(**kwargs)


def test_loop_config_round_trip(tmp_path):
    config = LoopConfig(output_dir=str(tmp_path), optimizer="adamw", max_steps=7, checkpointing_steps=3,
                        mixed_precision="bf16", log_with="none", per_device_eval_batch_size=5)
    assert config.log_with is None and config.eval_batch_size == 5
    config.save_pretrained(tmp_path)
    again = LoopConfig.from_pretrained(tmp_path)
    assert again.to_dict() == config.to_dict()
    with pytest.raises(ValueError, match=r"Unknown `LoopConfig` field\(s\) \['lr'\]"):
        LoopConfig.from_dict({"lr": 0.1})


def test_resolve_latest_checkpoint(tmp_path, caplog):
    config = LoopConfig(output_dir=str(tmp_path), resume_from_checkpoint="latest")
    with caplog.at_level("WARNING", logger="hf_r2"):
        assert resolve_checkpoint(config) is None  # nothing saved yet: start from the beginning, and say so
    assert "no complete checkpoint" in caplog.text
    root = tmp_path / "checkpoints"
    for name in ("step_2", "step_10", "step_9", "other", ".tmp-step_12", "step_11"):
        (root / name).mkdir(parents=True)
        if name in ("step_2", "step_10", "step_9"):  # complete: weights and random states
            (root / name / "model.safetensors").write_bytes(b"")
            (root / name / "random_states_0.pkl").write_bytes(b"")
    caplog.clear()
    with caplog.at_level("WARNING", logger="hf_r2"):
        assert resolve_checkpoint(config) == str(root / "step_10")  # numeric, not lexicographic; 11, 12 incomplete
        assert resolve_checkpoint(replace(config, resume_from_checkpoint="True")) == str(root / "step_10")
    assert "step_11: an incomplete checkpoint" in caplog.text and ".tmp-step_12" in caplog.text
    assert resolve_checkpoint(replace(config, resume_from_checkpoint=None)) is None
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        resolve_checkpoint(replace(config, resume_from_checkpoint=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="is an incomplete checkpoint"):
        resolve_checkpoint(replace(config, resume_from_checkpoint=str(root / "step_11")))


def test_train_argument_errors(tmp_path):
    from accelerate import Accelerator

    model, _, train_ds, _, config = build(str(tmp_path), 8, 1)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    match = r"`gradient_accumulation_steps=2` but `config.gradient_accumulation_steps=1`"
    with pytest.raises(ValueError, match=match):
        train_with_accelerate(model, train_ds, r2_config=R2Config(), config=config, accelerator=accelerator)


def test_trains_without_a_regularizer(tmp_path, monkeypatch):
    """`r2_config=None`: no R2Regularizer, no R2 parameters in the optimizer, no R2 entries in the metrics or the
    saved folder, and the same weights as R2 off (L-inf, which has no parameters, at `weight=0`)."""
    import hf_r2.loop as loop
    from hf_r2.regularizer import R2Regularizer

    model, _, train_ds, eval_ds, config = build(str(tmp_path / "none"), 8, 1)
    reference = TinyConvNet()
    reference.load_state_dict(model.state_dict())
    optimizers = []
    create_optimizer = loop.create_optimizer
    monkeypatch.setattr(loop, "create_optimizer", lambda *a: optimizers.append(create_optimizer(*a)) or optimizers[-1])
    monkeypatch.setattr(R2Regularizer, "__init__", lambda *a, **k: pytest.fail("built an R2Regularizer"))
    config = replace(config, num_epochs=1, save_model=True)
    metrics = train_with_accelerate(model, train_ds, eval_ds, config=config)
    params = [p for group in optimizers[0].param_groups for p in group["params"]]
    assert {id(p) for p in params} == {id(p) for p in model.parameters()} and len(params) == len(set(map(id, params)))
    assert not [k for k in metrics if "r2" in k]
    assert metrics["train_loss"] == metrics["train_task_loss"] and metrics["global_step"] == 4
    assert 0 <= metrics["eval_accuracy"] <= 1
    assert (tmp_path / "none" / "model" / "model.safetensors").is_file()
    assert not (tmp_path / "none" / "model" / "r2_config.json").exists()

    monkeypatch.undo()
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    off = replace(config, output_dir=str(tmp_path / "off"), save_model=False)
    train_with_accelerate(reference, train_ds, eval_ds, r2_config=R2Config(loss="linf", weight=0.0), config=off)
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_finetune_runs_without_r2(tmp_path):
    from hf_r2.loop import finetune

    model, _, train_ds, _, _ = build(str(tmp_path), 8, 1)
    metrics = finetune(model, train_ds, learning_rate=0.01, per_device_batch_size=8, max_steps=2, seed=0)
    assert metrics["global_step"] == 2 and not [k for k in metrics if "r2" in k]


def test_finetune_gives_its_seed_to_a_training_set_without_one():
    """A `SeededTransformDataset` built without a seed augments with the fine-tune's (the loop's) seed."""
    import datasets
    import numpy as np
    import timm
    from PIL import Image

    from hf_r2.data import collate_fn, with_transforms
    from hf_r2.loop import finetune

    rng = np.random.default_rng(0)
    raw = datasets.Dataset.from_dict({"image": [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
                                                for _ in range(8)], "label": list(range(8))})  # fmt: skip
    model, kw = timm.create_model("test_resnet", num_classes=10), dict(input_size=32, augment="cifar")
    train = with_transforms(raw, model, train=True, **kw)
    finetune(model, train, learning_rate=0.01, per_device_batch_size=4, max_steps=1, seed=5, collate_fn=collate_fn)
    for seed, same in ((5, True), (0, False)):
        own = with_transforms(raw, model, train=True, seed=seed, **kw)
        assert all(torch.equal(train[i]["pixel_values"], own[i]["pixel_values"]) for i in range(8)) is same


def test_finetune_with_r2_matches_the_loop(tmp_path):
    """`finetune(r2_config=...)` (what `hf-r2 qat / compress --r2-weight` run) trains with the R2 term: the same
    weights as `train_with_accelerate` with AdamW + cosine and that R2 config, and not those of R2 off."""
    from accelerate.state import AcceleratorState, GradientState

    from hf_r2.loop import finetune

    model, _, train_ds, _, _ = build(str(tmp_path), 8, 1)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    r2_config = R2Config(loss="linf", weight=1.0)
    metrics = finetune(model, train_ds, learning_rate=0.01, per_device_batch_size=8, max_steps=3, seed=0,
                       r2_config=r2_config)
    assert metrics["global_step"] == 3 and metrics["train_r2_loss"] > 0 and metrics["r2_lambda"] == 1.0

    def loop_run(r2):
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        other = TinyConvNet()
        other.load_state_dict(init)
        config = LoopConfig(output_dir=str(tmp_path / f"ref{r2 is None}"), max_steps=3, seed=0,
                            per_device_batch_size=8, optimizer="adamw", learning_rate=0.01,
                            lr_scheduler_type="cosine", use_cpu=True, save_model=False, logging_steps=50)
        train_with_accelerate(other, train_ds, r2_config=r2, config=config)
        return other

    for (name, a), b in zip(model.state_dict().items(), loop_run(r2_config).state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    without = loop_run(None)
    assert not torch.allclose(model.conv1.weight, without.conv1.weight)


# ----------------------------------------------------------------------------------------------------------------
# The loop against a hand-written reference
# ----------------------------------------------------------------------------------------------------------------


def _reference_training(config: LoopConfig, r2_config: R2Config, train_ds):
    """The same training written out: per-epoch `randperm(seed + epoch)`, consecutive micro-batches, SGD with
    momentum, linear-warm-up + cosine learning rate, and per step `mean task loss + lambda(step) * sum margin_r2`."""
    torch.manual_seed(0)
    model = TinyConvNet()
    layers = [model.conv1, model.conv2, model.head]
    margins = [layer.weight.detach().abs().amax().float().clone().requires_grad_() for layer in layers]
    init_margins = torch.stack(margins).detach().clone()
    optimizer = torch.optim.SGD(
        [
            {"params": [layer.weight for layer in layers], "weight_decay": config.weight_decay},
            {"params": [layer.bias for layer in layers], "weight_decay": 0.0},
            {"params": margins, "weight_decay": 0.0},
        ],
        lr=config.learning_rate, momentum=config.momentum,
    )
    n, b, ga = len(train_ds), config.per_device_batch_size, config.gradient_accumulation_steps
    steps_per_epoch = math.ceil(math.ceil(n / b) / ga)
    total, warmup = config.num_epochs * steps_per_epoch, config.lr_warmup_steps
    x, y = train_ds.pixel_values, train_ds.labels
    step, excess = 0, 0.0
    for epoch in range(config.num_epochs):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed + epoch))
        micro = [perm[i : i + b] for i in range(0, n, b)]
        for start in range(0, len(micro), ga):
            progress = (step - warmup) / (total - warmup)
            factor = step / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * progress))
            for group in optimizer.param_groups:
                group["lr"] = config.learning_rate * factor
            lam = r2_config.weight * min(1.0, step / r2_config.warmup_steps)
            task = sum(F.cross_entropy(model(x[idx]), y[idx]) for idx in micro[start : start + ga]) / ga
            r2 = sum(margin_r2(layer.weight, m, r2_config.margin_penalty) for layer, m in zip(layers, margins))
            excess += sum((layer.weight.abs() - m).clamp_min(0).sum().item() for layer, m in zip(layers, margins))
            optimizer.zero_grad()
            (task + lam * r2).backward()
            optimizer.step()
            step += 1
    return model.state_dict(), torch.stack(margins).detach(), init_margins, excess


@pytest.mark.parametrize("per_device_batch_size, gradient_accumulation_steps", [(8, 1), (4, 2)])
def test_matches_reference_loop(tmp_path, per_device_batch_size, gradient_accumulation_steps):
    model, regularizer, train_ds, _, config = build(str(tmp_path), per_device_batch_size, gradient_accumulation_steps)
    r2_config = regularizer.config
    # the default path: the regularizer is built inside; its final state is read back from the last checkpoint
    config = replace(config, checkpointing_steps=8)
    metrics = train_with_accelerate(model, train_ds, r2_config=r2_config, config=config)
    assert metrics["global_step"] == 8 and metrics["epoch"] == 2.0

    ref_weights, ref_margins, init_margins, excess = _reference_training(config, r2_config, train_ds)
    assert excess > 0, "the margins never uncovered any weight: the R2 gradient on the weights went untested"
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, ref_weights[name], rtol=1e-5, atol=1e-6, msg=name)
    saved = _load_checkpoint(tmp_path / "checkpoints" / "step_8")
    torch.testing.assert_close(saved["r2"]["margin"], ref_margins, rtol=1e-5, atol=1e-6)
    assert saved["loop"] == {"global_step": 8, "r2_config": r2_config.to_dict()}
    assert not torch.allclose(ref_margins, init_margins)  # the margins were learned, not left at max |w|


def test_evaluate_matches_full_batch(tmp_path):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = TinyConvNet()
    eval_ds = SyntheticImages(10, seed=1)
    dataloader = accelerator.prepare(torch.utils.data.DataLoader(eval_ds, batch_size=3))  # 3 + 3 + 3 + 1
    model.train()
    result = evaluate(model, dataloader, accelerator)
    assert model.training  # mode restored
    with torch.no_grad():
        logits = model.eval()(eval_ds.pixel_values).double()
    expected_loss = F.cross_entropy(logits, eval_ds.labels).item()
    expected_acc = (logits.argmax(-1) == eval_ds.labels).double().mean().item()
    assert result["accuracy"] == pytest.approx(expected_acc, abs=1e-12)
    assert result["loss"] == pytest.approx(expected_loss, rel=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints, logging, mixed precision, saving
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("saved_by", ["this version", "hf-r2 0.1.0"])
def test_resume_equals_uninterrupted_run(tmp_path, saved_by):
    """Also from a checkpoint as hf-r2 0.1.0 wrote it (its pickles read with `weights_only=True`)."""
    # 32 samples, micro-batch 4, 2 micro-batches per step: 4 steps an epoch, 8 in all; state saved every 2 steps
    full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"
    model, _, train_ds, _, config = build(str(full_dir), 4, 2)
    r2_config = R2Config(loss="margin", weight=0.5, warmup_steps=3)
    config = replace(config, checkpointing_steps=2)
    train_with_accelerate(model, train_ds, r2_config=r2_config, config=config)

    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    torch.manual_seed(123)  # a different init: everything must come from the checkpoint
    other = TinyConvNet()
    checkpoint = full_dir / "checkpoints" / "step_6"
    if saved_by == "hf-r2 0.1.0":
        checkpoint = Path(shutil.copytree(checkpoint, tmp_path / "old" / "step_6"))
        _as_hf_r2_0_1_0(checkpoint)
    # step 6 = epoch 1 after 2 of its 4 steps: the loop must reshuffle epoch 1 and skip its first 4 micro-batches
    resume = replace(config, output_dir=str(resumed_dir), resume_from_checkpoint=str(checkpoint))
    metrics = train_with_accelerate(other, train_ds, r2_config=r2_config, config=resume)
    assert metrics["global_step"] == 8
    assert not (resumed_dir / "checkpoints" / "step_6").exists()  # it resumed after step 6, not from 0

    full, resumed = (_load_checkpoint(d / "checkpoints" / "step_8") for d in (full_dir, resumed_dir))
    for name in full["model"]:
        torch.testing.assert_close(resumed["model"][name], full["model"][name], rtol=0, atol=1e-7, msg=name)
    torch.testing.assert_close(resumed["r2"]["margin"], full["r2"]["margin"], rtol=0, atol=1e-7)
    assert resumed["loop"] == full["loop"] == {"global_step": 8, "r2_config": r2_config.to_dict()}
    assert resumed["scheduler"]["last_epoch"] == full["scheduler"]["last_epoch"] == 8
    for key, buf in full["optimizer"]["state"].items():
        torch.testing.assert_close(resumed["optimizer"]["state"][key]["momentum_buffer"], buf["momentum_buffer"],
                                   rtol=0, atol=1e-7)
    # the resumed weights really moved away from the checkpoint they started from
    start = _load_checkpoint(full_dir / "checkpoints" / "step_6")
    assert not torch.allclose(start["model"]["conv1.weight"], full["model"]["conv1.weight"])


@pytest.mark.parametrize("saved, resumed, match", [
    ("margin", None, r"was saved with R2-Loss \(r2_regularizer.safetensors holds its learnable `margin`\) but this "
                     r"run has no R2: resume with the R2 settings it was saved with, or start a new run"),
    (None, "margin", r"was saved without R2's learnable parameters \(no r2_regularizer.safetensors: no R2, or a loss "
                     r"without any\) but this run's R2 \(loss='margin'\) learns `margin`: resume with the R2"),
    ("margin", "linf", r"was saved with R2-Loss \(r2_regularizer.safetensors holds its learnable `margin`\) but this "
                       r"run's R2 \(loss='linf'\) learns none: resume"),
])
def test_resume_with_other_r2_is_one_line(tmp_path, saved, resumed, match):
    """A checkpoint resumed with R2 where it was saved without (or the reverse) is refused in one line naming the
    folder, the fix, and what each side holds, not accelerate's "different number of parameter groups"."""
    from accelerate.state import AcceleratorState, GradientState

    from hf_r2.checkpoints import CheckpointError

    model, _, train_ds, _, config = build(str(tmp_path / "saved"), 4, 1)
    config = replace(config, checkpointing_steps=2, max_steps=2)
    train_with_accelerate(model, train_ds, r2_config=saved and R2Config(loss=saved), config=config)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    checkpoint = tmp_path / "saved" / "checkpoints" / "step_2"
    resume = replace(config, max_steps=3, output_dir=str(tmp_path / "resumed"),
                     resume_from_checkpoint=str(checkpoint))
    with pytest.raises(CheckpointError, match=f"^checkpoint {checkpoint} {match}") as refused:
        train_with_accelerate(TinyConvNet(), train_ds, r2_config=resumed and R2Config(loss=resumed), config=resume)
    assert "\n" not in str(refused.value)


def _save_and_resume(tmp_path, saved: R2Config | None, resumed: R2Config | None, old_style: bool = False):
    """Train 2 steps with `saved` (a checkpoint at step 2), then resume it with `resumed` for one more step; with
    `old_style`, the checkpoint's loop_state.json first loses its R2 record (as saved before the record)."""
    from accelerate.state import AcceleratorState, GradientState

    model, _, train_ds, _, config = build(str(tmp_path / "saved"), 4, 1)
    config = replace(config, checkpointing_steps=2, max_steps=2)
    train_with_accelerate(model, train_ds, r2_config=saved, config=config)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    checkpoint = tmp_path / "saved" / "checkpoints" / "step_2"
    state = json.loads((checkpoint / "loop_state.json").read_text())
    assert state == {"global_step": 2, "r2_config": None if saved is None else saved.to_dict()}
    if old_style:
        (checkpoint / "loop_state.json").write_text(json.dumps({"global_step": 2}))
    resume = replace(config, max_steps=3, output_dir=str(tmp_path / "resumed"),
                     resume_from_checkpoint=str(checkpoint))
    return checkpoint, lambda: train_with_accelerate(TinyConvNet(), train_ds, r2_config=resumed, config=resume)


@pytest.mark.parametrize("saved, resumed, match", [
    (R2Config(loss="linf"), None, r"was saved with R2-Loss \(loss='linf', r2_lambda=0\.01\) \(its loop_state\.json\) "
                                  r"but this run has no R2: resume with the R2 settings it was saved with, or start a "
                                  r"new run without resume_from_checkpoint\.$"),
    (None, R2Config(loss="linf"), r"was saved without R2-Loss \(its loop_state\.json\) but this run has R2-Loss "
                                  r"\(loss='linf', r2_lambda=0\.01\): resume with the R2 settings"),
    (R2Config(loss="linf"), R2Config(loss="kurtosis"), r"was saved with R2-Loss loss='linf' \(its loop_state\.json\) "
                                                       r"but this run has loss='kurtosis': resume"),
    (R2Config(loss="linf", per_channel=True), R2Config(loss="linf"),
     r"was saved with R2-Loss per_channel=True \(its loop_state\.json\) but this run has per_channel=False: resume"),
    (R2Config(loss="kurtosis"), R2Config(loss="kurtosis", exclude=["head"]),
     r"was saved with R2-Loss exclude=None \(its loop_state\.json\) but this run has exclude=\['head'\]: resume"),
])
def test_resume_with_another_parameter_free_r2_is_one_line(tmp_path, saved, resumed, match):
    """linf and kurtosis learn nothing, so only the R2 settings loop_state.json records tell their checkpoints from
    one without R2: another objective (on / off, loss, per_channel, target layers) is refused in one line."""
    from hf_r2.checkpoints import CheckpointError

    checkpoint, resume = _save_and_resume(tmp_path, saved, resumed)
    with pytest.raises(CheckpointError, match=f"^checkpoint {checkpoint} {match}") as refused:
        resume()
    assert "\n" not in str(refused.value)


def test_resume_with_another_lambda_warns_once(tmp_path, caplog):
    """Another lambda is a change a user may make on purpose (transformers resumes with changed arguments): the run
    resumes, and one warning line says what changed."""
    checkpoint, resume = _save_and_resume(tmp_path, R2Config(loss="linf", r2_lambda=0.1),
                                          R2Config(loss="linf", r2_lambda=0.2))
    with caplog.at_level("WARNING", logger="hf_r2"):
        assert resume()["global_step"] == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [f"Resuming {checkpoint} with R2 r2_lambda=0.2 where it was saved with r2_lambda=0.1: the rest "
                        "of the run uses the new value."]


@pytest.mark.parametrize("resumed", [R2Config(loss="linf", r2_lambda=0.2), None])
def test_resume_a_checkpoint_without_the_r2_record(tmp_path, caplog, resumed):
    """A checkpoint saved before loop_state.json recorded R2 resumes as it did: only R2's learnable parameters are
    compared (linf has none), and nothing is said."""
    _, resume = _save_and_resume(tmp_path, R2Config(loss="linf", r2_lambda=0.1), resumed, old_style=True)
    with caplog.at_level("WARNING", logger="hf_r2"):
        assert resume()["global_step"] == 3
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


@pytest.mark.parametrize("crafted", ["custom_checkpoint_1.pkl", "random_states_0.pkl", "optimizer.bin",
                                     "scheduler.bin", "an extra custom_checkpoint_0.pkl"])
def test_resume_never_runs_code_from_a_checkpoint(tmp_path, data_dir, crafted):
    """A checkpoint folder from anywhere, with a pickle that would write a marker file if unpickled in full (as
    accelerate reads its `register_for_checkpointing` files): `examples/train_accelerate.py --resume_from_checkpoint`
    (`train_with_accelerate`) writes no marker and refuses the file in one line naming it; a stray
    `custom_checkpoint_0.pkl` beside this version's files is never read, and the run resumes."""
    import runpy

    example = WORKER.parents[1] / "examples" / "train_accelerate.py"
    argv = ["--model", "test_resnet", "--dataset", "cifar10-tiny", "--data_dir", str(data_dir), "--input_size", "32",
            "--max_train_samples", "8", "--max_eval_samples", "4", "--per_device_batch_size", "4", "--use_cpu",
            "--loss", "margin", "--checkpointing_steps", "1", "--output_dir", str(tmp_path / "run")]

    def run_example(*extra):
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(sys, "argv", [str(example), *argv, *extra])
            runpy.run_path(str(example), run_name="__main__")

    run_example("--max_steps", "1")
    folder = tmp_path / "run" / "checkpoints" / "step_1"
    marker = tmp_path / "marker"
    if crafted.startswith("custom"):
        _as_hf_r2_0_1_0(folder)
    name = crafted.split()[-1]
    torch.save({"global_step": _WritesMarker(marker)}, folder / name)
    resume = ("--max_steps", "2", "--resume_from_checkpoint", str(folder))
    if crafted.startswith("an extra"):
        run_example(*resume)
        state = json.loads((tmp_path / "run" / "checkpoints" / "step_2" / "loop_state.json").read_text())
        assert state["global_step"] == 2 and state["r2_config"]["loss"] == "margin"
    else:
        with pytest.raises(SystemExit) as exited:
            run_example(*resume)
        message = str(exited.value.code)
        assert message.startswith(f"train_accelerate.py: error: {folder / name} holds more than tensors"), message
        assert "\n" not in message and "resume only from checkpoints you made" in message
    assert not marker.exists()


@pytest.mark.parametrize("model_name", ["timm", "transformers"])
def test_resume_with_augmentation_after_an_interrupted_save_is_exact(tmp_path, data_dir, model_name, monkeypatch):
    """Augmented cifar10-tiny, 5 steps over two epochs, a checkpoint every 2 steps. A run killed while writing
    step_4 leaves no `step_4` (only its staging folder); `latest` on a new random model resumes from step_2 and ends
    equal, bit for bit, to the uninterrupted run."""
    from accelerate.state import AcceleratorState, GradientState
    from conftest import make_timm
    from transformers import ConvNextConfig, ConvNextForImageClassification

    import hf_r2.loop as loop
    from hf_r2.data import collate_fn, load_image_dataset, with_transforms

    def make():
        if model_name == "timm":
            return make_timm("test_resnet")
        cfg = ConvNextConfig(num_labels=10, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, patch_size=2)
        return ConvNextForImageClassification(cfg)

    ds = load_image_dataset("cifar10-tiny", data_dir=data_dir, max_train_samples=12, max_eval_samples=4, seed=0)
    torch.manual_seed(0)
    init = make().state_dict()
    r2_config = R2Config(loss="margin", weight=0.5)

    def run(folder, resume=None, fresh=True):
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        model = make()
        if fresh:
            model.load_state_dict(init)
        train = with_transforms(ds["train"], model, train=True, input_size=32, augment="cifar", seed=0)
        config = LoopConfig(output_dir=str(folder), max_steps=5, per_device_batch_size=4, checkpointing_steps=2,
                            learning_rate=0.05, use_cpu=True, save_model=False, seed=0, resume_from_checkpoint=resume)
        train_with_accelerate(model, train, r2_config=r2_config, config=config, collate_fn=collate_fn)
        return model

    straight = run(tmp_path / "straight")
    save_checkpoint = loop.save_checkpoint

    def dies_at_step_4(accelerator, folder, *args):
        if folder.endswith("step_4"):
            accelerator.save_state = lambda path: (Path(path).mkdir(parents=True), (Path(path) / "x").touch(),
                                                   (_ for _ in ()).throw(KeyboardInterrupt))
        return save_checkpoint(accelerator, folder, *args)

    monkeypatch.setattr(loop, "save_checkpoint", dies_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed")
    monkeypatch.undo()
    root = tmp_path / "resumed" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [".tmp-step_4", "step_2"]
    torch.manual_seed(123)
    resumed = run(tmp_path / "resumed", resume="latest", fresh=False)
    assert (root / "step_4").is_dir() and not (root / ".tmp-step_4").exists()
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)


def test_logs_r2_metrics(tmp_path):
    from accelerate import Accelerator
    from accelerate.tracking import GeneralTracker
    from accelerate.utils import DataLoaderConfiguration

    class RecordingTracker(GeneralTracker):
        """Keeps what `accelerator.log` sends."""

        name = "recording"
        requires_logging_directory = False

        def __init__(self):
            super().__init__()
            self.logs, self.config = [], None

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values):
            self.config = values

        def log(self, values, step=None, **kwargs):
            self.logs.append((step, dict(values)))

    tracker = RecordingTracker()
    accelerator = Accelerator(cpu=True, log_with=[tracker],
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=3))
    model, regularizer, train_ds, eval_ds, config = build(str(tmp_path), 8, 1)
    r2_config = R2Config(loss="margin", weight=0.5, warmup_steps=2)
    assert regularizer.config == r2_config
    config = replace(config, lr_warmup_steps=2)
    seen = []  # per training forward (one per step): the weights, the margins and the batch it ran on

    def snapshot(module, args):
        if module.training:
            seen.append(({k: v.detach().clone() for k, v in module.state_dict().items()},
                         regularizer.margin.detach().clone(), args[0].detach().clone()))

    model.register_forward_pre_hook(snapshot)
    metrics = train_with_accelerate(model, train_ds, eval_ds, config=config, accelerator=accelerator,
                                    regularizer=regularizer)
    assert tracker.config["r2_config.loss"] == "margin" and tracker.config["learning_rate"] == 0.1

    train_logs = [(s, v) for s, v in tracker.logs if "task_loss" in v]
    assert [s for s, _ in train_logs] == list(range(1, 9))  # logging_steps=1
    for step, values in train_logs:
        assert {"loss", "task_loss", "r2_loss", "r2_lambda", "lr", "epoch", "r2_max_abs", "r2_mean_max_over_std",
                "r2_max_max_over_std", "r2_mean_kurtosis"} <= set(values)
        assert values["r2_lambda"] == pytest.approx(0.5 * min(1.0, (step - 1) / 2))  # the weight used for this step
        # an independent reference: the step's task loss in float64 on the weights it ran with, plus lambda times the
        # functional `margin_r2` of each layer (not the loop's own sum, nor the regularizer's batched kernel)
        weights, margins, x = seen[step - 1]
        labels = torch.stack([train_ds.labels[(train_ds.pixel_values == xi).flatten(1).all(1)][0] for xi in x])
        ref = TinyConvNet().double()
        ref.load_state_dict(weights)
        task = F.cross_entropy(ref(x.double()), labels).item()
        r2 = sum(margin_r2(weights[f"{n}.weight"], m).double() for n, m in zip(("conv1", "conv2", "head"), margins))
        lam = 0.5 * min(1.0, (step - 1) / 2)
        assert values["task_loss"] == pytest.approx(task, rel=1e-5)
        assert values["r2_loss"] == pytest.approx(lam * r2.item(), rel=1e-5, abs=1e-12)
        assert values["loss"] == pytest.approx(task + lam * r2.item(), rel=1e-5)
        assert (values["r2_loss"] == 0) == (step == 1)  # lambda * R: 0 only while lambda is 0
        warm = step / 2 if step < 2 else 0.5 * (1 + math.cos(math.pi * (step - 2) / 6))
        assert values["lr"] == pytest.approx(0.1 * warm)  # the rate for the next step
        assert values["epoch"] == pytest.approx(step / 4)
    max_abs = max(w.abs().max().item() for w in (model.conv1.weight, model.conv2.weight, model.head.weight))
    assert train_logs[-1][1]["r2_max_abs"] == pytest.approx(max_abs)
    eval_logs = [(s, v) for s, v in tracker.logs if "eval_accuracy" in v]
    assert [s for s, _ in eval_logs] == [4, 8]
    assert eval_logs[-1][1]["eval_loss"] == pytest.approx(metrics["eval_loss"])


def test_mixed_precision_on_cpu(tmp_path, caplog):
    """bf16 autocast stays close to float32 but is not identical to it (autocast really ran); fp16 is float32 on
    the CPU in accelerate 1.x, and the loop says so."""
    from accelerate.state import AcceleratorState, GradientState

    results = {}
    for precision in ("no", "bf16", "fp16"):
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        model, regularizer, train_ds, _, config = build(str(tmp_path / precision), 8, 1)
        config = replace(config, num_epochs=1, mixed_precision=precision)
        with caplog.at_level("WARNING", logger="hf_r2.loop"):
            metrics = train_with_accelerate(model, train_ds, regularizer=regularizer, config=config)
        assert regularizer.margin.dtype == torch.float32 and all(math.isfinite(v) for v in metrics.values())
        results[precision] = model.state_dict()
    diffs = [(results["bf16"][k] - results["no"][k]).abs().max().item() for k in results["no"]]
    assert 0 < max(diffs) < 2e-2
    for name, value in results["no"].items():
        assert torch.equal(results["fp16"][name], value), name
    assert "`mixed_precision='fp16'` has no effect on the CPU" in caplog.text


def test_saves_timm_model_folder(tmp_path):
    import timm

    from hf_r2.models import create_model

    model = timm.create_model("test_convnext", num_classes=4)
    data = SyntheticImages(8, seed=0, size=32)
    r2_config = R2Config(loss="linf", weight=0.01)
    config = LoopConfig(output_dir=str(tmp_path), max_steps=1, per_device_batch_size=4, use_cpu=True)
    train_with_accelerate(model, data, r2_config=r2_config, config=config)
    folder = tmp_path / "model"
    assert {"config.json", "model.safetensors", "r2_config.json", "r2_stats.json"} <= set(os.listdir(folder))
    assert R2Config.from_pretrained(folder).to_dict() == r2_config.to_dict()
    stats = json.loads((folder / "r2_stats.json").read_text())
    assert stats["overall"]["max_abs"] == pytest.approx(
        max(m.weight.abs().max().item() for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    )
    reloaded = create_model(str(folder), pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(data.pixel_values), model.eval()(data.pixel_values))


def test_saves_transformers_model_folder(tmp_path, hf_convnext):
    from hf_r2.models import create_model, forward_logits

    data = SyntheticImages(8, seed=0, num_classes=10, size=32)
    config = LoopConfig(output_dir=str(tmp_path), max_steps=1, per_device_batch_size=4, use_cpu=True,
                        optimizer="adamw", learning_rate=1e-3, weight_decay=0.05)
    before = {k: v.clone() for k, v in hf_convnext.state_dict().items()}
    train_with_accelerate(hf_convnext, data, r2_config=R2Config(loss="soft_min_max"), config=config)
    assert any(not torch.equal(before[k], v) for k, v in hf_convnext.state_dict().items())
    folder = tmp_path / "model"
    assert json.loads((folder / "config.json").read_text())["model_type"] == "convnext"
    assert (folder / "r2_config.json").is_file() and (folder / "r2_stats.json").is_file()
    reloaded = create_model(str(folder), pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(forward_logits(reloaded, data.pixel_values),
                                   forward_logits(hf_convnext.eval(), data.pixel_values))


# ----------------------------------------------------------------------------------------------------------------
# Two processes (DDP over gloo on the CPU)
# ----------------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
def test_two_processes_match_one(tmp_path):
    """2 processes x micro-batch 2 x 2 accumulation steps == 1 process x batch 8, to float32 rounding.

    Accelerate's prepared loader gives rank r the loader batches r, r + 2, r + 4, ... of the (seeded, identical)
    shuffled order, so the 4 micro-batches of optimizer step k are samples 8k .. 8k + 7 of that order: the same
    samples as step k of the 1-process run. DDP averages the gradients over ranks, which equals the mean over the
    8 samples; the R2 parameters are outside DDP and stay identical because every rank computes the same R.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    out = tmp_path / "two"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--num_cpu_threads_per_process", "1", "--main_process_port", str(_free_port()),
        str(WORKER), "--out", str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [r["num_processes"] for r in ranks] == [2, 2]
    assert ranks[0]["distributed_type"] == "DistributedType.MULTI_CPU"

    # both ranks end identical, R2 parameters included
    for name in ranks[0]["model"]:
        assert torch.equal(ranks[0]["model"][name], ranks[1]["model"][name]), name
    assert torch.equal(ranks[0]["r2"]["margin"], ranks[1]["r2"]["margin"])
    assert ranks[0]["metrics"] == ranks[1]["metrics"]

    # one process, same global batch
    model, regularizer, train_ds, eval_ds, config = build(str(tmp_path / "one"), 8, 1)
    init_margin = regularizer.margin.detach().clone()
    metrics = train_with_accelerate(model, train_ds, eval_ds, regularizer=regularizer, config=config)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(ranks[0]["model"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(ranks[0]["r2"]["margin"], regularizer.margin.detach(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(init_margin, regularizer.margin.detach())
    # metrics averaged over ranks and, for evaluation, over the 10 samples once (the padded repeats dropped)
    two = ranks[0]["metrics"]
    assert two["global_step"] == metrics["global_step"] == 8
    for key in ("train_task_loss", "train_loss", "train_r2_loss", "r2_max_abs", "eval_loss", "eval_accuracy"):
        assert two[key] == pytest.approx(metrics[key], rel=1e-5), key


# ----------------------------------------------------------------------------------------------------------------
# examples/train_accelerate.py
# ----------------------------------------------------------------------------------------------------------------


def test_example_script_runs(tmp_path, data_dir):
    """One step of the example on 16 local CIFAR-10 images: flags -> dataclasses -> data -> loop -> model folder."""
    import importlib.util

    path = WORKER.parents[1] / "examples" / "train_accelerate.py"
    spec = importlib.util.spec_from_file_location("train_accelerate", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    metrics = example.main([
        "--model", "test_convnext", "--dataset", "cifar10-tiny", "--data_dir", str(data_dir), "--input_size", "32",
        "--max_train_samples", "16", "--max_eval_samples", "8", "--max_steps", "1", "--per_device_batch_size", "16",
        "--loss", "margin", "--r2-lambda", "0.01", "--output_dir", str(tmp_path), "--use_cpu",
    ])
    assert metrics["global_step"] == 1 and 0 <= metrics["eval_accuracy"] <= 1
    saved = json.loads((tmp_path / "model" / "config.json").read_text())
    assert saved["architecture"] == "test_convnext" and saved["num_classes"] == 10
    assert saved["pretrained_cfg"]["input_size"] == [3, 32, 32]
    assert R2Config.from_pretrained(tmp_path / "model").loss == "margin"
    with pytest.raises(SystemExit, match="^2$"):  # a config's ValueError becomes a usage error
        example.main(["--model", "test_convnext", "--optimizer", "adam"])


def test_r2_not_computed_at_lambda_zero(tmp_path, monkeypatch):
    """With `weight=0` (a baseline, or a QAT / DKM fine-tune without R2) the loop never evaluates R, which on a
    DKM-prepared model would be a second clustering pass per step; the range statistics are still logged."""
    from hf_r2.config import R2Config
    from hf_r2.regularizer import R2Regularizer

    model, _, train_ds, _, config = build(str(tmp_path), 8, 1)
    regularizer = R2Regularizer(model, R2Config(loss="margin", weight=0.0))
    calls = []
    monkeypatch.setattr(R2Regularizer, "forward", lambda self: calls.append(1) or torch.zeros(()))
    metrics = train_with_accelerate(model, train_ds, regularizer=regularizer, config=replace(config, num_epochs=1))
    assert calls == [] and metrics["train_r2_loss"] == 0.0 and metrics["r2_max_abs"] > 0
