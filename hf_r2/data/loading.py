"""Loading image-classification data through 🤗 Datasets: [`load_image_dataset`] turns a short name (`"cifar10"`),
a Hub id, a folder of images or parquet files into a [`~datasets.DatasetDict`] with the splits `"train"` and `"test"`
and the columns `image` and `label`; [`calibration_batches`] draws the calibration subset of the low-bit steps.

The CIFAR-10 short names read a local parquet copy from `data_dir` or `$HF_R2_DATA_DIR` ([`find_local_data_dir`]),
else `uoft-cs/cifar10` from the Hub.
"""

from __future__ import annotations

import glob
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .checks import check_local_path, check_parquet_rows, check_rows, drop_bad_images, plausible_column
from .transforms import collate_fn, with_transforms

__all__ = [
    "LOCAL_DATASETS",
    "HUB_FALLBACKS",
    "VALIDATION_SEED",
    "find_local_data_dir",
    "hub_dataset_id",
    "load_image_dataset",
    "label_names",
    "calibration_batches",
]

logger = logging.getLogger(__name__)


#: Short names resolved to a local parquet copy (a folder of that name under the data directory).
LOCAL_DATASETS = ("cifar10", "cifar10-small", "cifar10-tiny")
#: Where a short name goes when no local copy is found: (Hub id, train rows, test rows); `None` keeps all rows.
HUB_FALLBACKS: dict[str, tuple[str, int | None, int | None]] = {
    "cifar10": ("uoft-cs/cifar10", None, None),
    "cifar10-small": ("uoft-cs/cifar10", 5000, 1000),
    "cifar10-tiny": ("uoft-cs/cifar10", 1000, 200),
}

_IMAGE_NAMES = ("image", "img", "pixel_values", "picture", "photo")
_LABEL_NAMES = ("label", "labels", "fine_label", "class", "target")
_EVAL_SPLITS = ("test", "validation", "valid", "val", "eval")
_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_SPLIT_PATTERN = re.compile(r"(?:^|[-_./])(train|test|validation|valid|val|eval)(?:$|[-_./\d])")

def hub_dataset_id(name_or_path: str | None) -> str | None:
    """The Hub id of a dataset name as [`load_image_dataset`] takes it: `uoft-cs/cifar10` for the CIFAR-10 short
    names, the name itself for a Hub id, `None` for a local folder or file pattern (no Hub id to cite)."""
    if not name_or_path:
        return None
    if name_or_path in HUB_FALLBACKS:
        return HUB_FALLBACKS[name_or_path][0]
    if os.path.exists(name_or_path) or name_or_path.startswith((".", "/", "~")) or "*" in name_or_path:
        return None
    return name_or_path if name_or_path.count("/") == 1 else None

def find_local_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The folder that holds the local copies (`cifar10/`, `cifar10-small/`, `cifar10-tiny/`), or `None`.

    Looks at `data_dir`, then at `$HF_R2_DATA_DIR` (the Makefile and the test suite point it at the checkout's
    `../shared/data`); the package guesses no other place.
    """
    candidates: list[Path] = []
    if data_dir is not None:
        candidates.append(Path(data_dir))
    if os.environ.get("HF_R2_DATA_DIR"):
        candidates.append(Path(os.environ["HF_R2_DATA_DIR"]))
    for candidate in candidates:
        if any((candidate / name).is_dir() for name in LOCAL_DATASETS):
            return candidate
    return None


def _split_of(path: str) -> str:
    """Split named by a (relative) file path (`train-00000-of-00004.parquet` -> `train`); `train` when none is."""
    match = _SPLIT_PATTERN.search(os.path.basename(path).lower()) or _SPLIT_PATTERN.search(path.lower())
    return match.group(1) if match else "train"


def _parquet_files(pattern_or_dir: str) -> dict[str, list[str]]:
    if os.path.isdir(pattern_or_dir):
        files = sorted(glob.glob(os.path.join(pattern_or_dir, "**", "*.parquet"), recursive=True))
    else:
        files = sorted(glob.glob(pattern_or_dir, recursive=True))
    by_split: dict[str, list[str]] = {}
    for file in files:
        # inside a folder its sub-folders may name the split (train/x.parquet); for a glob only the file name does
        name = os.path.relpath(file, pattern_or_dir) if os.path.isdir(pattern_or_dir) else os.path.basename(file)
        by_split.setdefault(_split_of(name), []).append(file)
    return by_split


def _has_images(folder: str) -> bool:
    for _, _, files in os.walk(folder):
        if any(f.lower().endswith(_IMAGE_EXTENSIONS) for f in files):
            return True
    return False


def _check_image_folder(folder: str) -> None:
    """An image folder must hold its images in class sub-folders (`<folder>/<class>/x.png`, optionally under
    `train/` and `test/`)."""
    loose = [f for f in os.listdir(folder) if f.lower().endswith(_IMAGE_EXTENSIONS)]
    classes = [d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d))]
    if loose or not classes:
        raise ValueError(
            f"the image folder {folder!r} has {'images directly in it' if loose else 'no sub-folders'}: put each "
            f"class's images in a sub-folder named after the class ({folder}/<class>/<image>, optionally under "
            f"train/ and test/: {folder}/train/<class>/<image>)."
        )


def _load_raw(name_or_path: str, data_dir: str | None, train_split: str | None, eval_split: str | None):
    """`(DatasetDict, source description, fallback sample caps)` before columns are checked."""
    from datasets import DatasetDict, load_dataset

    caps: tuple[int | None, int | None] = (None, None)
    fix = "check the id and the network, or unset HF_HUB_OFFLINE"
    if name_or_path in LOCAL_DATASETS:
        root = find_local_data_dir(data_dir)
        if root is not None and (root / name_or_path).is_dir():
            files = _parquet_files(str(root / name_or_path))
            check_parquet_rows(files, f"the local copy {root / name_or_path}")
            return load_dataset("parquet", data_files=files), f"local copy {root / name_or_path}", caps
        hub_id, n_train, n_test = HUB_FALLBACKS[name_or_path]
        logger.warning(
            "No local copy of %r found (looked at `data_dir` and $HF_R2_DATA_DIR); loading %r "
            "from the Hub%s.", name_or_path, hub_id, "" if n_train is None else f", first {n_train}/{n_test} rows "
            "after a seeded shuffle (not the same images as the local copy)",
        )
        fix = (f"point $HF_R2_DATA_DIR (or `data_dir=`, `--data_dir`) at the folder that holds {name_or_path}/, or "
               "go online")
        name_or_path, data_dir, caps = hub_id, None, (n_train, n_test)
    elif name_or_path == "imagefolder":
        if data_dir is None:
            raise ValueError("`name_or_path='imagefolder'` needs `data_dir=` (the folder of class sub-folders).")
        check_local_path(data_dir, "--data_dir")
        _check_image_folder(data_dir)
        return load_dataset("imagefolder", data_dir=data_dir), f"image folder {data_dir}", caps
    elif name_or_path == "parquet":
        if data_dir is None:
            raise ValueError("`name_or_path='parquet'` needs `data_dir=` (a folder or a glob of parquet files).")
        name_or_path = data_dir
    check_local_path(name_or_path, "--dataset")
    if os.path.isdir(name_or_path) or glob.has_magic(name_or_path) or name_or_path.endswith(".parquet"):
        files = _parquet_files(name_or_path)
        if files:
            check_parquet_rows(files, name_or_path)
            return load_dataset("parquet", data_files=files), f"parquet files {name_or_path}", caps
        if os.path.isdir(name_or_path) and _has_images(name_or_path):
            _check_image_folder(name_or_path)
            return load_dataset("imagefolder", data_dir=name_or_path), f"image folder {name_or_path}", caps
        raise ValueError(
            f"`name_or_path={name_or_path!r}` is a local path but holds no parquet files and no images "
            f"({', '.join(_IMAGE_EXTENSIONS)})."
        )
    if os.path.exists(name_or_path):
        raise ValueError(f"`name_or_path={name_or_path!r}` is a file, not a folder, a glob or a .parquet file.")
    try:
        loaded = load_dataset(name_or_path, data_dir=data_dir)
    except ConnectionError as err:  # offline, or no network: one line with the fix, not datasets' traceback
        raise FileNotFoundError(f"The Hub dataset {name_or_path!r} could not be loaded ({err}): {fix}.") from err
    if not isinstance(loaded, DatasetDict):  # pragma: no cover - load_dataset without `split` gives a DatasetDict
        loaded = DatasetDict({"train": loaded})
    return loaded, f"Hub dataset {name_or_path}", caps


def _pick_column(dataset, requested: str | None, kind: str) -> str:
    from datasets import ClassLabel, Image

    columns = list(dataset.column_names)
    features = dataset.features
    if requested is not None:
        if requested not in columns:
            raise ValueError(
                f"`{kind}_column={requested!r}` is not a column of the dataset; its columns are {columns}."
            )
        return requested
    feature_type, names = (Image, _IMAGE_NAMES) if kind == "image" else (ClassLabel, _LABEL_NAMES)
    typed = [c for c in columns if isinstance(features[c], feature_type)]
    for name in names:  # prefer the usual names, typed or not (e.g. `fine_label` over `coarse_label`)
        if name in typed:
            return name
    if typed:
        return typed[0]
    for name in names:
        if name in columns:
            return name
    other = "label" if kind == "image" else "image"
    fits = [c for c in columns if plausible_column(features[c], kind)]
    example = (f"e.g. `{kind}_column={fits[0]!r}` (command line: `--{kind}_column {fits[0]}`)" if fits else
               f"with `{kind}_column=` (command line: `--{kind}_column NAME`), though no column "
               + ("holds images, file paths or bytes" if kind == "image" else "holds class indices (integers)"))
    raise ValueError(
        f"Could not find the {kind} column: the dataset's columns are "
        f"{ {c: type(features[c]).__name__ for c in columns} }, and none is a "
        f"`datasets.{feature_type.__name__}` or named one of {list(names)}. Pass it explicitly, {example}; the "
        f"{other} column can be given the same way with `{other}_column=`."
    )


def _normalise_columns(dataset, image_column: str, label_column: str, names: list[str] | None):
    from datasets import ClassLabel, Image, Value

    dataset = dataset.remove_columns([c for c in dataset.column_names if c not in (image_column, label_column)])
    # through temporary names, so that e.g. a label column called "image" does not collide
    dataset = dataset.rename_columns({image_column: "__hf_r2_image__", label_column: "__hf_r2_label__"})
    dataset = dataset.rename_columns({"__hf_r2_image__": "image", "__hf_r2_label__": "label"})
    image_feature = dataset.features["image"]
    if isinstance(image_feature, Value) and image_feature.dtype in ("string", "large_string", "binary"):
        dataset = dataset.cast_column("image", Image())  # file paths or encoded bytes
    if not isinstance(dataset.features["label"], ClassLabel):
        assert names is not None, "class names are resolved before columns are normalised"
        if dataset.features["label"].dtype in ("string", "large_string"):
            index = {n: i for i, n in enumerate(names)}
            dataset = dataset.map(lambda b: {"label": [index[v] for v in b["label"]]}, batched=True,
                                  desc="encode labels")
        dataset = dataset.cast_column("label", ClassLabel(names=names))
    return dataset


def _class_names(splits: dict[str, Any], label_column: str) -> list[str] | None:
    """The classes of a label column that is not a `ClassLabel`: sorted strings, or `0..max` for integers."""
    from datasets import ClassLabel

    first = next(iter(splits.values()))
    if isinstance(first.features[label_column], ClassLabel):
        return None
    values = set()
    for split in splits.values():
        values.update(split.unique(label_column))
    if all(isinstance(v, str) for v in values):
        return sorted(values)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values) and min(values) >= 0:
        return [str(i) for i in range(max(values) + 1)]
    raise ValueError(
        f"The label column {label_column!r} holds {sorted(map(repr, values))[:5]}...: expected class indices "
        f"(integers >= 0), class names (strings) or a `datasets.ClassLabel`. Pass another one with `label_column=`."
    )


VALIDATION_SEED = 0
"""Seed of the validation hold-out ([`load_image_dataset`]'s `validation_size`): fixed, so every run and training
seed sees the same validation images."""


def load_image_dataset(
    name_or_path: str,
    *,
    data_dir: str | os.PathLike | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    train_split: str | None = None,
    eval_split: str | None = None,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    validation_size: int | None = None,
    seed: int = 0,
    skip_bad_images: bool = False,
):
    """Load an image-classification dataset as a `DatasetDict` with the splits `"train"` and `"test"`.

    Whatever the source, the result has exactly two splits, `"train"` and `"test"` (the split evaluated on, whatever
    its original name), and exactly two columns: `image` (a [`~datasets.Image`] feature, decoded to PIL) and
    `label` (a [`~datasets.ClassLabel`], so [`label_names`] always works). Other columns are dropped. Each split is
    checked first ([`~hf_r2.data.checks.check_rows`]): no rows, null images or labels beyond the classes are a
    `ValueError` naming the fix; rows without a label (-1) are left out of training (counted in the log) and refused
    in the split evaluated on.

    `name_or_path` may be:

    - `"cifar10"`, `"cifar10-small"` (5k/1k) or `"cifar10-tiny"` (1k/200): the local parquet copy in the folder of
      that name under `data_dir` or `$HF_R2_DATA_DIR` (see [`find_local_data_dir`]). Without a local copy they
      load `uoft-cs/cifar10` from the Hub (the small and tiny names then take that many rows after a seeded
      shuffle, which are not the same images);
    - `"imagefolder"` with `data_dir=` a folder of class sub-folders (optionally under `train/` and `test/`), or
      such a folder given directly;
    - `"parquet"` with `data_dir=` a folder or glob of parquet files, or such a folder / glob / file given directly.
      Files are put in splits by their names (`train-*.parquet`, `test-*.parquet`, `validation-*`, ...);
    - anything else: a Hub dataset id, `datasets.load_dataset(name_or_path, data_dir=data_dir)`.

    Args:
        name_or_path (`str`):
            What to load (see above).
        data_dir (`str` or `os.PathLike`, *optional*):
            For the CIFAR-10 short names: the folder holding the local copies. For `"imagefolder"` / `"parquet"`:
            the folder (or glob) of files. For a Hub id: passed to `load_dataset`.
        image_column (`str`, *optional*):
            The image column. By default the first [`~datasets.Image`] feature, else a column named `image`, `img`,
            `pixel_values`, ...
        label_column (`str`, *optional*):
            The label column. By default a [`~datasets.ClassLabel`] (preferring `label`, `labels`, `fine_label`),
            else a column with one of those names (integers or strings, turned into a `ClassLabel`).
        train_split (`str`, *optional*, defaults to `"train"`):
            The source split to train on.
        eval_split (`str`, *optional*):
            The source split to evaluate on. By default the first of `test`, `validation`, `valid`, `val`, `eval`
            that exists; if none does, 10% of the training split (seeded) is held out.
        max_train_samples (`int`, *optional*):
            Keep this many training rows, chosen by a shuffle with `seed` (so classes stay mixed).
        max_eval_samples (`int`, *optional*):
            Keep this many evaluation rows, chosen the same way.
        validation_size (`int`, *optional*):
            Hold out this many rows of the training split as the `"test"` split (a validation split, drawn with the
            fixed seed [`VALIDATION_SEED`] so that it is the same for every run and training seed); the source's
            test split is then not loaded. Choices (lambda, epochs) are made on it; the test set is kept for the
            final tables.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the subsampling shuffles and of a held-out split.
        skip_bad_images (`bool`, *optional*, defaults to `False`):
            Leave out (and count, in the log) rows whose image is null or does not decode. Without it a null image
            is an error naming its row, and an image folder's unreadable file one naming the file. Checked here, so
            that no transform ever sees a bad image.

    Returns:
        [`~datasets.DatasetDict`]: with splits `"train"` and `"test"`, columns `image` and `label`.

    Example:

    ```python
    >>> from hf_r2.data import load_image_dataset, label_names
    >>> ds = load_image_dataset("cifar10-tiny")
    >>> ds["train"].num_rows, ds["test"].num_rows, label_names(ds)[:2]
    (1000, 200, ['airplane', 'automobile'])
    ```
    """
    from datasets import DatasetDict

    if validation_size is not None and eval_split is not None:
        raise ValueError(f"`validation_size={validation_size}` holds out part of the training split as the "
                         f"evaluation split; it cannot be combined with `eval_split={eval_split!r}`. Drop one.")
    for arg, value in (("max_train_samples", max_train_samples), ("max_eval_samples", max_eval_samples),
                       ("validation_size", validation_size)):
        if value is not None and value <= 0:
            raise ValueError(f"`{arg}` must be a positive number of rows or None, got {value!r}.")
    raw, source, (cap_train, cap_eval) = _load_raw(str(name_or_path), None if data_dir is None else str(data_dir),
                                                   train_split, eval_split)
    train_split = train_split or "train"
    if train_split not in raw:
        raise ValueError(f"`train_split={train_split!r}` is not a split of {source}; its splits are {sorted(raw)}.")
    if eval_split is not None and eval_split not in raw:
        raise ValueError(f"`eval_split={eval_split!r}` is not a split of {source}; its splits are {sorted(raw)}.")
    if eval_split is None:
        eval_split = next((s for s in _EVAL_SPLITS if s in raw and s != train_split), None)
    train = raw[train_split]
    image_column = _pick_column(train, image_column, "image")
    label_column = _pick_column(train, label_column, "label")
    if image_column == label_column:
        raise ValueError(f"`image_column` and `label_column` are both {image_column!r}; they must differ.")
    columns = {"image_column": image_column, "label_column": label_column, "skip_bad_images": skip_bad_images}
    train = check_rows(train, train_split, source, **columns)  # before any hold-out, cap or training
    if validation_size is not None:
        if validation_size >= train.num_rows:
            raise ValueError(f"`validation_size={validation_size}` leaves no training rows: the {train_split!r} split "
                             f"of {source} has {train.num_rows}.")
        held_out = train.train_test_split(test_size=validation_size, seed=VALIDATION_SEED)
        splits = {"train": held_out["train"], "test": held_out["test"]}
    elif eval_split is None:
        logger.warning("%s has no evaluation split (splits: %s); holding out 10%% of %r (seed %d).",
                       source, list(raw), train_split, seed)
        held_out = train.train_test_split(test_size=0.1, seed=seed)
        splits = {"train": held_out["train"], "test": held_out["test"]}
    else:
        splits = {"train": train, "test": raw[eval_split]}
    for split_name, split in splits.items():
        missing = [c for c in (image_column, label_column) if c not in split.column_names]
        if missing:
            raise ValueError(f"The {split_name} split of {source} lacks the columns {missing}; its columns are "
                             f"{split.column_names}.")
    if validation_size is None and eval_split is not None:  # the source's own split (not held out of training)
        splits["test"] = check_rows(splits["test"], eval_split, source, evaluated=True, **columns)
    names = _class_names(splits, label_column)
    caps = {"train": max_train_samples or cap_train, "test": max_eval_samples or cap_eval}
    out = {}
    for split_name, split in splits.items():
        cap = caps[split_name]
        if cap is not None and cap < split.num_rows:
            split = split.shuffle(seed=seed).select(range(cap))
        split = _normalise_columns(split, image_column, label_column, names)
        if skip_bad_images or source.startswith("image folder"):
            split = drop_bad_images(split, split_name, skip_bad_images)
        out[split_name] = split
    return DatasetDict(out)


def label_names(dataset) -> list[str]:
    """The class names of a dataset from [`load_image_dataset`] (its `label` `ClassLabel`), for a split or a dict."""
    from datasets import ClassLabel, DatasetDict

    if isinstance(dataset, DatasetDict):
        dataset = dataset["train"] if "train" in dataset else next(iter(dataset.values()))
    feature = dataset.features.get("label")
    if not isinstance(feature, ClassLabel):
        raise ValueError(
            f"The dataset's `label` column is {feature!r}, not a `datasets.ClassLabel`: load it with "
            f"`load_image_dataset` (columns: {dataset.column_names})."
        )
    return list(feature.names)


def calibration_batches(
    train_split,
    model: nn.Module,
    count: int,
    *,
    seed: int,
    batch_size: int = 64,
    input_size: int | None = None,
) -> list[dict[str, Tensor]]:
    """The calibration subset: `count` rows of the training split (a seeded `torch.randperm`), with the evaluation
    transform (no augmentation), batched with [`collate_fn`] in that order.

    What every low-bit step calibrates activations, initialises LSQ / AdaRound and re-estimates batch norm on
    (`hf-r2 ptq / qat / compress` and `hf-r2 reproduce` draw it alike).

    Args:
        train_split ([`~datasets.Dataset`]):
            The `"train"` split of [`load_image_dataset`] (columns `image`, `label`).
        model (`nn.Module`):
            The model whose preprocessing to use.
        count (`int`):
            Rows to draw (all of them if the split is smaller).
        seed (`int`):
            Seed of the draw.
        batch_size (`int`, *optional*, defaults to `64`):
            Rows per batch.
        input_size (`int`, *optional*):
            Side of the square input, as [`build_transform`] takes it.
    """
    from torch.utils.data import DataLoader, Subset

    plain_train = with_transforms(train_split, model, train=False, input_size=input_size)
    count = min(count, len(plain_train))
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(plain_train), generator=generator)[:count].tolist()
    return list(DataLoader(Subset(plain_train, index), batch_size=batch_size, shuffle=False, collate_fn=collate_fn))
