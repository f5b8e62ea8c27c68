"""Each model's own preprocessing for image classification: [`build_transform`] resolves the model's mean, std and
input size the way `timm.data.resolve_data_config` does (for transformers models too), and [`with_transforms`] +
[`collate_fn`] give the batches every part of hf-r2 uses:
`{"pixel_values": float tensor (B, 3, H, W), "labels": long tensor (B,)}`. Training rows come from
[`SeededTransformDataset`], whose augmentation draws its randomness from `(seed, epoch, index)` alone, so that a
resumed run (and any number of dataloader workers) sees the very same augmented images as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import os
import random
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from .checks import check_classes

__all__ = ["AugmentType", "SeededTransformDataset", "build_transform", "collate_fn", "sample_seed", "with_transforms"]


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


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one sample's augmentation: a hash of `(seed, epoch, index)`, in `[0, 2**63)`."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@contextlib.contextmanager
def _seeded_rngs(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator, `random` and `numpy.random` (what torchvision and timm transforms draw from), and
    put their states back afterwards, so the rest of the process sees no draw."""
    import numpy as np

    states = torch.get_rng_state(), random.getstate(), np.random.get_state()
    torch.random.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        random.setstate(states[1])
        np.random.set_state(states[2])


class SeededTransformDataset(torch.utils.data.Dataset):
    """Rows `{"pixel_values": float tensor (3, H, W), "labels": int}` of an image dataset through a random transform
    whose draws depend only on `(seed, epoch, index)`: deterministic by construction.

    Each sample's augmentation is drawn under RNGs seeded with [`sample_seed`]`(seed, epoch, index)` (torch,
    `random` and numpy, restored afterwards), not from the process's running RNG state. So the images of a step
    depend neither on what was drawn before (a resumed run equals the uninterrupted one, bit for bit), nor on the
    number of dataloader workers, nor on the model's own draws (dropout). [`set_epoch`] (called by the accelerate
    loop and [`R2Trainer`] at each epoch; the value lives in shared memory, so persistent workers see it) gives
    every epoch new draws.

    Args:
        dataset ([`~datasets.Dataset`]): with the columns `image` and `label`.
        transform (`Callable`): PIL image -> tensor, e.g. [`build_transform`]`(model, train=True)`.
        seed (`int`, *optional*): the run's seed. `None`: the seed of the training that reads it, which
            [`R2Trainer`] (`args.seed`) and the accelerate loop (`config.seed`) pass to [`set_default_seed`] when
            they start; read before any did, `0`. Never the process's random state, so every process and every
            rerun sees the same images.
    """

    def __init__(self, dataset, transform: Callable, seed: int | None = None) -> None:
        self.dataset = dataset
        self.transform = transform
        self.seed = None if seed is None else int(seed)
        self.default_seed: int | None = None
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_default_seed(self, seed: int) -> None:
        """The seed to use when the dataset was built without one (a training's seed, set when it starts)."""
        self.default_seed = int(seed)

    @property
    def effective_seed(self) -> int:
        """The seed the draws use: `seed`, else the default seed (a training's), else 0."""
        return next((s for s in (self.seed, self.default_seed) if s is not None), 0)

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(int(epoch))

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def num_rows(self) -> int:
        return len(self.dataset)

    @property
    def column_names(self) -> list[str]:
        return ["pixel_values", "labels"]

    def _row(self, index: int, image: Any, label: Any) -> dict[str, Any]:
        with _seeded_rngs(sample_seed(self.effective_seed, self.epoch, index)):
            pixels = self.transform(_to_pil(image).convert("RGB"))
        return {"pixel_values": pixels, "labels": label}

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.dataset[int(index)]
        return self._row(int(index), row["image"], row["label"])

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        """A batch in one read of the underlying dataset (the DataLoader's batched fetch)."""
        indices = [int(i) for i in indices]
        rows = self.dataset[indices]
        return [self._row(i, image, label) for i, image, label in zip(indices, rows["image"], rows["label"])]


def with_transforms(dataset, model: nn.Module, train: bool, *, seed: int | None = None, **kwargs: Any):
    """A copy of `dataset` whose rows are `{"pixel_values": float tensor (3, H, W), "labels": int}`.

    With `train=False`: `dataset.with_transform` (applied on access, so nothing is stored), with
    [`build_transform`]`(model, train, **kwargs)` on the `image` column and `label` passed through as `labels`.
    With `train=True`: a [`SeededTransformDataset`], whose augmentation depends only on `(seed, epoch, index)`;
    training rows of fewer than two classes are refused ([`~hf_r2.data.checks.check_classes`]).
    A `DatasetDict` gets the same transform on every split.

    Args:
        dataset ([`~datasets.Dataset`] or [`~datasets.DatasetDict`]):
            With the columns `image` and `label` (as [`~hf_r2.data.load_image_dataset`] returns).
        model (`nn.Module`):
            The model whose preprocessing to use.
        train (`bool`):
            Training transform (augmented) or evaluation transform.
        seed (`int`, *optional*):
            Seed of the augmentation (`train=True`); default: the seed of the training that uses the dataset
            (`R2Trainer`'s `args.seed`, the accelerate loop's `config.seed`), or 0 outside one; see
            [`SeededTransformDataset`].
        kwargs:
            `input_size=` and `augment=` for [`build_transform`].
    """
    from datasets import DatasetDict

    if isinstance(dataset, DatasetDict):
        return DatasetDict({k: with_transforms(v, model, train, seed=seed, **kwargs) for k, v in dataset.items()})
    missing = [c for c in ("image", "label") if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"`with_transforms` needs the columns 'image' and 'label', but the dataset lacks {missing} (columns: "
            f"{dataset.column_names}); load it with `load_image_dataset`, which renames them."
        )
    transform = build_transform(model, train, **kwargs)
    if train:
        check_classes(dataset)  # one class: nothing to learn, and 100 % accuracy without a word
        return SeededTransformDataset(dataset, transform, seed)

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
