"""Block discovery for block reconstruction: the units cover every Conv / Linear layer exactly once (checked against
the model's own module list), the blocks are the residual / inverted-residual blocks of timm and transformers
models, and `run_order` orders them as a forward pass runs them and splits blocks that cannot run on their own."""

import logging

import pytest
import timm
import torch
from torch import nn
from transformers import (
    MobileNetV2Config,
    MobileNetV2ForImageClassification,
    ResNetConfig,
    ResNetForImageClassification,
)

from hf_r2.quant.ptq.blocks import find_blocks, run_order


def _layers(model):
    """Every Conv1d/2d/3d and Linear of `model`, by identity (the independent reference)."""
    return {id(m) for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))}


def _assert_cover_once(model, units):
    seen = [id(m) for _, unit in units for m in unit.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]
    assert len(seen) == len(set(seen)), "a layer lies in two units"
    assert set(seen) == _layers(model)
    for name, unit in units:
        assert model.get_submodule(name) is unit


def _hf_resnet(layer_type):
    cfg = ResNetConfig(num_labels=10, embedding_size=8, hidden_sizes=[8, 16], depths=[2, 1], layer_type=layer_type)
    return ResNetForImageClassification(cfg)


@pytest.mark.parametrize(
    "make, blocks, block_class",
    [
        (lambda: timm.create_model("resnet10t", num_classes=10), ["layer1.0", "layer2.0", "layer3.0", "layer4.0"],
         "BasicBlock"),
        (lambda: timm.create_model("resnet18", num_classes=10), [f"layer{i}.{j}" for i in range(1, 5) for j in (0, 1)],
         "BasicBlock"),
        (lambda: timm.create_model("resnet26", num_classes=10),
         [f"layer{i}.{j}" for i in range(1, 5) for j in (0, 1)], "Bottleneck"),
        (lambda: timm.create_model("mobilenetv2_100", num_classes=10),
         [f"blocks.{i}.{j}" for i, n in enumerate([1, 2, 3, 4, 3, 3, 1]) for j in range(n)], None),
        (lambda: _hf_resnet("basic"), ["resnet.encoder.stages.0.layers.0", "resnet.encoder.stages.0.layers.1",
                                       "resnet.encoder.stages.1.layers.0"], "ResNetBasicLayer"),
        (lambda: _hf_resnet("bottleneck"), ["resnet.encoder.stages.0.layers.0", "resnet.encoder.stages.0.layers.1",
                                            "resnet.encoder.stages.1.layers.0"], "ResNetBottleNeckLayer"),
        (lambda: MobileNetV2ForImageClassification(MobileNetV2Config(num_labels=10, depth_multiplier=0.25)),
         [f"mobilenet_v2.layer.{i}" for i in range(16)], "MobileNetV2InvertedResidual"),
    ],
    ids=["timm-resnet10t", "timm-resnet18", "timm-resnet26", "timm-mobilenetv2", "hf-resnet-basic",
         "hf-resnet-bottleneck", "hf-mobilenetv2"],
)
def test_units_cover_every_layer_once_and_blocks_are_the_residual_blocks(make, blocks, block_class):
    model = make()
    units = find_blocks(model)
    _assert_cover_once(model, units)
    found = [name for name, unit in units if not isinstance(unit, (nn.Conv2d, nn.Linear))]
    assert found == blocks
    if block_class is not None:
        assert {type(model.get_submodule(n)).__name__ for n in found} == {block_class}
    else:  # timm's MobileNetV2: the first block has no expansion
        kinds = [type(model.get_submodule(n)).__name__ for n in found]
        assert kinds == ["DepthwiseSeparableConv"] + ["InvertedResidual"] * (len(found) - 1)
    # everything else is a single layer: the stem, the head and the layers between stages
    assert all(isinstance(u, (nn.Conv2d, nn.Linear)) for n, u in units if n not in blocks)


def test_the_shortcut_conv_is_in_its_block():
    model = timm.create_model("resnet18", num_classes=10)
    units = dict(find_blocks(model))
    assert "layer2.0.downsample.0" not in units
    assert any(m is model.layer2[0].downsample[0] for m in units["layer2.0"].modules())


def test_a_plain_sequential_is_split_into_layers_and_min_layers():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Sequential(nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)))
    units = find_blocks(model)
    assert [n for n, _ in units] == ["0", "2.0", "2.1"]
    _assert_cover_once(model, units)
    resnet = timm.create_model("resnet18", num_classes=10)
    units = find_blocks(resnet, min_layers=3)  # the BasicBlocks of stage 1 hold 2 layers: split
    assert "layer1.0" not in dict(units) and "layer2.0" in dict(units)
    _assert_cover_once(resnet, units)
    with pytest.raises(ValueError, match="`min_layers` must be a positive integer"):
        find_blocks(resnet, min_layers=0)


def test_run_order_follows_the_forward_pass():
    model = timm.create_model("resnet18", num_classes=10).eval()
    units = find_blocks(model)
    shuffled = units[::-1]
    ordered = run_order(model, shuffled, torch.randn(1, 3, 32, 32))
    assert ordered == units  # resnet18 registers its modules in the order it runs them


class _Twice(nn.Module):
    """A block used twice per forward, a block called with two tensors, one returning a tuple, and one that never
    runs."""

    def __init__(self):
        super().__init__()
        self.stages = nn.ModuleList([nn.Sequential(nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)) for _ in range(3)])
        self.blocks = nn.ModuleList([_Pair(), _Pair(), _Pair(), _Pair(), _Pair()])

    def forward(self, x):
        x = self.blocks[0](self.blocks[0](x))  # shared: run twice
        x = self.blocks[1](x, x)  # two inputs
        x = self.blocks[3](x, pair=True)[0]  # a tuple out (and a keyword)
        x = self.blocks[4](x)  # a block that can be reconstructed as one
        return x.mean((2, 3))


class _Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)

    def forward(self, x, y=None, pair=False):
        out = self.b(self.a(x)) + (0 if y is None else y)
        return (out, out) if pair else out


def test_run_order_splits_blocks_that_cannot_run_alone_and_skips_unused_ones(caplog):
    model = _Twice()
    units = [(n, u) for n, u in find_blocks(model) if n.startswith("blocks")]
    assert [n for n, _ in units] == [f"blocks.{i}" for i in range(5)]
    with caplog.at_level(logging.INFO, logger="hf_r2.quant.ptq.blocks"):
        ordered = run_order(model, units[::-1], torch.randn(1, 3, 4, 4))
    assert [n for n, _ in ordered] == ["blocks.0.a", "blocks.0.b", "blocks.1.a", "blocks.1.b", "blocks.3.a",
                                       "blocks.3.b", "blocks.4"]
    assert "Skipping blocks.2" in caplog.text
