"""Tests of hf_r2.models: create_model on every kind of source, and logits / loss agreeing across model kinds."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_r2.models import classification_loss, create_model, forward_logits, is_transformers_model, unwrap_model

NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _ce_reference(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy in float64, written out: logsumexp(z) - z_y."""
    z = logits.double()
    return torch.logsumexp(z, dim=-1) - z[torch.arange(len(labels)), labels]


def test_timm_name_with_classes_and_labels():
    model = create_model("test_resnet", label_names=NAMES[:4])
    assert not is_transformers_model(model)
    assert model.num_classes == 4 and model.get_classifier().out_features == 4
    assert model.pretrained_cfg["label_names"] == NAMES[:4]
    assert create_model("test_resnet", num_classes=7).eval()(torch.randn(1, 3, 32, 32)).shape == (1, 7)


def test_unknown_name_lists_close_names():
    with pytest.raises(ValueError, match=r"Unknown model 'mobilenetv2'.*Close timm names: \['mobilenetv2_\d+"):
        create_model("mobilenetv2")
    with pytest.raises(ValueError, match=r"Unknown model 'zzzqqq'.*Hub id") as info:
        create_model("zzzqqq")
    assert "Close timm names" not in str(info.value)


def test_transformers_config_object():
    from transformers import ResNetConfig

    cfg = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    model = create_model(cfg, label_names=NAMES[:3])
    assert is_transformers_model(model)
    assert model.config.num_labels == 3 and model.config.id2label == {0: "airplane", 1: "automobile", 2: "bird"}
    assert forward_logits(model, torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_saved_timm_folder_round_trip(tmp_path, timm_cnn):
    import timm.models

    timm_cnn.eval()
    timm.models.save_for_hf(timm_cnn, str(tmp_path), model_config={"label_names": NAMES}, safe_serialization=True)
    x = torch.randn(3, 3, 32, 32)
    loaded = create_model(str(tmp_path), pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), timm_cnn(x), rtol=0, atol=0)
    assert loaded.pretrained_cfg["label_names"] == NAMES
    # without `pretrained` it is the same architecture, randomly initialised
    fresh = create_model(str(tmp_path)).eval()
    assert type(fresh) is type(timm_cnn)
    with torch.no_grad():
        assert not torch.allclose(fresh(x), timm_cnn(x))
    # a new head size keeps the body
    resized = create_model(str(tmp_path), num_classes=3, pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(resized.forward_features(x), timm_cnn.forward_features(x), rtol=0, atol=0)
        assert resized(x).shape == (3, 3)


def test_saved_transformers_folder_round_trip(tmp_path, hf_resnet):
    hf_resnet.eval().save_pretrained(str(tmp_path))
    loaded = create_model(str(tmp_path), pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(forward_logits(loaded, x), forward_logits(hf_resnet, x), rtol=0, atol=0)


def test_folder_errors(tmp_path, timm_cnn):
    import timm.models

    with pytest.raises(FileNotFoundError, match="without a config.json"):
        create_model(str(tmp_path))
    timm.models.save_for_hf(timm_cnn, str(tmp_path), safe_serialization=True)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor pytorch_model.bin"):
        create_model(str(tmp_path), pretrained=True)


def test_folder_with_pytorch_model_bin(tmp_path, timm_cnn):
    import timm.models

    timm.models.save_for_hf(timm_cnn, str(tmp_path), safe_serialization=False)
    assert (tmp_path / "pytorch_model.bin").is_file()
    loaded = create_model(str(tmp_path), pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), timm_cnn.eval()(x))


def test_unknown_name_suggests_close_timm_names():
    with pytest.raises(ValueError, match=r"Close timm names: \[.*'resnet18'"):
        create_model("resnet19")


def test_forward_logits_same_for_timm_and_its_transformers_wrapper(timm_cnn):
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    wrapper = TimmWrapperForImageClassification(TimmWrapperConfig(architecture="test_resnet", num_labels=10))
    wrapper.timm_model.load_state_dict(timm_cnn.state_dict())
    timm_cnn.eval()
    wrapper.eval()
    assert is_transformers_model(wrapper) and not is_transformers_model(timm_cnn)
    x = torch.randn(4, 3, 32, 32)
    labels = torch.tensor([0, 3, 9, 3])
    with torch.no_grad():
        torch.testing.assert_close(forward_logits(wrapper, x), forward_logits(timm_cnn, x))
        loss_w, _ = classification_loss(wrapper, x, labels)
        loss_t, logits_t = classification_loss(timm_cnn, x, labels)
    torch.testing.assert_close(loss_w, loss_t)
    torch.testing.assert_close(loss_t.double(), _ce_reference(logits_t, labels).mean(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fixture", ["timm_cnn", "hf_resnet"])
def test_classification_loss_matches_reference(fixture, request):
    model = request.getfixturevalue(fixture).eval()
    x = torch.randn(5, 3, 32, 32)
    labels = torch.tensor([1, 0, 9, 4, 4])
    with torch.no_grad():
        logits = model(pixel_values=x).logits if fixture == "hf_resnet" else model(x)
        loss, got_logits = classification_loss(model, x, labels)
        summed, _ = classification_loss(model, x, labels, num_items_in_batch=8)
    torch.testing.assert_close(got_logits, logits)
    per_example = _ce_reference(logits, labels)
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss.double(), per_example.mean(), rtol=1e-6, atol=1e-6)
    # num_items_in_batch: sum over this batch / the count over all micro-batches of the step
    torch.testing.assert_close(summed.double(), per_example.sum() / 8, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(summed.double(), F.cross_entropy(logits.double(), labels) * 5 / 8)


def test_classification_loss_gradient_accumulation_equivalence(timm_cnn):
    """Two unequal micro-batches with num_items_in_batch give the gradient of the mean over the whole batch."""
    timm_cnn.eval()  # batch norm with running stats: examples independent of their micro-batch
    x = torch.randn(5, 3, 32, 32)
    labels = torch.tensor([2, 7, 7, 1, 0])
    params = [p for p in timm_cnn.parameters() if p.requires_grad]
    full, _ = classification_loss(timm_cnn, x, labels)
    ref = torch.autograd.grad(full, params)
    parts = [classification_loss(timm_cnn, x[s], labels[s], num_items_in_batch=5)[0]
             for s in (slice(0, 2), slice(2, 5))]
    got = torch.autograd.grad(parts[0] + parts[1], params)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_unwrap_model(timm_cnn):
    class Wrapper(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert unwrap_model(Wrapper(Wrapper(timm_cnn))) is timm_cnn
    assert unwrap_model(timm_cnn) is timm_cnn


def test_saved_config_may_set_architecture_arguments_only(tmp_path, capsys):
    """A folder's config.json (from anyone) may not set `model_args` that are not the architecture's, such as
    `checkpoint_path` (weights from any file) or `pretrained_cfg`: one clear error through `hf_r2.from_pretrained`
    and `hf-r2 evaluate`; architecture arguments (`drop_rate`) still load."""
    import json

    import hf_r2
    from hf_r2.cli import main

    model = create_model("test_resnet", num_classes=3).eval()
    other = create_model("test_resnet", num_classes=3).eval()
    hf_r2.save_model_folder(model, str(tmp_path / "m"))
    hf_r2.save_model_folder(other, str(tmp_path / "other"))
    config_path = tmp_path / "m" / "config.json"
    config = json.loads(config_path.read_text())
    config["model_args"]["drop_rate"] = 0.1  # an architecture argument (dropout: no effect in eval)
    config_path.write_text(json.dumps(config))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(hf_r2.from_pretrained(str(tmp_path / "m")).model(x), model(x))
    for bad in ({"checkpoint_path": str(tmp_path / "other" / "model.safetensors")},
                {"pretrained_cfg": {"file": str(tmp_path / "other" / "model.safetensors")}}):
        config_path.write_text(json.dumps({**config, "model_args": {**config["model_args"], **bad}}))
        with pytest.raises(ValueError, match=f"sets `model_args` \\['{next(iter(bad))}'\\].*refused"):
            hf_r2.from_pretrained(str(tmp_path / "m"))
    assert main(["evaluate", str(tmp_path / "m"), "--dataset", "cifar10-tiny", "--input-size", "32"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("hf-r2 evaluate: error: config.json in") and "'pretrained_cfg'" in line
