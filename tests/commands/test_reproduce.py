"""Tests of `hf-r2 demo` (the demo preset of `hf-r2 reproduce`) end to end on tiny settings."""

import json
import os

import pytest

from hf_r2.cli import main


def test_demo_runs_on_tiny_settings(data_dir, tmp_path, monkeypatch, capsys):
    """The demo is hf-r2 reproduce on demo_config: one model, baseline and R2, FP and low-bit rows side by side."""
    from hf_r2.models import create_model
    from hf_r2.regularizer import R2Regularizer
    from hf_r2.reproduce.presets import demo_config

    monkeypatch.setenv("HF_R2_DATA_DIR", str(data_dir))
    out = tmp_path / "demo"
    argv = ["demo", "--output-dir", str(out), "--model", "test_resnet", "--dataset", "cifar10-tiny", "--epochs", "1",
            "--max-train-samples", "64", "--max-eval-samples", "32", "--batch-size", "32", "--bn-samples", "32",
            "--r2-loss", "linf", "--r2-weight", "0.5", "--no-progress"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert [v["name"] for v in results["config"]["variants"]] == ["baseline", "linf"]
    table = dict(results["summary"]["test_resnet"])
    assert list(table) == ["FP", "W8A8 per-channel mse", "W4A8 per-channel mse", "W2A8 per-tensor maxabs",
                           "W2A8 per-tensor mse", "W2A8 per-channel maxabs", "W2A8 per-channel mse", "W2 k-means",
                           "W2A8 per-channel mse + MagR"]
    magr = table.pop("W2A8 per-channel mse + MagR")  # the post-training alternative, on the baseline only
    assert set(magr) == {"baseline"} and 0.0 <= magr["baseline"]["mean"] <= 1.0
    assert f"| W2A8 per-channel mse + MagR | {100 * magr['baseline']['mean']:.2f} | - |" in text
    assert "| W2A8 per-channel mse + MagR | +8" not in text and "| W2A8 per-channel mse + MagR |  |" not in text
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
    # it ends in ONNX Runtime: the 2-bit models as QDQ files, and their top-1 there beside hf-r2's
    pytest.importorskip("onnxruntime", reason="the onnx extra (pip install 'hf-r2[onnx]') runs the demo's ONNX check")
    for run in runs.values():
        row = run["rows"]["W2A8 per-channel mse"]
        check = row["onnx"]
        assert os.path.isfile(check["path"]) and check["weights"] == "quantized" and check["opset"] == 21
        assert abs(check["accuracy"] - row["accuracy"]) <= 1 / 32 + 1e-9  # at most one image of 32 answers otherwise
        assert f"ONNX Runtime, W2A8 per-channel mse, {run['variant']['name']} seed 0: top-1 " \
            f"{100 * check['accuracy']:.2f} (hf-r2: {100 * row['accuracy']:.2f})" in text

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


@pytest.mark.parametrize("text, kind", [
    ('models: !!python/object/apply:os.system ["touch {marker}"]\n', "YAML"),
    ("models: !!python/name:os.system\n", "YAML"),
    ("models: [a\n", "YAML"),
    ('{"models": ["a"],', "JSON"),
])
def test_a_config_that_does_not_parse_is_one_line(tmp_path, capsys, text, kind):
    """`hf-r2 reproduce CONFIG` with a YAML tag that would build a Python object, or a syntax error: one line naming
    the file (as `hf-r2 train` says it), status 1, and the tag never runs."""
    marker = tmp_path / "marker"
    path = tmp_path / f"c.{kind.lower()}"
    path.write_text(text.replace("{marker}", str(marker)))
    assert main(["reproduce", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"hf-r2 reproduce: error: config file '{path}' is not "
                                                         f"valid {kind}: "), err
    assert not marker.exists()
