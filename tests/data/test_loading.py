"""Tests of hf_r2.data.loading: short names (local copy via data_dir / $HF_R2_DATA_DIR, Hub fallback), paths,
parquet, imagefolder, column detection and its errors, the validation hold-out, and the calibration subset."""

import numpy as np
import pytest
import torch
from PIL import Image

import hf_r2.data.loading
from hf_r2.data import (
    calibration_batches,
    collate_fn,
    find_local_data_dir,
    label_names,
    load_image_dataset,
    with_transforms,
)

CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


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
    monkeypatch.setattr("hf_r2.data.loading.find_local_data_dir", lambda data_dir=None: None)
    ds = load_image_dataset("cifar10")
    assert calls == ["uoft-cs/cifar10"]
    assert ds["train"].column_names == ["image", "label"] and ds["train"].num_rows == 12
    assert np.asarray(ds["train"][3]["image"])[0, 0].tolist() == [3, 0, 0]
    assert label_names(ds) == CIFAR_NAMES
    # the small/tiny names subsample the Hub copy to their sizes (here 8 / 3 of the fake 12 / 4 rows, so that the
    # subsample really happens): a seeded shuffle of distinct rows, the same on every call
    monkeypatch.setitem(hf_r2.data.loading.HUB_FALLBACKS, "cifar10-tiny", ("uoft-cs/cifar10", 8, 3))
    ds = load_image_dataset("cifar10-tiny")
    assert calls[-1] == "uoft-cs/cifar10" and ds["train"].num_rows == 8 and ds["test"].num_rows == 3
    reds = [int(np.asarray(image)[0, 0, 0]) for image in ds["train"]["image"]]
    assert len(set(reds)) == 8 and set(reds) <= set(range(12)) and reds != list(range(8))  # shuffled, not a head
    assert ds["train"]["label"] == [rows["label"][r] for r in reds]  # each image kept its own label
    assert [int(np.asarray(image)[0, 0, 0]) for image in load_image_dataset("cifar10-tiny")["train"]["image"]] == reds


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


def test_hub_unreachable_is_one_line_with_the_fix(monkeypatch):
    """Offline (or no network) and no local copy: a FileNotFoundError naming the Hub id and the fix, which the CLI
    prints as one line, not datasets' ConnectionError traceback."""
    import datasets

    def offline(path, *args, **kwargs):
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setattr("hf_r2.data.loading.find_local_data_dir", lambda data_dir=None: None)
    with pytest.raises(FileNotFoundError, match=r"'uoft-cs/cifar10' could not be loaded \(Couldn't reach .*\): point "
                       r"\$HF_R2_DATA_DIR .* at the folder that holds cifar10-tiny/, or go online\."):
        load_image_dataset("cifar10-tiny")
    with pytest.raises(FileNotFoundError, match=r"'me/pets' could not be loaded .*: check the id and the network"):
        load_image_dataset("me/pets")


def test_no_local_copy_without_data_dir_or_env(monkeypatch, tmp_path, data_dir):
    """The package looks only at `data_dir` and $HF_R2_DATA_DIR: no repository-relative guess."""
    monkeypatch.delenv("HF_R2_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert find_local_data_dir() is None
    assert find_local_data_dir(tmp_path) is None  # no cifar10* folder in it
    assert find_local_data_dir(data_dir) == data_dir


def test_calibration_batches_are_a_seeded_draw_with_the_eval_transform(timm_cnn, data_dir):
    train = load_image_dataset("cifar10-tiny", data_dir=data_dir)["train"]
    batches = calibration_batches(train, timm_cnn, 40, seed=3, batch_size=16, input_size=32)
    assert [b["pixel_values"].shape[0] for b in batches] == [16, 16, 8]
    # the rows a seeded randperm picks, in that order, with the evaluation transform
    index = torch.randperm(len(train), generator=torch.Generator().manual_seed(3))[:40].tolist()
    plain = with_transforms(train, timm_cnn, train=False, input_size=32)
    expected = collate_fn([plain[i] for i in index])
    torch.testing.assert_close(torch.cat([b["pixel_values"] for b in batches]), expected["pixel_values"])
    assert torch.cat([b["labels"] for b in batches]).tolist() == expected["labels"].tolist()
    again = calibration_batches(train, timm_cnn, 40, seed=3, batch_size=16, input_size=32)
    assert all(torch.equal(x["pixel_values"], y["pixel_values"]) for x, y in zip(batches, again))
    assert sum(len(b["labels"]) for b in calibration_batches(train, timm_cnn, 5000, seed=0, input_size=32)) == 1000
