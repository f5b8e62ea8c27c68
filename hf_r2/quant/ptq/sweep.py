"""The PTQ sweep: top-1 of a model in float and after post-training quantization at several settings
(`"fp"`, `"w8a8"`, `"w4a8"`, `"w2a8"`), as result rows for [`~hf_r2.quant.results.update_results`].
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

from ...metrics import evaluate_accuracy
from ..results import float_row, parse_setting
from .post_training import PTQConfig, post_training_quantize_

__all__ = ["low_bit_table"]


def low_bit_table(
    model: nn.Module,
    eval_data: Any,
    calibration_data: Iterable[Any] | None = None,
    settings: Sequence[str] = ("fp", "w8a8", "w4a8", "w2a8"),
    **ptq_kwargs: Any,
) -> list[dict[str, Any]]:
    """Top-1 accuracy of `model` in float and after PTQ at each of `settings`; `model` is left untouched.

    Each setting quantizes a copy with [`~hf_r2.quant.ptq.post_training_quantize_`] and `PTQConfig(w_bits, a_bits,
    **ptq_kwargs)` (by default per-channel MSE ranges, round to nearest, BN re-estimation: so
    `calibration_data` is needed for any setting but `"fp"`).

    Returns:
        `list[dict]`: one row per setting, `{"setting": "W2A8", "method": "ptq", "w_bits", "a_bits", "accuracy",
        "config"}`.
    """
    rows = []
    batches = None if calibration_data is None else list(calibration_data)
    for setting in settings:
        w_bits, a_bits = parse_setting(setting)
        if w_bits is None:
            rows.append(float_row(evaluate_accuracy(model, eval_data)["accuracy"]))
            continue
        config = PTQConfig(w_bits=w_bits, a_bits=a_bits, **ptq_kwargs)
        quantized = post_training_quantize_(copy.deepcopy(model), config, batches)
        rows.append(
            {
                "setting": setting.upper(),
                "method": "ptq",
                "w_bits": w_bits,
                "a_bits": a_bits,
                "accuracy": evaluate_accuracy(quantized, eval_data)["accuracy"],
                "config": config.to_dict(),
            }
        )
    return rows
