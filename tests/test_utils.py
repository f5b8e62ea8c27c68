"""Tests of hf_r2._utils' file helpers: saved files get the user's permissions (the umask's, not mkstemp's 0600 or
mkdtemp's 0700), a damaged `*.safetensors` file is named before a loader fails on it, and versions compare by
release."""

import json
import os
import stat
import tempfile

import pytest
import torch
from safetensors.torch import save_file

from hf_r2._utils import (
    _is_newer,
    check_safetensors_files,
    current_umask,
    give_default_mode,
    write_json_atomic,
    write_text_atomic,
)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_atomic_writes_respect_the_umask(tmp_path, umask_022):
    assert current_umask() == 0o022
    path = write_text_atomic(tmp_path / "README.md", "hello\n")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    path = write_json_atomic(tmp_path / "r2_config.json", {"a": 1})
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644 and json.loads(open(path).read()) == {"a": 1}
    os.umask(0o077)  # a private umask is respected too
    path = write_text_atomic(tmp_path / "private.txt", "x")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert [p for p in os.listdir(tmp_path) if p.endswith(".tmp")] == []


def test_give_default_mode_fixes_mkdtemp_and_safetensors(tmp_path, umask_022):
    folder = tempfile.mkdtemp(dir=tmp_path)
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    give_default_mode(folder)
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o755
    from hf_r2.saving import save_model_folder

    out = save_model_folder(torch.nn.Linear(2, 3), str(tmp_path / "plain"))
    assert stat.S_IMODE(os.stat(os.path.join(out, "model.safetensors")).st_mode) == 0o644


def test_damaged_safetensors_are_named(tmp_path):
    save_file({"w": torch.randn(64, 64)}, str(tmp_path / "model.safetensors"))
    check_safetensors_files(tmp_path)  # whole: fine
    data = (tmp_path / "model.safetensors").read_bytes()
    for cut, reason in ((len(data) - 100, "bytes of the"), (20, "header is cut short"), (4, "header is cut short")):
        (tmp_path / "model.safetensors").write_bytes(data[:cut])
        with pytest.raises(ValueError, match=rf"model\.safetensors is damaged or incomplete \(.*{reason}"):
            check_safetensors_files(tmp_path)
    header = len(data[8:8 + int.from_bytes(data[:8], "little")])
    (tmp_path / "model.safetensors").write_bytes(data[:8] + b"{" * header + data[8 + header:])
    with pytest.raises(ValueError, match="header does not parse"):
        check_safetensors_files(tmp_path)


@pytest.mark.parametrize(
    "writer, running, newer",
    [("0.2.0", "0.1.0", True), ("0.1.1", "0.1", True), ("1.0.0rc1", "0.9.9", True), ("0.2.0.dev1", "0.1.0", True),
     ("0.1.0", "0.1.0", False), ("0.1", "0.1.0", False), ("0.0.9", "0.1.0", False), (None, "0.1.0", False),
     ("unknown", "0.1.0", False), (3, "0.1.0", False)],
)
def test_is_newer_compares_release_numbers(writer, running, newer):
    """A config file records the hf-r2 that wrote it; only a later release may carry fields this one lacks."""
    assert _is_newer(writer, running) is newer
