"""save_model_folder: each kind of model loads back with its own library; JSON writes are atomic."""

import json

import pytest
import torch
from conftest import make_timm
from safetensors.torch import load_file
from torch import nn

from hf_r2 import R2_CONFIG_NAME, R2_STATS_NAME, R2Config, R2Regularizer, create_model, save_model_folder
from hf_r2._utils import check_choice, write_json_atomic
from hf_r2.config import R2LossType


def test_timm_folder_loads_with_plain_timm(tmp_path):
    import timm

    model = make_timm("test_resnet").eval()
    reg = R2Regularizer(model, loss="linf")
    save_model_folder(model, tmp_path, reg.config, reg.stats())
    assert json.loads((tmp_path / "config.json").read_text())["architecture"] == "test_resnet"
    assert R2Config.from_pretrained(tmp_path) == reg.config
    assert json.loads((tmp_path / R2_STATS_NAME).read_text())["per_layer"].keys() == set(reg.names)
    x = torch.randn(2, 3, 32, 32)
    plain = timm.create_model(f"local-dir:{tmp_path}", pretrained=True)
    for loaded in (plain, create_model(str(tmp_path), pretrained=True)):
        torch.testing.assert_close(loaded.eval()(x), model(x))


def test_transformers_folder_loads_with_from_pretrained(tmp_path, hf_convnext):
    from transformers import AutoModelForImageClassification

    hf_convnext.eval()
    save_model_folder(hf_convnext, tmp_path, R2Config(loss="margin"))
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(pixel_values=x).logits, hf_convnext(pixel_values=x).logits)
    assert (tmp_path / R2_CONFIG_NAME).is_file() and not (tmp_path / R2_STATS_NAME).exists()


@pytest.mark.parametrize("name", ["test_resnet", "test_vit"])
def test_timm_folder_loads_with_transformers(tmp_path, name):
    """transformers loads a saved timm folder (`TimmWrapperForImageClassification`) with the same logits and labels:
    timm's own config.json repeats `num_classes` in `model_args`, which made it fail with `multiple values for
    keyword argument 'num_classes'`. Saved by `save_model_folder` and by `R2Trainer.save_model` (a gathered state
    dict)."""
    import timm
    from transformers import AutoModelForImageClassification

    from hf_r2 import R2Trainer, R2TrainingArguments

    model = make_timm(name, num_classes=3).eval()
    model.pretrained_cfg = {**model.pretrained_cfg, "label_names": ["cat", "dog", "frog"]}
    args = R2TrainingArguments(output_dir=str(tmp_path / "trainer"), report_to="none", use_cpu=True)
    trainer = R2Trainer(model, args)
    trainer.save_model()
    save_model_folder(model, tmp_path / "saved")
    x = torch.randn(2, *model.pretrained_cfg["input_size"])
    for folder in (tmp_path / "saved", tmp_path / "trainer"):
        config = json.loads((folder / "config.json").read_text())
        assert config["num_classes"] == 3 and "num_classes" not in config.get("model_args", {})
        loaded = AutoModelForImageClassification.from_pretrained(folder).eval()
        assert type(loaded).__name__ == "TimmWrapperForImageClassification"
        assert loaded.config.id2label == {0: "cat", 1: "dog", 2: "frog"}
        plain = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        assert plain.num_classes == 3
        with torch.no_grad():
            for other in (loaded(x).logits, plain(x), create_model(str(folder), pretrained=True).eval()(x)):
                torch.testing.assert_close(other, model(x), rtol=0, atol=0)


def test_plain_module_gets_safetensors(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(1, 3, 8, 8))
    save_model_folder(model, tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    torch.testing.assert_close(state["0.weight"], model[0].weight.detach())


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "x.json"
    write_json_atomic(path, {"a": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"a": object()})  # not JSON-serialisable: fails mid-write
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_check_choice():
    assert check_choice("loss", R2LossType.LINF, R2LossType) == "linf"
    assert check_choice("loss", "margin", R2LossType) == "margin"
    match = r"`loss` must be one of .* got 'SoftMinMax'\. Did you mean `loss='soft_min_max'`"
    with pytest.raises(ValueError, match=match):
        check_choice("loss", "SoftMinMax", R2LossType)
