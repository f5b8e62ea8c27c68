"""Checks of the data a user names, before any work starts, each a one-line error that names the problem and its fix:
a path that does not exist ([`check_local_path`]), a parquet split without rows ([`check_parquet_rows`]), rows
without an image or a label, labels outside the classes ([`check_rows`]), an image that does not decode
([`drop_bad_images`]), training data of one class ([`check_classes`]), a model whose classes are not the dataset's
([`match_labels`]); and what the data really was ([`canonical_dataset`]), for results rows and model cards.
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
    "check_parquet_rows",
    "check_rows",
    "check_classes",
    "plausible_column",
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
    if not value or not (value.get("bytes") or value.get("path")):  # a null image: nothing to decode
        return False
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
    if not any(good):
        raise ValueError(f"none of the {len(good)} images of the {split} split decodes: point --dataset at images.")
    bad = [i for i, ok in enumerate(good) if not ok]
    first = plain[bad[0]]["image"] or {}
    name = first.get("path") or f"row {bad[0]}"
    if not skip:
        raise ValueError(f"the image {name} ({split} split) is damaged or not an image ({len(bad)} unreadable in "
                         "all); remove it, or pass --skip_bad_images to leave unreadable images out.")
    logger.warning("Skipped %d unreadable image(s) of the %s split (first: %s).", len(bad), split, name)
    return dataset.select([i for i, ok in enumerate(good) if ok])


def check_parquet_rows(files: dict[str, list[str]], where: str) -> None:
    """A `ValueError` naming the files when a split of `files` (split -> parquet files, as `load_dataset` takes them)
    holds no rows at all, read from the files' footers (nothing is loaded); `datasets` would fail on it with
    `Instruction "test" corresponds to no data!`."""
    import pyarrow.parquet as pq

    for split, paths in files.items():
        try:
            rows = sum(pq.ParquetFile(path).metadata.num_rows for path in paths)
        except Exception:  # noqa: BLE001 - not a parquet file: `load_dataset` names the problem
            continue
        if rows == 0:
            names = ", ".join(os.path.basename(path) for path in paths)
            raise ValueError(f"the {split!r} split of {where} has no rows ({names}: 0 rows): delete the empty "
                             "file(s) or write the split's rows into them.")


def _missing_images(column) -> Any:
    """The mask of the rows of an arrow image column that hold no image: null, or a struct whose `bytes` and `path`
    are both null."""
    import pyarrow as pa
    import pyarrow.compute as pc

    missing = pc.is_null(column)
    if pa.types.is_struct(column.type) and {"bytes", "path"} <= {f.name for f in column.type}:
        empty = pc.and_(pc.is_null(pc.struct_field(column, "bytes")), pc.is_null(pc.struct_field(column, "path")))
        missing = pc.or_(missing, pc.fill_null(empty, True))
    return missing


def _rows(mask) -> list[int]:
    import numpy as np

    return np.flatnonzero(np.asarray(mask.to_numpy(zero_copy_only=False), dtype=bool)).tolist()


def check_rows(split, split_name: str, where: str, *, image_column: str = "image", label_column: str = "label",
               skip_bad_images: bool = False, evaluated: bool = False):
    """`split` checked row by row before any training, each problem one `ValueError` naming it and its fix: no rows;
    rows whose image is null (left out and counted with `skip_bad_images`); labels beyond the classes of a
    `ClassLabel`; rows without a label (`-1`, a `ClassLabel`'s "no label", or null), which are left out and counted
    in a training split and refused in the split evaluated on (`evaluated`), where they would crash the evaluation
    after the whole training. Returns `split`, less the rows left out (the same object when none is)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    what = f"the {split_name!r} split of {where}"
    if split.num_rows == 0:
        raise ValueError(f"{what} has no rows: point --dataset at data with rows in it"
                         + (" (hf-r2 train: or name another split with --eval_split)." if evaluated else "."))
    keep = set(range(split.num_rows))
    if _count(_missing_images(split.data.column(image_column))):  # the whole table first: no copy when none is
        no_image = _rows(_missing_images(split.with_format("arrow")[image_column]))
        if no_image and not skip_bad_images:
            raise ValueError(f"{len(no_image)} row(s) of {what} have no image (null; first: row {no_image[0]}): "
                             "remove them, or pass --skip_bad_images to leave them out.")
        if no_image:
            logger.warning("Skipped %d row(s) without an image in %s (first: row %d).", len(no_image), what,
                           no_image[0])
        keep -= set(no_image)
    labels = split.with_format("arrow")[label_column]
    classes = getattr(split.features[label_column], "num_classes", None)
    if classes is not None:
        beyond = _rows(pc.fill_null(pc.greater_equal(labels, classes), False))
        if beyond:
            raise ValueError(f"{len(beyond)} row(s) of {what} have a label beyond its {classes} classes (first: row "
                             f"{beyond[0]}, label {labels[beyond[0]].as_py()}): fix the labels or the class names.")
    unlabelled = pc.is_null(labels)
    if pa.types.is_integer(labels.type):
        unlabelled = pc.or_(unlabelled, pc.fill_null(pc.less(labels, 0), True))
    unlabelled = _rows(unlabelled)
    if unlabelled and evaluated:
        raise ValueError(
            f"{len(unlabelled)} of the {split.num_rows} rows of {what}, the split evaluated on, have no label (-1, "
            "a ClassLabel's 'no label', or null; e.g. a benchmark's hidden test labels): evaluate on a labelled "
            "split (hf-r2 train: --eval_split NAME, or --validation_size N to hold out training images; the other "
            "commands: data whose test split is labelled).")
    if unlabelled:
        logger.warning("Left out %d of the %d row(s) of %s: they have no label (-1, a ClassLabel's 'no label', or "
                       "null).", len(unlabelled), split.num_rows, what)
        keep -= set(unlabelled)
    if len(keep) == split.num_rows:
        return split
    if not keep:
        raise ValueError(f"{what} has no row with both an image and a label: point --dataset at labelled data.")
    return split.select(sorted(keep))


def _count(mask) -> int:
    import pyarrow.compute as pc

    return int(pc.sum(pc.cast(mask, "int64")).as_py() or 0)


def check_classes(split) -> None:
    """A `ValueError` when the training rows `split` (a `label` column) hold fewer than two classes: a classifier
    of one class scores 100 % and learns nothing. The class names come from the `ClassLabel`, if there is one."""
    import pyarrow.compute as pc

    if "label" not in split.column_names or split.num_rows == 0:
        return
    values = pc.unique(split.with_format("arrow")["label"]).to_pylist()
    present = sorted(v for v in values if v is not None and not (isinstance(v, int) and v < 0))
    if len(present) >= 2:
        return
    names = getattr(split.features["label"], "names", None)
    name = names[present[0]] if present and names and 0 <= present[0] < len(names) else present[0] if present else None
    raise ValueError(f"the training data holds one class ({name!r}, all {split.num_rows} rows): a classifier needs "
                     "at least two; check the label column (--label_column) and the data (--max_train_samples "
                     "keeps a random subset).")


def plausible_column(feature, kind: str) -> bool:
    """Whether a column of this `datasets` feature could be the `kind` column: images are an `Image`, bytes, file
    paths (strings) or an encoded-image struct; labels a `ClassLabel` or integers."""
    from datasets import ClassLabel, Image, Value

    if kind == "label":
        return isinstance(feature, ClassLabel) or (isinstance(feature, Value) and "int" in feature.dtype)
    if isinstance(feature, dict):
        return "bytes" in feature
    return isinstance(feature, Image) or (isinstance(feature, Value) and feature.dtype in (
        "string", "large_string", "binary", "large_binary"))


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
