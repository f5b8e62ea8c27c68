"""The units block reconstruction optimises: residual / inverted-residual blocks found by the model's structure,
and single layers for everything outside a block.

BRECQ (Li et al., https://huggingface.co/papers/2102.05426) reconstructs a network block by block: a block is
small enough that its output error is a good proxy for the loss (its Hessian is close to block-diagonal), and large
enough that the rounding of its layers is learnt jointly. Its code names the blocks by class (`BasicBlock`,
`Bottleneck`, `InvertedResidual`); here they are found by structure, so that timm and transformers models (and
others built the same way) need no list of class names:

- a *block* is a module held in an `nn.Sequential` / `nn.ModuleList` (a stage), that is not itself a container,
  and that holds at least `min_layers` quantizable layers (Conv1d/2d/3d, Linear): timm's `BasicBlock` /
  `Bottleneck` (shortcut conv included), `InvertedResidual` / `DepthwiseSeparableConv`, ViT `Block`,
  transformers' `ResNetBasicLayer` / `ResNetBottleNeckLayer`, `MobileNetV2InvertedResidual`, `ConvNextLayer`;
- of two nested blocks the inner one is kept (a transformers `ResNetStage` sits in a `ModuleList` but holds
  `ResNetBasicLayer`s), so a block never swallows a whole stage;
- every quantizable layer in no block is a unit of its own (stems, heads, downsampling layers between stages).

So the units cover every quantizable layer exactly once. [`run_order`] puts them in the order they run and checks,
in one forward pass, that each block can be reconstructed as one (it runs once, on one tensor); a block that
cannot is split into its layers.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from ..._targets import TARGET_LAYER_TYPES
from ...models import forward_logits

__all__ = ["find_blocks", "block_layers", "run_order"]

logger = logging.getLogger(__name__)

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def block_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The quantizable layers (Conv1d/2d/3d, Linear) of `module`, itself included, as `(name, layer)` pairs with
    names relative to `module` (`""` for the module itself)."""
    return [(n, m) for n, m in module.named_modules() if isinstance(m, TARGET_LAYER_TYPES)]


def _is_block(module: nn.Module, in_stage: bool, min_layers: int) -> bool:
    if not in_stage or isinstance(module, (*_CONTAINERS, *TARGET_LAYER_TYPES)):
        return False
    return len(block_layers(module)) >= min_layers


def _walk(module: nn.Module, prefix: str, in_stage: bool, min_layers: int, out: list) -> bool:
    """Append the units under `module` to `out`; returns whether one of them is a block."""
    if isinstance(module, TARGET_LAYER_TYPES):
        out.append((prefix, module))
        return False
    start = len(out)
    found = False
    stage = isinstance(module, (nn.Sequential, nn.ModuleList))
    for name, child in module.named_children():
        found |= _walk(child, f"{prefix}.{name}" if prefix else name, stage, min_layers, out)
    if not found and _is_block(module, in_stage, min_layers):
        del out[start:]  # the block replaces the layers found inside it
        out.append((prefix, module))
        return True
    return found


def find_blocks(model: nn.Module, min_layers: int = 2) -> list[tuple[str, nn.Module]]:
    """The reconstruction units of `model`: its blocks and the quantizable layers outside them, as `(name, module)`
    pairs in registration order (see the module docstring for what a block is).

    Every Conv1d/2d/3d and Linear layer of `model` lies in exactly one unit (a block, or the unit that is the layer
    itself); a unit holds at least one such layer.

    Args:
        model (`torch.nn.Module`):
            A timm or transformers model, quantized or not (quantized layers are Conv / Linear subclasses).
        min_layers (`int`, *optional*, defaults to `2`):
            The fewest quantizable layers a block holds; a module in a stage with fewer is split into its layers.

    Returns:
        `list[tuple[str, torch.nn.Module]]`: the units; a block's name is its module name in `model`.

    ```python
    >>> import timm
    >>> [name for name, _ in find_blocks(timm.create_model("resnet18"))][:4]
    ['conv1', 'layer1.0', 'layer1.1', 'layer2.0']
    ```
    """
    if isinstance(min_layers, bool) or not isinstance(min_layers, int) or min_layers < 1:
        raise ValueError(f"`min_layers` must be a positive integer, got {min_layers!r}.")
    out: list[tuple[str, nn.Module]] = []
    _walk(model, "", False, min_layers, out)
    return out


def run_order(model: nn.Module, units: list[tuple[str, nn.Module]], images: Tensor) -> list[tuple[str, nn.Module]]:
    """The units of [`find_blocks`] in the order they first run in a forward of `model` on `images`, ready to be
    reconstructed one at a time. A block that runs other than once per forward, or not from one tensor to one
    tensor (its cached input would not be all it needs, or its output no tensor to match), is split into its
    layers; a unit that does not run is skipped with a warning."""
    layers = [(f"{name}.{sub}", m) for name, unit in units for sub, m in block_layers(unit) if sub]
    calls: dict[str, list[bool]] = {}

    def recorder(name: str) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            calls.setdefault(name, []).append(len(args) == 1 and isinstance(args[0], Tensor) and not kwargs)

        return hook

    def output_check(name: str) -> Any:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            calls[name][-1] &= isinstance(output, Tensor)  # a tuple output is no block output to match

        return hook

    handles = [m.register_forward_pre_hook(recorder(n), with_kwargs=True) for n, m in units + layers]
    handles += [m.register_forward_hook(output_check(n)) for n, m in units]
    try:
        with torch.no_grad():
            forward_logits(model, images)
    finally:
        for handle in handles:
            handle.remove()
    order = {name: i for i, name in enumerate(calls)}
    scheduled = []
    for name, unit in units:
        if name not in calls:
            logger.warning("Skipping %s: it does not run in a forward pass", name)
            continue
        whole = isinstance(unit, TARGET_LAYER_TYPES) or calls.get(name) == [True]
        parts = [(name, unit)] if whole else [(f"{name}.{sub}", m) for sub, m in block_layers(unit)]
        if len(parts) > 1:
            logger.info("Splitting block %s into its layers: it runs %d times per forward, or not from one tensor "
                        "to one tensor", name, len(calls.get(name, [])))
        for part, module in parts:
            if part in calls:
                scheduled.append((part, module))
            else:
                logger.warning("Skipping %s: it does not run in a forward pass", part)
    return sorted(scheduled, key=lambda unit: order[unit[0]])
