"""The model card of a saved folder: its Hub metadata (`library_name`, tags, datasets, base model, license, the
measured top-1 as model-index `eval_results`) and its body, assembled from the sections of
[`~hf_r2.model_card.measured`], [`~hf_r2.model_card.sections`] and [`~hf_r2.model_card.deploy`]."""

from __future__ import annotations

import os
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from .._utils import read_json, write_text_atomic
from ..config import R2_CONFIG_NAME
from ..models import is_timm_config
from ..saving import R2_STATS_NAME, read_training_info
from .deploy import deploy_section, read_export_results
from .measured import (
    Measurement,
    data_section,
    eval_result,
    full_precision_measurement,
    read_eval_results,
    results_section,
    row_measurement,
)
from .sections import format_number, license_section, r2_section, stats_section, training_section, usage_section

__all__ = ["MODEL_CARD_TAGS", "R2_CITATION", "build_model_card", "folder_library", "model_license",
           "write_model_card"]

MODEL_CARD_TAGS = ["r2-loss", "quantization", "image-classification", "hf-r2"]

R2_CITATION = """@article{kundu2023r2,
  title   = {R2 Loss: Range Restriction Loss for Model Compression and Quantization},
  author  = {Kundu, Arnav and Yoo, Chungkuk and Mishra, Srijan and Cho, Minsik and Adya, Saurabh},
  journal = {arXiv preprint arXiv:2303.08253},
  year    = {2023}
}"""


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


def model_license(folder: str) -> tuple[str | None, str | None]:
    """`(license id, where it comes from)` of the model in `folder`, from its `config.json`: timm's
    `pretrained_cfg["license"]`, else a top-level `license`; `(None, None)` when it names none."""
    config = _read_json(os.path.join(folder, "config.json")) or {}
    pretrained_cfg = config.get("pretrained_cfg")
    found = pretrained_cfg.get("license") if isinstance(pretrained_cfg, dict) else None
    if isinstance(found, str) and found:
        return found, "timm's `pretrained_cfg` (in `config.json`)"
    found = config.get("license")
    return (found, "`config.json`") if isinstance(found, str) and found else (None, None)


def _cited(datasets: list[str] | None, measured: list[Measurement], *hub_ids: str | None) -> list[str] | None:
    """The card's `datasets`: those named for it, then the Hub datasets the folder records it was trained or measured
    on as a whole."""
    found = list(datasets or []) + [m.hub_id for m in measured if m.recorded] + list(hub_ids)
    return list(dict.fromkeys(d for d in found if d)) or None


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
    """The [`~huggingface_hub.ModelCard`] of a saved hf-r2 model folder. Every number on it was measured and saved in
    the folder, and says what it was measured on (dataset, split, number of images, as recorded); its `## Deploy`
    section describes the files `hf-r2 export` recorded (`export_results.json`) that the folder holds, exported from
    its present weights.

    Args:
        folder (`str`):
            A folder saved by [`hf_r2.save_model_folder`], `R2Trainer.save_model` or `hf-r2 train`.
        repo_id (`str`, *optional*):
            The Hub repo the card is for (used in the loading snippet and as the model name); defaults to the folder
            name.
        datasets (`str` or `list[str]`, *optional*):
            Hub ids of the training / evaluation data (e.g. `"uoft-cs/cifar10"`), listed in the card's `datasets`.
            A number goes into the model-index on a Hub dataset only when it was measured on that whole dataset (as
            `r2_training.json` / `low_bit_results.json` record it); where the folder records nothing, on the first of
            `datasets`. Default: the Hub datasets the folder records.
        base_model (`str`, *optional*):
            The checkpoint this model was fine-tuned from, if any.
        license (`str`, *optional*):
            The license id of the weights; default: the one the model's `config.json` names (timm's
            `pretrained_cfg["license"]`), else none, which the card says.
        tags (`list[str]`, *optional*):
            Tags added to [`MODEL_CARD_TAGS`].
        accuracy (`float`, *optional*):
            A measured top-1 accuracy; defaults to the one in the folder's `eval_results.json` / `all_results.json`.
            Never pass a number that was not measured on the model in `folder`.
        training (`dict`, *optional*):
            Training hyperparameters to list (learning rate, batch size, ...); default: those in `r2_training.json`.
    """
    from ..quant import LOW_BIT_CONFIG_NAME, read_results

    library = folder_library(folder)
    low_bit = _read_json(os.path.join(folder, LOW_BIT_CONFIG_NAME))
    info = read_training_info(folder)
    trained_on = info.get("data") or {}
    given = [datasets] if isinstance(datasets, str) else list(datasets or []) or None
    all_rows = read_results(folder)
    # the card names one dataset (the training run's, else the latest measured) and shows only rows measured on it
    card_dataset = trained_on.get("dataset") or info.get("dataset") or next(
        (r.get("dataset") for r in reversed(all_rows) if r.get("dataset")), None)
    all_rows = [r for r in all_rows if r.get("dataset") == card_dataset or (card_dataset and not r.get("dataset")
                and not trained_on)]
    rows = [(r, row_measurement(r, given)) for r in all_rows
            if r.get("setting") != "FP" and isinstance(r.get("accuracy"), float)]
    fp: tuple[float, Measurement] | None = None
    measured, samples = read_eval_results(folder) if low_bit is None else (None, None)
    fp_rows = [r for r in all_rows if r.get("setting") == "FP" and isinstance(r.get("accuracy"), float)]
    if accuracy is not None and accuracy != measured:  # given by the caller: the folder does not say on what
        fp = (accuracy, full_precision_measurement({}, None, given))
    elif measured is not None:
        fp = (measured, full_precision_measurement(info, samples, given))
    elif low_bit is None and fp_rows:
        fp = (fp_rows[-1]["accuracy"], row_measurement(fp_rows[-1], given))
    if low_bit is not None:
        base_model = base_model or (low_bit.get("base_model") if _is_hub_id(low_bit.get("base_model")) else None)
    repo_id = repo_id or os.path.basename(os.path.abspath(folder))
    model_name = repo_id.split("/")[-1]
    if training is None:
        training = info.get("training_arguments")
    numbers = ([("Top-1 accuracy (full precision)", *fp)] if fp else []) + [
        (f"Top-1 accuracy ({row['setting']}, {row.get('method')})", row["accuracy"], m) for row, m in rows]
    eval_results = [e for e in (eval_result(*number) for number in numbers) if e is not None] or None
    cited = _cited(given, [m for *_, m in numbers], trained_on.get("hub_id"))
    license_source = "given" if license else None
    if not license:
        license, license_source = model_license(folder)
    all_tags = list(MODEL_CARD_TAGS) + [t for t in (tags or []) if t not in MODEL_CARD_TAGS]
    extra = {"base_model_relation": "quantized"} if low_bit is not None and base_model else {}
    if low_bit is not None:
        all_tags.append("low-bit")
    deploy, formats = deploy_section(folder, read_export_results(folder), repo_id)
    all_tags += [tag for tag in formats if tag not in all_tags]
    data = ModelCardData(
        library_name="hf-r2" if low_bit is not None else library,
        tags=all_tags,
        datasets=cited,
        base_model=base_model,
        license=license,
        pipeline_tag="image-classification",
        metrics=["accuracy"] if numbers else None,
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
        bits = format_number(size.get("bits_per_weight"))
        body[1] = (
            f"A low-bit export ({low_bit.get('method')}, {bits} bits per weight of the "
            f"{size.get('low_bit_layers')} quantized layers) of an image classifier ({library}) trained with hf-r2 "
            "and R2-Loss (Kundu et al., 2023, [arXiv 2303.08253](https://huggingface.co/papers/2303.08253)).\n"
        )
    if base_model:
        verb = "Quantized" if low_bit is not None else "Fine-tuned"
        body.append(f"{verb} from [`{base_model}`](https://huggingface.co/{base_model}).\n")
    body.append(results_section(fp, rows, given))
    body += [s for s in (data_section(trained_on), r2_section(_read_json(os.path.join(folder, R2_CONFIG_NAME))),
                         stats_section(_read_json(os.path.join(folder, R2_STATS_NAME))), training_section(training),
                         license_section(license, license_source),
                         usage_section(library, repo_id, low_bit=low_bit is not None), deploy) if s]
    body.append(f"## Citation\n\n```bibtex\n{R2_CITATION}\n```\n")
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))


def _is_hub_id(value: str | None) -> bool:
    if not value or os.path.exists(value) or value.startswith((".", "/", "~")):
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def write_model_card(folder: str, card: ModelCard) -> str:
    """Write `card` to `folder/README.md` atomically (a temp file, then a rename); returns the path."""
    return write_text_atomic(os.path.join(folder, "README.md"), str(card))
