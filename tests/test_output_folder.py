"""Tests of `hf_r2.output_folder`: what of an output folder is a run's (the training itself: tests/commands/
test_train.py, through `hf-r2 train`)."""

import json

import pytest

from hf_r2.output_folder import MANIFEST_NAME, check_output_folder, clear_run, finish_run, run_files, start_run


def test_a_run_killed_before_it_said_what_it_wrote_loses_only_what_is_not_kept(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    start_run(str(tmp_path))  # then `kill -9`: `written` never recorded
    (tmp_path / "checkpoint-1").mkdir()
    (tmp_path / "scratch.bin").write_text("the run's")
    assert run_files(str(tmp_path)) == ["checkpoint-1", "scratch.bin"]
    assert clear_run(str(tmp_path)) == ["checkpoint-1", "scratch.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST_NAME, "notes.txt"]


def test_after_a_finished_run_only_its_files_and_later_run_names_are_its(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    start_run(str(tmp_path))
    (tmp_path / "model.safetensors").write_text("the run's")
    assert finish_run(str(tmp_path)) == ["model.safetensors"]
    (tmp_path / "README.md").write_text("the card hf-r2 push wrote")
    (tmp_path / "todo.txt").write_text("added by the user")
    assert run_files(str(tmp_path)) == ["README.md", "model.safetensors"]
    assert check_output_folder(str(tmp_path), replace=True, add=False) == ["README.md", "model.safetensors"]
    with pytest.raises(ValueError, match="already holds a training run .*--overwrite_output_dir"):
        check_output_folder(str(tmp_path), replace=False, add=False)


def test_an_old_run_without_manifest_is_known_by_its_names(tmp_path):
    (tmp_path / "trainer_state.json").write_text("{}")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    assert run_files(str(tmp_path)) == ["config.json", "trainer_state.json"]
    project = tmp_path / "project"
    project.mkdir()
    (project / "config.json").write_text("{}")
    assert run_files(str(project)) == []  # a config.json alone does not make a run


def test_a_damaged_manifest_is_one_line_and_nothing_is_removed(tmp_path):
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"kept": "x"}))
    (tmp_path / "model.safetensors").write_text("?")
    with pytest.raises(ValueError, match=f"{MANIFEST_NAME} is damaged: remove the run's files"):
        clear_run(str(tmp_path))
    assert (tmp_path / "model.safetensors").exists()
