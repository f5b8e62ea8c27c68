"""`hf-r2 train` (the real entry point, `hf_r2.cli.main`) on data or a model that cannot train: each case is refused
before any training, in one line that names the problem and its fix, and leaves no output folder behind; the cases
that can go on (unlabelled training rows, null images with `--skip_bad_images`, a ViT at another input size) do,
and say what they left out."""

import json
import logging

import pytest
from conftest import tiny_train_argv

from hf_r2.cli import main


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    """32 training and 16 test rows of cifar10-tiny (columns `image`, `label`: a ClassLabel of the ten classes)."""
    from conftest import DATA_DIR

    from hf_r2.data import load_image_dataset

    if not (DATA_DIR / "cifar10-tiny").is_dir():
        pytest.skip(f"local CIFAR-10 copy not found under {DATA_DIR}")
    ds = load_image_dataset("cifar10-tiny", data_dir=DATA_DIR)
    return ds["train"].select(range(32)), ds["test"].select(range(16))


def _folder(root, train, test):
    """A folder of `train-00000.parquet` and `test-00000.parquet`."""
    root.mkdir(parents=True)
    train.to_parquet(str(root / "train-00000.parquet"))
    test.to_parquet(str(root / "test-00000.parquet"))
    return root


def _train(data_dir, out, dataset, *extra):
    return main(["train", *tiny_train_argv(data_dir, out, "--dataset", str(dataset), "--max_steps", "1", *extra)])


def _refused(capsys, code, out, *words):
    """One line `hf-r2 train: error: ...` holding `words`, status 1, and no output folder."""
    err = capsys.readouterr().err
    assert code == 1, err[-2000:]
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("hf-r2 train: error: "), err[-2000:]
    for word in words:
        assert word in line, (word, line)
    assert not out.exists(), sorted(p.name for p in out.iterdir())
    return line


def _trained(out) -> dict:
    assert (out / "model.safetensors").is_file()
    return json.loads((out / "r2_training.json").read_text())["data"]


def test_unlabelled_rows_refused_in_the_eval_split_and_left_out_of_training(cifar, data_dir, tmp_path, capsys, caplog):
    train, test = cifar
    no_label = lambda row, i: {"label": -1 if i % 2 else row["label"]}  # noqa: E731 - a ClassLabel's "no label"
    folder = _folder(tmp_path / "hidden-test", train, test.map(no_label, with_indices=True))
    out = tmp_path / "out"
    _refused(capsys, _train(data_dir, out, folder), out, "8 of the 16 rows of the 'test' split", "no label (-1",
             "--eval_split", "--validation_size")

    folder = _folder(tmp_path / "some-unlabelled", train.map(no_label, with_indices=True), test)
    with caplog.at_level(logging.WARNING, logger="hf_r2"):
        assert _train(data_dir, out, folder) == 0
    assert "Left out 16 of the 32 row(s) of the 'train' split" in caplog.text
    assert _trained(out)["train_images"] == 16


def test_empty_parquet_refused(cifar, data_dir, tmp_path, capsys):
    train, test = cifar
    out = tmp_path / "out"
    folder = _folder(tmp_path / "empty-test", train, test.select([]))
    _refused(capsys, _train(data_dir, out, folder), out, "the 'test' split of", "has no rows",
             "test-00000.parquet: 0 rows")
    folder = _folder(tmp_path / "empty-train", train.select([]), test)
    _refused(capsys, _train(data_dir, out, folder), out, "the 'train' split of", "train-00000.parquet: 0 rows")


def test_null_images_refused_or_skipped(cifar, data_dir, tmp_path, capsys, caplog):
    from datasets import Image

    train, test = cifar
    plain = train.cast_column("image", Image(decode=False))
    holes = plain.map(lambda row, i: {"image": None if i in (3, 7) else row["image"]}, with_indices=True)
    folder = _folder(tmp_path / "holes", holes.cast_column("image", Image()), test)
    out = tmp_path / "out"
    _refused(capsys, _train(data_dir, out, folder), out, "2 row(s) of the 'train' split", "have no image",
             "row 3", "--skip_bad_images")
    with caplog.at_level(logging.WARNING, logger="hf_r2"):
        assert _train(data_dir, out, folder, "--skip_bad_images", "true") == 0
    assert "Skipped 2 row(s) without an image" in caplog.text
    assert _trained(out)["train_images"] == 30


def test_one_class_refused(cifar, data_dir, tmp_path, capsys):
    train, test = cifar
    cat = lambda row: {"label": 3}  # noqa: E731
    folder = _folder(tmp_path / "cats", train.map(cat), test.map(cat))
    out = tmp_path / "out"
    _refused(capsys, _train(data_dir, out, folder), out, "one class ('cat', all 32 rows)", "at least two")


def test_missing_label_column_suggests_only_label_like_columns(cifar, data_dir, tmp_path, capsys):
    from datasets import Value

    train, test = cifar
    as_int = lambda split: split.cast_column("label", Value("int64")).rename_column("label", "category")  # noqa
    folder = _folder(tmp_path / "category", as_int(train), as_int(test))
    out = tmp_path / "out"
    line = _refused(capsys, _train(data_dir, out, folder), out, "Could not find the label column",
                    "--label_column category")
    assert "label_column='image'" not in line and "--label_column image" not in line

    as_text = lambda split: split.map(lambda row: {"note": "x"}).remove_columns("label")  # noqa: E731
    folder = _folder(tmp_path / "notes", as_text(train), as_text(test))
    line = _refused(capsys, _train(data_dir, out, folder), out, "Could not find the label column",
                    "no column holds class indices")
    assert "label_column='image'" not in line and "label_column='note'" not in line


def test_fixed_size_model_is_resized_to_the_input_size(data_dir, tmp_path, capsys):
    """timm ViTs (ViT, DeiT, Swin, ...) take `--input_size`: resized (position embeddings resampled), trained, saved
    at that size, and the folder loads back at it."""
    import torch

    from hf_r2.models import create_model

    out = tmp_path / "vit"
    assert main(["train", *tiny_train_argv(data_dir, out, "--model", "vit_tiny_patch16_224", "--max_steps", "1",
                                           "--max_train_samples", "16", "--max_eval_samples", "8")]) == 0
    model = create_model(str(out), pretrained=True).eval()
    assert model.patch_embed.img_size == (32, 32)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_model_that_cannot_take_the_input_size_refused(data_dir, tmp_path, capsys):
    from transformers import ViTConfig

    folder = tmp_path / "hf-vit"  # a transformers ViT of 64x64 inputs (no position-embedding resampling)
    ViTConfig(image_size=64, patch_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
              intermediate_size=37, num_labels=10).save_pretrained(folder)
    out = tmp_path / "out"
    code = main(["train", *tiny_train_argv(data_dir, out, "--model", str(folder), "--max_steps", "1")])
    _refused(capsys, code, out, "does not take 32x32 images", "--input_size 64")


def test_a_refusal_during_training_leaves_no_empty_output_folder(data_dir, tmp_path, capsys):
    """A training that diverges before its first checkpoint saved nothing: the folder the Trainer made goes too (a
    folder that existed before stays)."""
    out = tmp_path / "out"
    argv = tiny_train_argv(data_dir, out, "--max_steps", "3", "--learning_rate", "1e30")
    _refused(capsys, main(["train", *argv]), out, "the training diverged", "no checkpoint was saved")
    out.mkdir()
    assert main(["train", *argv]) == 1
    assert out.is_dir()
