"""Each model's own preprocessing for image classification: [`build_transform`] resolves the model's mean, std and
input size the way `timm.data.resolve_data_config` does (for transformers models too), and [`with_transforms`] +
[`collate_fn`] give the batches every part of hf-r2 uses:
`{"pixel_values": float tensor (B, 3, H, W), "labels": long tensor (B,)}`.
"""

from __future__ import annotations

import enum
import json
import os
from typing import Any, Callable

import torch
from torch import Tensor, nn

__all__ = ["AugmentType", "build_transform", "with_transforms", "collate_fn"]


class AugmentType(str, enum.Enum):
    """Training-time augmentation recipes of [`build_transform`]. Plain strings are accepted too.

    - `"auto"`: `"cifar"` when the input size is 64 pixels or less, else `"timm"`.
    - `"cifar"`: the small-image recipe: random crop with 4 pixels of zero padding and a horizontal flip; evaluation
      uses the whole image (resized to the input size when it differs).
    - `"timm"`: timm's `create_transform(is_training=True)` (random-resized crop, flip, colour jitter); evaluation
      resizes and centre-crops by the model's `crop_pct`.
    - `"none"`: no augmentation: training uses the evaluation transform of `"cifar"`.
    """

    AUTO = "auto"
    CIFAR = "cifar"
    TIMM = "timm"
    NONE = "none"


def _preprocessor_json(config) -> dict[str, Any]:
    path = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
    file = os.path.join(path, "preprocessor_config.json") if path else None
    if file and os.path.isfile(file):
        with open(file) as f:
            return json.load(f)
    return {}


def _size_of(value: Any) -> int | None:
    if isinstance(value, int):
        return value
    if isinstance(value, (list, tuple)) and value:
        return int(value[-1])
    if isinstance(value, dict):
        for key in ("shortest_edge", "height", "width"):
            if key in value:
                return int(value[key])
    return None


def _resolve_data_config(model: nn.Module, input_size: int | None) -> dict[str, Any]:
    """timm's data config (input_size, interpolation, mean, std, crop_pct, crop_mode) for a timm or HF model."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, resolve_data_config

    from ..models import is_transformers_model, unwrap_model

    model = unwrap_model(model)
    args = {} if input_size is None else {"input_size": (3, int(input_size), int(input_size))}
    if hasattr(model, "timm_model"):  # transformers' TimmWrapper
        model = model.timm_model
    if not is_transformers_model(model):
        return resolve_data_config(args, model=model)
    config = model.config
    processor = _preprocessor_json(config)
    size = input_size or _size_of(getattr(config, "image_size", None)) or _size_of(processor.get("crop_size")) \
        or _size_of(processor.get("size")) or 224
    mean = getattr(config, "image_mean", None) or processor.get("image_mean") or IMAGENET_DEFAULT_MEAN
    std = getattr(config, "image_std", None) or processor.get("image_std") or IMAGENET_DEFAULT_STD
    crop_pct = processor.get("crop_pct") or 0.875
    return {"input_size": (3, int(size), int(size)), "interpolation": "bilinear", "mean": tuple(mean),
            "std": tuple(std), "crop_pct": float(crop_pct), "crop_mode": "center"}


def build_transform(
    model: nn.Module, train: bool, input_size: int | None = None, augment: str | AugmentType = "auto"
) -> Callable:
    """The preprocessing of `model`: a torchvision transform from PIL image to normalised float tensor `(3, H, W)`.

    Mean, std, interpolation and crop come from the model through `timm.data.resolve_data_config` (timm models and
    transformers' `TimmWrapper`), or for other transformers models from `config.image_size` / the folder's
    `preprocessor_config.json`, else ImageNet's mean and std at 224 pixels. The transform itself is built by
    `timm.data.create_transform`, except for the `"cifar"` training recipe (see [`AugmentType`]).

    Args:
        model (`nn.Module`):
            A timm or transformers image classifier.
        train (`bool`):
            Training transform (with augmentation) or evaluation transform.
        input_size (`int`, *optional*):
            Side of the square input in pixels; overrides the model's (use `32` for CIFAR at native size).
        augment (`str` or [`AugmentType`], *optional*, defaults to `"auto"`):
            The recipe: `"auto"`, `"cifar"`, `"timm"` or `"none"`.
    """
    from timm.data import create_transform
    from torchvision import transforms as T

    try:
        augment = AugmentType(augment)
    except ValueError:
        raise ValueError(
            f"`augment={augment!r}` is not a known recipe; choose one of {[a.value for a in AugmentType]}."
        ) from None
    cfg = _resolve_data_config(model, input_size)
    size = int(cfg["input_size"][-1])
    if augment is AugmentType.AUTO:
        augment = AugmentType.CIFAR if size <= 64 else AugmentType.TIMM
    if augment is AugmentType.TIMM:
        return create_transform(**cfg, is_training=train)
    eval_transform = create_transform(**{**cfg, "crop_pct": 1.0}, is_training=False)
    if not train or augment is AugmentType.NONE:
        return eval_transform
    # eval_transform = [Resize, CenterCrop, ToTensor, Normalize]: random crop + flip go after the resize
    steps = list(eval_transform.transforms)
    return T.Compose(steps[:2] + [T.RandomCrop(size, padding=4), T.RandomHorizontalFlip()] + steps[2:])


def _to_pil(image: Any):
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    array = torch.as_tensor(image).numpy()
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):  # CHW -> HWC
        array = array.transpose(1, 2, 0)
    if array.dtype != "uint8":
        array = (array * 255.0 if array.max() <= 1.0 else array).clip(0, 255).astype("uint8")
    return Image.fromarray(array.squeeze(-1) if array.ndim == 3 and array.shape[-1] == 1 else array)


def with_transforms(dataset, model: nn.Module, train: bool, **kwargs: Any):
    """A copy of `dataset` whose rows are `{"pixel_values": float tensor (3, H, W), "labels": int}`.

    Uses `dataset.with_transform` (applied on access, so nothing is stored), with [`build_transform`]`(model, train,
    **kwargs)` on the `image` column and `label` passed through as `labels`. A `DatasetDict` gets the same transform
    on every split.

    Args:
        dataset ([`~datasets.Dataset`] or [`~datasets.DatasetDict`]):
            With the columns `image` and `label` (as [`~hf_r2.data.load_image_dataset`] returns).
        model (`nn.Module`):
            The model whose preprocessing to use.
        train (`bool`):
            Training transform (augmented) or evaluation transform.
        kwargs:
            `input_size=` and `augment=` for [`build_transform`].
    """
    from datasets import DatasetDict

    if isinstance(dataset, DatasetDict):
        return DatasetDict({k: with_transforms(v, model, train, **kwargs) for k, v in dataset.items()})
    missing = [c for c in ("image", "label") if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"`with_transforms` needs the columns 'image' and 'label', but the dataset lacks {missing} (columns: "
            f"{dataset.column_names}); load it with `load_image_dataset`, which renames them."
        )
    transform = build_transform(model, train, **kwargs)

    def _apply(batch: dict[str, list]) -> dict[str, list]:
        return {"pixel_values": [transform(_to_pil(image).convert("RGB")) for image in batch["image"]],
                "labels": batch["label"]}

    return dataset.with_transform(_apply, columns=["image", "label"])


def collate_fn(examples: list[dict[str, Any]]) -> dict[str, Tensor]:
    """Stack rows of [`with_transforms`] into a batch `{"pixel_values": (B, 3, H, W), "labels": LongTensor (B,)}`."""
    return {
        "pixel_values": torch.stack([torch.as_tensor(ex["pixel_values"]) for ex in examples]),
        "labels": torch.tensor([int(ex["labels"]) for ex in examples], dtype=torch.long),
    }
