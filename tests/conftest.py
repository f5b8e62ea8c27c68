"""Shared fixtures: offline settings, tiny models, the local CIFAR-10 copy."""

import os

# Before any Hugging Face library is imported: never reach the network in tests, whatever the shell says (the Hub
# tests start their own local Hub and point the client at it explicitly).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("HF_R2_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))
# hf_r2 finds the local CIFAR-10 copies through $HF_R2_DATA_DIR only (the package guesses no repository layout)
os.environ.setdefault("HF_R2_DATA_DIR", str(DATA_DIR))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def data_dir() -> Path:
    """Folder holding `cifar10`, `cifar10-small` and `cifar10-tiny` (parquet); skips if absent."""
    if not (DATA_DIR / "cifar10-tiny").is_dir():
        pytest.skip(f"local CIFAR-10 copy not found under {DATA_DIR} (set HF_R2_DATA_DIR)")
    return DATA_DIR


@pytest.fixture
def tiny_cifar_dir(data_dir) -> Path:
    return data_dir / "cifar10-tiny"


def make_timm(name: str = "test_resnet", num_classes: int = 10, **kwargs):
    """A tiny timm model from random init (timm's own `test_*` models: 0.1M to 0.4M parameters)."""
    import timm

    return timm.create_model(name, num_classes=num_classes, **kwargs)


def conv_net(num_classes: int = 5) -> torch.nn.Module:
    """Conv (8 out), BN, ReLU, depthwise conv (8), pointwise conv (6 out), pooled Linear head (`num_classes` out):
    the smallest net with every layer kind the quantizers handle."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),  # depthwise
        nn.Conv2d(8, 6, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, num_classes),
    )


class TinyImages(torch.utils.data.Dataset):
    """`n` random 32x32 images with labels in `[0, 10)`, as `{"pixel_values", "labels"}` dicts."""

    def __init__(self, n: int = 16, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, 32, 32, generator=g)
        self.y = torch.randint(0, 10, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


@pytest.fixture
def timm_cnn():
    """timm CNN with batch norm (`test_resnet`)."""
    return make_timm("test_resnet")


@pytest.fixture
def timm_vit():
    """timm ViT at 32x32 input."""
    return make_timm("test_vit", img_size=32)


@pytest.fixture
def hf_resnet():
    """A transformers ResNet from a small config (no download)."""
    from transformers import ResNetConfig, ResNetForImageClassification

    cfg = ResNetConfig(num_labels=10, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    return ResNetForImageClassification(cfg)


@pytest.fixture
def hf_convnext():
    """A transformers ConvNeXt from a small config (no batch norm; no download)."""
    from transformers import ConvNextConfig, ConvNextForImageClassification

    cfg = ConvNextConfig(num_labels=10, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, patch_size=2)
    return ConvNextForImageClassification(cfg)


def assert_png(path: str) -> None:
    """`path` is a real PNG file of more than 100 x 100 pixels that decodes."""
    from PIL import Image

    assert os.path.getsize(path) > 1000, path
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()
    with Image.open(path) as image:  # verify() leaves the file unusable: reopen to decode the pixels
        image.load()
        assert image.size[0] > 100 and image.size[1] > 100


def tiny_train_argv(data_dir, output_dir, *extra) -> list[str]:
    """`hf-r2 train` flags for two steps of test_resnet on 64 images of cifar10-tiny, then `extra`."""
    return [
        "--model", "test_resnet", "--dataset", "cifar10-tiny", "--data-dir", str(data_dir), "--input-size", "32",
        "--max-train-samples", "64", "--max_eval_samples", "32", "--output-dir", str(output_dir), "--max_steps", "2",
        "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "16", "--save_strategy", "no",
        "--disable_tqdm", "true", "--dataloader_pin_memory", "false", *extra,
    ]


@pytest.fixture
def model_dir(tmp_path, data_dir) -> str:
    """A saved test_resnet folder (random weights) with CIFAR-10's label names and a 32x32 input: what the low-bit
    commands and their error tests start from."""
    from hf_r2.data import label_names, load_image_dataset
    from hf_r2.saving import save_model_folder

    model = make_timm("test_resnet")
    names = label_names(load_image_dataset("cifar10-tiny", data_dir=data_dir, max_eval_samples=8))
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, 32, 32), "crop_pct": 1.0, "label_names": names}
    return str(save_model_folder(model, str(tmp_path / "model")))


def r2_reference_total(
    reg: torch.nn.Module, weights: list[torch.Tensor] | None = None
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None]:
    """Sum of the functional losses of `hf_r2.losses` over `reg`'s layers, on detached copies of its weights unless
    `weights` are given (e.g. float64 CPU copies); returns (total, the weights used, the copy of R2's own parameter
    on their device and dtype, or None)."""
    from hf_r2.losses import kurtosis_r2, linf_r2, margin_r2, soft_min_max_r2

    c = reg.config
    if weights is None:
        weights = [w.detach().clone().requires_grad_() for w in reg.weights()]
    param = None
    if c.loss in ("margin", "soft_min_max"):  # on the reference weights' device and dtype
        learned = reg.margin if c.loss == "margin" else reg.log_alpha
        param = learned.detach().to(weights[0].device, weights[0].dtype).clone().requires_grad_()
    total, offset = 0.0, 0
    for w in weights:
        k = w.shape[0] if c.per_channel else 1
        p = None if param is None else param[offset : offset + k]
        if p is not None and not c.per_channel:
            p = p.reshape(())
        offset += k
        if c.loss == "linf":
            total = total + linf_r2(w, c.per_channel)
        elif c.loss == "margin":
            total = total + margin_r2(w, p, c.margin_penalty)
        elif c.loss == "soft_min_max":
            total = total + soft_min_max_r2(w, p.exp(), c.soft_min_max_penalty)
        else:
            total = total + kurtosis_r2(w, c.kurtosis_target, c.per_channel)
    return total, weights, param


def perturb_r2_params(reg: torch.nn.Module) -> None:
    """Move R2's learnable parameters off their initial values, so that margins have excess."""
    with torch.no_grad():
        if reg.config.loss == "margin":
            reg.margin.mul_(0.8)
        if reg.config.loss == "soft_min_max":
            reg.log_alpha.sub_(0.7)
