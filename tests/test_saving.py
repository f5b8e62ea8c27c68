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
