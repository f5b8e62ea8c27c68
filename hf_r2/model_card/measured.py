"""What each number on a model card was measured on, as the folder's files record it, and the card's `## Results`
and `## Data` sections.

The records: `eval_results.json` / `all_results.json` (`Trainer.save_metrics("eval", ...)`; `hf-r2 train` adds
`eval_samples`) hold the full-precision top-1; `r2_training.json` (`hf-r2 train`) holds `data`, what the data really
was (dataset, source, `hub_id` only when it was that whole Hub dataset, splits, image counts); each row of
`low_bit_results.json` holds its `dataset`, `split` and `num_images`. A card names a Hub dataset in its model-index
only for a number measured on that whole dataset; a number measured on a local copy or a subset says so and stays out
of the model-index. A number whose data the folder does not record is put on the dataset named for the card (`hf-r2
push --dataset`), and the card says that the split and image count were not recorded. No local path goes on a card:
a local folder is named by its base name.
"""

from __future__ import annotations

import math
import os
from typing import Any, NamedTuple

from huggingface_hub import EvalResult

from .._utils import read_json
from ..data import hub_dataset_id

__all__ = ["Measurement", "data_section", "eval_result", "measured_on", "public_dataset_name", "read_eval_results",
           "read_measured_accuracy", "results_section", "row_measurement", "full_precision_measurement"]

_RESULT_FILES = ("eval_results.json", "all_results.json")
# The test split's size of the Hub datasets hf-r2 names by a short name: fewer images are a subset, not the dataset.
_FULL_TEST_IMAGES = {"uoft-cs/cifar10": 10000}
_LOCAL_SOURCES = ("local copy", "local files", "image folder")


class Measurement(NamedTuple):
    """What one number was measured on.

    where (`str` or `None`):
        The data in words, without a local path (`` `cifar10-tiny` (local copy) ``); `None` when not recorded.
    split (`str` or `None`), num_images (`int` or `None`):
        The split and its number of images, where recorded.
    hub_id (`str` or `None`):
        The Hub dataset the model-index may cite for this number: the whole dataset it was measured on, or the one
        named for the card when the folder records nothing; `None` for a local copy, a subset or unknown data.
    recorded (`bool`):
        Whether the folder records the data (else only the dataset named for the card does).
    """

    where: str | None
    split: str | None
    num_images: int | None
    hub_id: str | None
    recorded: bool


def public_dataset_name(name: Any) -> str:
    """`name` as a card may print it: a local path becomes its base name (`/home/me/data/cifar10-tiny` ->
    `cifar10-tiny`); a short name or a Hub id stays."""
    text = str(name)
    if os.path.isabs(text) or text.startswith(("~", ".")) or os.sep in text.replace("/", "") or text.count("/") > 1:
        return os.path.basename(os.path.normpath(text)) or text
    return text


def _public_source(source: Any) -> str | None:
    """`source` of `describe_data` without a local path: `local copy /x/cifar10-tiny` -> `local copy`."""
    if not source:
        return None
    text = str(source)
    return next((kind for kind in _LOCAL_SOURCES if text.startswith(kind)), text)


def _claimed_hub_id(dataset: str | None, num_images: int | None = None) -> str | None:
    """The Hub id a card may cite for data recorded only by name: the name itself when it is a Hub id, the whole
    CIFAR-10 for `cifar10`; never for a local folder or a subset (`cifar10-tiny`, fewer images than the test split
    of a dataset whose size is known)."""
    if not dataset:
        return None
    found = hub_dataset_id(dataset)
    if found != dataset and dataset != "cifar10":
        return None
    full = _FULL_TEST_IMAGES.get(found)
    return None if full is not None and num_images is not None and num_images != full else found


def read_eval_results(folder: str) -> tuple[float | None, int | None]:
    """`(eval_accuracy, eval_samples)` from the folder's `eval_results.json`, else its `all_results.json`; `None`
    for what neither holds."""
    for name in _RESULT_FILES:
        results = read_json(os.path.join(folder, name))
        results = results if isinstance(results, dict) else {}
        for key in ("eval_accuracy", "accuracy"):
            value = results.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                samples = results.get("eval_samples")
                return float(value), samples if isinstance(samples, int) else None
    return None, None


def read_measured_accuracy(folder: str) -> float | None:
    """The top-1 accuracy measured on the evaluation data (`eval_accuracy`), from the folder's `eval_results.json`,
    else its `all_results.json`; `None` when neither holds one."""
    return read_eval_results(folder)[0]


def _given(datasets: list[str] | None) -> Measurement:
    return Measurement(None, None, None, datasets[0] if datasets else None, recorded=False)


def full_precision_measurement(info: dict[str, Any], eval_samples: int | None, datasets: list[str] | None,
                               row: dict[str, Any] | None = None) -> Measurement:
    """What the full-precision top-1 was measured on: `r2_training.json`'s `data` (`info["data"]`, from `hf-r2
    train`), else its dataset name (`info["dataset"]`, from `train_model`) with the `eval_samples` of the results
    file, else the full-precision `row` of `low_bit_results.json` it came from, else only `datasets` (named for the
    card)."""
    data = info.get("data") or {}
    if data:
        where = f"`{public_dataset_name(data.get('dataset'))}`"
        source = _public_source(data.get("source"))
        return Measurement(where + (f" ({source})" if source else ""), data.get("eval_split"),
                           data.get("eval_images") or eval_samples, data.get("hub_id"), recorded=True)
    if info.get("dataset"):
        name = info["dataset"]
        return Measurement(f"`{public_dataset_name(name)}`", None, eval_samples, _claimed_hub_id(name, eval_samples),
                           recorded=True)
    return row_measurement(row, datasets) if row else _given(datasets)


def row_measurement(row: dict[str, Any], datasets: list[str] | None) -> Measurement:
    """What a row of `low_bit_results.json` was measured on (its `dataset`, `split`, `num_images`)."""
    name = row.get("dataset")
    if not name:
        return _given(datasets)
    return Measurement(f"`{public_dataset_name(name)}`", row.get("split"), row.get("num_images"),
                       _claimed_hub_id(name, row.get("num_images")), recorded=True)


def measured_on(m: Measurement) -> str:
    """The data of `m` in words, for the Results table."""
    if not m.recorded:
        return (f"`{m.hub_id}` (named for this card; the folder records no split or image count)" if m.hub_id
                else "not recorded")
    parts = [m.where] + ([f"`{m.split}` split"] if m.split else []) + (
        [f"{m.num_images} images"] if m.num_images else [])
    return ", ".join(parts)


def eval_result(metric_name: str, value: float, m: Measurement) -> EvalResult | None:
    """The model-index entry of one number: only where `m` names a Hub dataset it may cite ([`Measurement`])."""
    if not m.hub_id:
        return None
    details = ", ".join(([f"{m.split} split"] if m.split else []) + (
        [f"{m.num_images} images"] if m.num_images else []))
    return EvalResult(task_type="image-classification", task_name="Image Classification", dataset_type=m.hub_id,
                      dataset_name=m.hub_id + (f" ({details})" if details else ""), dataset_split=m.split,
                      metric_type="accuracy", metric_name=metric_name, metric_value=value)


def results_section(fp: tuple[float, Measurement] | None, rows: list[tuple[dict[str, Any], Measurement]],
                    datasets: list[str] | None) -> str:
    """`## Results`: one table of every measured top-1 with what it was measured on; a line for each dataset named
    for the card that the numbers were not measured on as a whole (so not in the model-index)."""
    if fp is None and not rows:
        return "## Results\n\nNo evaluation results were saved with this model.\n"
    lines = ["## Results\n", "Measured by hf-r2 and saved with the model (`eval_results.json` / `all_results.json`, "
             "`low_bit_results.json`), each number on the data named beside it:\n",
             "| setting | method | top-1 accuracy | measured on | bits / weight |", "|---|---|---|---|---|"]
    if fp is not None:
        lines.append(f"| full precision | float | {fp[0]:.4f} | {measured_on(fp[1])} | - |")
    for row, m in rows:
        bpw = row.get("bits_per_weight")
        lines.append(f"| {row['setting']} | {row.get('method') or '-'} | {row['accuracy']:.4f} | {measured_on(m)} | "
                     f"{'-' if bpw is None else f'{bpw:.2f}'} |")
    cited = {m.hub_id for m in ([fp[1]] if fp else []) + [m for _, m in rows]}
    for name in [d for d in datasets or [] if d not in cited]:
        lines.append(f"\nNone of these numbers was measured on the whole `{name}`, so the model-index (the Hub's "
                     "results metadata) claims no result on it.")
    return "\n".join(lines) + "\n"


def data_section(data: dict[str, Any]) -> str:
    """`## Data`: what `hf-r2 train` trained and evaluated on (`r2_training.json`'s `data`), without local paths."""
    if not data:
        return ""
    source = _public_source(data.get("source"))
    return (f"## Data\n\n`{public_dataset_name(data.get('dataset'))}`" + (f" ({source})" if source else "")
            + f": trained on {data.get('train_images')} images of the `{data.get('train_split')}` split, evaluated "
            f"on {data.get('eval_images')} images of the `{data.get('eval_split')}` split"
            + (f", at {data['input_size']} pixels" if data.get("input_size") else "") + ".\n")
