"""The dataclasses of `hf-r2 train`'s model and data flags ([`ModelArguments`], [`DataArguments`], parsed with
[`~transformers.HfArgumentParser`]) and what they turn into: the dataset ([`load_data`]) and the input size, which the
model is fitted to ([`fit_input_size`]) and records ([`record_data_config`]). Shared by `hf-r2 train`,
`hf-r2 reproduce` and `examples/train_accelerate.py`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from .checks import canonical_dataset
from .loading import HUB_FALLBACKS, LOCAL_DATASETS, find_local_data_dir, hub_dataset_id, load_image_dataset

__all__ = ["ModelArguments", "DataArguments", "load_data", "fit_input_size", "record_data_config", "describe_data"]


@dataclass
class ModelArguments:
    """Which model `hf-r2 train` trains.

    model_name_or_path (`str`):
        A timm name (`resnet18`), an `hf-hub:` id, a transformers checkpoint (Hub id or folder) or a folder saved by
        `hf-r2 train`. The classifier head is sized to the dataset's classes.
    pretrained (`bool`, *optional*, defaults to `False`):
        Start from the checkpoint's weights instead of a random init.
    """

    model_name_or_path: str = field(
        metadata={
            "help": "A timm name (resnet18), an hf-hub: id, a transformers checkpoint (Hub id or folder) or a folder "
            "saved by hf-r2 train. The classifier head is sized to the dataset's classes.",
            "aliases": ["--model"],
        },
    )
    pretrained: bool = field(
        default=False, metadata={"help": "Start from the checkpoint's weights instead of a random init."}
    )


@dataclass
class DataArguments:
    """Which data `hf-r2 train` trains and evaluates on, and how it is preprocessed (see [`load_image_dataset`]).

    dataset_name (`str`, *optional*, defaults to `"cifar10"`):
        `cifar10`, `cifar10-small`, `cifar10-tiny` (local copy, else `uoft-cs/cifar10`), a Hub dataset id, a folder
        of class sub-folders of images, or a folder / glob of parquet files.
    data_dir (`str`, *optional*):
        Folder of the local CIFAR-10 copies (default: `$HF_R2_DATA_DIR`), or the `data_dir` of a Hub dataset.
    image_column (`str`, *optional*):
        The image column; found by itself when it is an `Image` feature or named `image`, `img`, ...
    label_column (`str`, *optional*):
        The label column; found by itself when it is a `ClassLabel` or named `label`, `labels`, `fine_label`, ...
    train_split (`str`, *optional*, defaults to `"train"`):
        The split to train on.
    eval_split (`str`, *optional*):
        The split to evaluate on (default: `test`, else `validation`, else 10% of the training split).
    input_size (`int`, *optional*):
        Side of the square input in pixels; default: the model's own (use `32` for CIFAR-10 at native size).
    augment (`str`, *optional*, defaults to `"auto"`):
        Training augmentation: `cifar` (random crop with padding 4 + flip), `timm` (timm's training transform),
        `none`, or `auto` (`cifar` up to 64 pixels, else `timm`).
    max_train_samples (`int`, *optional*):
        Train on this many examples (a seeded random subset).
    max_eval_samples (`int`, *optional*):
        Evaluate on this many examples (a seeded random subset).
    validation_size (`int`, *optional*):
        Hold out this many training images (fixed seed) as the evaluation split instead of the test split.
    skip_bad_images (`bool`, *optional*, defaults to `False`):
        Leave out (and count) images that do not decode instead of stopping at the first one.

    Values that cannot work (`input_size=0`, `max_train_samples=0`) are a `ValueError` naming the flag.
    """

    dataset_name: str = field(
        default="cifar10",
        metadata={
            "help": "cifar10, cifar10-small, cifar10-tiny (local copy, else uoft-cs/cifar10), a Hub dataset id, a "
            "folder of class sub-folders of images, or a folder / glob of parquet files.",
            "aliases": ["--dataset"],
        },
    )
    data_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder of the local CIFAR-10 copies (default: $HF_R2_DATA_DIR), or the data_dir of a Hub "
            "dataset."
        },
    )
    image_column: str | None = field(
        default=None,
        metadata={"help": "The image column; found by itself when it is an Image feature or named image, img, ..."},
    )
    label_column: str | None = field(
        default=None,
        metadata={
            "help": "The label column; found by itself when it is a ClassLabel or named label, labels, fine_label, ..."
        },
    )
    train_split: str = field(default="train", metadata={"help": "The split to train on."})
    eval_split: str | None = field(
        default=None,
        metadata={"help": "The split to evaluate on (default: test, else validation, else 10%% of the train split)."},
    )
    input_size: int | None = field(
        default=None,
        metadata={
            "help": "Side of the square input in pixels; default: the model's own (use 32 for CIFAR-10 at native "
            "size)."
        },
    )
    augment: str = field(
        default="auto",
        metadata={
            "help": "Training augmentation: cifar (random crop with padding 4 + flip), timm (timm's training "
            "transform), none, or auto (cifar up to 64 pixels, else timm).",
            "choices": ["auto", "cifar", "timm", "none"],
        },
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Train on this many examples (a seeded random subset)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Evaluate on this many examples (a seeded random subset)."}
    )
    validation_size: int | None = field(
        default=None,
        metadata={"help": "Hold out this many training images (fixed seed) and evaluate on them instead of the test "
                  "split: choose lambdas and epochs on it, keep the test set for the final table."},
    )
    skip_bad_images: bool = field(
        default=False,
        metadata={"help": "Leave out (and count) images that do not decode, instead of stopping at the first one."},
    )

    def __post_init__(self):
        for name in ("input_size", "max_train_samples", "max_eval_samples", "validation_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                what = "a side in pixels" if name == "input_size" else "a number of images"
                raise ValueError(f"--{name} must be a positive integer ({what}), got {value!r}; leave it out for "
                                 f"the default.")


def load_data(data_args: DataArguments, seed: int = 0):
    """The [`~datasets.DatasetDict`] that `data_args` describe ([`hf_r2.data.load_image_dataset`]); `seed` draws the
    `max_*_samples` subsets."""
    return load_image_dataset(
        data_args.dataset_name,
        data_dir=data_args.data_dir,
        image_column=data_args.image_column,
        label_column=data_args.label_column,
        train_split=data_args.train_split,
        eval_split=data_args.eval_split,
        max_train_samples=data_args.max_train_samples,
        max_eval_samples=data_args.max_eval_samples,
        validation_size=data_args.validation_size,
        seed=seed,
        skip_bad_images=data_args.skip_bad_images,
    )


def describe_data(data_args: DataArguments, dataset) -> dict[str, Any]:
    """What the data of `data_args` really was, for `r2_training.json` and the model card: `dataset` (the name, or
    the absolute path of a local folder), `source` (local copy / Hub dataset / local files), `hub_id` (only when the
    data is that whole Hub dataset: no local copy of a subset, no `max_*_samples` or held-out split), the splits and
    the image counts of the loaded `dataset` (a `DatasetDict` from [`load_data`])."""
    name = data_args.dataset_name
    hub_id = hub_dataset_id(name)
    root = find_local_data_dir(data_args.data_dir) if name in LOCAL_DATASETS else None
    if root is not None and (root / name).is_dir():
        source = f"local copy {root / name}"
        hub_id = hub_id if HUB_FALLBACKS[name][1] is None else None  # the small copies are subsets
    elif name in HUB_FALLBACKS:
        hub, n_train, n_test = HUB_FALLBACKS[name]
        source = f"Hub dataset {hub}" + ("" if n_train is None else f" (first {n_train} / {n_test} rows, shuffled)")
        hub_id = hub if n_train is None else None
    elif hub_id is None:
        source = f"local files {os.path.abspath(name) if os.path.exists(name) else name}"
    else:
        source = f"Hub dataset {hub_id}"
    if data_args.max_train_samples or data_args.max_eval_samples or data_args.validation_size:
        hub_id = None
    eval_split = "validation hold-out" if data_args.validation_size else (data_args.eval_split or "test")
    return {"dataset": canonical_dataset(name), "source": source, "hub_id": hub_id,
            "train_split": data_args.train_split, "eval_split": eval_split,
            "train_images": dataset["train"].num_rows, "eval_images": dataset["test"].num_rows,
            "input_size": data_args.input_size}


def fit_input_size(model, input_size: int) -> None:
    """Make `model` take `input_size` x `input_size` images, or refuse in one line before any training.

    A timm model of a fixed input size (`pretrained_cfg["fixed_input_size"]`: ViT, DeiT, Swin, EVA, BEiT, MaxViT,
    ...) is resized in place with its `set_input_size` (position embeddings resampled, pretrained ones included);
    then one blank image of that size goes through the model (eval mode, no gradient), and a model that cannot take
    it (a transformers ViT, a timm model without `set_input_size`, a size too small for the network) is a
    `ValueError` naming the model's own size, instead of a traceback at the first training step.
    """
    import torch

    from ..models import forward_logits, input_shape

    cfg = getattr(model, "pretrained_cfg", None)
    own = None
    try:
        own = input_shape(model)[1:]
    except ValueError:  # no size in the model's config
        pass
    if isinstance(cfg, dict) and cfg.get("fixed_input_size") and own != (input_size, input_size) and hasattr(
            model, "set_input_size"):
        model.set_input_size(img_size=(input_size, input_size))
    parameter = next(model.parameters(), None)
    blank = torch.zeros(1, *input_shape(model, input_size), device=None if parameter is None else parameter.device)
    training = model.training
    try:
        with torch.no_grad():
            forward_logits(model.eval(), blank)
    except Exception as err:  # noqa: BLE001 - whatever the model raises, it cannot take this size
        detail = " ".join(str(err).split())[:200] or type(err).__name__
        usual = f" (its own size is {own[0]}: --input_size {own[0]}, or leave the flag out)" if own else ""
        raise ValueError(f"the model does not take {input_size}x{input_size} images ({type(err).__name__}: "
                         f"{detail}): choose another --input_size{usual}, or another model.") from None
    finally:
        model.train(training)


def record_data_config(model, data_args: DataArguments) -> None:
    """Fit `model` to the input size of `data_args` ([`fit_input_size`]: resized, or refused in one line), and store
    that size in a timm model's `pretrained_cfg`, so that the saved folder is rebuilt at it and preprocesses alike
    (the whole image for the small-image recipe)."""
    if data_args.input_size is None:
        return
    size = int(data_args.input_size)
    fit_input_size(model, size)
    cfg = getattr(model, "pretrained_cfg", None)
    if not isinstance(cfg, dict):
        return
    update: dict[str, Any] = {"input_size": (3, size, size)}
    if data_args.augment in ("cifar", "none") or (data_args.augment == "auto" and size <= 64):
        update["crop_pct"] = 1.0  # evaluated on the whole image
    model.pretrained_cfg = {**cfg, **update}
