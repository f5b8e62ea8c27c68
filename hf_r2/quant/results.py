"""Low-bit results file I/O: setting names (`"w2a8"` <-> `(2, 8)`), the FP row, the results file
`low_bit_results.json` that every `hf-r2 ptq / qat / compress / evaluate` run adds its row to, and its markdown
table. The PTQ sweep that measures such rows is [`~hf_r2.quant.ptq.sweep.low_bit_table`].
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

from .._utils import read_json, write_json_atomic

__all__ = [
    "LOW_BIT_RESULTS_NAME",
    "parse_setting",
    "format_setting",
    "float_row",
    "format_table",
    "read_results",
    "update_results",
    "DATA_FIELDS",
    "row_key",
]

LOW_BIT_RESULTS_NAME = "low_bit_results.json"
#: What a row was measured on: the dataset (name, Hub id or absolute path), its split, the number of images and the
#: input side. Rows that differ in any of them are different results and are kept apart.
DATA_FIELDS = ("dataset", "split", "num_images", "input_size")


def parse_setting(setting: str) -> tuple[int | None, int | None]:
    """`"fp"` -> `(None, None)`, `"w2a8"` -> `(2, 8)`, `"w4"` -> `(4, None)` (weight-only)."""
    text = setting.strip().lower()
    if text in ("fp", "fp32", "float"):
        return None, None
    match = re.fullmatch(r"w(\d)(?:a(\d))?", text)
    if not match:
        raise ValueError(f"Unknown low-bit setting {setting!r}: use 'fp', 'w<bits>' or 'w<bits>a<bits>' ('w2a8').")
    return int(match.group(1)), (int(match.group(2)) if match.group(2) else None)


def format_setting(w_bits: int | None, a_bits: int | None = None) -> str:
    """The inverse of [`parse_setting`]: `(2, 8)` -> `"W2A8"`, `(4, None)` -> `"W4"`, `(None, None)` -> `"FP"`."""
    if w_bits is None:
        return "FP"
    return f"W{w_bits}" + (f"A{a_bits}" if a_bits else "")


def float_row(accuracy: float, **fields: Any) -> dict[str, Any]:
    """The result row of the full-precision model: `{"setting": "FP", "method": "float", "w_bits": None,
    "a_bits": None, "accuracy": accuracy}`, followed by `fields` (e.g. `dataset=...`, `seconds=...`)."""
    return {"setting": "FP", "method": "float", "w_bits": None, "a_bits": None, "accuracy": accuracy, **fields}


def format_table(rows: Sequence[dict[str, Any]], title: str | None = None) -> str:
    """A markdown table of result rows (`setting`, `method`, `accuracy` in %, and `bits_per_weight` if given)."""
    lines = [f"### {title}", ""] if title else []
    lines += ["| setting | method | top-1 (%) | bits / weight |", "|---|---|---|---|"]
    for row in rows:
        bpw = row.get("bits_per_weight")
        lines.append(
            f"| {row['setting']} | {row.get('method', '')} | {100 * row['accuracy']:.2f} | "
            f"{'' if bpw is None else f'{bpw:.2f}'} |"
        )
    return "\n".join(lines)


def read_results(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows in `folder/low_bit_results.json` (`[]` if there is none)."""
    data = read_json(os.path.join(os.fspath(folder), LOW_BIT_RESULTS_NAME))
    return [] if data is None else data.get("rows", [])


def row_key(row: dict[str, Any]) -> tuple:
    """`(setting, method, dataset, split, num_images, input_size)`: a row replaces only the row of the same method
    measured on the same data ([`DATA_FIELDS`])."""
    return (row["setting"], row.get("method"), *(row.get(field) for field in DATA_FIELDS))


def update_results(folder: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> str:
    """Add `rows` to `folder/low_bit_results.json` (atomically), replacing the rows with the same [`row_key`] (the
    same setting and method measured on the same data); rows measured on other data are kept beside them. Returns
    the path."""
    new = {row_key(row) for row in rows}
    kept = [row for row in read_results(folder) if row_key(row) not in new]
    return write_json_atomic(os.path.join(os.fspath(folder), LOW_BIT_RESULTS_NAME), {"rows": kept + list(rows)})
