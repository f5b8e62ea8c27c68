"""One `create_model` for timm names, `hf-hub:` ids, transformers checkpoints and saved hf-r2 folders, and the
one place that turns a batch into logits and a task loss for either kind of model."""

from __future__ import annotations

import difflib
import json
import os
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ._utils import check_safetensors_files

__all__ = [
    "create_model",
    "is_timm_config",
    "is_transformers_model",
    "unwrap_model",
    "forward_logits",
    "classification_loss",
    "input_shape",
    "LogitsModule",
]


def is_transformers_model(model: nn.Module) -> bool:
    """Whether `model` is a transformers `PreTrainedModel` (it takes `pixel_values=` and returns an output object)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(unwrap_model(model), PreTrainedModel)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP / `torch.compile` / accelerate wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def is_timm_config(config: dict[str, Any]) -> bool:
    """Whether a saved `config.json` is in timm's layout (`architecture`, no transformers `model_type`)."""
    return "architecture" in config and "model_type" not in config


def _read_json(path: str) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def create_model(
    model_name_or_path: str | Any,
    num_classes: int | None = None,
    *,
    pretrained: bool = False,
    label_names: list[str] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Create a timm or transformers image classifier from one name.

    `model_name_or_path` may be:

    - a timm name (`"resnet18"`, `"mobilenetv2_100"`) or `"hf-hub:org/name"`: [`timm.create_model`];
    - a local folder in timm's layout (`config.json` with `architecture`, e.g. saved by `hf-r2 train`): timm, with
      the folder's `model.safetensors` as weights when `pretrained=True`;
    - a local folder or Hub id of a transformers checkpoint (`config.json` with `model_type`):
      [`~transformers.AutoModelForImageClassification`] (`from_pretrained` if `pretrained`, else `from_config`);
    - a transformers `PretrainedConfig` instance: `AutoModelForImageClassification.from_config`.

    Args:
        model_name_or_path (`str` or `transformers.PretrainedConfig`):
            What to create (see above).
        num_classes (`int`, *optional*):
            Size of the classifier head; `None` keeps the checkpoint's.
        pretrained (`bool`, *optional*, defaults to `False`):
            Load weights (from the folder, the Hub or the cache); `False` gives a random init.
        label_names (`list[str]`, *optional*):
            Class names, stored as `id2label` on transformers models and `label_names` on timm's `pretrained_cfg`.
        kwargs:
            Passed on to `timm.create_model` or `from_pretrained` / `from_config`.
    """
    if label_names is not None and num_classes is None:
        num_classes = len(label_names)
    if not isinstance(model_name_or_path, str):
        return _create_transformers(model_name_or_path, num_classes, pretrained, label_names, **kwargs)
    name = model_name_or_path
    config_path = os.path.join(name, "config.json")
    if os.path.isdir(name):
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"{name!r} is a folder without a config.json: not a saved model.")
        config = _read_json(config_path)
        if pretrained:
            check_safetensors_files(name)  # a damaged file is named, not a bare SafetensorError
        if is_timm_config(config):
            return _create_timm_from_folder(name, config, num_classes, pretrained, label_names, **kwargs)
        return _create_transformers(name, num_classes, pretrained, label_names, **kwargs)
    import timm

    if name.startswith("hf-hub:") or name.startswith("local-dir:") or timm.is_model(name):
        model = timm.create_model(name, pretrained=pretrained, **_num_classes_kw(num_classes), **kwargs)
        _set_timm_labels(model, label_names)
        return model
    if "/" in name:
        hub_config = _timm_hub_config(name, kwargs)
        if hub_config is not None:  # timm's Hub layout: timm itself, as `hf-hub:` would
            _check_model_args(name, hub_config["architecture"], hub_config.get("model_args", {}))
            model = timm.create_model(f"hf-hub:{name}", pretrained=pretrained, **_num_classes_kw(num_classes),
                                      **kwargs)
            _set_timm_labels(model, label_names)
            return model
        return _create_transformers(name, num_classes, pretrained, label_names, **kwargs)
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6) or timm.list_models(f"*{name}*")[:5]
    hint = f" Close timm names: {close}." if close else ""
    raise ValueError(
        f"Unknown model {name!r}: not a timm model name, an `hf-hub:` id, a local folder or a Hub id `org/name`.{hint}"
    )


def _timm_hub_config(repo_id: str, kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """The `config.json` of the Hub repo `repo_id` if it is in timm's layout, else `None`. Reads the cache when
    offline; `None` when the config cannot be had (transformers then gives its own error)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        path = hf_hub_download(repo_id, "config.json", revision=kwargs.get("revision"),
                               cache_dir=kwargs.get("cache_dir"), token=kwargs.get("token"))
        config = _read_json(path)
    except (OSError, ValueError, EntryNotFoundError):  # no such repo / file, offline without a copy, invalid id, JSON
        return None
    return config if isinstance(config, dict) and is_timm_config(config) else None


#: `timm.create_model` / `build_model_with_cfg` arguments that are not the architecture's: where weights come from
#: (`checkpoint_path`, `pretrained_cfg`, `cache_dir`, ...) and how the model is built. A saved `config.json` may not
#: set them through `model_args`.
_NOT_ARCHITECTURE = frozenset({
    "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir", "scriptable",
    "exportable", "no_jit", "model_cfg", "feature_cfg", "pretrained_strict", "pretrained_filter_fn", "kwargs_filter",
    "pretrained_model_args", "device", "dtype", "variant", "model_cls", "model_name", "file", "url", "hf_hub_id",
    "state_dict", "source", "self", "args", "kwargs",
})


def _architecture_keys(architecture: str) -> set[str]:
    """The arguments a timm architecture's constructors take: every parameter of the classes and functions of the
    module that defines its entrypoint, less [`_NOT_ARCHITECTURE`]."""
    import inspect

    import timm.models

    module = inspect.getmodule(timm.models.model_entrypoint(architecture))
    keys: set[str] = set()
    for value in vars(module).values():
        if inspect.isclass(value) or inspect.isfunction(value):
            target = value.__init__ if inspect.isclass(value) else value
            try:
                keys.update(inspect.signature(target).parameters)
            except (TypeError, ValueError):  # builtins without a signature
                continue
    return keys - _NOT_ARCHITECTURE


def _check_model_args(folder: str, architecture: str, model_args: Any) -> dict[str, Any]:
    """`model_args` of a saved timm `config.json`, refused unless each key is an argument of the architecture (not
    `checkpoint_path`, `pretrained_cfg`, ...): the file may come from anyone."""
    import timm

    if not isinstance(architecture, str) or not timm.is_model(architecture):
        raise ValueError(f"config.json in {folder!r} names the architecture {architecture!r}, which is not a timm "
                         "model: fix `architecture` in config.json, or save the model again.")
    if not isinstance(model_args, dict):
        raise ValueError(f"config.json in {folder!r} has `model_args` {type(model_args).__name__}, not a mapping: "
                         "fix it, or save the model again.")
    unknown = sorted(set(model_args) - _architecture_keys(architecture) - {"num_classes"})
    if unknown:
        raise ValueError(f"config.json in {folder!r} sets `model_args` {unknown}, which are not arguments of the "
                         f"{architecture} architecture (e.g. where weights load from): refused; remove them from "
                         "config.json if you trust the folder.")
    return dict(model_args)


def _num_classes_kw(num_classes: int | None) -> dict[str, int]:
    return {} if num_classes is None else {"num_classes": num_classes}


def _set_timm_labels(model: nn.Module, label_names: list[str] | None) -> None:
    if label_names is not None and hasattr(model, "pretrained_cfg"):
        model.pretrained_cfg = {**model.pretrained_cfg, "label_names": list(label_names)}


def _create_timm_from_folder(
    folder: str, config: dict[str, Any], num_classes: int | None, pretrained: bool, label_names, **kwargs: Any
) -> nn.Module:
    import timm

    model_args = _check_model_args(folder, config["architecture"], config.get("model_args", {}))
    saved_classes = config.get("num_classes")
    model_args.setdefault("num_classes", saved_classes)
    model_args.update(kwargs)
    pretrained_cfg = config.get("pretrained_cfg", {})
    pretrained_cfg = dict(pretrained_cfg) if isinstance(pretrained_cfg, dict) else {}
    for key in ("file", "url", "hf_hub_id", "state_dict", "source"):  # weights come from this folder, or nowhere
        pretrained_cfg.pop(key, None)
    if pretrained:
        found = [p for p in ("model.safetensors", "pytorch_model.bin") if os.path.isfile(os.path.join(folder, p))]
        if not found:
            raise FileNotFoundError(
                f"{folder!r} has neither model.safetensors nor pytorch_model.bin to load with `pretrained=True`."
            )
        pretrained_cfg["file"] = os.path.join(folder, found[0])
    model = timm.create_model(
        config["architecture"], pretrained=pretrained, pretrained_cfg_overlay=pretrained_cfg, **model_args
    )
    if num_classes is not None and num_classes != model_args["num_classes"]:
        model.reset_classifier(num_classes)
    _set_timm_labels(model, label_names or config.get("label_names") or pretrained_cfg.get("label_names"))
    return model


def _create_transformers(source: Any, num_classes: int | None, pretrained: bool, label_names, **kwargs: Any):
    from transformers import AutoConfig, AutoModelForImageClassification, PretrainedConfig

    head: dict[str, Any] = {}
    if label_names is not None:
        head = {"num_labels": len(label_names), "id2label": dict(enumerate(label_names)),
                "label2id": {n: i for i, n in enumerate(label_names)}}
    elif num_classes is not None:
        head = {"num_labels": num_classes}
    if isinstance(source, PretrainedConfig):
        for key, value in head.items():
            setattr(source, key, value)
        return AutoModelForImageClassification.from_config(source, **kwargs)
    if pretrained:
        return AutoModelForImageClassification.from_pretrained(
            source, **head, ignore_mismatched_sizes=bool(head), **kwargs
        )
    return AutoModelForImageClassification.from_config(AutoConfig.from_pretrained(source, **head), **kwargs)


def forward_logits(model: nn.Module, pixel_values: Tensor) -> Tensor:
    """Logits `(B, num_classes)` of a timm or transformers classifier."""
    if is_transformers_model(model):
        return model(pixel_values=pixel_values).logits
    return model(pixel_values)


def classification_loss(
    model: nn.Module, pixel_values: Tensor, labels: Tensor, num_items_in_batch: int | Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Cross-entropy and logits for a batch, the same way for timm and transformers models.

    The loss is the mean over the batch, or `sum / num_items_in_batch` when that is given (the Trainer passes the
    number of labels over all gradient-accumulation micro-batches, so that unequal micro-batches weigh right).
    It is computed here rather than by a transformers model's own head so that both kinds of model give the same
    number for the same logits.
    """
    logits = forward_logits(model, pixel_values)
    if num_items_in_batch is None:
        loss = F.cross_entropy(logits.float(), labels)
    else:
        loss = F.cross_entropy(logits.float(), labels, reduction="sum") / num_items_in_batch
    return loss, logits


def input_shape(model: nn.Module, input_size: int | tuple[int, ...] | None = None) -> tuple[int, int, int]:
    """`(C, H, W)` of `model`'s input: from `input_size` (a square side, `(H, W)` or `(C, H, W)`), else from the
    model's config (timm's `pretrained_cfg["input_size"]`, transformers' `config.image_size` / `num_channels`); what
    the ONNX and Core ML exports trace with."""
    hf = is_transformers_model(model)
    channels = int(getattr(model.config, "num_channels", 3) or 3) if hf else 3
    if input_size is None:
        config = getattr(model, "pretrained_cfg", None) or {}
        input_size = getattr(model.config, "image_size", None) if hf else config.get("input_size")
    if isinstance(input_size, int) and not isinstance(input_size, bool) and input_size > 0:
        return channels, input_size, input_size
    if isinstance(input_size, (tuple, list)) and len(input_size) in (2, 3) and all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in input_size
    ):
        return (channels, *input_size) if len(input_size) == 2 else tuple(input_size)  # type: ignore[return-value]
    raise ValueError(f"`input_size` must be a positive int (square side), `(H, W)` or `(C, H, W)`, got "
                     f"{input_size!r}; pass it when the model's config gives none.")


class LogitsModule(nn.Module):
    """`pixel_values -> logits` for a timm or transformers classifier ([`forward_logits`]): the one-tensor signature
    the ONNX and Core ML exports trace."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: Tensor) -> Tensor:
        return forward_logits(self.model, pixel_values)
