"""The model card's Deploy section, from a given `export_results.json` (no export runs here: tests/commands/
test_export.py writes the file with `hf-r2 export`, tests/test_hub.py pushes it): what it says for an ONNX file with
and without a measured accuracy, for a Core ML package, and when it stays off the card (no export, a file no longer
in the folder, a file exported from other weights). The card's other sections are tested in tests/test_hub.py."""

from __future__ import annotations

import logging
import os

import pytest
from conftest import make_timm

import hf_r2
from hf_r2._utils import write_json_atomic
from hf_r2.model_card import EXPORT_RESULTS_NAME, build_model_card, read_export_results, weights_digest

REPO = "me/resnet-w2a8"
PREPROCESSING = [
    {"op": "resize", "size": 32, "interpolation": "bilinear"},
    {"op": "center_crop", "size": [32, 32]},
    {"op": "to_tensor"},
    {"op": "normalize", "mean": [0.4914, 0.4822, 0.4465], "std": [0.247, 0.2435, 0.2616]},
]
INPUT = ("- Input: `pixel_values`, float32 ({batch}, 3, 32, 32), preprocessed as for the PyTorch model (its own "
         "preprocessing, not part of the file): resize the shorter side to 32 pixels (bilinear), center-crop 32 x 32, "
         "convert to float in [0, 1] (RGB, channels first), normalize with mean (0.4914, 0.4822, 0.4465) and std "
         "(0.247, 0.2435, 0.2616).")


@pytest.fixture
def folder(tmp_path) -> str:
    """A saved float folder holding a (stand-in) `model.onnx` of 64 KiB."""
    out = str(tmp_path / "m")
    hf_r2.save_model_folder(make_timm("test_resnet", num_classes=3), out)
    with open(os.path.join(out, "model.onnx"), "wb") as f:
        f.write(b"\0" * 65536)
    return out


def _onnx_entry(folder: str, **changes) -> dict:
    entry = {
        "format": "onnx", "path": "model.onnx", "file_bytes": 65536, "float_bytes": 524288, "bits_per_weight": 2.3125,
        "weights": "quantized", "low_bit_layers": 16, "opset": 21, "input_size": [3, 32, 32],
        "preprocessing": PREPROCESSING,
        "check": {"kind": "logits", "num_images": 8, "seed": 0, "max_abs_diff": 3.5e-07, "max_abs_logit": 2.04,
                  "top1_agreement": 1.0},
        "accuracy": {"onnxruntime": 0.625, "hf_r2": 0.6328125, "dataset": "cifar10-tiny", "split": "test",
                     "num_images": 128, "input_size": 32},
        "weights_sha256": weights_digest(folder),
    }
    return {**entry, **changes}


def _write(folder: str, **exports) -> None:
    write_json_atomic(os.path.join(folder, EXPORT_RESULTS_NAME),
                      {"format_version": 1, "hf_r2_version": hf_r2.__version__, "exports": exports})


def _deploy(card) -> str:
    text = card.text
    assert text.count("## Deploy") == 1
    return text[text.index("## Deploy"):text.index("## Citation")]


def test_onnx_deploy_section(folder):
    _write(folder, onnx=_onnx_entry(folder))
    card = build_model_card(folder, REPO)
    assert _deploy(card) == "\n".join([
        "## Deploy\n",
        "Written and checked by `hf-r2 export` (`export_results.json`).\n",
        "### ONNX: `model.onnx`\n",
        "- Size: 64.0 KiB, against 512.0 KiB of float weights (8.0x smaller); 2.31 bits per Conv/Linear weight "
        "(quantized weights, opset 21).",
        "- Checked: ONNX Runtime and hf-r2 give the same top-1 class on 100.0% of 8 random inputs (largest logit "
        "difference 3.5e-07, largest logit 2.04).",
        "- Top-1 accuracy on `cifar10-tiny` (128 images of the `test` split, 32 pixels): 0.6250 in ONNX Runtime, "
        "0.6328 in hf-r2 (PyTorch) on the same images.",
        INPUT.format(batch="batch"),
        "\n```python",
        "import numpy as np",
        "import onnxruntime",
        "from huggingface_hub import hf_hub_download\n",
        f'session = onnxruntime.InferenceSession(hf_hub_download("{REPO}", "model.onnx"))',
        "x = np.zeros((1, 3, 32, 32), dtype=np.float32)  # your images, preprocessed as above",
        'logits = session.run(None, {"pixel_values": x})[0]  # (batch, classes)',
        "```\n\n",
    ])
    assert "onnx" in card.data.tags and "coreml" not in card.data.tags
    assert card.text.index("## How to load") < card.text.index("## Deploy") < card.text.index("## Citation")


def test_onnx_deploy_section_without_accuracy_or_check(folder):
    _write(folder, onnx=_onnx_entry(folder, accuracy=None, check=None, float_bytes=None, preprocessing=None))
    deploy = _deploy(build_model_card(folder, REPO))
    assert "- Size: 64.0 KiB; 2.31 bits per Conv/Linear weight (quantized weights, opset 21).\n" in deploy
    assert "- Not checked against hf-r2 (exported with `--check-samples 0`)." in deploy
    assert "Top-1 accuracy" not in deploy and "ONNX Runtime and hf-r2 give" not in deploy
    assert ("- Input: `pixel_values`, float32 (batch, 3, 32, 32), preprocessed as for the PyTorch model (its own "
            "preprocessing, not part of the file).\n") in deploy
    assert "onnxruntime.InferenceSession(" in deploy


def test_coreml_deploy_section(folder):
    os.makedirs(os.path.join(folder, "model.mlpackage", "Data"))
    coreml = {
        "format": "coreml", "path": "model.mlpackage", "file_bytes": 2**20, "float_file_bytes": 6 * 2**20,
        "float_bytes": 5 * 2**20, "bits_per_weight": 3.66, "weights": "palettized", "low_bit_layers": 16,
        "precision": "float16", "deployment_target": "iOS18", "activations": "float", "input_quantizers_dropped": 0,
        "input_size": [3, 32, 32], "preprocessing": PREPROCESSING, "accuracy": None,
        "check": {"kind": "weights", "num_layers": 16, "exact_layers": 16, "values_match": True, "max_abs_diff": 0.0,
                  "max_rel_diff": 0.0, "missing": []},
        "weights_sha256": weights_digest(folder),
    }
    _write(folder, coreml=coreml, onnx=_onnx_entry(folder))
    card = build_model_card(folder, REPO)
    deploy = _deploy(card)
    assert deploy.index("### ONNX: `model.onnx`") < deploy.index("### Core ML: `model.mlpackage`")  # ONNX first
    coreml_part = deploy[deploy.index("### Core ML"):]
    assert coreml_part == "\n".join([
        "### Core ML: `model.mlpackage`\n",
        "- Size: 1.0 MiB, against 6.0 MiB for the same network converted with float weights (6.0x smaller); 3.66 "
        "bits per Conv/Linear weight (palettized weights, float16, iOS 18 / macOS 15 or later; activations in float).",
        "- Checked: the weights read back from the package decode to hf-r2's rounded to float16 bit for bit in "
        "16 / 16 low-bit layers (indices and codes equal hf-r2's).",
        "- Not run: hf-r2 made no prediction with Core ML (which runs on Apple systems only), so no accuracy was "
        "measured in Core ML.",
        INPUT.format(batch="1"),
        "\n```python",
        "import coremltools as ct  # predictions need macOS",
        "import numpy as np",
        "from huggingface_hub import snapshot_download\n",
        f'folder = snapshot_download("{REPO}", allow_patterns=["model.mlpackage/*"])',
        'model = ct.models.MLModel(f"{folder}/model.mlpackage")',
        "x = np.zeros((1, 3, 32, 32), dtype=np.float32)  # your images, preprocessed as above",
        'logits = model.predict({"pixel_values": x})["logits"]  # (1, classes)',
        "```\n\n",
    ])
    assert {"onnx", "coreml"} <= set(card.data.tags)
    # without the ONNX file (deleted after the export): the Core ML part only
    os.remove(os.path.join(folder, "model.onnx"))
    card = build_model_card(folder, REPO)
    assert "### ONNX" not in card.text and "### Core ML" in card.text
    assert "coreml" in card.data.tags and "onnx" not in card.data.tags


def test_no_deploy_section_without_an_export(folder):
    card = build_model_card(folder, REPO)  # model.onnx is there, but nothing recorded it
    assert "## Deploy" not in card.text and "onnx" not in card.data.tags
    assert read_export_results(folder) == {}
    _write(folder, onnx=_onnx_entry(folder, path="elsewhere.onnx"))  # recorded, but not in the folder
    assert "## Deploy" not in build_model_card(folder, REPO).text
    write_json_atomic(os.path.join(folder, EXPORT_RESULTS_NAME), {"exports": ["not", "a", "dict"]})
    assert read_export_results(folder) == {} and "## Deploy" not in build_model_card(folder, REPO).text


def test_a_file_exported_from_other_weights_is_not_described(folder, caplog):
    """A later `hf-r2 ptq` / `save_low_bit` into the folder keeps the old model.onnx: the card does not describe it
    as this model's."""
    _write(folder, onnx=_onnx_entry(folder, weights_sha256="0" * 64))
    with caplog.at_level(logging.WARNING, logger="hf_r2.model_card"):
        card = build_model_card(folder, REPO)
    deploy = _deploy(card)
    assert "`model.onnx` was exported from earlier weights than these, so it is not described here." in deploy
    assert "InferenceSession" not in deploy and "Top-1 accuracy on" not in deploy and "onnx" not in card.data.tags
    assert "left off the card" in caplog.text


def test_weights_digest(folder, tmp_path):
    digest = weights_digest(folder)
    assert len(digest) == 64 and digest == weights_digest(folder)
    with open(os.path.join(folder, "README.md"), "w") as f:  # the card and other files do not count
        f.write("card")
    assert weights_digest(folder) == digest
    with open(os.path.join(folder, "model.safetensors"), "ab") as f:
        f.write(b"\0")
    assert weights_digest(folder) != digest
    assert weights_digest(str(tmp_path)) is None


@pytest.mark.parametrize("kind", ["traversal", "absolute", "hidden", "link"])
def test_an_export_path_outside_the_folder_is_refused(folder, tmp_path, caplog, kind):
    """`export_results.json` comes with the folder (from anyone): a path that leaves the folder (`../../etc/passwd`),
    is absolute, hidden, or a link out of it is not followed, and the card says nothing of it, whether it exists or
    not."""
    outside = tmp_path / "outside.onnx"
    outside.write_bytes(b"\0" * 65536)
    if kind == "link":
        os.remove(os.path.join(folder, "model.onnx"))
        os.symlink(outside, os.path.join(folder, "model.onnx"))
        path = "model.onnx"
    else:
        path = {"traversal": os.path.relpath(outside, folder), "absolute": str(outside),
                "hidden": ".x/model.onnx"}[kind]
        os.makedirs(os.path.join(folder, ".x"), exist_ok=True)
        os.replace(os.path.join(folder, "model.onnx"), os.path.join(folder, ".x", "model.onnx"))
    _write(folder, onnx=_onnx_entry(folder, path=path))
    with caplog.at_level(logging.WARNING, logger="hf_r2.model_card"):
        card = build_model_card(folder, REPO)
    assert "## Deploy" not in card.text and "onnx" not in card.data.tags and "outside" not in card.text
    if kind != "link":
        assert "not a plain file name inside the folder: refused" in caplog.text
