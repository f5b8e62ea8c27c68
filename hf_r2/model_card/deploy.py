"""The model card's `## Deploy` section: the files `hf-r2 export` wrote into the folder and recorded in
`export_results.json` (size, bits per weight, what was checked and measured, how to run them), described only while
the folder holds them and the weights they were exported from."""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any

from .._utils import is_plain_path
from ..output_folder import EXPORT_RESULTS_NAME, read_export_results
from .measured import public_dataset_name

__all__ = ["EXPORT_RESULTS_NAME", "deploy_section", "read_export_results", "weights_digest"]

logger = logging.getLogger(__name__)

# EXPORT_RESULTS_NAME: what `hf-r2 export` wrote into a model folder and measured: `{"format_version",
# "hf_r2_version", "exports": {"onnx": {...}, "coreml": {...}}}`, one entry per format (see `hf_r2.commands.export`).
_TARGETS = {"iOS18": "iOS 18 / macOS 15"}  # Core ML deployment targets, as Apple names the systems


def weights_digest(folder: str) -> str | None:
    """The sha256 of the folder's weights: its top-level `*.safetensors` files, each name then its bytes, in name
    order (`None` when it has none). `export_results.json` records it, so that a card describes an exported file
    only as long as the folder still holds the weights it was exported from."""
    names = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors")
                   and os.path.isfile(os.path.join(folder, n)))
    if not names:
        return None
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode() + b"\0")
        with open(os.path.join(folder, name), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:.1f} MiB" if num_bytes >= 2**20 else f"{num_bytes / 1024:.1f} KiB"


def _preprocessing(steps: list[dict[str, Any]]) -> str:
    """The evaluation transform `hf-r2 export` recorded, in words."""
    words = []
    for step in steps:
        op, size = step.get("op"), step.get("size")
        if op == "resize":
            to = f"the shorter side to {size}" if isinstance(size, int) else f"to {size[0]} x {size[1]}"
            words.append(f"resize {to} pixels ({step.get('interpolation')})")
        elif op == "center_crop":
            words.append(f"center-crop {size[0]} x {size[1]}")
        elif op == "to_tensor":
            words.append("convert to float in [0, 1] (RGB, channels first)")
        elif op == "normalize":
            words.append(f"normalize with mean {tuple(step['mean'])} and std {tuple(step['std'])}")
        else:
            words.append(f"`{step.get('repr', op)}`")
    return ", ".join(words)


def _deploy_entry(fmt: str, entry: dict[str, Any], repo_id: str) -> list[str]:
    """The lines of one exported file: size, bits, what was checked and measured, and how to run it."""
    path, size, float_bytes = entry["path"], entry["file_bytes"], entry.get("float_bytes")
    shape, check, acc = list(entry.get("input_size") or [3, 224, 224]), entry.get("check"), entry.get("accuracy")
    vs = f", against {_size(float_bytes)} of float weights ({float_bytes / size:.1f}x smaller)" if float_bytes else ""
    bits = f"{entry['bits_per_weight']:.2f} bits per Conv/Linear weight ({entry.get('weights')} weights"
    x = f"x = np.zeros(({', '.join(map(str, [1, *shape]))}), dtype=np.float32)  # your images, preprocessed as above"
    steps = _preprocessing(entry.get("preprocessing") or [])
    batch = "1" if fmt == "coreml" else "batch"
    given = (f"- Input: `pixel_values`, float32 ({batch}, {', '.join(map(str, shape))}), preprocessed as for the "
             "PyTorch model (its own preprocessing, not part of the file)" + (f": {steps}." if steps else "."))
    if fmt == "onnx":
        lines = [f"### ONNX: `{path}`\n", f"- Size: {_size(size)}{vs}; {bits}, opset {entry.get('opset')})."]
        if check:
            lines.append(f"- Checked: ONNX Runtime and hf-r2 give the same top-1 class on "
                         f"{100 * check['top1_agreement']:.1f}% of {check['num_images']} random inputs (largest "
                         f"logit difference {check['max_abs_diff']:.3g}, largest logit {check['max_abs_logit']:.3g}).")
        else:
            lines.append("- Not checked against hf-r2 (exported with `--check-samples 0`).")
        if acc:
            lines.append(f"- Top-1 accuracy on `{public_dataset_name(acc['dataset'])}` ({acc['num_images']} images "
                         f"of the `{acc['split']}` split, {acc['input_size']} pixels): {acc['onnxruntime']:.4f} in "
                         f"ONNX Runtime, {acc['hf_r2']:.4f} in hf-r2 (PyTorch) on the same images.")
        lines.append(given)
        code = ("import numpy as np\nimport onnxruntime\nfrom huggingface_hub import hf_hub_download\n\n"
                f'session = onnxruntime.InferenceSession(hf_hub_download("{repo_id}", "{path}"))\n{x}\n'
                'logits = session.run(None, {"pixel_values": x})[0]  # (batch, classes)')
    else:
        float_file = entry.get("float_file_bytes")
        if float_file:
            vs = (f", against {_size(float_file)} for the same network converted with float weights "
                  f"({float_file / size:.1f}x smaller)")
        target = entry.get("deployment_target")
        lines = [f"### Core ML: `{path}`\n", f"- Size: {_size(size)}{vs}; {bits}, {entry.get('precision')}, "
                 f"{_TARGETS.get(target, target)} or later; activations in float)."]
        if check:
            rounded = "" if entry.get("precision") == "float32" else f" rounded to {entry.get('precision')}"
            same = "equal" if check.get("values_match") else "do NOT equal"
            lines.append(f"- Checked: the weights read back from the package decode to hf-r2's{rounded} bit for bit "
                         f"in {check['exact_layers']} / {check['num_layers']} low-bit layers (indices and codes "
                         f"{same} hf-r2's).")
        elif entry.get("low_bit_layers"):
            lines.append("- The weights were not read back (exported with `--check-samples 0`).")
        lines += ["- Not run: hf-r2 made no prediction with Core ML (which runs on Apple systems only), so no "
                  "accuracy was measured in Core ML.", given]
        code = ("import coremltools as ct  # predictions need macOS\nimport numpy as np\n"
                f'from huggingface_hub import snapshot_download\n\nfolder = snapshot_download("{repo_id}", '
                f'allow_patterns=["{path}/*"])\nmodel = ct.models.MLModel(f"{{folder}}/{path}")\n{x}\n'
                'logits = model.predict({"pixel_values": x})["logits"]  # (1, classes)')
    return lines + [f"\n```python\n{code}\n```\n"]


def deploy_section(folder: str, exports: dict[str, dict[str, Any]], repo_id: str) -> tuple[str, list[str]]:
    """`## Deploy` for the exported files that `export_results.json` describes and `folder` holds, exported from
    its present weights; and those files' formats. `("", [])` when there is none."""
    out, shown, digest = [], [], weights_digest(folder)
    for fmt, entry in [(f, exports[f]) for f in ("onnx", "coreml") if f in exports]:
        if not is_plain_path(entry.get("path")):  # refused on the name alone, before the file system is asked
            logger.warning("%s in %s names %r, not a plain file name inside the folder: refused, left off the card.",
                           EXPORT_RESULTS_NAME, folder, entry.get("path"))
        path = os.path.join(folder, *entry["path"].split("/")) if is_plain_path(entry.get("path")) else ""
        if not path or os.path.islink(path) or not (os.path.isfile(path) if fmt == "onnx" else os.path.isdir(path)):
            continue  # a link is not uploaded by `hf-r2 push` either
        if entry.get("weights_sha256") not in (None, digest):
            logger.warning("%s in %s was exported from other weights than the folder's: left off the card. Run "
                           "`hf-r2 export` again.", entry["path"], folder)
            out.append(f"`{entry['path']}` was exported from earlier weights than these, so it is not described "
                       "here.\n")
            continue
        out += _deploy_entry(fmt, entry, repo_id)
        shown.append(fmt)
    if not out:
        return "", []
    return "## Deploy\n\nWritten and checked by `hf-r2 export` (`export_results.json`).\n\n" + "\n".join(out), shown
