"""Tests of hf_r2.data.transforms: timm-resolved transforms checked against a hand computation, the augmentation
recipes, and collation."""

import numpy as np
import pytest
import torch
from PIL import Image

from hf_r2.data import AugmentType, build_transform, collate_fn, label_names, load_image_dataset, with_transforms

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])


def _normalise(image: Image.Image, mean, std) -> np.ndarray:
    """Hand reference: (x / 255 - mean) / std in float64, CHW."""
    x = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    return ((x - np.asarray(mean)) / np.asarray(std)).transpose(2, 0, 1)


def test_eval_transform_native_size_matches_hand_computation(timm_cnn, hf_resnet, data_dir):
    image = load_image_dataset("cifar10-tiny", data_dir=data_dir)["test"][0]["image"]
    # timm test_resnet: mean = std = 0.5 in its pretrained_cfg
    got = build_transform(timm_cnn, train=False, input_size=32)(image)
    np.testing.assert_allclose(got.double().numpy(), _normalise(image, [0.5] * 3, [0.5] * 3), atol=1e-5)
    # transformers ResNet: no data config -> ImageNet mean / std
    got = build_transform(hf_resnet, train=False, input_size=32)(image)
    assert got.dtype == torch.float32 and got.shape == (3, 32, 32)
    np.testing.assert_allclose(got.double().numpy(), _normalise(image, IMAGENET_MEAN, IMAGENET_STD), atol=1e-5)
    # "none" trains on the same transform
    got = build_transform(timm_cnn, train=True, input_size=32, augment="none")(image)
    np.testing.assert_allclose(got.double().numpy(), _normalise(image, [0.5] * 3, [0.5] * 3), atol=1e-5)


def test_cifar_train_transform_is_a_padded_shift_or_flip(timm_cnn):
    """Brute force: each augmented output equals the hand-normalised image shifted by (dy, dx) in [-4, 4] with zero
    padding, optionally mirrored."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    ref = _normalise(image, [0.5] * 3, [0.5] * 3)
    pad_value = (0.0 - 0.5) / 0.5
    padded = np.pad(ref, ((0, 0), (4, 4), (4, 4)), constant_values=pad_value)
    candidates = {}
    for dy in range(9):
        for dx in range(9):
            crop = padded[:, dy:dy + 32, dx:dx + 32]
            candidates[(dy, dx, False)] = crop
            candidates[(dy, dx, True)] = crop[:, :, ::-1]
    transform = build_transform(timm_cnn, train=True, input_size=32)  # "auto" -> "cifar" at 32 px
    seen = set()
    torch.manual_seed(0)
    for _ in range(12):
        out = transform(image).double().numpy()
        assert out.shape == (3, 32, 32)
        match = [k for k, c in candidates.items() if np.allclose(out, c, atol=1e-5)]
        assert match, "augmented image is not a padded shift / flip of the input"
        seen.add(match[0])
    assert len(seen) > 1  # it is random


def test_timm_recipe_and_sizes(timm_cnn):
    # test_resnet's pretrained_cfg: 160 px, crop_pct 0.95, bilinear, mean = std = 0.5. The evaluation transform by
    # hand: shorter side to floor(160 / 0.95) = 168, centre crop 160, (x / 255 - 0.5) / 0.5.
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, size=(50, 40, 3), dtype=np.uint8))  # 40 wide, 50 high
    resized = image.resize((168, 210), Image.BILINEAR)  # 50 * 168 / 40 = 210
    top, left = round((210 - 160) / 2), round((168 - 160) / 2)
    expected = _normalise(resized.crop((left, top, left + 160, top + 160)), [0.5] * 3, [0.5] * 3)
    ours = build_transform(timm_cnn, train=False, augment=AugmentType.TIMM)(image).double().numpy()
    np.testing.assert_allclose(ours, expected, atol=1e-5)
    # timm's training recipe: a random resized crop to 160 (scale 0.08-1), a flip, colour jitter 0.4, normalised
    train = build_transform(timm_cnn, train=True, augment=AugmentType.TIMM)
    steps = {type(t).__name__: t for t in train.transforms}
    crop = steps["RandomResizedCropAndInterpolation"]
    assert (tuple(crop.size), tuple(crop.scale)) == ((160, 160), (0.08, 1.0))
    assert steps["RandomHorizontalFlip"].p == 0.5 and steps["ColorJitter"].brightness == (0.6, 1.4)
    torch.manual_seed(0)
    draws = [train(image) for _ in range(3)]
    assert all(d.shape == (3, 160, 160) for d in draws) and not torch.equal(draws[0], draws[1])
    image = Image.new("RGB", (40, 50), (10, 20, 30))
    assert build_transform(timm_cnn, train=False)(image).shape == (3, 160, 160)  # test_resnet's own input size
    assert build_transform(timm_cnn, train=True, input_size=48)(image).shape == (3, 48, 48)  # auto -> cifar
    assert build_transform(timm_cnn, train=True, input_size=96)(image).shape == (3, 96, 96)  # auto -> timm
    with pytest.raises(ValueError, match=r"`augment='flip'` is not a known recipe.*'cifar'"):
        build_transform(timm_cnn, train=True, augment="flip")


def test_transformers_input_size_from_config():
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                    image_size=48, patch_size=16, num_labels=3)
    model = ViTForImageClassification(cfg)
    out = build_transform(model, train=False)(Image.new("RGB", (64, 64), (255, 255, 255)))
    assert out.shape == (3, 48, 48)
    expected = (1.0 - IMAGENET_MEAN) / IMAGENET_STD
    np.testing.assert_allclose(out[:, 24, 24].double().numpy(), expected, atol=1e-5)


def test_with_transforms_and_collate(timm_cnn, data_dir):
    ds = load_image_dataset("cifar10-tiny", data_dir=data_dir, max_eval_samples=8)
    raw = ds["test"]
    transformed = with_transforms(raw, timm_cnn, train=False, input_size=32)
    assert raw.column_names == ["image", "label"] and isinstance(raw[0]["image"], Image.Image)  # input untouched
    rows = [transformed[i] for i in range(5)]
    assert set(rows[0]) == {"pixel_values", "labels"}
    batch = collate_fn(rows)
    assert batch["pixel_values"].shape == (5, 3, 32, 32) and batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == raw["label"][:5]
    for i in range(5):
        np.testing.assert_allclose(batch["pixel_values"][i].double().numpy(),
                                   _normalise(raw[i]["image"], [0.5] * 3, [0.5] * 3), atol=1e-5)
    # a DatasetDict gets the transform on every split; a DataLoader yields the same batches
    both = with_transforms(ds, timm_cnn, train=True, input_size=32)
    loader = torch.utils.data.DataLoader(both["test"], batch_size=4, collate_fn=collate_fn)
    batches = list(loader)
    assert [b["pixel_values"].shape[0] for b in batches] == [4, 4]
    assert torch.cat([b["labels"] for b in batches]).tolist() == raw["label"]


def test_with_transforms_needs_image_and_label(timm_cnn):
    import datasets

    bad = datasets.Dataset.from_dict({"img": [Image.new("RGB", (4, 4))], "y": [0]})
    with pytest.raises(ValueError, match=r"lacks \['image', 'label'\].*load_image_dataset"):
        with_transforms(bad, timm_cnn, train=False)
    with pytest.raises(ValueError, match="not a `datasets.ClassLabel`"):
        label_names(bad)


_UNSEEDED_WORKER = """
import hashlib, sys
import numpy as np, datasets, timm
from PIL import Image
from transformers import set_seed
from hf_r2.data import with_transforms

rng = np.random.default_rng(0)
images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(2)]
raw = datasets.Dataset.from_dict({"image": images, "label": [0, 1]})
train = with_transforms(raw, timm.create_model("test_resnet", num_classes=10), train=True, input_size=32,
                        augment="cifar")  # no seed, in a process nobody has seeded yet
set_seed(int(sys.argv[1]))  # what R2Trainer / Trainer.__init__ do, after the data is built
print(hashlib.sha256(train[0]["pixel_values"].numpy().tobytes()).hexdigest())
"""


def _random_images(n=4):
    import datasets

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]
    return datasets.Dataset.from_dict({"image": images, "label": list(range(n))})


def test_unseeded_augmentation_is_the_same_in_every_process(timm_cnn):
    """`with_transforms(train=True)` without a seed draws from a fixed seed (0) until a trainer gives its own, never
    from the process's random initial seed: two fresh processes read the same augmented image."""
    import hashlib
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    digests = [subprocess.run([sys.executable, "-c", _UNSEEDED_WORKER, "3"], env=env, capture_output=True, text=True,
                              check=True).stdout.strip() for _ in range(2)]  # fmt: skip
    expected = with_transforms(_random_images(2), timm_cnn, train=True, input_size=32, augment="cifar", seed=0)
    assert digests[0] == digests[1] == hashlib.sha256(expected[0]["pixel_values"].numpy().tobytes()).hexdigest()


def test_default_seed_applies_only_without_an_own_seed(timm_cnn):
    raw = _random_images()

    def pixels(ds):
        return torch.stack([ds[i]["pixel_values"] for i in range(len(ds))])

    unseeded = with_transforms(raw, timm_cnn, train=True, input_size=32, augment="cifar")
    assert unseeded.seed is None
    fixed = pixels(unseeded)
    torch.manual_seed(1234)  # the process's RNG plays no part
    assert torch.equal(pixels(unseeded), fixed)
    assert torch.equal(fixed, pixels(with_transforms(raw, timm_cnn, train=True, input_size=32, augment="cifar",
                                                     seed=0)))  # fmt: skip
    for seed in (5, 6):  # a trainer's seed (each training that uses the dataset sets its own)
        unseeded.set_default_seed(seed)
        own = with_transforms(raw, timm_cnn, train=True, input_size=32, augment="cifar", seed=seed)
        assert torch.equal(pixels(unseeded), pixels(own))
    assert not torch.equal(pixels(unseeded), fixed)
    seeded = with_transforms(raw, timm_cnn, train=True, input_size=32, augment="cifar", seed=0)
    seeded.set_default_seed(5)  # an explicit seed wins
    assert torch.equal(pixels(seeded), fixed)
