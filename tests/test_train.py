"""Tests of `hf_r2.train`: the one training recipe (`train_model`) and `run_train`, what `hf-r2 train` runs."""

import json

import pytest
import torch
from conftest import tiny_train_argv

from hf_r2.commands.train import _parse_train_args
from hf_r2.train import run_train, train_model


def test_train_end_to_end_saves_a_loadable_model(data_dir, tmp_path):
    from hf_r2.data import collate_fn, load_image_dataset, with_transforms
    from hf_r2.metrics import evaluate_accuracy
    from hf_r2.models import create_model

    out = tmp_path / "run"
    argv = tiny_train_argv(data_dir, out, "--r2_loss", "margin", "--r2_weight", "0.1")
    results = run_train(*_parse_train_args(argv))
    trainer = results["trainer"]
    for name in ("model.safetensors", "config.json", "r2_config.json", "all_results.json", "eval_results.json",
                 "train_results.json", "trainer_state.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "r2_config.json").read_text())["loss"] == "margin"
    assert trainer.state.global_step == 2
    info = json.loads((out / "r2_training.json").read_text())
    assert info["dataset"] == "cifar10-tiny" and info["dataset_id"] == "uoft-cs/cifar10"
    assert info["training_arguments"]["max_steps"] == 2 and info["training_arguments"]["seed"] == trainer.args.seed

    loaded = create_model(str(out), pretrained=True).eval()
    assert loaded.pretrained_cfg["label_names"][:2] == ["airplane", "automobile"]
    assert tuple(loaded.pretrained_cfg["input_size"]) == (3, 32, 32)  # trained size recorded for preprocessing
    trained = trainer.model.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), trained(x), rtol=0, atol=0)

    # the reported eval accuracy is that of the saved model on the same 32 eval images
    saved = json.loads((out / "all_results.json").read_text())
    ds = load_image_dataset("cifar10-tiny", data_dir=data_dir, max_train_samples=64, max_eval_samples=32,
                            seed=trainer.args.seed)  # the subset `hf-r2 train` drew
    loader = torch.utils.data.DataLoader(with_transforms(ds["test"], loaded, train=False), batch_size=8,
                                         collate_fn=collate_fn)
    mine = evaluate_accuracy(loaded, loader)
    assert saved["eval_accuracy"] == pytest.approx(mine["accuracy"])
    assert saved["eval_task_loss"] == pytest.approx(mine["loss"], rel=1e-4)
    assert saved["eval_samples"] == 32 and saved["train_samples"] == 64


def test_train_model_trains_saves_and_records_the_dataset(tmp_path):
    from conftest import TinyImages, make_timm

    from hf_r2.training_args import R2TrainingArguments

    model = make_timm("test_resnet")
    args = R2TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=8,
                               report_to="none", save_strategy="no", disable_tqdm=True,
                               dataloader_pin_memory=False, r2_loss="linf", r2_weight=0.1)
    trainer, result = train_model(model, args, TinyImages(16), dataset="cifar10-tiny")
    assert trainer.state.global_step == 2 and result.metrics["train_runtime"] >= 0
    for name in ("model.safetensors", "config.json", "r2_config.json", "r2_training.json"):
        assert (tmp_path / "run" / name).is_file(), name
    info = json.loads((tmp_path / "run" / "r2_training.json").read_text())
    assert info["dataset"] == "cifar10-tiny" and info["dataset_id"] == "uoft-cs/cifar10"


def test_r2_fine_tune_of_a_trained_folder_starts_from_its_weights_and_ramps_lambda(data_dir, tmp_path):
    """`hf-r2 train --model FOLDER --pretrained --r2_loss margin --r2_warmup_steps N`: the fine-tune starts from the
    saved weights (so the margins start at their max |w|) and lambda ramps in linearly from 0."""
    from hf_r2.models import create_model

    base = tmp_path / "baseline"
    run_train(*_parse_train_args(tiny_train_argv(data_dir, base, "--r2_weight", "0")))
    start = create_model(str(base), pretrained=True)
    argv = tiny_train_argv(data_dir, tmp_path / "ft", "--model_name_or_path", str(base), "--pretrained", "true",
                           "--r2_loss", "margin", "--r2_weight", "0.5", "--r2_warmup_steps", "4",
                           "--learning_rate", "1e-12", "--logging_steps", "1", "--max_steps", "3")
    trainer = run_train(*_parse_train_args(argv))["trainer"]
    # margins started at each layer's largest |w| of the loaded weights (a learning rate of 1e-12 keeps them there)
    expected = torch.stack([w.detach().abs().amax() for w in (m.weight for _, m in _targets(start))])
    torch.testing.assert_close(trainer.regularizer.margin.detach(), expected, rtol=1e-6, atol=1e-9)
    lambdas = [log["r2_lambda"] for log in trainer.state.log_history if "r2_lambda" in log and "loss" in log]
    assert lambdas[:3] == pytest.approx([0.5 * 0 / 4, 0.5 * 1 / 4, 0.5 * 2 / 4])  # lambda at steps 0, 1, 2


def _targets(model):
    from hf_r2 import find_target_modules

    return find_target_modules(model)
