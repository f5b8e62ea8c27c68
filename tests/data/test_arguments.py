"""Tests of hf_r2.data.arguments: `hf-r2 train`'s model and data dataclasses, `load_data` and
`record_data_config`."""

import pytest

from hf_r2.data import DataArguments, ModelArguments, label_names, load_data, load_image_dataset, record_data_config


def test_load_data_is_load_image_dataset_of_the_fields(data_dir):
    args = DataArguments(dataset_name="cifar10-tiny", data_dir=str(data_dir), max_train_samples=64,
                         max_eval_samples=32)
    ds = load_data(args, seed=3)
    ref = load_image_dataset("cifar10-tiny", data_dir=data_dir, max_train_samples=64, max_eval_samples=32, seed=3)
    assert (ds["train"].num_rows, ds["test"].num_rows) == (64, 32)
    assert ds["train"]["label"] == ref["train"]["label"] and ds["test"]["label"] == ref["test"]["label"]
    assert label_names(ds)[:2] == ["airplane", "automobile"]
    held_out = load_data(DataArguments(dataset_name="cifar10-tiny", data_dir=str(data_dir), validation_size=100))
    assert (held_out["train"].num_rows, held_out["test"].num_rows) == (900, 100)


@pytest.mark.parametrize(
    "size, augment, crop_pct",
    [(32, "auto", 1.0), (32, "cifar", 1.0), (32, "none", 1.0), (96, "auto", None), (96, "timm", None)],
)
def test_record_data_config_stores_the_trained_input_size(timm_cnn, size, augment, crop_pct):
    before = dict(timm_cnn.pretrained_cfg)
    record_data_config(timm_cnn, DataArguments(input_size=size, augment=augment))
    cfg = timm_cnn.pretrained_cfg
    assert tuple(cfg["input_size"]) == (3, size, size)
    assert cfg.get("crop_pct") == (crop_pct if crop_pct is not None else before.get("crop_pct"))


def test_record_data_config_leaves_the_model_without_input_size(timm_cnn, hf_resnet):
    before = dict(timm_cnn.pretrained_cfg)
    record_data_config(timm_cnn, DataArguments())
    assert timm_cnn.pretrained_cfg == before
    record_data_config(hf_resnet, DataArguments(input_size=32))  # no pretrained_cfg: nothing to record
    assert not hasattr(hf_resnet, "pretrained_cfg")


def test_model_arguments_defaults():
    args = ModelArguments(model_name_or_path="resnet18")
    assert args.pretrained is False
    assert DataArguments().dataset_name == "cifar10" and DataArguments().augment == "auto"
