"""Tests of `hf-r2 train`'s command line: the dataclass flags, their two spellings, config files with override
flags, and argument errors (the training itself: tests/test_train.py)."""

import json

import pytest
from conftest import tiny_train_argv

from hf_r2.cli import main
from hf_r2.commands.train import _parse_train_args


def test_train_help_shows_dataclass_fields(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_R2_CACHE", str(tmp_path))
    assert main(["train", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for flag in ("--model_name_or_path", "--dataset_name", "--input_size", "--augment", "--r2_loss", "--r2-lambda",
                 "--learning_rate", "--max-train-samples"):
        assert flag in out
    assert "Which R2 variant" in out  # the fields' metadata help


@pytest.mark.parametrize("flag", ["--r2-lambda", "--r2_lambda", "--r2-weight", "--r2_weight"])
def test_r2_lambda_flag_and_its_older_spellings(flag, tmp_path):
    """`--r2-lambda` is the flag; `--r2_weight` / `--r2-weight` (its older name) still set the same field."""
    args = _parse_train_args(["--model", "test_resnet", flag, "0.25", "--output_dir", str(tmp_path)])[2]
    assert args.r2_lambda == 0.25 and args.r2_config.r2_lambda == 0.25


def test_config_file_may_use_the_older_r2_weight(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"model": "test_resnet", "output_dir": str(tmp_path), "r2_weight": 0.5}))
    assert _parse_train_args([str(path)])[2].r2_lambda == 0.5


def test_dash_and_underscore_spellings(data_dir, tmp_path):
    a = _parse_train_args(["--model_name_or_path", "test_resnet", "--max_train_samples", "5", "--r2_warmup_steps",
                           "3", "--output_dir", str(tmp_path)])
    b = _parse_train_args(["--model", "test_resnet", "--max-train-samples", "5", "--r2-warmup-steps", "3",
                           "--output-dir", str(tmp_path)])
    assert a[0] == b[0] and a[1] == b[1]
    assert a[1].max_train_samples == 5 and b[2].r2_warmup_steps == 3 and b[2].output_dir == str(tmp_path)


@pytest.mark.parametrize("suffix", ["json", "yaml"])
def test_train_from_config_file_with_override(data_dir, tmp_path, suffix, capsys):
    import yaml

    argv = tiny_train_argv(data_dir, tmp_path / "run")
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
        main(["train", "--model", "test_resnet", "--r2_lambda", "-1", "--output_dir", str(tmp_path)])
    assert info.value.code == 2
    assert "`r2_lambda` must be >= 0, got -1" in capsys.readouterr().err

    with pytest.raises(SystemExit, match="^2$"):
        main(["train", "--dataset", "cifar10-tiny"])
    assert "--model_name_or_path" in capsys.readouterr().err  # required

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model_name_or_path": "test_resnet", "lerning_rate": 0.1}))
    with pytest.raises(SystemExit, match="^2$"):
        main(["train", str(bad)])
    assert "unknown fields ['lerning_rate']" in capsys.readouterr().err


def _run_cli(*argv):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "hf_r2", "train", *argv], env=env, capture_output=True, text=True,
                          timeout=180)


def test_help_lists_hf_r2_flags_first_in_their_groups(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_R2_CACHE", str(tmp_path))
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    # cached: the second call prints the file, without building the parser (which imports transformers)
    (cached,) = tmp_path.glob("train-help-*.txt")
    assert cached.read_text() == out
    cached.write_text(out + "from the cache\n")
    assert main(["train", "-h"]) == 0 and capsys.readouterr().out.endswith("from the cache\n")
    titles = ("model", "data", "R2-Loss", "training (transformers.TrainingArguments)")
    heads = [out.index(f"\n{title}:\n") for title in titles]
    assert heads == sorted(heads)
    assert heads[0] < out.index("  --model_name_or_path") < heads[1] < out.index("  --input_size") < heads[2]
    assert heads[2] < out.index("  --r2_lambda") < heads[3] < out.index("  --learning_rate")
    assert len(out.split("\n\n", 1)[0].splitlines()) == 1  # a one-line usage, not 100 lines of flags
    # another terminal width: argparse wraps to it, so it has its own cached text
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["train", "-h"]) == 0
    wide = capsys.readouterr().out
    assert len(list(tmp_path.glob("train-help-*.txt"))) == 2 and max(map(len, wide.splitlines())) > 120


@pytest.mark.parametrize("flag", ["--max_train_samples", "--input_size"])
def test_bad_sizes_are_one_line_errors_before_any_work(tmp_path, flag):
    out = tmp_path / "run"
    done = _run_cli("--model", "test_resnet", flag, "0", "--output_dir", str(out))
    assert done.returncode != 0 and not out.exists()
    assert len(done.stderr.strip().splitlines()) == 1 and flag in done.stderr, done.stderr


def test_output_dir_of_another_run_is_refused_unless_overwrite(data_dir, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoint-3").mkdir(parents=True)
    (out / "checkpoint-3" / "trainer_state.json").write_text("{}")
    for name in ("model.safetensors", "low_bit_results.json", "r2_stats.json"):
        (out / name).write_text("old run")
    (out / "notes.txt").write_text("the user's own file")
    refused = _run_cli(*tiny_train_argv(data_dir, out))
    assert refused.returncode != 0 and "--overwrite_output_dir" in refused.stderr, refused.stderr[-2000:]
    assert "already holds a training run" in refused.stderr
    assert (out / "model.safetensors").read_text() == "old run" and (out / "checkpoint-3").is_dir()  # untouched

    done = _run_cli(*tiny_train_argv(data_dir, out, "--overwrite_output_dir", "true"))
    assert done.returncode == 0, done.stderr[-3000:]
    names = {p.name for p in out.iterdir()}
    assert "checkpoint-3" not in names and "low_bit_results.json" not in names  # the old run's files are gone
    assert (out / "notes.txt").read_text() == "the user's own file" and "model.safetensors" in names
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2


def test_resume_true_and_latest_continue_the_run_in_its_folder(data_dir, tmp_path):
    """`--resume_from_checkpoint True` (what transformers users type) and `latest`: the newest complete checkpoint
    of the output folder, which is then not refused as "another run"."""
    from hf_r2.train import prepare_output_dir

    out = tmp_path / "run"
    assert main(["train", *tiny_train_argv(data_dir, out, "--save_strategy", "steps", "--save_steps", "1")]) == 0
    for value in ("True", "latest"):
        *_, args = _parse_train_args(tiny_train_argv(data_dir, out, "--resume_from_checkpoint", value))
        assert prepare_output_dir(args) == str(out / "checkpoint-2")
    *_, args = _parse_train_args(tiny_train_argv(data_dir, out))
    with pytest.raises(ValueError, match="already holds a training run"):
        prepare_output_dir(args)


def test_resume_command_replaces_the_resume_flag():
    from hf_r2.commands.train import resume_command

    argv = ["--model", "test_resnet", "--resume_from_checkpoint", "out/checkpoint-1", "--output_dir", "my out"]
    assert resume_command(argv) == ("hf-r2 train --model test_resnet --output_dir 'my out' "
                                    "--resume_from_checkpoint latest")
    assert resume_command(["--resume-from-checkpoint=x"]) == "hf-r2 train --resume_from_checkpoint latest"


def test_a_project_folder_is_not_a_run_and_nothing_is_cleared_before_the_data_loads(data_dir, tmp_path):
    """Only hf-r2's and the Trainer's own files make a folder a run's: a project folder with its README, a
    config.json and a model/ of its own holds no run files. With --overwrite_output_dir, the old run's files go only
    once data and model loaded: a typo in --dataset leaves them in place."""
    from hf_r2.output_folder import run_files

    project = tmp_path / "project"
    (project / "model").mkdir(parents=True)
    for name in ("README.md", "config.json"):
        (project / name).write_text("the user's own")
    assert run_files(str(project)) == []
    run = tmp_path / "run"
    assert main(["train", *tiny_train_argv(data_dir, run)]) == 0
    before = sorted(p.name for p in run.iterdir())
    argv = tiny_train_argv(data_dir, run, "--overwrite_output_dir", "true")
    argv[argv.index("cifar10-tiny")] = str(tmp_path / "no-such-data")
    done = _run_cli(*argv)
    assert done.returncode == 1 and "no-such-data" in done.stderr
    assert sorted(p.name for p in run.iterdir()) == before  # nothing removed: the error came first


def test_latest_without_a_checkpoint_does_not_train_over_a_finished_run(data_dir, tmp_path):
    from hf_r2.train import prepare_output_dir

    out = tmp_path / "run"
    assert main(["train", *tiny_train_argv(data_dir, out)]) == 0  # save_strategy no: a run without checkpoints
    *_, args = _parse_train_args(tiny_train_argv(data_dir, out, "--resume_from_checkpoint", "latest"))
    with pytest.raises(ValueError, match="has no complete checkpoint to resume from .*--overwrite_output_dir"):
        prepare_output_dir(args)
    empty = tmp_path / "fresh"  # an interrupted run before its first save: latest starts from the beginning
    *_, args = _parse_train_args(tiny_train_argv(data_dir, empty, "--resume_from_checkpoint", "latest"))
    assert prepare_output_dir(args) is None


@pytest.mark.parametrize("name, text, kind", [("c.json", '{"model": "x",', "JSON"), ("c.yaml", "model: [x\n", "YAML")])
def test_config_file_syntax_errors_are_one_line(tmp_path, capsys, name, text, kind):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(SystemExit, match="^2$"):
        main(["train", str(path)])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"is not valid {kind}" in err and name in err


def test_a_folder_of_yours_is_refused_and_with_add_to_output_dir_nothing_of_yours_is_touched(data_dir, tmp_path,
                                                                                              capsys):
    """`hf-r2 train --output_dir proj` into a folder of the user's: refused in one line naming the flag, nothing
    written. With `--add_to_output_dir` the run trains beside the user's files (content, mode and links kept) and
    records what it wrote; `--overwrite_output_dir` later removes only that, also keeping a file the user added after
    the first run. A file of the user's with a name the run writes (config.json) is refused with either flag."""
    import os
    import stat

    project = tmp_path / "proj"
    (project / "data").mkdir(parents=True)
    (project / "data" / "x.csv").write_text("1,2\n")
    (project / "notes.txt").write_text("mine")
    os.symlink(project / "notes.txt", project / "notes-link")
    project.chmod(0o700)
    before = {p.relative_to(project): (p.is_symlink(), p.read_text() if p.is_file() else None)
              for p in project.rglob("*")}

    assert main(["train", *tiny_train_argv(data_dir, project)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--add_to_output_dir" in err and "notes.txt" in err, err
    assert sorted(os.listdir(project)) == ["data", "notes-link", "notes.txt"]

    def yours_unchanged():
        for path, (link, text) in before.items():
            assert (project / path).is_symlink() == link and (
                text is None or (project / path).read_text() == text), path
        assert stat.S_IMODE(project.stat().st_mode) == 0o700

    assert main(["train", *tiny_train_argv(data_dir, project, "--add_to_output_dir", "true")]) == 0
    yours_unchanged()
    manifest = json.loads((project / ".hf-r2-output.json").read_text())
    assert manifest["kept"] == ["data", "notes-link", "notes.txt"] and manifest["finished"] is True
    assert {"model.safetensors", "config.json", "trainer_state.json"} <= set(manifest["written"])
    assert not {"data", "notes.txt"} & set(manifest["written"])

    (project / "later.txt").write_text("added after the run")
    (project / "old-run-extra.json").write_text("{}")
    manifest["written"].append("old-run-extra.json")  # as if the first run had written it
    (project / ".hf-r2-output.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(["train", *tiny_train_argv(data_dir, project)]) == 1  # a run now: refused without the flag
    assert "already holds a training run" in capsys.readouterr().err
    assert main(["train", *tiny_train_argv(data_dir, project, "--overwrite_output_dir", "true")]) == 0
    yours_unchanged()
    assert (project / "later.txt").read_text() == "added after the run"
    assert not (project / "old-run-extra.json").exists() and (project / "model.safetensors").is_file()
    assert json.loads((project / ".hf-r2-output.json").read_text())["kept"] == [
        "data", "later.txt", "notes-link", "notes.txt"]

    clash = tmp_path / "clash"
    clash.mkdir()
    (clash / "config.json").write_text('{"mine": true}')
    capsys.readouterr()
    for flag in ("--add_to_output_dir", "--overwrite_output_dir"):
        assert main(["train", *tiny_train_argv(data_dir, clash, "--add_to_output_dir", "true", flag, "true")]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "config.json of yours" in err, err
    assert os.listdir(clash) == ["config.json"] and (clash / "config.json").read_text() == '{"mine": true}'
