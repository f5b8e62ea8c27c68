"""Where `export_onnx` and `hf-r2 export --format onnx -o FILE` write: an existing file is replaced only by a complete
one (written beside it, then renamed) and keeps its mode, a link is followed and stays a link, and a folder in the
file's place is refused in one line before any work (`hf_r2.output_folder.check_export_file` / `replace_file`)."""

import os
import stat

import pytest
from conftest import conv_net, make_timm

onnx = pytest.importorskip("onnx", reason="ONNX export tests need `pip install 'hf-r2[onnx]'` (onnx)")

from hf_r2.cli import main  # noqa: E402
from hf_r2.quant.export import onnx_export  # noqa: E402
from hf_r2.quant.export.onnx_export import export_onnx  # noqa: E402
from hf_r2.saving import save_model_folder  # noqa: E402

SIZE = 16


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_an_existing_file_is_replaced_whole_and_keeps_its_mode(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"old")
    path.chmod(0o600)
    export_onnx(conv_net().eval(), path, input_size=SIZE)
    onnx.checker.check_model(onnx.load(str(path)))
    assert _mode(path) == 0o600 and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_a_link_is_followed_and_stays(tmp_path):
    real = tmp_path / "store" / "m.onnx"
    real.parent.mkdir()
    real.write_bytes(b"old")
    real.chmod(0o640)
    link = tmp_path / "m.onnx"
    link.symlink_to(real)
    report = export_onnx(conv_net().eval(), link, input_size=SIZE)
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert report["path"] == str(link) and report["file_bytes"] == real.stat().st_size > 3
    assert _mode(real) == 0o640 and sorted(p.name for p in real.parent.iterdir()) == ["m.onnx"]
    dangling = tmp_path / "gone.onnx"
    dangling.symlink_to(tmp_path / "nowhere.onnx")
    with pytest.raises(ValueError, match=r"^`path .*gone\.onnx` is a link to .*nowhere\.onnx, which does not exist: "
                                         r"choose another `path`, or remove the link\.$"):
        export_onnx(conv_net().eval(), dangling, input_size=SIZE)


def test_a_folder_is_refused_before_any_work(tmp_path, monkeypatch):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "mine.txt").write_text("mine")
    monkeypatch.setattr(onnx_export, "input_shape", lambda *a: pytest.fail("the export started"))
    for path in (folder, f"{tmp_path / 'new'}{os.sep}"):
        with pytest.raises(ValueError, match=r"^`path .*` is a folder, not an ONNX file: name the file, e\.g\. "
                                             r"`path .*model\.onnx`\.$"):
            export_onnx(conv_net().eval(), path, input_size=SIZE)
    assert [p.name for p in folder.iterdir()] == ["mine.txt"] and not (tmp_path / "new").exists()


def test_a_failed_save_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"old")

    def half_save(proto, partial):
        open(partial, "wb").write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(onnx, "save_model", half_save)
    with pytest.raises(OSError, match="disk full"):
        export_onnx(conv_net().eval(), path, input_size=SIZE)
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_the_command_refuses_a_folder_and_follows_a_link(tmp_path, capsys):
    pytest.importorskip("onnxruntime", reason="`hf-r2 export` checks the file in ONNX Runtime")
    model = make_timm("test_resnet").eval()
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, 32, 32), "crop_pct": 1.0}
    folder = save_model_folder(model, str(tmp_path / "fp"))
    taken = tmp_path / "taken.onnx"
    taken.mkdir()
    assert main(["export", folder, "-o", str(taken), "--latency-runs", "0"]) != 0
    err = capsys.readouterr().err.strip()
    assert err == (f"hf-r2 export: error: `--output {taken}` is a folder, not an ONNX file: name the file, e.g. "
                   f"`--output {taken / 'model.onnx'}`.")
    real = tmp_path / "store" / "fp.onnx"
    real.parent.mkdir()
    real.write_bytes(b"old")
    real.chmod(0o600)
    link = tmp_path / "fp.onnx"
    link.symlink_to(real)
    assert main(["export", folder, "-o", str(link), "--check-samples", "2", "--latency-runs", "0"]) == 0
    assert link.is_symlink() and _mode(real) == 0o600
    onnx.checker.check_model(onnx.load(str(real)))
    assert sorted(p.name for p in real.parent.iterdir()) == ["fp.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp", "fp.onnx", "store", "taken.onnx"]
