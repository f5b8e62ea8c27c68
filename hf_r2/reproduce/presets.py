"""The demo's preset (`hf-r2 demo`): [`DEMO_DEFAULTS`] and [`demo_config`], the [`ReproduceConfig`] it runs."""

from __future__ import annotations

import os
from typing import Any

from .config import ReproduceConfig

__all__ = ["DEMO_DEFAULTS", "demo_config"]

#: Settings of the demo preset ([`demo_config`], `hf-r2 demo`'s flag defaults): sized to finish in under 5 minutes on
#: 2 CPU cores.
DEMO_DEFAULTS: dict[str, Any] = {
    "output_dir": os.path.join("outputs", "demo"),
    "model": "resnet10t",
    "dataset": "cifar10",
    "input_size": 32,
    "epochs": 5.0,
    "max_train_samples": 10000,
    "max_eval_samples": 2000,
    "batch_size": 64,
    "learning_rate": 3e-3,
    "weight_decay": 0.05,
    "r2_loss": "linf",
    "r2_weight": 3.0,
    "r2_per_channel": True,
    "bits": 2,
    "bn_samples": 512,
    "seed": 0,
}


def demo_config(**overrides: Any) -> ReproduceConfig:
    """The [`ReproduceConfig`] of the demo (`hf-r2 demo`): [`DEMO_DEFAULTS`] updated with `overrides`.

    One model, two variants (`baseline`, and `r2_loss` at `r2_weight`), one seed, no lambda sweep; the low-bit rows
    are FP, W8A8 and W4A8 (per channel, MSE), then at `bits` bits: per tensor and per channel with max-abs and MSE
    ranges, k-means, and, on the baseline only, MagR before the per-channel MSE PTQ (the post-training alternative to
    R2). `bn_samples` training images calibrate the activations and re-estimate batch norm.
    """
    unknown = sorted(set(overrides) - set(DEMO_DEFAULTS))
    if unknown:
        raise ValueError(f"Unknown demo setting(s) {unknown}; the settings are {sorted(DEMO_DEFAULTS)}.")
    s = {**DEMO_DEFAULTS, **overrides}
    bits = s["bits"]
    low_bit: list[dict[str, Any]] = [
        {"method": "ptq", "w_bits": w, "a_bits": 8, "per_channel": True, "weight_range": "mse"} for w in (8, 4)
        if w > bits
    ]
    low_bit += [
        {"method": "ptq", "w_bits": bits, "a_bits": 8, "per_channel": per_channel, "weight_range": weight_range}
        for per_channel in (False, True)
        for weight_range in ("maxabs", "mse")
    ]
    low_bit.append({"method": "kmeans", "w_bits": bits})
    # the post-training alternative to retraining with R2: MagR on the baseline, then the same per-channel PTQ
    low_bit.append({"method": "ptq", "w_bits": bits, "a_bits": 8, "per_channel": True, "weight_range": "mse",
                    "pre": ["magr"], "variants": ["baseline"]})
    return ReproduceConfig(
        output_dir=s["output_dir"],
        dataset=s["dataset"],
        input_size=s["input_size"],
        max_train_samples=s["max_train_samples"],
        max_eval_samples=s["max_eval_samples"],
        data_seed=s["seed"],
        models=[s["model"]],
        variants=[
            {"name": "baseline", "loss": "baseline"},
            {"name": s["r2_loss"], "loss": s["r2_loss"], "weight": s["r2_weight"], "per_channel": s["r2_per_channel"]},
        ],
        epochs=s["epochs"],
        batch_size=s["batch_size"],
        lr=s["learning_rate"],
        weight_decay=s["weight_decay"],
        seeds=[s["seed"]],
        lambda_sweep=None,
        low_bit=low_bit,
        calibration_samples=s["bn_samples"],
        onnx_settings=[f"W{bits}A8 per-channel mse"],  # the demo ends in ONNX Runtime (with the onnx extra)
    )
