"""The layers hf-r2 acts on: `TARGET_LAYER_TYPES` and `find_target_modules`, shared by R2-Loss and every quant verb.

A target is a Conv1d/2d/3d (depthwise included) or Linear layer, subclasses included (timm's `Conv2dSame`,
transformers' convolutions, hf-r2's own quantized layers), found by type so that timm and transformers models
alike are covered.
"""

from __future__ import annotations

import logging
import re

from torch import Tensor, nn
from torch.nn.utils import parametrize

__all__ = ["TARGET_LAYER_TYPES", "find_target_modules"]

logger = logging.getLogger(__name__)

TARGET_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _has_weight(module: nn.Module) -> bool:
    """A weight tensor, without computing a parametrized one (a DKM weight costs a clustering pass)."""
    if parametrize.is_parametrized(module, "weight"):
        return True
    return isinstance(getattr(module, "weight", None), Tensor)


_COMPILED = re.compile(r"(^|\.)_orig_mod(\.|$)")


def _eager_name(name: str) -> str:
    """`name` as in the eager model: `torch.compile` wraps a module as `_orig_mod`, which `named_modules` puts in
    every name (`_orig_mod.layer1.conv1`); patterns, stats and checkpoints use the eager names."""
    while _COMPILED.search(name):
        name = _COMPILED.sub(lambda m: m.group(1) if m.group(2) else "", name, count=1)
    return name


def find_target_modules(
    model: nn.Module,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    skip_first_last: bool = False,
) -> list[tuple[str, nn.Module]]:
    """The `(name, module)` pairs of `model` that R2 (and every quant verb) applies to, in registration order.

    A module is a target if it is a Conv1d/2d/3d or Linear (subclasses included) with a `weight`, its name (as in
    the eager model: a `torch.compile` wrapper's `_orig_mod.` is left out) matches one of `include` (if given,
    `re.search`) and none of `exclude`; `skip_first_last` then drops the
    first and the last of them. Raises `ValueError` if nothing is left, naming the patterns that matched no module.
    """
    candidates = [
        (_eager_name(name), module)
        for name, module in model.named_modules()
        if isinstance(module, TARGET_LAYER_TYPES) and _has_weight(module)
    ]
    if not candidates:
        raise ValueError(
            f"{type(model).__name__} has no Conv1d/Conv2d/Conv3d/Linear layer with a weight, so R2-Loss has "
            "nothing to act on."
        )
    unmatched = []
    selected = candidates
    if include:
        unmatched += [f"include={p!r}" for p in include if not any(re.search(p, n) for n, _ in candidates)]
        selected = [(n, m) for n, m in selected if any(re.search(p, n) for p in include)]
    if exclude:
        unmatched += [f"exclude={p!r}" for p in exclude if not any(re.search(p, n) for n, _ in candidates)]
        selected = [(n, m) for n, m in selected if not any(re.search(p, n) for p in exclude)]
    if skip_first_last:
        selected = selected[1:-1]
    if not selected:
        names = ", ".join(n for n, _ in candidates[:8]) + (", ..." if len(candidates) > 8 else "")
        why = f" Patterns that matched no layer: {', '.join(unmatched)}." if unmatched else ""
        raise ValueError(
            f"No target layer left in {type(model).__name__} after include={include!r}, exclude={exclude!r}, "
            f"skip_first_last={skip_first_last}.{why} Conv/Linear layers found: {names}."
        )
    for pattern in unmatched:
        logger.warning("R2 target pattern %s matched no layer", pattern)
    return selected
