"""Non-finite values (NaN, +inf, -inf): one place to find them in tensors, models and numbers, and to refuse them.

A diverged training (too high a learning rate or R2 lambda) leaves NaN / inf in its loss first and in its weights
soon after. Every later step would carry them silently: accuracy falls to chance, scales and BN statistics become NaN,
and any numeric check that compares with `<` or `>` passes, because every comparison with NaN is false. So hf-r2
checks where the values arise (the training loss, a model loaded for a verb, a number a user typed) and stops with one
line that names the first bad value; a numeric check counts NaN as a failure (`if not (err <= tol): fail`, never
`if err > tol: fail`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where a tensor is looked at: R2Config's checks and `hf-r2 --help` stay light
    from torch import Tensor, nn

__all__ = [
    "NonFiniteError",
    "check_finite_model",
    "check_finite_number",
    "first_nonfinite",
    "is_finite_number",
    "json_safe",
]

#: What to try when a training diverges; shared by the messages of the Trainer, the accelerate loop and the CLI.
DIVERGENCE_HINT = "the learning rate or the R2 lambda (`r2_lambda`) is probably too high: lower it and train again"


class NonFiniteError(ValueError):
    """A value that must be finite is NaN or infinite (a loss, a weight, a number given by the user). The message is
    one line that names the value and, where there is one, what to do; the CLI prints it as `hf-r2 <cmd>: error: ...`.
    """


def is_finite_number(value: Any) -> bool:
    """True for a real number (an int or float, numpy's too; not a bool, not a string) that is neither NaN nor
    infinite."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    return math.isfinite(value)


def check_finite_number(name: str, value: Any, *, minimum: float | None = None) -> float:
    """Return `value` as a float; raise a `ValueError` naming `name` when it is not a real number (a string, a
    bool, `None`) and a [`NonFiniteError`] when it is NaN or infinite; with `minimum`, a `ValueError` below it.

    The messages are those of the configs' other checks: "`weight` must be a finite number, got nan."."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"`{name}` must be a number, got {type(value).__name__} {value!r}.")
    if not math.isfinite(value):
        raise NonFiniteError(f"`{name}` must be a finite number, got {value!r}.")
    if minimum is not None and not value >= minimum:
        raise ValueError(f"`{name}` must be >= {minimum:g}, got {value!r}.")
    return float(value)


def _named_tensors(obj: nn.Module | Mapping[str, Tensor] | Iterable[tuple[str, Tensor]]):
    """A module's state dict (its parameters and persistent buffers, each tensor once: not the non-persistent
    buffers, where a model may keep an attention mask of -inf on purpose), or the given names and tensors."""
    from torch import nn

    if isinstance(obj, nn.Module):
        seen: set[int] = set()
        for name, tensor in obj.state_dict(keep_vars=True).items():
            if id(tensor) not in seen:
                seen.add(id(tensor))
                yield name, tensor
        return
    yield from (obj.items() if isinstance(obj, Mapping) else obj)


def first_nonfinite(obj: nn.Module | Mapping[str, Tensor] | Iterable[tuple[str, Tensor]]) -> tuple[str, str] | None:
    """The first floating-point tensor (in the order of the module's state dict, or of the mapping) holding a NaN or an
    infinity, as `(name, "<n> NaN and <m> inf of <numel> values")`; None when every value is finite.
    One device-to-host read for the whole model (not one per tensor), so it is cheap enough before every save."""
    import torch
    from torch import Tensor

    named = [(name, t.detach()) for name, t in _named_tensors(obj)
             if isinstance(t, Tensor) and t.is_floating_point() and t.numel() and not t.is_meta]
    if not named:
        return None
    device = named[0][1].device
    finite = torch.stack([torch.isfinite(t).all().to(device) for _, t in named]).cpu()
    if bool(finite.all()):
        return None
    name, t = named[int((~finite).nonzero()[0, 0])]
    n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
    return name, f"{n_nan} NaN and {n_inf} inf of {t.numel()} values"


def check_finite_model(model: nn.Module | Mapping[str, Tensor], what: str = "the model") -> None:
    """Raise [`NonFiniteError`] if any weight or buffer of `model` (a module or a state dict) is NaN or infinite,
    naming the first bad tensor; `what` names the model in the message (e.g. its folder)."""
    bad = first_nonfinite(model)
    if bad is not None:
        name, counts = bad
        raise NonFiniteError(f"{what} has non-finite weights: {name} holds {counts}; a training that diverged "
                             "leaves such weights (train it again with a lower learning rate or R2 lambda); refusing "
                             "to use it")


def json_safe(value: Any) -> Any:
    """`value` with every NaN / inf float (also inside dicts, lists and tuples) replaced by None, so that the JSON
    written is valid for every reader (`json.dumps` would write the non-standard `NaN` / `Infinity`)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
