"""Checks of the data a user names, before any work starts: a path that does not exist ([`check_local_path`]), an
image that does not decode ([`drop_bad_images`]), a model whose classes are not the dataset's ([`match_labels`]),
and what the data really was ([`data_source`], [`canonical_dataset`]), for results rows and model cards.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

__all__ = [
    "looks_like_path",
    "check_local_path",
    "canonical_dataset",
    "drop_bad_images",
    "model_label_names",
    "match_labels",
]

logger = logging.getLogger(__name__)


def looks_like_path(name: str) -> bool:
    """Whether `name` is meant as a local path rather than a Hub id: it exists, starts with `.`, `/` or `~`, has
    more than one `/`, or its first part is an existing folder (`out/model` when `out/` exists)."""
    name = os.fspath(name)
    if os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") > 1:
        return True
    head = name.split("/", 1)[0]
    return "/" in name and os.path.isdir(head)


def check_local_path(name: str, what: str) -> None:
    """A `FileNotFoundError` naming `what` (the flag, e.g. `--dataset`) when `name` looks like a path that does not
    exist, instead of asking the Hub for it."""
    if looks_like_path(name) and not os.path.exists(os.path.expanduser(name)) and "*" not in name:
        full = os.path.abspath(os.path.expanduser(name))
        raise FileNotFoundError(f"{what} {name!r}: no such folder or file ({full}).")


def canonical_dataset(name: str | None) -> str | None:
    """The dataset as results rows and cards record it: the absolute path of a local folder or file, else the name
    (`cifar10-tiny`, a Hub id)."""
    if name and looks_like_path(name) and os.path.exists(os.path.expanduser(name)):
        return os.path.abspath(os.path.expanduser(name))
    return name


def _readable(example: dict[str, Any]) -> bool:
    import io

    from PIL import Image

    value = example["image"]
    try:
        source = io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"]
        with Image.open(source) as image:
            image.load()
        return True
    except Exception:  # noqa: BLE001 - any decoding error means "unreadable"
        return False


def drop_bad_images(dataset, split: str, skip: bool):
    """`dataset` (columns `image`, `label`) without rows whose image does not decode: with `skip`, they are counted
    and logged; without, the first is an error that names its file and the `--skip_bad_images` option."""
    from datasets import Image

    plain = dataset.cast_column("image", Image(decode=False))
    good = [_readable(row) for row in plain.select_columns(["image"])]
    if all(good):
        return dataset
    bad = [i for i, ok in enumerate(good) if not ok]
    first = plain[bad[0]]["image"]
    name = first.get("path") or f"row {bad[0]}"
    if not skip:
        raise ValueError(f"the image {name} ({split} split) is damaged or not an image ({len(bad)} unreadable in "
                         "all); remove it, or pass --skip_bad_images to leave unreadable images out.")
    logger.warning("Skipped %d unreadable image(s) of the %s split (first: %s).", len(bad), split, name)
    return dataset.select([i for i, ok in enumerate(good) if ok])


_DEFAULT_LABEL = re.compile(r"LABEL_\d+")


def model_label_names(model) -> list[str] | None:
    """The class names a model was trained with (timm: `pretrained_cfg["label_names"]`; transformers: `config.id2label`
    unless it is the default `LABEL_0, ...`), or `None` when it does not record them."""
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("label_names"):
        return [str(n) for n in cfg["label_names"]]
    id2label = getattr(getattr(model, "config", None), "id2label", None)
    if id2label:
        names = [str(id2label[k]) for k in sorted(id2label, key=int)]
        if not all(_DEFAULT_LABEL.fullmatch(n) for n in names):
            return names
    return None


def match_labels(model, dataset, dataset_name: str, map_by_name: bool = False):
    """`dataset` (a `DatasetDict` from [`load_image_dataset`]) checked against the model's classes: the same names
    in the same order pass; other names are an error (with `map_by_name`, a dataset whose classes are all among the
    model's is re-indexed to the model's order instead)."""
    split = dataset["train"] if "train" in dataset else next(iter(dataset.values()))
    names, ours = model_label_names(model), list(split.features["label"].names)
    if names is None:
        classes = getattr(getattr(model, "config", None), "num_labels", None) or getattr(model, "num_classes", None)
        if classes is not None and len(ours) > int(classes):
            raise ValueError(f"the model has {classes} classes but {dataset_name!r} has {len(ours)} "
                             f"({', '.join(ours[:5])}, ...): evaluate on the data the model was trained on.")
        return dataset
    if names == ours:
        return dataset
    missing = [n for n in ours if n not in names]
    if map_by_name and not missing:
        return dataset.align_labels_with_mapping({n: i for i, n in enumerate(names)}, "label")
    shown = lambda xs: ", ".join(xs[:6]) + (", ..." if len(xs) > 6 else "")  # noqa: E731
    hint = ("pass --map-labels-by-name to score it by class name" if not missing
            else "evaluate on the data the model was trained on")
    raise ValueError(f"the model's {len(names)} classes ({shown(names)}) are not the {len(ours)} classes of "
                     f"{dataset_name!r} ({shown(ours)}): {hint}.")
