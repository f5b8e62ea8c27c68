"""Tests of the `hf-r2` command line: help, env, train end to end (flags and config files), errors, and the demo."""

import json
import os

import pytest
import torch

from hf_r2.cli import _parse_train_args, main, run_train


def _train_argv(data_dir, output_dir, *extra):
    return [
        "--model", "test_resnet", "--dataset", "cifar10-tiny", "--data-dir", str(data_dir), "--input-size", "32",
        "--max-train-samples", "64", "--max_eval_samples", "32", "--output-dir", str(output_dir), "--max_steps", "2",
        "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "16", "--save_strategy", "no",
        "--disable_tqdm", "true", "--dataloader_pin_memory", "false", *extra,
    ]


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "hf-r2" in out and all(cmd in out for cmd in ("train", "demo", "env"))
    assert main([]) == 1  # no command: help, non-zero status
    assert "usage: hf-r2" in capsys.readouterr().out


def test_train_help_shows_dataclass_fields(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for flag in ("--model_name_or_path", "--dataset_name", "--input_size", "--augment", "--r2_loss", "--r2_weight",
                 "--learning_rate", "--max-train-samples"):
        assert flag in out
    assert "Which R2 variant" in out  # the fields' metadata help


def test_env(capsys):
    import timm
    import transformers

    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "`hf-r2 version`" in out
    assert f"`torch version`: {torch.__version__.split('+')[0]}" in out
    assert f"`timm version`: {timm.__version__}" in out
    assert f"`transformers version`: {transformers.__version__}" in out
    with pytest.raises(SystemExit) as info:
        main(["env", "--bogus"])
    assert info.value.code == 2


def test_dash_and_underscore_spellings(data_dir, tmp_path):
    a = _parse_train_args(["--model_name_or_path", "test_resnet", "--max_train_samples", "5", "--r2_warmup_steps",
                           "3", "--output_dir", str(tmp_path)])
    b = _parse_train_args(["--model", "test_resnet", "--max-train-samples", "5", "--r2-warmup-steps", "3",
                           "--output-dir", str(tmp_path)])
    assert a[0] == b[0] and a[1] == b[1]
    assert a[1].max_train_samples == 5 and b[2].r2_warmup_steps == 3 and b[2].output_dir == str(tmp_path)


def test_train_end_to_end_saves_a_loadable_model(data_dir, tmp_path):
    from hf_r2.data import collate_fn, load_image_dataset, with_transforms
    from hf_r2.metrics import evaluate_accuracy
    from hf_r2.models import create_model

    out = tmp_path / "run"
    results = run_train(*_parse_train_args(_train_argv(data_dir, out, "--r2_loss", "margin", "--r2_weight", "0.1")))
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


@pytest.mark.parametrize("suffix", ["json", "yaml"])
def test_train_from_config_file_with_override(data_dir, tmp_path, suffix, capsys):
    import yaml

    argv = _train_argv(data_dir, tmp_path / "run")
    values = {}
    for key, value in zip(argv[::2], argv[1::2]):
        key = key.lstrip("-").replace("-", "_")
        values[{"model": "model_name_or_path", "dataset": "dataset_name"}.get(key, key)] = value
    values.update(max_steps=3, r2_loss="soft_min_max", input_size=32, max_train_samples=64)
    path = tmp_path / f"config.{suffix}"
    path.write_text(json.dumps(values) if suffix == "json" else yaml.safe_dump(values))
    assert main(["train", str(path), "--max-steps", "1"]) == 0  # the flag overrides the file
    state = json.loads((tmp_path / "run" / "trainer_state.json").read_text())
    assert state["global_step"] == 1
    assert json.loads((tmp_path / "run" / "r2_config.json").read_text())["loss"] == "soft_min_max"
    assert "Saved the model to" in capsys.readouterr().out


def test_bad_arguments(capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        main(["train", "--model", "test_resnet", "--r2_loss", "foo"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--r2_loss" in err and "invalid choice: 'foo'" in err and "'linf'" in err

    with pytest.raises(SystemExit) as info:
        main(["train", "--model", "test_resnet", "--r2_weight", "-1", "--output_dir", str(tmp_path)])
    assert info.value.code == 2
    assert "`r2_weight` must be >= 0, got -1" in capsys.readouterr().err

    with pytest.raises(SystemExit):
        main(["train", "--dataset", "cifar10-tiny"])
    assert "--model_name_or_path" in capsys.readouterr().err  # required

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model_name_or_path": "test_resnet", "lerning_rate": 0.1}))
    with pytest.raises(SystemExit):
        main(["train", str(bad)])
    assert "unknown fields ['lerning_rate']" in capsys.readouterr().err


def test_demo_runs_on_tiny_settings(data_dir, tmp_path, monkeypatch, capsys):
    """The demo is hf-r2 reproduce on demo_config: one model, baseline and R2, FP and low-bit rows side by side."""
    from hf_r2.demo import demo_config
    from hf_r2.models import create_model
    from hf_r2.regularizer import R2Regularizer

    monkeypatch.setenv("HF_R2_DATA_DIR", str(data_dir))
    out = tmp_path / "demo"
    argv = ["demo", "--output-dir", str(out), "--model", "test_resnet", "--dataset", "cifar10-tiny", "--epochs", "1",
            "--max-train-samples", "64", "--max-eval-samples", "32", "--batch-size", "32", "--bn-samples", "32",
            "--r2-loss", "linf", "--r2-weight", "0.5", "--no-progress"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert [v["name"] for v in results["config"]["variants"]] == ["baseline", "linf"]
    table = results["summary"]["test_resnet"]
    assert list(table) == ["FP", "W8A8 per-channel mse", "W4A8 per-channel mse", "W2A8 per-tensor maxabs",
                           "W2A8 per-tensor mse", "W2A8 per-channel maxabs", "W2A8 per-channel mse", "W2 k-means"]
    for setting, cells in table.items():
        assert set(cells) == {"baseline", "linf"}
        assert all(0.0 <= cell["mean"] <= 1.0 for cell in cells.values())
        assert f"| {setting} | {100 * cells['baseline']['mean']:.2f} | {100 * cells['linf']['mean']:.2f} |" in text
    runs = {run["variant"]["name"]: run for run in results["runs"]}
    assert runs["baseline"]["variant"]["weight"] == 0.0 and runs["linf"]["variant"]["weight"] == 0.5
    for run in runs.values():  # the reported ranges are those of the saved model
        saved = create_model(run["run_dir"], pretrained=True)
        assert R2Regularizer(saved).stats()["overall"]["max_abs"] == pytest.approx(run["stats"]["overall"]["max_abs"])
    plots = [path for kind in results["plots"]["test_resnet"].values() for path in [kind]]
    assert len(plots) == 3 and all(os.path.isfile(p) and p in text for p in plots)
    assert str(out / "results.json") in text
    assert "Low-bit: first and last layer at 8 bits in every row; PTQ and clustering rows re-estimate BN on 32 " \
        "training images." in text  # no QAT, DKM or AdaRound row in the demo: not mentioned

    # a rerun reuses both trainings and every row; a bad setting is an error, not a traceback
    assert main(argv) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["timing"]["trained_now"] == 0 and again["timing"]["rows_computed"] == 0
    assert again["summary"] == results["summary"]
    capsys.readouterr()
    assert main([*argv[:-1], "--bits", "9", "--no-progress"]) == 1
    assert "hf-r2 demo: error:" in capsys.readouterr().err
    with pytest.raises(ValueError, match="Unknown demo setting"):
        demo_config(epoch=3)
