"""The bit-width rules shared by every quant config and verb: the 1-8 bits checks, the checks PTQ and QAT configs
share (`check_grid_fields`), and the one `first_last_bits` rule (`layer_bits`)."""

from __future__ import annotations

from typing import Any

from .._utils import check_choice, check_patterns, check_positive_int
from .observers import ObserverType

__all__ = ["check_bits", "check_grid", "check_grid_fields", "layer_bits"]


def check_bits(name: str, value: Any, *, low: int = 1, allow_none: bool = False, what: str = "") -> None:
    """A `ValueError` unless `value` is an integer from `low` to 8 (or `None` with `allow_none`); `what` is added
    to the message after the range (e.g. `" (2^bits centroids)"`)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 8:
        none = " or `None`" if allow_none else ""
        raise ValueError(f"`{name}` must be an integer from {low} to 8{none}{what}, got {value!r}.")


def check_grid(bits: int, symmetric: bool) -> None:
    """The bits of a uniform grid, 1 to 8; 1 bit (binary) only with `symmetric=True`."""
    check_bits("bits", bits)
    if bits == 1 and not symmetric:
        raise ValueError(
            "`bits=1` is binary quantization `sign(w) * mean|w|`, which is symmetric only; got `symmetric=False`. "
            "Use `bits=1, symmetric=True`."
        )


def check_grid_fields(config: Any) -> None:
    """The checks [`~hf_r2.quant.ptq.PTQConfig`] and [`~hf_r2.quant.qat.QATConfig`] share: bit widths,
    `per_channel`, `act_observer`, `calibration_batches` and the `include` / `exclude` patterns (normalised in
    place)."""
    check_bits("w_bits", config.w_bits)
    check_bits("a_bits", config.a_bits, low=2, allow_none=True)
    check_bits("first_last_bits", config.first_last_bits, allow_none=True)
    if not isinstance(config.per_channel, bool):
        raise ValueError(f"`per_channel` must be `True` or `False`, got {config.per_channel!r}.")
    config.act_observer = check_choice("act_observer", config.act_observer, ObserverType)
    check_positive_int("calibration_batches", config.calibration_batches)
    config.include = check_patterns("include", config.include)
    config.exclude = check_patterns("exclude", config.exclude)


def layer_bits(bits: int | None, first_last_bits: int | None, index: int, count: int) -> int | None:
    """The bits of target layer `index` of `count`: `bits`, or `max(first_last_bits, bits)` for the first and the
    last layer (so they are never below the others); `None` (float) stays `None`, and `first_last_bits=None`
    quantizes the ends like the others."""
    if bits is None:
        return None
    if first_last_bits is not None and index in (0, count - 1):
        return max(first_last_bits, bits)
    return bits
