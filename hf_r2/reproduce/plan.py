"""What one `hf-r2 reproduce` run does: the plan (every training once, with the union of the low-bit rows it needs)
and the specs that decide whether a cached training or row can be reused."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

from .config import ReproduceConfig
from .deploy import onnx_check_available
from .sweep import weight_decay_role
from .variants import BASELINE, SCOPE_KEYS, TRAINING_KEYS, on_model, slug

__all__ = ["Run", "plan", "variant_dir", "variant_names", "train_spec", "row_spec"]


@dataclass
class Run:
    """One training of the plan: `model` x `variant` x `seed` in `run_dir`, with the rows it needs. A fine-tune
    (`init_from: baseline`) starts from `init_dir`; an external baseline (`baselines`) is copied from `copy_from`."""

    model: str
    variant: dict[str, Any]
    seed: int
    run_dir: str
    settings: list[str]
    roles: list[str]  # "headline", "sweep:<variant>:<lambda>" and / or "wd_sweep:<factor>"
    init_dir: str | None = None
    copy_from: str | None = None


def variant_dir(variant: dict[str, Any]) -> str:
    """The folder name of a variant's trainings: its loss, lambda, weight decay (when not the recipe's) and a digest of
    its other settings."""
    name = BASELINE if variant["loss"] == BASELINE else (
        f"{variant['loss']}{'-pc' if variant['per_channel'] else ''}-w{variant['weight']:g}")
    training = {k: variant[k] for k in TRAINING_KEYS if variant.get(k) is not None}
    if training:
        name += "-ft" if variant.get("init_from") else "-own"
        if variant.get("weight_decay") is not None:
            name += f"-wd{variant['weight_decay']:g}"
        digest = hashlib.sha1(json.dumps({"r2": variant["r2"], **training}, sort_keys=True).encode()).hexdigest()
        name += f"-{digest[:8]}"
    elif variant["r2"]:
        digest = hashlib.sha1(json.dumps(variant["r2"], sort_keys=True).encode()).hexdigest()[:8]
        name += f"-{digest}"
    return slug(name)


def plan(config: ReproduceConfig, chosen: dict[str, dict[str, float | None]] | None = None,
         chosen_weight_decay: dict[str, float | None] | None = None) -> list[Run]:
    """Every training, once, with the union of the rows it needs, in a stable order: trainings from random init (and
    copied baselines) first, then the fine-tunes that start from them.

    `chosen` (`{variant: {model: lambda or None}}`, the lambda sweeps' choices) resolves the `weight: chosen`
    variants and `chosen_weight_decay` (`{model: weight decay or None}`, the weight-decay sweep's) the
    `weight_decay: chosen` ones (and their lambda sweeps); without them (before the sweeps have run) those variants
    are left out. The weight-decay sweep's trainings are always planned."""
    runs: dict[str, Run] = {}
    first = config.seeds[0]
    baseline = config.baseline_variant

    def add(model: str, variant: dict[str, Any], seed: int, settings: list[str], role: str) -> None:
        run_dir = os.path.join(config.output_dir, "runs", slug(model), variant_dir(variant), f"seed{seed}")
        run = runs.setdefault(run_dir, Run(model, variant, seed, run_dir, [], []))
        if role == "headline":  # a setting with `variants` / `models` is measured on those only
            settings = [name for name in settings if config.setting(name)["variants"] is None
                        or variant["name"] in config.setting(name)["variants"]]
            settings = [name for name in settings if on_model(config.setting(name), model)]
        run.settings = [s["name"] for s in config.low_bit if s["name"] in set(run.settings) | set(settings)]
        run.roles.append(role)
        if variant["name"] == baseline and model in config.baselines:
            run.copy_from = config.baselines[model]
        if variant["init_from"]:
            run.init_dir = config.baselines.get(model) or os.path.join(
                config.output_dir, "runs", slug(model), BASELINE, f"seed{first}")

    for model in config.models:
        for seed in config.seeds:
            settings = [s["name"] for s in config.low_bit] if seed == first else config.headline_settings
            for variant in config.variants:
                if variant["name"] == baseline and model in config.baselines and seed != first:
                    continue  # one trained folder: the same model for every seed
                resolved = config.resolve(variant, model, chosen, chosen_weight_decay)
                if resolved is not None and (variant["seeds"] is None or seed in variant["seeds"]):
                    add(model, resolved, seed, settings, "headline")
    sweep = config.weight_decay_sweep
    if sweep:
        base = next(v for v in config.variants if v["name"] == baseline)
        for model in sweep["models"]:
            for factor in sweep["factors"]:  # factor 1 is the baseline itself (same folder, same name)
                variant = base if factor == 1 else {
                    **base, "name": f"{base['name']} wd={config.weight_decay_of(model, factor):g}",
                    "weight_decay": config.weight_decay_of(model, factor)}
                add(model, config.resolve(variant, model), first, sweep["settings"], weight_decay_role(factor))
    for sweep in config.lambda_sweep or []:
        base = next(v for v in config.variants if v["name"] == sweep["variant"])
        for model in sweep["models"]:
            for lam in sweep["lambdas"]:
                variant = config.resolve({**base, "name": f"{base['name']} lambda={lam:g}", "weight": lam}, model,
                                         None, chosen_weight_decay)
                if variant is not None:  # at a weight decay not chosen yet: planned once it is
                    add(model, variant, first, sweep["settings"], f"sweep:{base['name']}:{lam:g}")
    return sorted(runs.values(), key=lambda run: run.init_dir is not None)


def variant_names(run: Run, config: ReproduceConfig, chosen: dict[str, dict[str, float | None]] | None,
                  chosen_weight_decay: dict[str, float | None] | None) -> list[str]:
    """The configured variants `run` is a headline training of, their chosen values resolved (one training can be
    several: the tuned baseline is the default one when the sweep keeps the default weight decay)."""
    if "headline" not in run.roles:
        return []
    resolved = [(v["name"], config.resolve(v, run.model, chosen, chosen_weight_decay)) for v in config.variants]
    return [name for name, v in resolved if v is not None and variant_dir(v) == variant_dir(run.variant)
            and (v["seeds"] is None or run.seed in v["seeds"])]


def _file_digest(folder: str) -> str | None:
    """sha1 of a trained folder's weights (`None` before they exist): a fine-tune is reused only from the same
    starting point."""
    path = os.path.join(folder, "model.safetensors")
    if not os.path.isfile(path):
        return None
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def train_spec(run: Run, config: ReproduceConfig) -> dict[str, Any]:
    """What a training depends on: a folder trained with another spec is not reused. Settings at their defaults
    are left out, so folders trained before a setting existed stay valid."""
    variant = {k: run.variant[k] for k in ("loss", "weight", "per_channel", "r2")}
    recipe = config.recipe(run.model, run.variant)
    spec = {
        "model": run.model, "variant": variant, "seed": run.seed, "dataset": config.dataset,
        "max_train_samples": config.max_train_samples, "data_seed": config.data_seed,
        "input_size": config.input_size, "epochs": recipe["epochs"], "max_steps": config.max_steps,
        "batch_size": config.batch_size, "lr": recipe["lr"], "weight_decay": recipe["weight_decay"],
        "warmup_ratio": recipe["warmup_ratio"],
        **({"model_kwargs": config.model_kwargs[run.model]} if config.model_kwargs.get(run.model) else {}),
    }
    if config.optimizer != "adamw":
        spec.update(optimizer=config.optimizer, momentum=config.momentum)
    if config.validation_size:
        spec["validation_size"] = config.validation_size
    if run.init_dir:
        spec["init_from"] = {"folder": os.path.abspath(run.init_dir), "sha1": _file_digest(run.init_dir)}
    if run.copy_from:
        spec = {"copied_from": os.path.abspath(run.copy_from), "sha1": _file_digest(run.copy_from),
                "model": run.model, "dataset": config.dataset, "input_size": config.input_size}
    return jsonable(spec)


def row_spec(setting: dict[str, Any] | None, config: ReproduceConfig) -> dict[str, Any]:
    """What a low-bit row depends on besides the trained model: a cached row with another spec is recomputed."""
    spec: dict[str, Any] = {"dataset": config.dataset, "max_eval_samples": config.max_eval_samples,
                            "data_seed": config.data_seed, "input_size": config.input_size}
    if config.validation_size:  # also measured on the validation split; calibration draws from the rest
        spec["validation_size"] = config.validation_size
    if setting is None:
        return jsonable(spec)
    # `pre` enters only when set, so rows cached before it existed stay valid
    # keys added later stay out of the spec when unset, so that runs measured before them keep their cache
    spec["setting"] = {
        k: v for k, v in setting.items()
        if k not in SCOPE_KEYS and not (k in ("pre", "bias_correction", "finetune_steps") and v is None)
    }
    if setting["name"] in (config.onnx_settings or []):  # measured in ONNX Runtime too, once the extra is there
        spec["onnx"] = onnx_check_available()
    spec["calibration_samples"] = config.calibration_samples
    if setting["method"] == "ptq" and setting["rounding"] == "adaround":
        spec["adaround_iters"] = config.adaround_iters
    if setting["method"] in ("qat", "dkm"):
        spec.update(finetune_epochs=config.finetune_epochs, finetune_max_steps=config.finetune_max_steps,
                    finetune_lr=config.finetune_lr, batch_size=config.batch_size,
                    max_train_samples=config.max_train_samples)
    return jsonable(spec)


def jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))
