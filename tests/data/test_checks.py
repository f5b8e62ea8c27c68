"""Tests of hf_r2.data.checks and the data flags' validation: paths that do not exist, image folders without class
sub-folders, unreadable images (named, or skipped and counted), the model-vs-dataset class check and its mapping
by name, and what the data really was (`describe_data`) for the model card."""

import os

import pytest
from conftest import make_timm
from PIL import Image

from hf_r2.data import (
    DataArguments,
    canonical_dataset,
    check_local_path,
    describe_data,
    label_names,
    load_data,
    load_image_dataset,
    match_labels,
    model_label_names,
)
from hf_r2.data.checks import looks_like_path


def _folder(root, classes=("cat", "dog"), per_class=5, bad=None, loose=False):
    for c, name in enumerate(classes):
        os.makedirs(root / name, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", (8, 8), (50 * c, 20 * i, 0)).save(root / name / f"{i}.png")
    if bad:
        (root / classes[0] / bad).write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    if loose:
        Image.new("RGB", (8, 8)).save(root / "loose.png")
    return root


def test_paths_that_do_not_exist(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    for name in ("./nosuch", "/abs/nosuch", "~/nosuch-hf-r2", "out/nosuch", "a/b/c"):
        assert looks_like_path(name), name
        with pytest.raises(FileNotFoundError, match="--dataset .*no such folder or file"):
            check_local_path(name, "--dataset")
    for name in ("uoft-cs/cifar10", "cifar10", "user/model"):  # Hub ids and short names are not paths
        assert not looks_like_path(name)
        check_local_path(name, "--dataset")
    with pytest.raises(FileNotFoundError, match=r"--dataset '\./nosuch': no such folder or file"):
        load_image_dataset("./nosuch")
    assert canonical_dataset("out") == str(tmp_path / "out") and canonical_dataset("cifar10") == "cifar10"


def test_image_folder_needs_class_sub_folders(tmp_path):
    with pytest.raises(ValueError, match=r"images directly in it: put each class's images in a sub-folder"):
        load_image_dataset(str(_folder(tmp_path / "a", loose=True)))
    (tmp_path / "b").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "b" / "x.png")
    with pytest.raises(ValueError, match=r"<class>/<image>"):
        load_image_dataset(str(tmp_path / "b"))


def test_bad_images_are_named_or_skipped_at_load_time(tmp_path, caplog):
    folder = str(_folder(tmp_path / "pets", bad="broken.png"))
    with pytest.raises(ValueError, match=r"broken\.png .*damaged or not an image.*--skip_bad_images"):
        load_image_dataset(folder, eval_split=None)
    with caplog.at_level("WARNING"):
        ds = load_image_dataset(folder, skip_bad_images=True)
    assert ds["train"].num_rows + ds["test"].num_rows == 10  # the 11th file, unreadable, is left out
    assert "Skipped 1 unreadable image" in caplog.text
    for split in ds.values():  # every kept image decodes
        for image in split["image"]:
            image.load()
    ds = load_data(DataArguments(dataset_name=folder, skip_bad_images=True))
    assert ds["train"].num_rows + ds["test"].num_rows == 10


@pytest.mark.parametrize("field, value", [("input_size", 0), ("input_size", -3), ("max_train_samples", 0),
                                          ("max_eval_samples", -1), ("validation_size", 0)])
def test_data_arguments_reject_sizes_that_cannot_work(field, value):
    with pytest.raises(ValueError, match=f"--{field} must be a positive integer"):
        DataArguments(**{field: value})


def test_class_check_and_mapping_by_name(tmp_path):
    ds = load_image_dataset(str(_folder(tmp_path / "pets", classes=("cat", "dog"))))
    model = make_timm("test_resnet", num_classes=3)
    assert model_label_names(model) is None
    assert match_labels(model, ds, "pets") is ds  # no names recorded, head large enough: nothing to check
    model.pretrained_cfg = {**model.pretrained_cfg, "label_names": ["dog", "bird", "cat"]}
    with pytest.raises(ValueError, match=r"the model's 3 classes \(dog, bird, cat\) are not the 2 classes of "
                       r"'pets' \(cat, dog\): pass --map-labels-by-name"):
        match_labels(model, ds, "pets")
    mapped = match_labels(model, ds, "pets", map_by_name=True)
    assert label_names(mapped) == ["dog", "bird", "cat"]
    # every image keeps its class: cat images (label 0 before) are now 2, dog images (1 before) are 0
    before, after = ds["train"]["label"], mapped["train"]["label"]
    assert after == [{0: 2, 1: 0}[label] for label in before]
    other = make_timm("test_resnet", num_classes=2)
    other.pretrained_cfg = {**other.pretrained_cfg, "label_names": ["car", "truck"]}
    with pytest.raises(ValueError, match="evaluate on the data the model was trained on"):
        match_labels(other, ds, "pets", map_by_name=True)  # names that are not the model's cannot be mapped
    small = make_timm("test_resnet", num_classes=1)
    with pytest.raises(ValueError, match="the model has 1 classes but 'pets' has 2"):
        match_labels(small, ds, "pets")


def test_transformers_label_names(hf_resnet):
    assert model_label_names(hf_resnet) is None or model_label_names(hf_resnet) == [
        hf_resnet.config.id2label[i] for i in range(hf_resnet.config.num_labels)]
    hf_resnet.config.id2label = {i: f"LABEL_{i}" for i in range(hf_resnet.config.num_labels)}
    assert model_label_names(hf_resnet) is None  # the default names say nothing


def test_describe_data_claims_a_hub_id_only_for_that_dataset(data_dir, tmp_path):
    args = DataArguments(dataset_name="cifar10-tiny", data_dir=str(data_dir), max_train_samples=16)
    info = describe_data(args, load_data(args))
    assert info["dataset"] == "cifar10-tiny" and info["hub_id"] is None
    assert info["source"] == f"local copy {data_dir / 'cifar10-tiny'}"
    assert (info["train_images"], info["eval_images"], info["train_split"], info["eval_split"]) == (
        16, 200, "train", "test")
    folder = str(_folder(tmp_path / "pets"))
    args = DataArguments(dataset_name=folder)
    info = describe_data(args, load_data(args))
    assert info["hub_id"] is None and info["dataset"] == folder and info["source"].startswith("local files")
