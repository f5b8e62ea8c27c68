"""Saving a trained model folder: the model in its own library's format, plus R2's side files.

The folder loads with plain timm (`timm.create_model("local-dir:...")`, or `"hf-hub:..."` once pushed), with plain
transformers (`AutoModelForImageClassification.from_pretrained`: its own models, and timm models through its
`TimmWrapperForImageClassification`), and with [`hf_r2.create_model`]; `r2_config.json` and `r2_stats.json` sit beside
the weights, as peft keeps `adapter_config.json` beside its adapter.
"""

from __future__ import annotations

import os
from typing import Any

import safetensors.torch
from torch import Tensor, nn

from ._finite import check_finite_model
from ._utils import give_default_modes, read_json, write_json_atomic
from .config import R2Config
from .models import is_transformers_model

__all__ = [
    "R2_STATS_NAME",
    "R2_TRAINING_NAME",
    "is_timm_model",
    "read_training_info",
    "save_model_folder",
    "save_r2_files",
    "save_timm_folder",
    "update_training_info",
    "write_timm_config",
]

R2_STATS_NAME = "r2_stats.json"
#: The training arguments that matter and the data trained on, beside `r2_config.json` (read by the model card).
R2_TRAINING_NAME = "r2_training.json"


def is_timm_model(model: nn.Module) -> bool:
    """A timm model (it carries a `pretrained_cfg` dict) that is not a transformers model."""
    return isinstance(getattr(model, "pretrained_cfg", None), dict) and not is_transformers_model(model)


def _timm_model_config(model: nn.Module) -> dict[str, Any] | None:
    """The `model_config` entries hf-r2 adds to timm's `config.json`: the label names, if the model has them."""
    label_names = model.pretrained_cfg.get("label_names")
    return {"label_names": list(label_names)} if label_names else None


def write_timm_config(model: nn.Module, save_directory: str) -> None:
    """timm's `config.json` for `model` (`architecture`, `num_classes`, `pretrained_cfg` with the label names),
    without weights: what `timm.create_model("local-dir:...")` needs to rebuild the architecture."""
    from timm.models._hub import save_config_for_hf

    save_config_for_hf(model, os.path.join(save_directory, "config.json"), model_config=_timm_model_config(model))
    _drop_model_args_num_classes(os.path.join(save_directory, "config.json"))


def _drop_model_args_num_classes(config_path: str) -> None:
    """Remove `model_args.num_classes` from timm's `config.json` when it repeats the top-level `num_classes`.

    transformers' `TimmWrapperForImageClassification` calls `timm.create_model(..., num_classes=num_labels,
    **model_args)`, so the copy that timm's `save_config_for_hf` writes into `model_args` made
    `AutoModelForImageClassification.from_pretrained` fail (`multiple values for keyword argument 'num_classes'`);
    timm and hf-r2 read the top-level one, so nothing else changes."""
    config = read_json(config_path)
    args = config.get("model_args") if isinstance(config, dict) else None
    if not isinstance(args, dict) or "num_classes" not in args or args["num_classes"] != config.get("num_classes"):
        return
    del args["num_classes"]
    if not args:
        del config["model_args"]
    write_json_atomic(config_path, config)


def save_timm_folder(model: nn.Module, save_directory: str, state_dict: dict[str, Tensor] | None = None) -> None:
    """timm's own layout: `config.json` ([`write_timm_config`]) and `model.safetensors`, as
    [`timm.models.save_for_hf`] writes it. `state_dict` overrides the weights (e.g. gathered by FSDP / DeepSpeed)."""
    import timm.models

    os.makedirs(save_directory, exist_ok=True)
    if state_dict is None:
        timm.models.save_for_hf(model, save_directory, model_config=_timm_model_config(model), safe_serialization=True)
        _drop_model_args_num_classes(os.path.join(save_directory, "config.json"))
        give_default_modes(save_directory)  # safetensors writes 0600; the user's umask decides (0644)
        return
    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in state_dict.items()},
        os.path.join(save_directory, "model.safetensors"),
        metadata={"format": "pt"},
    )
    give_default_modes(save_directory)
    write_timm_config(model, save_directory)


def save_r2_files(save_directory: str, r2_config: R2Config | None, stats: dict[str, Any] | None = None) -> None:
    """`r2_config.json` and, if given, `r2_stats.json` (the output of [`R2Regularizer.stats`]), beside weights saved
    just before, whose file modes it sets to the user's default (transformers' `save_pretrained` writes 0600)."""
    if r2_config is not None:
        r2_config.save_pretrained(save_directory)
    if stats is not None:
        write_json_atomic(os.path.join(save_directory, R2_STATS_NAME), stats)
    give_default_modes(save_directory)


def save_model_folder(
    model: nn.Module, save_directory: str, r2_config: R2Config | None = None, stats: dict[str, Any] | None = None
) -> str:
    """Save `model` so that it loads back with its own library, plus the R2 side files.

    transformers models: `save_pretrained`; timm models: timm's layout ([`save_timm_folder`]); any other module:
    `model.safetensors` only. A model with NaN / inf weights is refused ([`hf_r2._finite.NonFiniteError`], nothing
    written): it is no result to keep.
    """
    check_finite_model(model, f"the model to save to {save_directory}")
    os.makedirs(save_directory, exist_ok=True)
    if is_transformers_model(model):
        model.save_pretrained(save_directory)
    elif is_timm_model(model):
        save_timm_folder(model, save_directory)
    else:
        safetensors.torch.save_model(model, os.path.join(save_directory, "model.safetensors"))
    give_default_modes(save_directory)  # safetensors writes 0600; the user's umask decides (0644)
    save_r2_files(save_directory, r2_config, stats)
    return save_directory


def read_training_info(folder: str) -> dict[str, Any]:
    """The contents of `folder/r2_training.json` (`{}` if there is none)."""
    return read_json(os.path.join(folder, R2_TRAINING_NAME)) or {}


def update_training_info(folder: str, **entries: Any) -> str:
    """Merge `entries` (`training_arguments={...}`, `dataset="cifar10"`, `dataset_id="uoft-cs/cifar10"`) into
    `folder/r2_training.json`, atomically; entries given as `None` are left out."""
    info = read_training_info(folder)
    info.update({k: v for k, v in entries.items() if v is not None})
    return write_json_atomic(os.path.join(folder, R2_TRAINING_NAME), info)
