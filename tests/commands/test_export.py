"""`hf-r2 export --format onnx` on saved folders: a PTQ export (the ONNX file holds the same integer codes and grids
as exporting the in-memory model, and ONNX Runtime agrees with the folder loaded by `load_low_bit`), a palettized
export (written into the folder by default), a float folder, and the command's errors. `--format coreml` on a PTQ
and a palettized folder: the package's weights, read back, are the in-memory model's codes, grids and palettes.
What the command records in the folder (`export_results.json`, one entry per format) and `--dataset`, which measures
the file's top-1 in ONNX Runtime beside hf-r2's on the same images ([`onnx_accuracy`], shared with `hf-r2
reproduce`)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import make_timm

onnx = pytest.importorskip("onnx", reason="`hf-r2 export` tests need `pip install 'hf-r2[onnx]'` (onnx)")
ort = pytest.importorskip("onnxruntime", reason="`hf-r2 export` tests need `pip install 'hf-r2[onnx]'` (onnxruntime)")

from hf_r2.cli import main  # noqa: E402
from hf_r2.commands import export as export_command  # noqa: E402
from hf_r2.hub import from_pretrained  # noqa: E402
from hf_r2.metrics import evaluate_accuracy  # noqa: E402
from hf_r2.model_card import EXPORT_RESULTS_NAME, build_model_card, weights_digest  # noqa: E402
from hf_r2.quant import (  # noqa: E402
    PalettizeConfig,
    PTQConfig,
    load_low_bit,
    onnx_accuracy,
    palettize_,
    post_training_quantize_,
    save_low_bit,
)
from hf_r2.quant.export import coreml_export, onnx_export  # noqa: E402
from hf_r2.reproduce.deploy import onnx_check  # noqa: E402
from hf_r2.saving import save_model_folder  # noqa: E402

SIZE = 32


def _images(n: int, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _model():
    """test_resnet with a saved 32x32 input size, so that the command takes its input size from the folder."""
    torch.manual_seed(0)
    model = make_timm("test_resnet")
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, SIZE, SIZE), "crop_pct": 1.0}
    return model.eval()


def _initializers(path) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t).astype(np.float64) for t in onnx.load(path).graph.initializer}


def test_export_a_ptq_folder(tmp_path, capsys):
    model = post_training_quantize_(_model(), PTQConfig(w_bits=2, a_bits=8, calibration_batches=2),
                                    [{"pixel_values": _images(8, seed)} for seed in (1, 2)])
    folder = str(tmp_path / "w2a8")
    save_low_bit(model, folder, method="ptq")
    direct = onnx_export.export_onnx(model, tmp_path / "direct.onnx", input_size=SIZE, storage="int4")
    out = str(tmp_path / "onnx" / "w2a8.onnx")
    assert main(["export", folder, "--format", "onnx", "--output", out, "--storage", "int4"]) == 0
    printed = capsys.readouterr().out
    assert "Storage int4: every weight dequantized in float on each run" in printed
    assert f"ONNX file: {out}" in printed and "opset 21, quantized weights" in printed
    assert f"QuantizeLinear / DequantizeLinear nodes: {direct['quantize_linear']} / " in printed
    assert "on 8 random inputs" in printed and "top-1 agreement 100.0%" in printed
    # the folder's codes, scales and zero points are the in-memory model's
    got, expected = _initializers(out), _initializers(direct["path"])
    grids = [k for k in expected if k.endswith(("_codes", "_scale", "_zero_point", "_half_step"))]
    assert grids and all(np.array_equal(got[k], expected[k]) for k in grids)
    loaded, _ = load_low_bit(folder)
    check = onnx_export.compare_onnx(loaded, out, _images(32))
    assert check["top1_agreement"] == 1.0
    assert not any(m.weight_quantizer is not None for m in loaded.modules() if hasattr(m, "weight_quantizer"))
    assert not os.path.exists(os.path.join(folder, EXPORT_RESULTS_NAME))  # a file outside the folder: not recorded
    assert "Recorded in" not in printed


def test_export_stores_int8_for_integer_kernels_and_times_it(tmp_path, capsys):
    """The default `--storage int8`: the layers ONNX Runtime can run in integer kernels are counted, the file is
    timed beside the float file, both recorded; the check still passes (its tolerance, NaN rule)."""
    model = post_training_quantize_(_model(), PTQConfig(w_bits=2, a_bits=8, calibration_batches=2),
                                    [{"pixel_values": _images(8, seed)} for seed in (1, 2)])
    folder = str(tmp_path / "w2a8")
    save_low_bit(model, folder, method="ptq")
    direct = onnx_export.export_onnx(model, tmp_path / "direct.onnx", input_size=SIZE)
    assert main(["export", folder, "--latency-runs", "3"]) == 0
    printed = capsys.readouterr().out
    quantized = direct["integer_layers"] + len(direct["float_layers"])
    assert direct["storage"] == "int8" and direct["integer_layers"] > 0
    assert f"Storage int8: {direct['integer_layers']} of {quantized} quantized layers in ONNX Runtime's integer " \
           "kernels" in printed
    assert "ONNX Runtime latency (CPU, 1 thread, batch 1, median of 3 runs): " in printed
    assert "x its time), " in printed and "x this file's size)" in printed
    entry = _exports(folder)["onnx"]
    assert entry["storage"] == "int8" and entry["integer_layers"] == direct["integer_layers"]
    latency = entry["latency"]
    assert latency["runs"] == 3 and latency["threads"] == 1 and latency["batch_size"] == 1
    assert latency["ms_per_image"] > 0 and latency["float_ms_per_image"] > 0
    assert latency["float_file_bytes"] > 2 * entry["file_bytes"]
    assert entry["check"]["num_images"] == 8  # passed, or nothing would have been written
    # the same file as the in-memory model's export
    got, expected = _initializers(os.path.join(folder, "model.onnx")), _initializers(direct["path"])
    assert got.keys() == expected.keys() and all(np.array_equal(got[k], expected[k]) for k in expected)
    assert main(["export", folder, "--latency-runs", "0", "--check-samples", "0"]) == 0
    assert "latency" not in capsys.readouterr().out and _exports(folder)["onnx"]["latency"] is None


def test_export_a_palettized_folder_into_itself(tmp_path, capsys):
    model = palettize_(_model(), PalettizeConfig(bits=2))
    folder = str(tmp_path / "p2")
    save_low_bit(model, folder, method="kmeans")
    assert main(["export", folder, "--check-samples", "4"]) == 0
    path = os.path.join(folder, "model.onnx")
    assert os.path.isfile(path) and f"ONNX file: {os.path.abspath(path)}" in capsys.readouterr().out
    graph = onnx.load(path).graph
    assert "GatherElements" in {n.op_type for n in graph.node}
    assert any(t.data_type == onnx.TensorProto.UINT4 for t in graph.initializer)
    loaded, _ = load_low_bit(folder)  # the ONNX file beside the export does not disturb loading it
    check = onnx_export.compare_onnx(loaded, path, _images(16))
    assert check["max_abs_diff"] <= 1e-4 * max(1.0, check["max_abs_logit"])


def test_export_a_float_folder(tmp_path, capsys):
    folder = save_model_folder(_model(), str(tmp_path / "fp"))
    out = str(tmp_path / "fp.onnx")
    assert main(["export", folder, "--opset", "17", "--check-samples", "0", "-o", out]) == 0
    printed = capsys.readouterr().out
    assert "opset 17, float weights" in printed and "32.00" in printed and "random inputs" not in printed
    assert not {"QuantizeLinear", "DequantizeLinear"} & {n.op_type for n in onnx.load(out).graph.node}
    check = onnx_export.compare_onnx(from_pretrained(folder).model, out, _images(16))
    assert check["max_abs_diff"] <= 1e-4 * max(1.0, check["max_abs_logit"])


def test_export_folders_to_coreml(tmp_path, capsys):
    pytest.importorskip("coremltools", reason="`hf-r2 export --format coreml` needs `pip install 'hf-r2[coreml]'`")
    model = post_training_quantize_(_model(), PTQConfig(w_bits=2, a_bits=8, calibration_batches=2),
                                    [{"pixel_values": _images(8, seed)} for seed in (1, 2)])
    folder = str(tmp_path / "w2a8")
    save_low_bit(model, folder, method="ptq")
    assert main(["export", folder, "--format", "coreml"]) == 0
    path = os.path.join(folder, "model.mlpackage")  # into the folder by default
    printed = capsys.readouterr().out
    count = sum(hasattr(m, "weight_quantizer") for m in model.modules())
    assert f"Core ML package: {os.path.abspath(path)} (" in printed and "x smaller; float32, iOS18" in printed
    assert f"Activations: float ({count} input quantizers not exported" in printed
    assert f"{count} / {count} layers decode to hf-r2's weights bit for bit, indices and codes equal" in printed
    # the folder's codes and grids are the in-memory model's
    check = coreml_export.compare_coreml_weights(model, path)
    assert check["num_layers"] == check["exact_layers"] == count and check["values_match"]
    assert load_low_bit(folder)[1]["layers"]  # the package beside the export does not disturb loading it
    # recorded in the folder, then an ONNX export beside it: one entry per format
    coreml_entry = _exports(folder)["coreml"]
    assert coreml_entry["path"] == "model.mlpackage" and coreml_entry["format"] == "coreml"
    files = [os.path.join(root, name) for root, _, names in os.walk(path) for name in names]
    assert coreml_entry["file_bytes"] == sum(map(os.path.getsize, files)) and coreml_entry["accuracy"] is None
    assert coreml_entry["check"] == {"kind": "weights", "num_layers": count, "exact_layers": count,
                                     "values_match": True, "max_abs_diff": 0.0, "max_rel_diff": 0.0, "missing": []}
    assert coreml_entry["precision"] == "float32" and coreml_entry["deployment_target"] == "iOS18"
    assert main(["export", folder, "--check-samples", "0"]) == 0
    exports = _exports(folder)
    assert exports["coreml"] == coreml_entry and exports["onnx"]["check"] is None
    card = build_model_card(folder, "me/w2a8")
    assert "### ONNX: `model.onnx`" in card.text and "### Core ML: `model.mlpackage`" in card.text
    assert "- Not checked against hf-r2 (exported with `--check-samples 0`)." in card.text
    assert {"onnx", "coreml"} <= set(card.data.tags)
    # a palettized folder, in float16, elsewhere: its palettes and indices
    model = palettize_(_model(), PalettizeConfig(bits=1))
    save_low_bit(model, str(tmp_path / "p1"), method="kmeans")
    out = str(tmp_path / "coreml" / "p1.mlpackage")
    assert main(["export", str(tmp_path / "p1"), "--format", "coreml", "-o", out, "--precision", "float16"]) == 0
    assert "float16, iOS18, palettized weights" in capsys.readouterr().out
    check = coreml_export.compare_coreml_weights(model, out)
    assert check["exact_layers"] == check["num_layers"] > 0 and check["precision"] == "float16"


def _exports(folder: str) -> dict:
    with open(os.path.join(folder, EXPORT_RESULTS_NAME)) as f:
        data = json.load(f)
    assert set(data) == {"format_version", "hf_r2_version", "exports"} and data["format_version"] == 1
    return data["exports"]


def test_export_records_the_file_and_its_accuracy(tmp_path, data_dir, capsys):
    """`--dataset`: the ONNX file's top-1 in ONNX Runtime beside hf-r2's top-1 of the same model on the same images
    (the number `hf-r2 evaluate` gives); both recorded in `export_results.json`, replaced by the next ONNX export."""
    model = post_training_quantize_(_model(), PTQConfig(w_bits=2, a_bits=8, calibration_batches=2),
                                    [{"pixel_values": _images(8, seed)} for seed in (1, 2)])
    folder = str(tmp_path / "w2a8")
    description = save_low_bit(model, folder, method="ptq")
    assert main(["export", folder, "--dataset", "cifar10-tiny", "--data-dir", str(data_dir),
                 "--max-eval-samples", "48", "--batch-size", "16"]) == 0
    printed = capsys.readouterr().out
    entry = _exports(folder)["onnx"]
    accuracy = entry.pop("accuracy")
    assert accuracy.keys() == {"onnxruntime", "hf_r2", "dataset", "split", "num_images", "input_size"}
    assert (accuracy["dataset"], accuracy["split"], accuracy["num_images"], accuracy["input_size"]) == (
        "cifar10-tiny", "test", 48, SIZE)
    assert (f"Top-1 on 48 images (test split of cifar10-tiny, 32 pixels): ONNX Runtime "
            f"{100 * accuracy['onnxruntime']:.2f}%, hf-r2 {100 * accuracy['hf_r2']:.2f}% (the same images)") in printed
    assert f"Recorded in {os.path.join(folder, EXPORT_RESULTS_NAME)}" in printed
    # hf-r2's number is `hf-r2 evaluate`'s on the same subset; ONNX Runtime's is within a rounding of it
    assert main(["evaluate", folder, "--dataset", "cifar10-tiny", "--data-dir", str(data_dir),
                 "--max-eval-samples", "48"]) == 0
    with open(os.path.join(folder, "low_bit_results.json")) as f:
        (row,) = json.load(f)["rows"]
    assert accuracy["hf_r2"] == row["accuracy"] and row["num_images"] == 48
    assert abs(accuracy["onnxruntime"] - accuracy["hf_r2"]) <= 1 / 48
    path = os.path.join(folder, "model.onnx")
    check = entry.pop("check")
    assert check["kind"] == "logits" and check["num_images"] == 8 and check["seed"] == 0
    # int8 storage: a fused layer's bias is rounded to int32, so a near-tie among random inputs may flip
    assert check["max_abs_diff"] <= onnx_export.ONNX_CHECK_TOLERANCE * check["max_abs_logit"]
    assert check["top1_agreement"] >= 0.75
    latency = entry.pop("latency")
    assert latency["ms_per_image"] > 0 and latency["float_ms_per_image"] > 0
    preprocessing = entry.pop("preprocessing")
    assert [step["op"] for step in preprocessing] == ["resize", "center_crop", "to_tensor", "normalize"]
    assert preprocessing[1]["size"] == [SIZE, SIZE]
    assert 0 < entry.pop("bits_per_weight") < 32
    assert entry == {"format": "onnx", "path": "model.onnx", "file_bytes": os.path.getsize(path),
                     "float_bytes": description["size"]["float_bytes"], "weights": "quantized",
                     "low_bit_layers": description["size"]["low_bit_layers"], "opset": 21,
                     "input_size": [3, SIZE, SIZE], "storage": "int8", "integer_layers": 6,
                     "weights_sha256": weights_digest(folder)}
    card = build_model_card(folder, "me/w2a8").text
    assert (f"- Top-1 accuracy on `cifar10-tiny` (48 images of the `test` split, 32 pixels): "
            f"{accuracy['onnxruntime']:.4f} in ONNX Runtime, {accuracy['hf_r2']:.4f} in hf-r2 (PyTorch)") in card
    # the next ONNX export replaces the entry (here: no check, no accuracy)
    assert main(["export", folder, "--check-samples", "0", "--opset", "17"]) == 0
    entry = _exports(folder)["onnx"]
    assert entry["opset"] == 17 and entry["check"] is None and entry["accuracy"] is None
    assert "Top-1 accuracy" not in build_model_card(folder, "me/w2a8").text


def test_onnx_accuracy_counts_what_hf_r2_counts(tmp_path):
    """`onnx_accuracy` (and `hf-r2 reproduce`'s `onnx_check`, which calls it) on labelled batches: a float model's
    file gets hf-r2's top-1 exactly."""
    model = _model()
    generator = torch.Generator().manual_seed(5)
    batches = [{"pixel_values": _images(16, seed), "labels": torch.randint(0, 10, (16,), generator=generator)}
               for seed in (5, 6, 7)]
    with torch.no_grad():  # labels = the model's own answers on half the images: a top-1 well away from 0
        batches[0]["labels"][:8] = model(batches[0]["pixel_values"][:8]).argmax(-1)
    expected = evaluate_accuracy(model, batches)["accuracy"]
    done = onnx_check(model, batches, str(tmp_path / "fp.onnx"), SIZE)
    assert done["accuracy"] == expected >= 8 / 48 and done["weights"] == "float"
    got = onnx_accuracy(done["path"], iter(batches))
    assert got == {"accuracy": expected, "correct": round(expected * 48), "num_images": 48}
    assert onnx_accuracy(done["path"], [])["accuracy"] == 0.0


def test_export_errors(tmp_path, capsys, monkeypatch):
    folder = save_model_folder(_model(), str(tmp_path / "fp"))
    with pytest.raises(SystemExit, match="^2$"):
        main(["export", folder, "--format", "tflite"])
    assert "invalid choice: 'tflite'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="^2$"):
        main(["export", folder, "--format", "coreml", "--opset", "17"])
    assert "--opset and --float-palettes apply to --format onnx only" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="^2$"):
        main(["export", folder, "--precision", "float16"])
    assert "--precision applies to --format coreml only" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="^2$"):
        main(["export", folder, "--format", "coreml", "--precision", "int8"])
    assert "invalid choice: 'int8'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="^2$"):
        main(["export", folder, "--opset", "12"])
    assert "--opset takes an integer from 13 to 23" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="^2$"):
        main(["export", folder, "--format", "coreml", "--dataset", "cifar10"])
    assert "--dataset applies to --format onnx only" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="^2$"):
        main(["export", folder, "--max-eval-samples", "8"])
    assert "--max-eval-samples and --data-dir need --dataset" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nosuch")]) == 1
    assert capsys.readouterr().err.startswith("hf-r2 export: error: ")
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if the extra were not installed
    assert main(["export", folder]) == 1
    err = capsys.readouterr().err
    assert err.startswith("hf-r2 export: error: ") and "pip install 'hf-r2[onnx]'" in err
    assert not os.path.exists(os.path.join(folder, "model.onnx"))
    monkeypatch.setitem(sys.modules, "coremltools", None)
    assert main(["export", folder, "--format", "coreml"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("hf-r2 export: error: ") and "pip install 'hf-r2[coreml]'" in err
    assert not os.path.exists(os.path.join(folder, "model.mlpackage"))


def test_command_constants_match_the_library():
    assert export_command._OPSET == onnx_export.DEFAULT_ONNX_OPSET
    assert (export_command._MIN_OPSET, export_command._MAX_OPSET) == (
        onnx_export.MIN_ONNX_OPSET, onnx_export.MAX_ONNX_OPSET)
    assert export_command.default_output("org/name") == "name.onnx"
    assert export_command._PRECISIONS == coreml_export.COREML_PRECISIONS
    assert export_command._STORAGES == onnx_export.ONNX_STORAGES
    assert export_command._STORAGES[0] == onnx_export.DEFAULT_ONNX_STORAGE
    assert export_command.default_output("org/name", "coreml") == "name.mlpackage"


def test_help_stays_light():
    """`hf-r2 --help` lists `export` and imports neither torch, onnx nor coremltools (a fresh process)."""
    code = ("import sys, hf_r2.cli; "
            "print(sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'coremltools') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr
    with pytest.raises(SystemExit, match="^0$"):
        main(["--help"])
