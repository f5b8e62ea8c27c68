"""The model card of an hf-r2 model folder: Hub metadata (`library_name`, tags, datasets, base model, the measured
accuracy as model-index `eval_results`) plus a body with the R2 settings, the per-layer weight ranges, how to load the
model, how to deploy the files `hf-r2 export` wrote (ONNX, Core ML), and the citation.

Only numbers measured and saved in the folder (`eval_results.json` / `all_results.json`, as
`Trainer.save_metrics("eval", ...)` writes them; `low_bit_results.json`; `export_results.json`, as `hf-r2 export`
writes it) or passed explicitly go on the card.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ._utils import is_plain_path, read_json, write_text_atomic
from .config import R2_CONFIG_NAME
from .data import hub_dataset_id
from .models import is_timm_config
from .saving import R2_STATS_NAME, read_training_info

__all__ = ["EXPORT_RESULTS_NAME", "MODEL_CARD_TAGS", "R2_CITATION", "build_model_card", "folder_library",
           "read_export_results", "read_measured_accuracy", "weights_digest", "write_model_card"]

logger = logging.getLogger(__name__)

MODEL_CARD_TAGS = ["r2-loss", "quantization", "image-classification", "hf-r2"]

R2_CITATION = """@article{kundu2023r2,
  title   = {R2 Loss: Range Restriction Loss for Model Compression and Quantization},
  author  = {Kundu, Arnav and Yoo, Chungkuk and Mishra, Srijan and Cho, Minsik and Adya, Saurabh},
  journal = {arXiv preprint arXiv:2303.08253},
  year    = {2023}
}"""

# Rows of the per-layer range table; larger models list the layers with the largest max/std first, then stop.
_MAX_LAYER_ROWS = 60
_RESULT_FILES = ("eval_results.json", "all_results.json")
#: What `hf-r2 export` wrote into a model folder and measured: `{"format_version", "hf_r2_version", "exports":
#: {"onnx": {...}, "coreml": {...}}}`, one entry per format (see `hf_r2.commands.export`).
EXPORT_RESULTS_NAME = "export_results.json"
_TARGETS = {"iOS18": "iOS 18 / macOS 15"}  # Core ML deployment targets, as Apple names the systems


def _read_json(path: str) -> dict[str, Any] | None:
    data = read_json(path)
    return data if isinstance(data, dict) else None


def folder_library(folder: str) -> str:
    """`"timm"` for a folder in timm's layout (`config.json` with `architecture` and no `model_type`), else
    `"transformers"`. Raises `FileNotFoundError` when the folder has no `config.json`."""
    config = _read_json(os.path.join(folder, "config.json"))
    if config is None:
        raise FileNotFoundError(
            f"{folder!r} has no config.json: not a saved model folder. Save one with `hf_r2.save_model_folder` or "
            "`trainer.save_model()` first."
        )
    return "timm" if is_timm_config(config) else "transformers"


def read_measured_accuracy(folder: str) -> float | None:
    """The top-1 accuracy measured on the evaluation data (`eval_accuracy`), from the folder's `eval_results.json`,
    else its `all_results.json`; `None` when neither holds one."""
    for name in _RESULT_FILES:
        results = _read_json(os.path.join(folder, name)) or {}
        for key in ("eval_accuracy", "accuracy"):
            value = results.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                return float(value)
    return None


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


def read_export_results(folder: str) -> dict[str, dict[str, Any]]:
    """`{format: entry}` from the folder's `export_results.json` (`{}` when there is none): what `hf-r2 export`
    wrote (`path` relative to the folder, `file_bytes`, `bits_per_weight`, ...) and measured (`check`, `accuracy`)."""
    exports = (_read_json(os.path.join(folder, EXPORT_RESULTS_NAME)) or {}).get("exports")
    return {k: v for k, v in exports.items() if isinstance(v, dict)} if isinstance(exports, dict) else {}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def _r2_section(r2_config: dict[str, Any] | None) -> str:
    if not r2_config:
        return "## R2 settings\n\nNo `r2_config.json` was saved with this model.\n"
    rows = "\n".join(f"| `{k}` | `{v!r}` |" for k, v in sorted(r2_config.items()))
    return (
        "## R2 settings\n\nTrained with R2-Loss (`task_loss + lambda * R(W)`), which restricts the range of the "
        "weights so that they quantize to few bits. The settings, as saved in `r2_config.json`:\n\n"
        f"| setting | value |\n|---|---|\n{rows}\n"
    )


def _stats_section(stats: dict[str, Any] | None) -> str:
    if not stats:
        return "## Weight ranges\n\nNo `r2_stats.json` was saved with this model.\n"
    out = ["## Weight ranges\n", "Measured on the saved weights of the layers R2 acts on (`r2_stats.json`)."]
    overall = stats.get("overall") or {}
    if overall:
        out.append("\n| overall | value |\n|---|---|")
        out += [f"| `{k}` | {_fmt(v)} |" for k, v in overall.items()]
    per_layer = stats.get("per_layer") or {}
    if per_layer:
        names = list(per_layer)
        if len(names) > _MAX_LAYER_ROWS:
            names = sorted(names, key=lambda n: -float(per_layer[n].get("max_over_std") or 0))[:_MAX_LAYER_ROWS]
            out.append(f"\nThe {_MAX_LAYER_ROWS} layers (of {len(per_layer)}) with the largest max/std:")
        out.append("\n| layer | min | max | std | max/std | kurtosis |\n|---|---|---|---|---|---|")
        for name in names:
            s = per_layer[name]
            out.append(
                f"| `{name}` | {_fmt(s.get('min'))} | {_fmt(s.get('max'))} | {_fmt(s.get('std'))} | "
                f"{_fmt(s.get('max_over_std'))} | {_fmt(s.get('kurtosis'))} |"
            )
    return "\n".join(out) + "\n"


def _usage_section(library: str, repo_id: str, low_bit: bool = False) -> str:
    if low_bit:
        return (
            "## How to load\n\n"
            "The weights are stored as low-bit codes (`low_bit.safetensors`, described by `low_bit_config.json`); "
            "hf-r2 decodes them into the timm / transformers architecture in `config.json`:\n\n"
            f'```python\nimport hf_r2\nmodel, r2_config, stats, low_bit = hf_r2.from_pretrained("{repo_id}")\n```\n'
        )
    if library == "timm":
        plain = f'import timm\nmodel = timm.create_model("hf-hub:{repo_id}", pretrained=True).eval()'
    else:
        plain = (
            "from transformers import AutoModelForImageClassification\n"
            f'model = AutoModelForImageClassification.from_pretrained("{repo_id}").eval()'
        )
    return (
        "## How to load\n\n"
        f"```python\n{plain}\n```\n\n"
        "With hf-r2, which also returns the R2 settings and the weight-range statistics:\n\n"
        f'```python\nimport hf_r2\nmodel, r2_config, stats, _ = hf_r2.from_pretrained("{repo_id}")\n```\n'
    )


def _is_hub_id(value: str | None) -> bool:
    if not value or os.path.exists(value) or value.startswith((".", "/", "~")):
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def _low_bit_section(rows: list[dict[str, Any]], dataset: str | None) -> str:
    on = f" on `{dataset}`" if dataset else ""
    lines = ["## Low-bit results\n", f"Measured by `hf-r2 ptq / qat / compress / evaluate`{on} "
             "(`low_bit_results.json`; rows measured on other data are left out):\n",
             "| setting | method | top-1 accuracy | images | bits / weight |", "|---|---|---|---|---|"]
    for row in rows:
        bpw = row.get("bits_per_weight")
        lines.append(f"| {row['setting']} | {row.get('method') or '-'} | {row['accuracy']:.4f} | "
                     f"{row.get('num_images') or '-'} | {'-' if bpw is None else f'{bpw:.2f}'} |")
    return "\n".join(lines) + "\n"


def _claimed_hub_id(dataset: str | None) -> str | None:
    """The Hub id a card may cite for data recorded only by name: the name itself when it is a Hub id, the whole
    CIFAR-10 for `cifar10`; never for a local folder or a subset (`cifar10-tiny`)."""
    if not dataset:
        return None
    found = hub_dataset_id(dataset)
    return found if found == dataset or dataset == "cifar10" else None


def _data_section(data: dict[str, Any]) -> str:
    if not data:
        return ""
    return (f"## Data\n\n`{data.get('dataset')}` ({data.get('source')}): trained on {data.get('train_images')} "
            f"images of the `{data.get('train_split')}` split, evaluated on {data.get('eval_images')} images of the "
            f"`{data.get('eval_split')}` split"
            + (f", at {data['input_size']} pixels" if data.get("input_size") else "") + ".\n")


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
            lines.append(f"- Top-1 accuracy on `{acc['dataset']}` ({acc['num_images']} images of the "
                         f"`{acc['split']}` split, {acc['input_size']} pixels): {acc['onnxruntime']:.4f} in ONNX "
                         f"Runtime, {acc['hf_r2']:.4f} in hf-r2 (PyTorch) on the same images.")
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


def _deploy_section(folder: str, exports: dict[str, dict[str, Any]], repo_id: str) -> tuple[str, list[str]]:
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


def build_model_card(
    folder: str,
    repo_id: str | None = None,
    *,
    datasets: str | list[str] | None = None,
    base_model: str | None = None,
    license: str | None = None,
    tags: list[str] | None = None,
    accuracy: float | None = None,
    training: dict[str, Any] | None = None,
) -> ModelCard:
    """The [`~huggingface_hub.ModelCard`] of a saved hf-r2 model folder. Its `## Deploy` section describes the files
    `hf-r2 export` recorded (`export_results.json`) that the folder holds, exported from its present weights.

    Args:
        folder (`str`):
            A folder saved by [`hf_r2.save_model_folder`], `R2Trainer.save_model` or `hf-r2 train`.
        repo_id (`str`, *optional*):
            The Hub repo the card is for (used in the loading snippet and as the model name); defaults to the folder
            name.
        datasets (`str` or `list[str]`, *optional*):
            Hub ids of the training / evaluation data (e.g. `"uoft-cs/cifar10"`); default: the dataset recorded in
            the folder (`r2_training.json` from `hf-r2 train`, or the rows of `low_bit_results.json`). The measured
            accuracy goes into the model-index only when the dataset is known (the model-index needs one).
        base_model (`str`, *optional*):
            The checkpoint this model was fine-tuned from, if any.
        license (`str`, *optional*):
            The license id of the weights.
        tags (`list[str]`, *optional*):
            Tags added to [`MODEL_CARD_TAGS`].
        accuracy (`float`, *optional*):
            A measured top-1 accuracy; defaults to the one in the folder's `eval_results.json` / `all_results.json`.
            Never pass a number that was not measured on the model in `folder`.
        training (`dict`, *optional*):
            Training hyperparameters to list (learning rate, batch size, ...); default: those in `r2_training.json`.
    """
    from .quant import LOW_BIT_CONFIG_NAME, read_results

    library = folder_library(folder)
    low_bit = _read_json(os.path.join(folder, LOW_BIT_CONFIG_NAME))
    info = read_training_info(folder)
    trained_on = info.get("data") or {}
    all_rows = read_results(folder)
    # the card names one dataset (the training run's, else the latest measured) and shows only rows measured on it
    card_dataset = trained_on.get("dataset") or info.get("dataset") or next(
        (r.get("dataset") for r in reversed(all_rows) if r.get("dataset")), None)
    all_rows = [r for r in all_rows if r.get("dataset") == card_dataset or (card_dataset and not r.get("dataset")
                and not trained_on)]
    rows = [r for r in all_rows if r.get("setting") != "FP" and isinstance(r.get("accuracy"), float)]
    if low_bit is not None:
        base_model = base_model or (low_bit.get("base_model") if _is_hub_id(low_bit.get("base_model")) else None)
    repo_id = repo_id or os.path.basename(os.path.abspath(folder))
    model_name = repo_id.split("/")[-1]
    r2_config = _read_json(os.path.join(folder, R2_CONFIG_NAME))
    stats = _read_json(os.path.join(folder, R2_STATS_NAME))
    if accuracy is None and low_bit is None:
        accuracy = read_measured_accuracy(folder)
        fp_rows = [r for r in all_rows if r.get("setting") == "FP"]
        if accuracy is None and fp_rows:
            accuracy = fp_rows[-1]["accuracy"]
            eval_images = fp_rows[-1].get("num_images")
        else:
            eval_images = trained_on.get("eval_images")
    else:
        eval_images = trained_on.get("eval_images")
    if training is None:
        training = info.get("training_arguments")
    if not datasets:
        # the data recorded by `hf-r2 train` (r2_training.json: a Hub id only for that whole dataset), else the name
        # recorded by the low-bit commands; never a Hub id for a local copy of a subset
        hub_id = trained_on.get("hub_id") if trained_on else _claimed_hub_id(card_dataset)
        datasets = [hub_id] if hub_id else None
    if isinstance(datasets, str):
        datasets = [datasets]
    all_tags = list(MODEL_CARD_TAGS) + [t for t in (tags or []) if t not in MODEL_CARD_TAGS]
    metrics: list[tuple[str, float]] = []  # (metric name, top-1) for the model-index
    if datasets:
        if accuracy is not None:
            metrics.append(("Top-1 accuracy (full precision)", accuracy))
        metrics += [(f"Top-1 accuracy ({row['setting']}, {row.get('method')})", row["accuracy"]) for row in rows or []]
    eval_results = [
        EvalResult(task_type="image-classification", task_name="Image Classification", dataset_type=datasets[0],
                   dataset_name=datasets[0], metric_type="accuracy", metric_name=name, metric_value=value)
        for name, value in metrics
    ] or None
    extra = {"base_model_relation": "quantized"} if low_bit is not None and base_model else {}
    if low_bit is not None:
        all_tags.append("low-bit")
    deploy, formats = _deploy_section(folder, read_export_results(folder), repo_id)
    all_tags += [tag for tag in formats if tag not in all_tags]
    data = ModelCardData(
        library_name="hf-r2" if low_bit is not None else library,
        tags=all_tags,
        datasets=datasets or None,
        base_model=base_model,
        license=license,
        pipeline_tag="image-classification",
        metrics=["accuracy"] if accuracy is not None or rows else None,
        model_name=model_name if eval_results else None,
        eval_results=eval_results,
        **extra,
    )
    body = [f"# {model_name}\n",
            f"An image classifier ({library}) trained with hf-r2 and R2-Loss, the range "
            "restriction loss of Kundu et al. (2023, [arXiv 2303.08253](https://huggingface.co/papers/2303.08253)), "
            "which prepares the weights for low-bit quantization. This repo holds the full-precision weights.\n"]
    if low_bit is not None:
        size = low_bit.get("size") or {}
        body[1] = (
            f"A low-bit export ({low_bit.get('method')}, {_fmt(size.get('bits_per_weight'))} bits per weight of the "
            f"{size.get('low_bit_layers')} quantized layers) of an image classifier ({library}) trained with hf-r2 "
            "and R2-Loss (Kundu et al., 2023, [arXiv 2303.08253](https://huggingface.co/papers/2303.08253)).\n"
        )
    if base_model and low_bit is not None:
        body.append(f"Quantized from [`{base_model}`](https://huggingface.co/{base_model}).\n")
    elif base_model:
        body.append(f"Fine-tuned from [`{base_model}`](https://huggingface.co/{base_model}).\n")
    body.append("## Results\n")
    if accuracy is not None:
        named = datasets[0] if datasets else card_dataset
        on = (f" on `{named}`" if named else "") + (f" ({eval_images} images)" if eval_images else "")
        body.append(f"| metric | value |\n|---|---|\n| top-1 accuracy (full precision){on} | {accuracy:.4f} |\n")
    elif not rows:
        body.append("No evaluation results were saved with this model.\n")
    if rows:
        body.append(_low_bit_section(rows, card_dataset))
    if trained_on:
        body.append(_data_section(trained_on))
    body.append(_r2_section(r2_config))
    body.append(_stats_section(stats))
    if training:
        rows = "\n".join(f"| `{k}` | `{v!r}` |" for k, v in training.items())
        body.append(f"## Training\n\n| hyperparameter | value |\n|---|---|\n{rows}\n")
    body.append(_usage_section(library, repo_id, low_bit=low_bit is not None))
    if deploy:
        body.append(deploy)
    body.append(f"## Citation\n\n```bibtex\n{R2_CITATION}\n```\n")
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)
    return ModelCard(content)


def write_model_card(folder: str, card: ModelCard) -> str:
    """Write `card` to `folder/README.md` atomically (a temp file, then a rename); returns the path."""
    return write_text_atomic(os.path.join(folder, "README.md"), str(card))
