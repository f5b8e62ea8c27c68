"""Export folders that may be the user's (`hf_r2.output_folder.check_export_folder` / `replace_folder`, through
`save_low_bit` and `export_coreml`): a folder that is not hf-r2's export is refused and left as it was, a previous
export is replaced keeping its mode and the entries beside it (links stay links), a link to a folder is followed;
and a Core ML export prints none of the notices coremltools logs on import."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT, make_timm

from hf_r2.cli import main
from hf_r2.output_folder import exported_entries, replace_folder
from hf_r2.quant import PalettizeConfig, PTQConfig, palettize_, post_training_quantize_
from hf_r2.quant.export import LOW_BIT_CONFIG_NAME, load_low_bit, save_low_bit
from hf_r2.quant.export.coreml_export import check_coreml_path, is_coremltools_available


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return post_training_quantize_(make_timm("test_resnet").eval(), PTQConfig(w_bits=2, a_bits=None, bn="keep"))


def _state(folder) -> dict:
    """Every entry under `folder` (links not followed): its mode, and its bytes or link target."""
    out = {".": os.stat(folder).st_mode}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if os.path.islink(path):
                out[rel] = ("link", os.readlink(path))
            elif os.path.isfile(path):
                out[rel] = (os.stat(path).st_mode, open(path, "rb").read())
            else:
                out[rel] = os.stat(path).st_mode
    return out


def _user_folder(path):
    path.mkdir()
    (path / "config.json").write_text('{"mine": true}')
    (path / "notes.txt").write_text("notes")
    os.chmod(path, 0o700)
    return path


# ---- low-bit exports ------------------------------------------------------------------------------------------------


def test_a_folder_of_the_users_is_refused_and_untouched(model, tmp_path):
    folder = _user_folder(tmp_path / "mine")
    before = _state(folder)
    with pytest.raises(ValueError, match=r"`save_directory .*mine` holds files that are not a low-bit export "
                                         r"\(config.json, notes.txt\): choose a new or empty folder"):
        save_low_bit(model, folder)
    assert _state(folder) == before and sorted(os.listdir(tmp_path)) == ["mine"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a low-bit export: choose another `save_directory`"):
        save_low_bit(model, tmp_path / "file")


def test_the_command_line_refuses_it_before_any_work(tmp_path, capsys):
    folder = _user_folder(tmp_path / "mine")
    before = _state(folder)
    assert main(["ptq", str(tmp_path / "no-such-model"), "--output-dir", str(folder)]) == 1
    err = capsys.readouterr().err
    assert "error: `--output-dir" in err and "holds files that are not a low-bit export" in err
    assert len(err.strip().splitlines()) == 1 and _state(folder) == before


def test_a_previous_export_is_replaced_keeping_its_mode_and_entries(model, tmp_path):
    folder = tmp_path / "export"
    save_low_bit(model, folder, method="first")
    elsewhere = tmp_path / "data.txt"
    elsewhere.write_text("the user's")
    (folder / "README.md").write_text("card")
    (folder / "data").symlink_to(elsewhere)
    (folder / "results").mkdir()
    (folder / "results" / "eval.json").write_text("{}")
    os.chmod(folder, 0o700)
    save_low_bit(model, folder, method="second")
    assert os.stat(folder).st_mode & 0o777 == 0o700
    assert (folder / "README.md").read_text() == "card" and (folder / "results" / "eval.json").read_text() == "{}"
    assert os.path.islink(folder / "data") and os.readlink(folder / "data") == str(elsewhere)  # not a copy
    assert load_low_bit(folder)[1]["method"] == "second"
    assert sorted(os.listdir(tmp_path)) == ["data.txt", "export"]  # no temporary or old folder left


def test_an_empty_folder_keeps_its_mode(model, tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir(mode=0o700)
    save_low_bit(model, folder)
    assert os.stat(folder).st_mode & 0o777 == 0o700 and (folder / LOW_BIT_CONFIG_NAME).is_file()


def test_a_link_to_a_folder_is_followed_and_stays(model, tmp_path):
    real = tmp_path / "disk" / "export"
    real.parent.mkdir()
    save_low_bit(model, real, method="first")
    link = tmp_path / "export"
    link.symlink_to(real)
    save_low_bit(model, link, method="second")
    assert os.path.islink(link) and os.readlink(link) == str(real)
    assert load_low_bit(real)[1]["method"] == "second"
    assert sorted(os.listdir(real.parent)) == ["export"]
    user = _user_folder(tmp_path / "mine")
    (tmp_path / "to-mine").symlink_to(user)
    with pytest.raises(ValueError, match="to-mine` holds files that are not a low-bit export"):
        save_low_bit(model, tmp_path / "to-mine")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    with pytest.raises(ValueError, match="dangling` is a link to .*gone, which does not exist: create that folder"):
        save_low_bit(model, tmp_path / "dangling")
    assert not (tmp_path / "gone").exists()


def test_a_failed_swap_leaves_the_old_folder_as_it_was(tmp_path, monkeypatch):
    target, new = tmp_path / "export", tmp_path / ".tmp-new"
    target.mkdir(mode=0o700)
    (target / LOW_BIT_CONFIG_NAME).write_text("{}")
    (target / "README.md").write_text("card")
    new.mkdir()
    (new / LOW_BIT_CONFIG_NAME).write_text('{"new": 1}')
    before = _state(target)
    rename = os.rename

    def failing(src, dst):
        if os.fspath(src) == str(new):
            raise OSError("disk trouble")
        return rename(src, dst)

    monkeypatch.setattr(os, "rename", failing)
    with pytest.raises(OSError, match="disk trouble"):
        replace_folder(str(new), str(target), keep_entries=True)
    monkeypatch.undo()
    assert _state(target) == before and sorted(os.listdir(tmp_path)) == ["export"]


# ---- Core ML packages -----------------------------------------------------------------------------------------------


def _package(path):
    (path / "Data" / "com.apple.CoreML").mkdir(parents=True)
    (path / "Manifest.json").write_text("{}")
    return path


def test_a_folder_that_is_not_a_core_ml_package_is_refused(tmp_path):
    folder = _user_folder(tmp_path / "mine.mlpackage")
    with pytest.raises(ValueError, match=r"`-o .*mine.mlpackage` holds files that are not a Core ML package "
                                         r"\(config.json, notes.txt\): choose a new or empty folder for `-o`"):
        check_coreml_path(folder, "-o")
    assert check_coreml_path(_package(tmp_path / "old.mlpackage")) == str(tmp_path / "old.mlpackage")
    assert check_coreml_path(tmp_path / "new.mlpackage/") == str(tmp_path / "new.mlpackage")
    with pytest.raises(ValueError, match=r"`path` must be a `\.mlpackage` folder"):
        check_coreml_path(tmp_path / "mine")


needs_coremltools = pytest.mark.skipif(not is_coremltools_available(), reason="needs coremltools")


@needs_coremltools
def test_export_coreml_refuses_a_folder_of_the_users_and_keeps_a_packages_mode(tmp_path):
    from hf_r2.quant.export.coreml_export import export_coreml

    model = palettize_(make_timm("test_resnet").eval(), PalettizeConfig(bits=2))
    folder = _user_folder(tmp_path / "mine.mlpackage")
    before = _state(folder)
    with pytest.raises(ValueError, match="holds files that are not a Core ML package"):
        export_coreml(model, folder, input_size=32, float_baseline=False)
    assert _state(folder) == before
    path = tmp_path / "m.mlpackage"
    export_coreml(model, path, input_size=32, float_baseline=False)
    os.chmod(path, 0o700)
    export_coreml(model, path, input_size=32, float_baseline=False)
    assert os.stat(path).st_mode & 0o777 == 0o700 and (path / "Manifest.json").is_file()
    assert sorted(os.listdir(tmp_path)) == ["m.mlpackage", "mine.mlpackage"]


_EXPORT = """
import logging
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
import torch, timm
from hf_r2.quant import PalettizeConfig, palettize_
from hf_r2.quant.export.coreml_export import export_coreml
model = palettize_(timm.create_model("test_resnet", num_classes=10).eval(), PalettizeConfig(bits=2))
export_coreml(model, {path!r}, input_size=32, float_baseline=False)
"""


@needs_coremltools
def test_a_core_ml_export_prints_no_import_notices_or_trace_warnings(tmp_path):
    """In a fresh process (the notices come once, on import) with Python's default warning filters and the log
    level of `hf-r2`: neither the lines coremltools logs on import nor torch's trace warnings; what coremltools
    says while converting would still show."""
    script = _EXPORT.format(path=str(tmp_path / "m.mlpackage"))
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    for noise in ("Failed to load", "has not been tested", "TracerWarning", "torch.jit.trace"):
        assert noise not in run.stderr
    assert "WARNING" not in run.stderr and "Warning:" not in run.stderr, run.stderr[-2000:]


def test_a_new_export_leaves_the_files_made_from_the_old_weights(model, tmp_path):
    """`model.onnx` / a Core ML package that `hf-r2 export` wrote from the old export (recorded in its
    export_results.json) would be pushed beside the new weights: they go with the old export; the user's entries
    stay, and a recorded path outside the folder removes nothing."""
    folder = tmp_path / "export"
    save_low_bit(model, folder)
    (folder / "model.onnx").write_bytes(b"old onnx")
    (folder / "model.mlpackage").mkdir()
    (folder / "notes.txt").write_text("mine")
    outside = tmp_path / "outside.onnx"
    outside.write_bytes(b"not the folder's")
    (folder / "export_results.json").write_text(json.dumps({"exports": {
        "onnx": {"path": "model.onnx"}, "coreml": {"path": "./model.mlpackage"}, "x": {"path": "../outside.onnx"},
        "y": {"path": "/etc/passwd"}, "z": "not a dict"}}))
    save_low_bit(model, folder)
    assert sorted(os.listdir(folder)) == sorted([LOW_BIT_CONFIG_NAME, "config.json", "low_bit.safetensors",
                                                 "notes.txt"])
    assert outside.read_bytes() == b"not the folder's" and sorted(os.listdir(tmp_path)) == ["export", "outside.onnx"]


def test_exported_entries_reads_only_names_inside_the_folder(tmp_path):
    assert exported_entries(str(tmp_path / "missing")) == set() and exported_entries(str(tmp_path)) == set()
    (tmp_path / "export_results.json").write_text(json.dumps({"exports": {"onnx": {"path": "sub/model.onnx"},
                                                                          "bad": {"path": ".."}}}))
    assert exported_entries(str(tmp_path)) == {"export_results.json", "sub"}
