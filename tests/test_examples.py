"""The example scripts as a user runs them: `examples/train_trainer.py` (the input-size flag, one final evaluation)
and what `examples/train_accelerate.py` prints at its end (its run itself is tested in tests/test_loop.py)."""

from __future__ import annotations

import ast
import importlib.util
import json
import runpy
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_trainer_example_trains_at_the_given_input_size_and_evaluates_once_at_the_end(tmp_path, data_dir,
                                                                                     monkeypatch, capsys):
    """`--input_size 32` trains, evaluates and saves at 32 pixels; the evaluation of the last epoch is the final one
    (it printed a second evaluation of the same weights before)."""
    from hf_r2.trainer import R2Trainer

    sizes, evaluated = [], []
    evaluate = R2Trainer.evaluate

    def counted(self, *args, **kwargs):
        sizes.append(tuple(next(iter(self.get_eval_dataloader()))["pixel_values"].shape[-2:]))
        evaluated.append(self.state.global_step)
        return evaluate(self, *args, **kwargs)

    monkeypatch.setattr(R2Trainer, "evaluate", counted)
    out = tmp_path / "run"
    argv = ["--dataset", "cifar10-tiny", "--data_dir", str(data_dir), "--input_size", "32", "--max_train_samples",
            "32", "--max_eval_samples", "16", "--per_device_train_batch_size", "16", "--per_device_eval_batch_size",
            "16", "--num_train_epochs", "1", "--r2_warmup_steps", "0", "--output_dir", str(out), "--use_cpu", "true",
            "--disable_tqdm", "true", "--dataloader_pin_memory", "false", "--save_strategy", "no"]
    monkeypatch.setattr(sys, "argv", [str(EXAMPLES / "train_trainer.py"), *argv])
    runpy.run_path(str(EXAMPLES / "train_trainer.py"), run_name="__main__")
    assert evaluated == [2] and sizes == [(32, 32)]  # once, after the last of its 2 steps
    final = ast.literal_eval(capsys.readouterr().out.strip().splitlines()[-1])
    assert final["step"] == 2 and 0 <= final["eval_accuracy"] <= 1
    assert json.loads((out / "config.json").read_text())["pretrained_cfg"]["input_size"] == [3, 32, 32]


def test_accelerate_example_says_where_it_saved_the_model(tmp_path, data_dir, capsys):
    path = EXAMPLES / "train_accelerate.py"
    spec = importlib.util.spec_from_file_location("train_accelerate", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main(["--model", "test_resnet", "--dataset", "cifar10-tiny", "--data_dir", str(data_dir), "--input_size",
                  "32", "--max_train_samples", "8", "--max_eval_samples", "4", "--max_steps", "1",
                  "--per_device_batch_size", "8", "--output_dir", str(tmp_path), "--use_cpu"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"Saved the model to {tmp_path / 'model'}"
    assert (tmp_path / "model" / "model.safetensors").is_file()
