"""The configs that ship with hf-r2: the demo's ([`DEMO_DEFAULTS`], [`demo_config`], `hf-r2 demo`) and the
`hf-r2 reproduce` presets ([`CONFIG_PRESETS`], [`load_config`]): YAML files under `hf_r2/reproduce/configs/`,
package data, so that `hf-r2 reproduce tiny` works from a wheel as from a clone."""

from __future__ import annotations

import os
from importlib import resources
from typing import Any

from .config import ReproduceConfig

__all__ = ["CONFIG_PRESETS", "DEMO_DEFAULTS", "demo_config", "load_config", "preset_file"]

#: The `hf-r2 reproduce` presets: name -> (file under `hf_r2/reproduce/configs/`, what it runs). A clone also
#: reaches the files as `configs/<file>` (a link to that folder).
CONFIG_PRESETS: dict[str, tuple[str, str]] = {
    "tiny": ("reproduce_tiny.yaml", "the whole pipeline on 64 cifar10-tiny images, in seconds; measures nothing"),
    "paper": ("reproduce.yaml", "the paper's claims side by side: baseline and four R2 variants, 3 epochs on 10k "
              "CIFAR-10 images, 3 seeds, 2 models (about 2 h in one process on 2 CPU cores)"),
    "long": ("reproduce_long.yaml", "`paper`'s baseline against L-inf only, trained 4x longer, one seed (about 30 "
             "min in one process)"),
    "evidence": ("evidence.yaml", "the evidence study's stage 2 (R2 fine-tunes and from scratch, W2A2; hours); "
                 "needs its stage-1 baselines (make evidence-baselines, in a clone)"),
    "headline": ("headline.yaml", "the claims from scratch against a tuned-weight-decay baseline, 3 seeds (days)"),
    "finetune": ("finetune.yaml", "R2 for a trained model: the fine-tune recipe against the same-length fine-tune "
                 "without R2, QAT and MagR (hours); starts from headline's MobileNetV2 baseline (make evidence-headline)"),
}


def preset_file(name: str) -> resources.abc.Traversable:
    """The shipped YAML file of the preset `name` ([`CONFIG_PRESETS`]), read through `importlib.resources`."""
    if name not in CONFIG_PRESETS:
        raise ValueError(f"No preset {name!r}; the presets are {', '.join(CONFIG_PRESETS)}.")
    return resources.files(__package__).joinpath("configs", CONFIG_PRESETS[name][0])


def load_config(name_or_path: str | os.PathLike) -> ReproduceConfig:
    """The [`ReproduceConfig`] of a preset name ([`CONFIG_PRESETS`]: `tiny`, `paper`, ...) or of a YAML / JSON file
    or a run's `output_dir` ([`ReproduceConfig.from_file`]). A preset name wins over a file of that name in the
    current folder: write `./paper` for the file."""
    name = os.fspath(name_or_path)
    if name in CONFIG_PRESETS:
        with resources.as_file(preset_file(name)) as path:
            return ReproduceConfig.from_file(path)
    if not os.path.exists(name) and os.sep not in name and "." not in name:
        raise FileNotFoundError(f"No config file or preset {name!r}; the presets are {', '.join(CONFIG_PRESETS)} "
                                "(hf-r2 reproduce --help).")
    return ReproduceConfig.from_file(name)

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
