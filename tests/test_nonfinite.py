"""Non-finite values are never a silent result (issue 35): through the real entry points (the `hf-r2` command line
via `hf_r2.cli.main`, the public API), NaN / inf in a number the user typed, in a training's loss, in a model's
weights or in a numeric self-check is refused or reported in one line, and nothing non-finite is saved as a result."""

import json
import math

import numpy as np
import pytest
import torch

from hf_r2 import R2Config, R2TrainingArguments
from hf_r2.cli import main


def _one_error_line(err: str, command: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith(f"hf-r2 {command}: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---- numbers the user types -------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("name", ["r2_lambda", "margin_penalty", "soft_min_max_penalty", "kurtosis_target"])
def test_r2_config_refuses_non_finite_numbers(name, value):
    with pytest.raises(ValueError, match=rf"^`{name}` must be a finite number, got {value!r}\.$"):
        R2Config(**{name: value})


def test_r2_config_refuses_a_string_in_one_line():
    with pytest.raises(ValueError, match=r"^`r2_lambda` must be a number, got str '0\.1'\.$"):
        R2Config(r2_lambda="0.1")
    with pytest.raises(ValueError, match=r"^`warmup_steps` must be an integer, got float 2\.5\.$"):
        R2Config(warmup_steps=2.5)
    assert R2Config(weight=1).weight == 1.0  # an int is a number


def test_training_arguments_refuse_non_finite_numbers(tmp_path):
    with pytest.raises(ValueError, match=r"`r2_lambda` must be a finite number, got nan"):
        R2TrainingArguments(output_dir=str(tmp_path), r2_lambda=float("nan"))
    with pytest.raises(ValueError, match=r"`learning_rate` must be a finite number, got inf"):
        R2TrainingArguments(output_dir=str(tmp_path), learning_rate=float("inf"))


@pytest.mark.parametrize("flag,value", [("--r2_lambda", "nan"), ("--r2-weight", "inf"), ("--learning_rate", "nan")])
def test_train_refuses_a_non_finite_flag_before_any_work(tmp_path, capsys, flag, value):
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="^2$"):
        main(["train", "--model", "test_resnet", "--output_dir", str(out), flag, value])
    line = _one_error_line(capsys.readouterr().err, "train")
    assert f"must be a finite number, got {value}" in line
    assert not out.exists()


def test_loop_config_refuses_non_finite_numbers(tmp_path):
    from hf_r2 import LoopConfig

    for kwargs in ({"learning_rate": float("inf")}, {"weight_decay": float("nan")}, {"momentum": float("nan")}):
        with pytest.raises(ValueError, match="must be a finite number"):
            LoopConfig(output_dir=str(tmp_path), **kwargs)


@pytest.mark.parametrize("command,flags,message", [
    ("ptq", ["--first-last-bits", "0"], "--first-last-bits got '0': --first-last-bits takes 2 to 8 or 'none'"),
    ("ptq", ["--first-last-bits", "fp"], "--first-last-bits takes 2 to 8 or 'none'"),
    ("qat", ["--r2-weight", "nan"], "--r2-weight got 'nan': --r2-weight takes a finite number >= 0"),
    ("qat", ["--learning-rate", "inf"], "--learning-rate takes a finite number > 0"),
    ("compress", ["--method", "dkm", "--epochs", "nan"], "--epochs takes a finite number > 0"),
])
def test_low_bit_flags_refuse_what_their_help_does_not_allow(model_dir, tmp_path, capsys, monkeypatch, command,
                                                                flags, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="^2$"):
        main([command, model_dir, *flags])
    assert message in _one_error_line(capsys.readouterr().err, command)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no export folder


def test_ptq_first_last_bits_none_still_means_like_the_others():
    from hf_r2.commands.quant import ptq_command_parser

    parser = ptq_command_parser()
    assert parser.parse_args(["m", "--first-last-bits", "none"]).first_last_bits is None
    assert parser.parse_args(["m", "--a-bits", "0"]).a_bits is None  # an activation width of 0 is float


# ---- JSON --------------------------------------------------------------------------------------------------------


def test_json_files_hold_no_nan_tokens(tmp_path):
    from hf_r2.saving import save_r2_files

    stats = {"max_abs": float("inf"), "per_layer": {"fc": {"kurtosis": float("nan"), "max_abs": 1.5}}}
    save_r2_files(str(tmp_path), R2Config(), stats)
    text = (tmp_path / "r2_stats.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    loaded = json.loads(text, parse_constant=lambda token: pytest.fail(f"non-standard JSON token {token}"))
    assert loaded == {"max_abs": None, "per_layer": {"fc": {"kurtosis": None, "max_abs": 1.5}}}
    assert not math.isnan(stats["per_layer"]["fc"]["max_abs"])  # the caller's dict is left as it was
    assert math.isnan(stats["per_layer"]["fc"]["kurtosis"])


def _nan_(model: torch.nn.Module, name: str) -> None:
    with torch.no_grad():
        dict(model.named_parameters())[name].view(-1)[0] = float("nan")


# ---- a training that diverges ------------------------------------------------------------------------------------


def test_train_with_a_huge_learning_rate_stops_in_one_line(data_dir, tmp_path, capsys):
    """`hf-r2 train --learning_rate 1e30`: the loss of step 2 is NaN; the run stops there with one line naming the
    step, the likely cause and the last checkpoint (saved at step 1, finite); no model is saved as the result."""
    from conftest import tiny_train_argv
    from safetensors.torch import load_file

    out = tmp_path / "run"
    argv = tiny_train_argv(data_dir, out, "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "1",
                           "--learning_rate", "1e30")
    assert main(["train", *argv]) == 1
    captured = capsys.readouterr()
    line = _one_error_line(captured.err, "train")
    assert "Saved the model" not in captured.out
    assert "the training diverged at step 2: the loss is nan" in line
    assert "learning rate" in line and "R2 lambda (`r2_lambda`)" in line
    assert f"the last good checkpoint is {out / 'checkpoint-1'}" in line and "the model was not saved" in line
    # no model.safetensors, no r2_stats.json; the manifest says what the run wrote
    assert sorted(p.name for p in out.iterdir()) == [".hf-r2-output.json", "checkpoint-1"]
    weights = load_file(out / "checkpoint-1" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_r2_trainer_stops_a_users_script_and_refuses_to_save_nan(tmp_path):
    """The guard is R2Trainer's own: a script that builds the trainer gets the same stop, and `save_model` of a
    model with NaN weights writes nothing."""
    from conftest import TinyImages, make_timm

    from hf_r2 import R2Trainer
    from hf_r2.divergence import DivergedError

    args = R2TrainingArguments(output_dir=str(tmp_path / "run"), use_cpu=True, report_to="none", disable_tqdm=True,
                               save_strategy="no", per_device_train_batch_size=4, max_steps=4, learning_rate=1e30)
    trainer = R2Trainer(make_timm("test_resnet"), args, train_dataset=TinyImages(16))
    with pytest.raises(DivergedError, match=r"^the training diverged at step 2: the loss is nan; .* no checkpoint was "
                                            r"saved before it; the model was not saved$") as info:
        trainer.train()
    assert info.value.step == 2 and info.value.checkpoint is None
    # step 2's forward left BN's running statistics infinite (the optimizer never stepped on its NaN loss)
    with pytest.raises(DivergedError, match=r"^the training diverged by step 1: conv1\.1\.running_var holds 0 NaN and 16 inf of 16 "
                                            r"values; .*the model was not saved$"):
        trainer.save_model(str(tmp_path / "saved"))
    assert not (tmp_path / "saved" / "model.safetensors").exists()


def test_accelerate_loop_stops_and_saves_no_model(tmp_path):
    from accelerate.state import AcceleratorState, GradientState
    from conftest import TinyImages, make_timm

    from hf_r2 import LoopConfig, train_with_accelerate
    from hf_r2.divergence import DivergedError

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    config = LoopConfig(output_dir=str(tmp_path), max_steps=4, per_device_batch_size=4, learning_rate=1e30,
                        checkpointing_steps=1, use_cpu=True, save_model=True)
    try:
        with pytest.raises(DivergedError, match=r"^the training diverged at step 2: the loss is nan; .*learning "
                                                r"rate.*; the last good checkpoint is .*step_1; the model was not "
                                                r"saved$"):
            train_with_accelerate(make_timm("test_resnet"), TinyImages(16), r2_config=R2Config(), config=config)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    assert not (tmp_path / "model").exists()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_1"]


def test_save_model_folder_refuses_non_finite_weights(tmp_path):
    from conftest import make_timm

    from hf_r2._finite import NonFiniteError
    from hf_r2.saving import save_model_folder

    model = make_timm("test_resnet")
    with torch.no_grad():
        model.fc.bias[1] = float("inf")
    with pytest.raises(NonFiniteError, match=r"fc\.bias holds 0 NaN and 1 inf of 10 values"):
        save_model_folder(model, str(tmp_path / "m"))
    assert not (tmp_path / "m").exists()


# ---- a saved model with NaN / inf weights ------------------------------------------------------------------------


@pytest.fixture
def nan_model_dir(model_dir):
    """`model_dir` with one NaN in `layer1.0.conv2.weight` (what a diverged training leaves)."""
    from safetensors.torch import load_file, save_file

    path = f"{model_dir}/model.safetensors"
    weights = load_file(path)
    weights["layer1.0.conv2.weight"].view(-1)[3] = float("nan")
    save_file(weights, path, metadata={"format": "pt"})
    return model_dir


@pytest.mark.parametrize("command,flags", [
    ("evaluate", []),
    ("ptq", ["--calibration-samples", "32"]),
    ("compress", ["--method", "kmeans", "--calibration-samples", "32"]),
    ("qat", ["--calibration-samples", "32", "--max-train-samples", "16"]),
    ("export", ["--format", "onnx"]),
])
def test_every_verb_refuses_a_model_with_nan_weights(nan_model_dir, data_dir, tmp_path, capsys, monkeypatch,
                                                     command, flags):
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    folder_before = {p.name: p.read_bytes() for p in (tmp_path / "model").iterdir()}
    data = [] if command == "export" else ["--dataset", "cifar10-tiny", "--data-dir", str(data_dir), "--input-size",
                                            "32", "--max-eval-samples", "16", "--batch-size", "16"]
    assert main([command, nan_model_dir, *data, *flags]) == 1
    line = _one_error_line(capsys.readouterr().err, command)
    assert f"the model {nan_model_dir!r} has non-finite weights: layer1.0.conv2.weight holds 1 NaN and 0 inf" in line
    assert "lower learning rate" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no export folder
    assert {p.name: p.read_bytes() for p in (tmp_path / "model").iterdir()} == folder_before  # nothing recorded


def test_library_verbs_refuse_nan_weights_naming_the_layer(tmp_path):
    from conftest import make_timm

    from hf_r2._finite import NonFiniteError
    from hf_r2.quant import PalettizeConfig, PTQConfig, palettize_, quantize_, save_low_bit

    model = make_timm("test_resnet")
    _nan_(model, "layer2.0.conv1.weight")
    bad = r"has non-finite weights: layer2\.0\.conv1\.weight holds 1 NaN"
    with pytest.raises(NonFiniteError, match=rf"^the model to palettize {bad}"):
        palettize_(model, PalettizeConfig(bits=2))
    with pytest.raises(NonFiniteError, match=rf"^the model to quantize {bad}"):
        quantize_(model, PTQConfig(w_bits=4, a_bits=None, bn="keep"))
    with pytest.raises(NonFiniteError, match=rf"^the model to export {bad}"):
        save_low_bit(model, tmp_path / "export")
    assert not (tmp_path / "export").exists()


# ---- numeric self-checks fail on NaN -----------------------------------------------------------------------------


def test_onnx_check_fails_on_nan_logits(tmp_path):
    """`compare_onnx`: a NaN logit is a disagreement and fails the check (argmax takes NaN as the largest, so both
    runtimes' NaN rows used to "agree" at 100%)."""
    pytest.importorskip("onnxruntime")
    from conftest import make_timm

    from hf_r2.quant.export.onnx_export import compare_onnx, export_onnx

    model = make_timm("test_resnet").eval()
    path = export_onnx(model, tmp_path / "m.onnx", input_size=32)["path"]
    images = torch.randn(4, 3, 32, 32)
    assert compare_onnx(model, path, images)["passed"]
    with torch.no_grad():
        model.fc.weight.fill_(float("nan"))
    check = compare_onnx(model, path, images)
    assert math.isnan(check["max_abs_diff"]) and check["nonfinite_logits"] == 40
    assert check["top1_agreement"] == 0.0 and check["passed"] is False


def test_export_writes_nothing_when_its_check_fails(model_dir, tmp_path, capsys):
    """Weights too large for float32 (finite, so loaded) give inf / NaN logits: `hf-r2 export` used to print
    "max |logit difference| nan ... top-1 agreement 100.0%" and record the file; now it fails in one line and neither
    `model.onnx` nor `export_results.json` is written."""
    pytest.importorskip("onnxruntime")
    from safetensors.torch import load_file, save_file

    path = f"{model_dir}/model.safetensors"
    weights = load_file(path)
    weights["fc.weight"].fill_(3e38)
    save_file(weights, path, metadata={"format": "pt"})
    before = sorted(p.name for p in (tmp_path / "model").iterdir())
    assert main(["export", model_dir, "--format", "onnx"]) == 1
    line = _one_error_line(capsys.readouterr().err, "export")
    assert "the ONNX file does not compute what hf-r2 computes on 8 random inputs: max |logit difference| nan" in line
    assert "top-1 agreement 0.0%" in line and f"nothing was written to {model_dir}/model.onnx" in line
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == before


# ---- KURE on a layer without spread ------------------------------------------------------------------------------


@pytest.mark.parametrize("per_channel", [False, True])
def test_kure_on_one_weight_or_a_constant_row_gives_finite_gradients(per_channel):
    """A layer of one weight (its variance is 0) made the batched KURE kernel's gradient NaN (`inf * 0`); a row
    without spread now counts as kurtosis 0 and passes no gradient, in the kernel and the reference alike."""
    from torch import nn

    from hf_r2 import R2Regularizer
    from hf_r2.losses import kurtosis_r2

    model = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 1), nn.Linear(1, 1))  # the last: one weight
    with torch.no_grad():
        model[0].weight[2].fill_(0.3)  # a constant row
    reg = R2Regularizer(model, R2Config(loss="kurtosis", per_channel=per_channel))
    value = reg()
    value.backward()
    references = [w.detach().clone().requires_grad_() for w in reg.weights()]
    expected = sum(kurtosis_r2(w, 1.8, per_channel) for w in references)
    expected.backward()
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    for w, ref in zip(reg.weights(), references):
        assert torch.isfinite(w.grad).all() and torch.isfinite(ref.grad).all()
        torch.testing.assert_close(w.grad, ref.grad, rtol=1e-4, atol=1e-6)
    assert model[2].weight.grad.item() == 0.0  # one weight: no gradient
    assert model[0].weight.grad.abs().sum() > 0  # the other rows still get theirs
    if per_channel:
        assert model[0].weight.grad[2].abs().sum() == 0.0


# ---- a model that learnt nothing ---------------------------------------------------------------------------------


def test_train_reports_a_model_at_chance_level(data_dir, tmp_path, capsys):
    """A training that leaves the model at chance (here: learning rate 0, the random initialisation) ends with a line
    that says so and what to try, not just "Saved the model"."""
    from conftest import tiny_train_argv

    out = tmp_path / "run"
    assert main(["train", *tiny_train_argv(data_dir, out, "--learning_rate", "0")]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(f"Saved the model to {out} (eval accuracy ")
    assert ", but that is chance level: always guessing the most frequent class scores " in last
    assert "on these 32 images" in last and "the model learnt nothing: train longer" in last
    results = json.loads((out / "eval_results.json").read_text())
    assert 0 < results["eval_chance_accuracy"] < 1 and results["eval_predicted_classes"] >= 1
    assert (out / "model.safetensors").is_file()  # a finite model at chance is still saved, and said to be at chance


def test_chance_level_rule():
    from transformers import EvalPrediction

    from hf_r2.metrics import at_chance, compute_accuracy_and_chance

    labels = np.array([0, 0, 0, 1, 2, 3, 4, 5])
    logits = np.zeros((8, 6))
    logits[:, 0] = 1.0  # one class for every image
    metrics = compute_accuracy_and_chance(EvalPrediction(predictions=logits, label_ids=labels))
    assert metrics == {"accuracy": 0.375, "chance_accuracy": 0.375, "predicted_classes": 1}
    assert at_chance(0.375, 0.375, 8)
    assert at_chance(0.105, 0.1, 10_000) and not at_chance(0.11, 0.1, 10_000)  # 2 standard errors: 0.006
    assert not at_chance(0.9, 0.1, 32) and not at_chance(float("nan"), 0.1, 32)


def test_a_constant_layer_keeps_the_logs_and_trainer_state_finite(tmp_path):
    """A zero-initialised head has std 0 (max |w| / std = inf, kurtosis NaN): the overall statistics R2Trainer logs
    leave it out, so `trainer_state.json` is valid JSON; `r2_stats.json` holds null for its own entries."""
    from conftest import TinyImages, make_timm

    from hf_r2 import R2Trainer

    model = make_timm("test_resnet")
    torch.nn.init.zeros_(model.fc.weight)
    args = R2TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", disable_tqdm=True,
                               save_strategy="no", per_device_train_batch_size=4, max_steps=2, logging_steps=1,
                               learning_rate=0.0, r2_skip_frozen=False)
    trainer = R2Trainer(model, args, train_dataset=TinyImages(8))
    trainer.train()
    trainer.save_model()
    trainer.save_state()
    strict = {"parse_constant": lambda token: pytest.fail(f"non-standard JSON token {token}")}
    logged = [e for e in json.loads((tmp_path / "trainer_state.json").read_text(), **strict)["log_history"]
              if "r2_mean_kurtosis" in e]
    assert logged and all(math.isfinite(e[k]) for e in logged for k in ("r2_mean_kurtosis", "r2_mean_max_over_std"))
    stats = json.loads((tmp_path / "r2_stats.json").read_text(), **strict)
    assert stats["per_layer"]["fc"]["kurtosis"] is None and stats["per_layer"]["fc"]["max_over_std"] is None
