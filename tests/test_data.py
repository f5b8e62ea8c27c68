"""Tests of hf_r2.data: loading (short names, paths, parquet, imagefolder, Hub fallback), column detection and its
errors, timm-resolved transforms checked against a hand computation, and collation."""

import numpy as np
import pytest
import torch
from PIL import Image

from hf_r2.data import (
    AugmentType,
    build_transform,
    collate_fn,
    find_local_data_dir,
    label_names,
    load_image_dataset,
    with_transforms,
)

CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])


def _normalise(image: Image.Image, mean, std) -> np.ndarray:
    """Hand reference: (x / 255 - mean) / std in float64, CHW."""
    x = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    return ((x - np.asarray(mean)) / np.asarray(std)).transpose(2, 0, 1)


# ---------------------------------------------------------------------------------------------------------------
# loading


def test_short_name_local_copy(data_dir):
    ds = load_image_dataset("cifar10-tiny", data_dir=data_dir)
    assert set(ds) == {"train", "test"}
    assert (ds["train"].num_rows, ds["test"].num_rows) == (1000, 200)
    assert ds["train"].column_names == ["image", "label"] == ds["test"].column_names
    assert label_names(ds) == CIFAR_NAMES == label_names(ds["test"])
    # 100 a class in train, 20 a class in test (data README)
    assert np.bincount(ds["train"]["label"], minlength=10).tolist() == [100] * 10
    assert np.bincount(ds["test"]["label"], minlength=10).tolist() == [20] * 10
    image = ds["train"][0]["image"]
    assert isinstance(image, Image.Image) and image.size == (32, 32)


def test_short_name_via_env_and_path_agree(data_dir, tiny_cifar_dir, monkeypatch):
    monkeypatch.setenv("HF_R2_DATA_DIR", str(data_dir))
    assert find_local_data_dir() == data_dir
    by_name = load_image_dataset("cifar10-tiny")
    by_path = load_image_dataset(str(tiny_cifar_dir))
    by_glob = load_image_dataset(str(tiny_cifar_dir / "*.parquet"))
    by_builder = load_image_dataset("parquet", data_dir=str(tiny_cifar_dir))
    for other in (by_path, by_glob, by_builder):
        for split in ("train", "test"):
            assert other[split]["label"] == by_name[split]["label"]
    a, b = np.asarray(by_name["test"][5]["image"]), np.asarray(by_glob["test"][5]["image"])
    np.testing.assert_array_equal(a, b)


def test_data_dir_argument_wins(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_R2_DATA_DIR", str(data_dir))
    full = load_image_dataset("cifar10-tiny", data_dir=data_dir)
    (tmp_path / "cifar10-tiny").mkdir()
    full["train"].select(range(30)).to_parquet(str(tmp_path / "cifar10-tiny" / "train-00000-of-00001.parquet"))
    full["test"].select(range(10)).to_parquet(str(tmp_path / "cifar10-tiny" / "test-00000-of-00001.parquet"))
    mine = load_image_dataset("cifar10-tiny", data_dir=tmp_path)
    assert (mine["train"].num_rows, mine["test"].num_rows) == (30, 10)
    assert mine["train"]["label"] == full["train"]["label"][:30]
    assert label_names(mine) == CIFAR_NAMES


def test_max_samples_subsample_is_seeded(data_dir):
    a = load_image_dataset("cifar10-tiny", data_dir=data_dir, max_train_samples=64, max_eval_samples=16, seed=1)
    b = load_image_dataset("cifar10-tiny", data_dir=data_dir, max_train_samples=64, max_eval_samples=16, seed=1)
    c = load_image_dataset("cifar10-tiny", data_dir=data_dir, max_train_samples=64, seed=2)
    assert (a["train"].num_rows, a["test"].num_rows, c["test"].num_rows) == (64, 16, 200)
    assert a["train"]["label"] == b["train"]["label"]
    imgs_a = [np.asarray(im).tobytes() for im in a["train"]["image"]]
    imgs_c = [np.asarray(im).tobytes() for im in c["train"]["image"]]
    assert imgs_a == [np.asarray(im).tobytes() for im in b["train"]["image"]]
    assert imgs_a != imgs_c
    assert len(set(a["train"]["label"])) > 5  # a shuffle, not the first 64 rows of one class
    with pytest.raises(ValueError, match="`max_train_samples` must be a positive"):
        load_image_dataset("cifar10-tiny", data_dir=data_dir, max_train_samples=0)


def test_cifar10_falls_back_to_hub(monkeypatch, tmp_path):
    """Without a local copy, `cifar10` is `uoft-cs/cifar10` (columns `img`, `label`), renamed to image/label."""
    import datasets

    calls = []
    names = datasets.ClassLabel(names=CIFAR_NAMES)
    features = datasets.Features({"img": datasets.Image(), "label": names})
    rows = {"img": [Image.new("RGB", (32, 32), (i, 0, 0)) for i in range(12)], "label": list(range(10)) + [0, 1]}
    hub = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict(rows, features=features),
        "test": datasets.Dataset.from_dict({k: v[:4] for k, v in rows.items()}, features=features),
    })

    def fake_load_dataset(path, *args, **kwargs):
        calls.append(path)
        return hub

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr("hf_r2.data.find_local_data_dir", lambda data_dir=None: None)
    ds = load_image_dataset("cifar10")
    assert calls == ["uoft-cs/cifar10"]
    assert ds["train"].column_names == ["image", "label"] and ds["train"].num_rows == 12
    assert np.asarray(ds["train"][3]["image"])[0, 0].tolist() == [3, 0, 0]
    assert label_names(ds) == CIFAR_NAMES
    # the small/tiny names subsample the Hub copy to their sizes
    ds = load_image_dataset("cifar10-tiny")
    assert calls[-1] == "uoft-cs/cifar10" and ds["train"].num_rows == 12 and ds["test"].num_rows == 4


def _write_parquet(tmp_path, columns: dict, features=None, name="train-00000.parquet"):
    import datasets

    folder = tmp_path / "pq"
    folder.mkdir(exist_ok=True)
    datasets.Dataset.from_dict(columns, features=features).to_parquet(str(folder / name))
    return folder


def test_missing_image_column_error_names_columns(tmp_path):
    folder = _write_parquet(tmp_path, {"caption": ["a", "b"], "label": [0, 1]})
    with pytest.raises(ValueError, match=r"Could not find the image column.*'caption'.*'label'.*image_column="):
        load_image_dataset(str(folder))


def test_missing_label_column_error_and_explicit_columns(tmp_path):
    import datasets

    images = [Image.new("RGB", (8, 8), (10 * i, 0, 0)) for i in range(6)]
    features = datasets.Features({"photo_data": datasets.Image(), "target_idx": datasets.Value("int64"),
                                  "note": datasets.Value("string")})
    folder = _write_parquet(
        tmp_path, {"photo_data": images, "target_idx": [2, 0, 1, 2, 0, 1], "note": list("abcdef")}, features
    )
    with pytest.raises(ValueError, match=r"label column.*'photo_data'.*'target_idx'.*'note'.*label_column="):
        load_image_dataset(str(folder))
    with pytest.raises(ValueError, match=r"`label_column='nope'` is not a column.*'target_idx'"):
        load_image_dataset(str(folder), label_column="nope")
    ds = load_image_dataset(str(folder), label_column="target_idx")  # image found by its Image feature
    assert ds["train"].column_names == ["image", "label"]
    assert label_names(ds) == ["0", "1", "2"]
    # no test split in the folder: 10% held out, nothing lost or duplicated
    assert ds["train"].num_rows + ds["test"].num_rows == 6 and ds["test"].num_rows >= 1
    reds = sorted(np.asarray(im)[0, 0, 0] for split in ds.values() for im in split["image"])
    assert reds == [0, 10, 20, 30, 40, 50]


def test_string_labels_become_one_classlabel_for_all_splits(tmp_path):
    images = [Image.new("RGB", (8, 8)) for _ in range(4)]
    _write_parquet(tmp_path, {"img": images, "labels": ["dog", "cat", "dog", "cat"]}, name="train-0.parquet")
    folder = _write_parquet(tmp_path, {"img": images[:2], "labels": ["emu", "cat"]}, name="test-0.parquet")
    ds = load_image_dataset(str(folder))
    assert label_names(ds) == ["cat", "dog", "emu"]
    assert ds["train"]["label"] == [1, 0, 1, 0] and ds["test"]["label"] == [2, 0]


def test_parquet_splits_from_sub_folders_and_names(tmp_path):
    import datasets

    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    for split, n in (("train", 5), ("validation", 3)):
        (tmp_path / "data" / split).mkdir(parents=True)
        rows = {"img": [Image.new("RGB", (4, 4), (i, 0, 0)) for i in range(n)], "label": [i % 2 for i in range(n)]}
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "data" / split / "x.parquet"))
    ds = load_image_dataset(str(tmp_path / "data"))
    assert (ds["train"].num_rows, ds["test"].num_rows) == (5, 3)  # "validation" is the evaluation split
    ds = load_image_dataset(str(tmp_path / "data"), eval_split="train", train_split="validation")
    assert (ds["train"].num_rows, ds["test"].num_rows) == (3, 5)


def test_imagefolder(tmp_path):
    colours = {"cat": (255, 0, 0), "dog": (0, 0, 255)}
    for split, n in (("train", 4), ("test", 2)):
        for cls, colour in colours.items():
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (12, 10), colour).save(tmp_path / split / cls / f"{i}.png")
    by_path = load_image_dataset(str(tmp_path))
    by_builder = load_image_dataset("imagefolder", data_dir=str(tmp_path))
    for ds in (by_path, by_builder):
        assert (ds["train"].num_rows, ds["test"].num_rows) == (8, 4)
        names = label_names(ds)
        assert names == ["cat", "dog"]
        for split in ds.values():
            for row in split:  # each image's colour matches its class folder
                assert np.asarray(row["image"])[0, 0].tolist() == list(colours[names[row["label"]]])
    with pytest.raises(ValueError, match="needs `data_dir="):
        load_image_dataset("imagefolder")


def test_bad_paths_and_splits(tmp_path, data_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no parquet files and no images"):
        load_image_dataset(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match=r"`eval_split='validation'` is not a split.*\['test', 'train'\]"):
        load_image_dataset("cifar10-tiny", data_dir=data_dir, eval_split="validation")


# ---------------------------------------------------------------------------------------------------------------
# transforms


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
    from timm.data import create_transform, resolve_data_config

    cfg = resolve_data_config(model=timm_cnn)
    for train in (True, False):
        ours = build_transform(timm_cnn, train=train, augment=AugmentType.TIMM)
        assert repr(ours) == repr(create_transform(**cfg, is_training=train))
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


def test_validation_size_holds_out_training_rows_the_same_for_every_seed(data_dir):
    full = load_image_dataset("cifar10-tiny", data_dir=data_dir)
    a = load_image_dataset("cifar10-tiny", data_dir=data_dir, validation_size=100, seed=0)
    b = load_image_dataset("cifar10-tiny", data_dir=data_dir, validation_size=100, seed=7)
    assert (a["train"].num_rows, a["test"].num_rows) == (900, 100)

    def keys(split):  # images are unique (data README): their bytes identify them
        return {np.asarray(im).tobytes() for im in split["image"]}

    train, val, test = keys(a["train"]), keys(a["test"]), keys(full["test"])
    assert not train & val and train | val == keys(full["train"])  # a partition of the training split
    assert not val & test  # the test split is never touched
    assert val == keys(b["test"])  # the same validation images whatever the training seed
    with pytest.raises(ValueError, match="cannot be combined with `eval_split='test'`"):
        load_image_dataset("cifar10-tiny", data_dir=data_dir, validation_size=10, eval_split="test")
    with pytest.raises(ValueError, match="leaves no training rows"):
        load_image_dataset("cifar10-tiny", data_dir=data_dir, validation_size=1000)
    with pytest.raises(ValueError, match="`validation_size` must be a positive"):
        load_image_dataset("cifar10-tiny", data_dir=data_dir, validation_size=0)
