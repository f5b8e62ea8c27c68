"""The model card's Deploy section, from a given `export_results.json` (no export runs here: tests/commands/
test_export.py writes the file with `hf-r2 export`, tests/test_hub.py pushes it): what it says for an ONNX file with
and without a measured accuracy, for a Core ML package, and when it stays off the card (no export, a file no longer
in the folder, a file exported from other weights). Then what the card says each number was measured on, where the
model-index may cite a Hub dataset, that no local path reaches the card, the license, and the low-bit card's Results
and metadata. Its other sections (and the cards pushed through `hf-r2 push`) are tested in tests/test_hub.py."""

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


# ---- what each number was measured on; paths; license; the low-bit card ----

SUBSET = {"dataset": "cifar10-tiny", "source": "local copy /home/me/secret/cifar10-tiny", "hub_id": None,
          "train_split": "train", "eval_split": "test", "train_images": 1000, "eval_images": 200, "input_size": 32}


def _index(card) -> list[tuple[str, str, str, float]]:
    """`(dataset type, dataset name, split, value)` of each model-index result."""
    return [(r["dataset"]["type"], r["dataset"]["name"], r["dataset"].get("split"), m["value"])
            for entry in card.data.to_dict().get("model-index", []) for r in entry["results"] for m in r["metrics"]]


def test_numbers_measured_on_a_local_subset_stay_out_of_the_model_index(folder):
    """`hf-r2 push --dataset uoft-cs/cifar10` of a model evaluated on 200 images of a local copy of cifar10-tiny: the
    card lists the dataset, says what the number was measured on, and claims nothing on the Hub dataset."""
    from hf_r2.saving import update_training_info

    write_json_atomic(os.path.join(folder, "all_results.json"), {"eval_accuracy": 0.375, "eval_samples": 200})
    update_training_info(folder, dataset="cifar10-tiny", data=SUBSET)
    card = build_model_card(folder, REPO, datasets="uoft-cs/cifar10")
    assert card.data.datasets == ["uoft-cs/cifar10"] and "model-index" not in card.data.to_dict()
    assert card.data.metrics == ["accuracy"]
    assert ("| full precision | float | 0.3750 | `cifar10-tiny` (local copy), `test` split, 200 images | - |"
            in card.text)
    assert ("None of these numbers was measured on the whole `uoft-cs/cifar10`, so the model-index (the Hub's results "
            "metadata) claims no result on it.") in card.text
    # trained and evaluated on the whole Hub dataset: the model-index names it, with the split and image count
    update_training_info(folder, data={**SUBSET, "dataset": "uoft-cs/cifar10", "source": "Hub dataset uoft-cs/cifar10",
                                       "hub_id": "uoft-cs/cifar10", "eval_images": 10000})
    card = build_model_card(folder, REPO)
    assert _index(card) == [("uoft-cs/cifar10", "uoft-cs/cifar10 (test split, 10000 images)", "test", 0.375)]
    assert card.data.datasets == ["uoft-cs/cifar10"] and "None of these numbers" not in card.text


def test_low_bit_rows_claim_a_hub_dataset_only_for_its_whole_test_split(folder):
    """Rows of `low_bit_results.json` recorded by name: `cifar10` with 48 images is a subset (no model-index entry),
    with all 10000 test images it is the Hub dataset."""
    from hf_r2.quant import update_results

    row = {"setting": "W2A8", "method": "ptq-nearest", "accuracy": 0.5, "bits_per_weight": 2.25,
           "dataset": "cifar10", "split": "test", "input_size": 32}
    update_results(folder, [{**row, "num_images": 48}])
    card = build_model_card(folder, REPO)
    assert "model-index" not in card.data.to_dict() and "datasets" not in card.data.to_dict()
    assert "| W2A8 | ptq-nearest | 0.5000 | `cifar10`, `test` split, 48 images | 2.25 |" in card.text
    update_results(folder, [{**row, "num_images": 10000, "accuracy": 0.625}])
    card = build_model_card(folder, REPO)
    assert [value for *_, value in _index(card)] == [0.625] and card.data.datasets == ["uoft-cs/cifar10"]


def test_no_local_path_reaches_the_card(folder, tmp_path):
    """A dataset given as a local folder is recorded by its absolute path (r2_training.json, low_bit_results.json,
    export_results.json): the card names its base name only."""
    from hf_r2.quant import update_results
    from hf_r2.saving import update_training_info

    local = str(tmp_path / "private" / "my-photos")
    write_json_atomic(os.path.join(folder, "eval_results.json"), {"eval_accuracy": 0.5})
    update_training_info(folder, dataset=local, data={**SUBSET, "dataset": local, "source": f"local files {local}"})
    update_results(folder, [{"setting": "W4A8", "method": "ptq-nearest", "accuracy": 0.25, "dataset": local,
                             "split": "test", "num_images": 8}])
    acc = {**_onnx_entry(folder)["accuracy"], "dataset": local}
    _write(folder, onnx=_onnx_entry(folder, accuracy=acc))
    text = build_model_card(folder, REPO).text
    assert str(tmp_path) not in text and "private" not in text
    assert "## Data\n\n`my-photos` (local files): trained on 1000 images" in text
    assert "| W4A8 | ptq-nearest | 0.2500 | `my-photos`, `test` split, 8 images | - |" in text
    assert "- Top-1 accuracy on `my-photos` (128 images of the `test` split" in text


def test_license_defaults_to_the_models_or_says_none(folder, tmp_path, hf_convnext):
    card = build_model_card(folder, REPO)  # timm's test_resnet: apache-2.0 in its pretrained_cfg
    assert card.data.license == "apache-2.0"
    assert "## License\n\n`apache-2.0`: the license timm's `pretrained_cfg` (in `config.json`) names" in card.text
    card = build_model_card(folder, REPO, license="mit")
    assert card.data.license == "mit" and "## License\n\n`mit`.\n" in card.text
    hf_r2.save_model_folder(hf_convnext, str(tmp_path / "hf"))
    card = build_model_card(str(tmp_path / "hf"), REPO)
    assert card.data.license is None and "license:" not in str(card).split("---")[1]
    assert "## License\n\nNone given: no license was passed (`hf-r2 push --license`)" in card.text


def test_low_bit_card_results_and_metadata(tmp_path):
    """A low-bit export's card: one `## Results` heading, with its rows and what they were measured on; the
    model-index and `datasets` where the rows name the Hub dataset; the base model."""
    import torch

    from hf_r2.quant import PTQConfig, quantize_, save_low_bit, update_results

    model = make_timm("test_resnet", num_classes=10).eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    quantized = quantize_(model, PTQConfig(w_bits=4, a_bits=8, bn="keep"), [{"pixel_values": x}])
    out = str(tmp_path / "w4a8")
    save_low_bit(quantized, out, method="ptq", base_model="me/resnet-r2")
    update_results(out, [{"setting": "W4A8", "method": "ptq-nearest", "accuracy": 0.75, "bits_per_weight": 4.1,
                          "dataset": "uoft-cs/cifar10", "split": "test", "num_images": 10000}])
    card = build_model_card(out, "me/resnet-r2-w4a8")
    assert card.text.count("## Results") == 1 and "## Low-bit results" not in card.text
    results = card.text[card.text.index("## Results"):card.text.index("## R2 settings")]
    assert "| W4A8 | ptq-nearest | 0.7500 | `uoft-cs/cifar10`, `test` split, 10000 images | 4.10 |" in results
    assert _index(card) == [("uoft-cs/cifar10", "uoft-cs/cifar10 (test split, 10000 images)", "test", 0.75)]
    assert card.data.datasets == ["uoft-cs/cifar10"] and card.data.base_model == "me/resnet-r2"
    assert card.data.license == "apache-2.0" and card.data.library_name == "hf-r2"
    # no row: the Results section says so, under its one heading
    os.remove(os.path.join(out, "low_bit_results.json"))
    card = build_model_card(out, "me/resnet-r2-w4a8")
    assert "## Results\n\nNo evaluation results were saved with this model.\n" in card.text
