"""The weight rounding of a reproduce 'ptq' row, spelled as `hf-r2 ptq` spells it: `rounding: nearest | adaround |
brecq`, QDrop being `rounding: brecq` with `drop_prob: 0.5` (`--rounding brecq --drop-prob 0.5`); the keys only
learnt-rounding rows take (`iters`, `drop_prob`), their part of the row name, and the quant config a 'ptq' row
builds ([`~hf_r2.quant.PTQConfig`], or [`~hf_r2.quant.BlockReconstructionConfig`] for block reconstruction)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..quant import BlockReconstructionConfig, PTQConfig

__all__ = ["ROUNDINGS", "ROUNDING_KEYS", "normalise_rounding", "rounding_label", "ptq_config"]

#: A 'ptq' row's `rounding`: round-to-nearest, AdaRound (layer by layer), block reconstruction (BRECQ / QDrop).
ROUNDINGS = ("nearest", "adaround", "brecq")
#: The setting keys of learnt-rounding rows only; a setting holds them only where they apply, so that the rows
#: cached before they existed keep their names and specs.
ROUNDING_KEYS = ("iters", "drop_prob")
#: QDrop's paper value of `drop_prob`: such rows are named plain "qdrop".
QDROP_PAPER = 0.5


def normalise_rounding(what: str, method: str, rounding: Any, item: dict[str, Any]) -> dict[str, Any]:
    """The learnt-rounding keys of setting `item` (`what` names it in errors): `{}` for round-to-nearest and
    non-'ptq' rows, `{"iters"}` for an AdaRound row that sets its own (overriding the config's `adaround_iters`),
    `{"iters", "drop_prob"}` for block reconstruction (defaults: [`~hf_r2.quant.BlockReconstructionConfig`]'s)."""
    given = [k for k in ROUNDING_KEYS if item.get(k) is not None]
    if method != "ptq":
        if given:
            raise ValueError(f"{what}: {given} set the learnt rounding of a 'ptq' row (`rounding: adaround` or "
                             f"`brecq`); method {method!r} takes none: leave them out.")
        return {}
    if rounding not in ROUNDINGS:
        raise ValueError(f"{what}: `rounding` must be one of {list(ROUNDINGS)}, got {rounding!r}; QDrop is "
                         f"`rounding: brecq` with `drop_prob: {QDROP_PAPER}`.")
    if rounding == "nearest":
        if given:
            raise ValueError(f"{what}: {given} set learnt rounding, but the row rounds to nearest: add `rounding: "
                             "adaround` or `rounding: brecq` (QDrop: with `drop_prob: 0.5`), or leave them out.")
        return {}
    if rounding == "adaround" and "drop_prob" in given:
        raise ValueError(f"{what}: `drop_prob` is QDrop's, a kind of block reconstruction, not AdaRound's: use "
                         "`rounding: brecq` with it, or leave it out.")
    if item.get("bias_correction") and rounding == "brecq":
        raise ValueError(f"{what}: block reconstruction (`rounding: brecq`) keeps the batch norms as trained and "
                         "fits each block's float output, so it takes no `bias_correction`: leave it out.")
    iters = item.get("iters")
    if iters is not None and (isinstance(iters, bool) or not isinstance(iters, int) or iters < 1):
        raise ValueError(f"{what}: `iters` (Adam steps per layer / block) must be a positive integer, got {iters!r}.")
    if rounding == "adaround":
        return {} if iters is None else {"iters": iters}
    from ..quant import BlockReconstructionConfig

    defaults = {f.name: f.default for f in dataclasses.fields(BlockReconstructionConfig)}
    drop_prob = item.get("drop_prob", defaults["drop_prob"])
    if isinstance(drop_prob, bool) or not isinstance(drop_prob, (int, float)) or not 0 <= drop_prob < 1:
        raise ValueError(f"{what}: `drop_prob` (QDrop: the chance an activation stays float) must be in [0, 1), 0 "
                         f"for BRECQ, {QDROP_PAPER} for QDrop's paper; got {drop_prob!r}.")
    return {"iters": defaults["iters"] if iters is None else iters, "drop_prob": float(drop_prob)}


def rounding_label(setting: dict[str, Any]) -> str | None:
    """The row name's word for a learnt rounding (`"adaround"`, `"brecq"`, `"qdrop"`, `"qdrop p=0.3"`), in place
    of the weight range; `None` for round-to-nearest."""
    rounding = setting["rounding"]
    if rounding != "brecq":
        return "adaround" if rounding == "adaround" else None
    p = setting["drop_prob"]
    return "brecq" if p == 0 else "qdrop" if p == QDROP_PAPER else f"qdrop p={p:g}"


def ptq_config(setting: dict[str, Any], adaround_iters: int | None = None) -> PTQConfig | BlockReconstructionConfig:
    """The quant config of a full 'ptq' setting: [`~hf_r2.quant.PTQConfig`] (BN re-estimated; AdaRound with the
    row's `iters`, else `adaround_iters`, else its default), or for `rounding: brecq`
    [`~hf_r2.quant.BlockReconstructionConfig`] (BN kept as trained, the row's `iters` and `drop_prob`); both on
    all calibration batches (their number is set by the config's `calibration_samples`)."""
    from ..quant import BlockReconstructionConfig, PTQConfig

    grid = {k: setting[k] for k in ("w_bits", "a_bits", "per_channel", "weight_range")}
    if setting["rounding"] == "brecq":
        return BlockReconstructionConfig(**grid, iters=setting["iters"], drop_prob=setting["drop_prob"],
                                         calibration_batches=10**6)
    iters = setting.get("iters") or adaround_iters
    return PTQConfig(
        **grid,
        rounding=setting["rounding"],
        adaround={"iters": iters} if setting["rounding"] == "adaround" and iters else None,
        bn="reestimate",
        bias_correction=bool(setting.get("bias_correction")),
        calibration_batches=10**6,
    )
