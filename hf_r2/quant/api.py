"""The one quantization verb, `quantize_(model, config, calibration_data)`: it looks the config's type up in a
registry, as torchao's `quantize_` does, and runs the handler its family registered there with
[`register_quantize_handler`]; the per-method verbs stay public beside it. A new method is one module (its config
and its verb) plus one registration.

| config | handler run | then |
|---|---|---|
| `PTQConfig` | [`~hf_r2.quant.post_training_quantize_`] | evaluate, or export with `save_low_bit` |
| `AdaRoundConfig` | [`~hf_r2.quant.adaround_`] (on a model PTQ quantized) | evaluate, or export |
| `BlockReconstructionConfig` | [`~hf_r2.quant.reconstruct_blocks_`] (BRECQ / QDrop) | evaluate, or export |
| `EqualizeConfig` | [`~hf_r2.quant.equalize_`] (cross-layer equalization) | quantize |
| `MagRConfig` | [`~hf_r2.quant.magr_`] | quantize |
| `QATConfig` | [`~hf_r2.quant.prepare_qat`] | train (LSQ step sizes learnt), then export |
| `PalettizeConfig(method="kmeans")` | [`~hf_r2.quant.palettize_`] | export |
| `PalettizeConfig(method="dkm")` | [`~hf_r2.quant.prepare_dkm`] | train, then [`~hf_r2.quant.finalize_dkm`] |

Data-free weight-only PTQ is `PTQConfig(a_bits=None, bn="keep")` (round to nearest): no calibration data needed,
and the result exports with `save_low_bit` like any other.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from torch import nn

from .._finite import check_finite_model

__all__ = ["quantize_", "register_quantize_handler", "registered_quantize_configs"]

H = TypeVar("H", bound=Callable[..., nn.Module])

# config class -> handler(model, config, calibration_data); each family registers its own configs on import
_HANDLERS: dict[type, Callable[..., nn.Module]] = {}


def register_quantize_handler(config_cls: type) -> Callable[[H], H]:
    """Decorator: [`quantize_`] runs the decorated `handler(model, config, calibration_data) -> model` for configs
    of type `config_cls` (and its subclasses). Registering a class twice replaces its handler, with a warning.

    ```python
    >>> @register_quantize_handler(MyConfig)
    ... def _my_method(model, config, calibration_data=None):
    ...     ...
    ...     return model
    ```
    """
    if not isinstance(config_cls, type):
        raise TypeError(f"`register_quantize_handler` takes a config class, got {config_cls!r}.")

    def decorator(handler: H) -> H:
        if config_cls in _HANDLERS and _HANDLERS[config_cls] is not handler:
            warnings.warn(f"`quantize_`'s handler for {config_cls.__name__} is replaced by {handler.__name__}.",
                          stacklevel=2)
        _HANDLERS[config_cls] = handler
        return handler

    return decorator


def registered_quantize_configs() -> tuple[type, ...]:
    """The config classes [`quantize_`] accepts, in the order they were registered."""
    return tuple(_HANDLERS)


def quantize_(model: nn.Module, config: Any, calibration_data: Iterable[Any] | None = None) -> nn.Module:
    """Quantize, palettize or prepare `model` in place as `config` says, and return it: the handler registered for
    `type(config)` runs (see the module docstring for the table).

    - `PTQConfig`: post-training quantization ([`~hf_r2.quant.post_training_quantize_`]); `calibration_data`
      is needed for activations, AdaRound and BN folding / re-estimation, not for
      `PTQConfig(a_bits=None, bn="keep")`.
    - `AdaRoundConfig`: learned rounding of a model already quantized ([`~hf_r2.quant.adaround_`]; needs
      `calibration_data`).
    - `BlockReconstructionConfig`: PTQ with block reconstruction, BRECQ / QDrop ([`~hf_r2.quant.reconstruct_blocks_`];
      needs `calibration_data`).
    - `EqualizeConfig` / `MagRConfig`: range reduction before quantizing ([`~hf_r2.quant.equalize_`],
      [`~hf_r2.quant.magr_`]).
    - `QATConfig`: prepares quantization-aware training ([`~hf_r2.quant.prepare_qat`]; `calibration_data`
      initialises the activation step sizes); train the model afterwards.
    - `PalettizeConfig(method="kmeans")`: data-free k-means palettization ([`~hf_r2.quant.palettize_`]).
    - `PalettizeConfig(method="dkm")`: prepares DKM ([`~hf_r2.quant.prepare_dkm`]); train the model, then
      [`~hf_r2.quant.finalize_dkm`] snaps each weight to its nearest learnt centroid.

    ```python
    >>> from hf_r2.quant import PalettizeConfig, PTQConfig, QATConfig, quantize_, save_low_bit
    >>> quantize_(model, PTQConfig(w_bits=2, a_bits=8), calibration_data=train_loader)  # W2A8 PTQ
    >>> quantize_(model, PTQConfig(w_bits=4, a_bits=None, bn="keep"))  # data-free, weight-only
    >>> quantize_(model, PalettizeConfig(bits=1))  # 2 shared values per tensor
    >>> save_low_bit(model, "outputs/resnet18-w2a8")
    ```

    Args:
        model (`torch.nn.Module`):
            A timm or transformers model (or any module with Conv/Linear layers).
        config (a registered config, e.g. `PTQConfig`, `QATConfig` or `PalettizeConfig`):
            What to do; a type with no registered handler raises a `TypeError` naming the registered ones.
        calibration_data (iterable of batches, *optional*):
            Batches as dicts with `"pixel_values"` (or `(images, labels)` pairs), for the methods that need data.

    Returns:
        `torch.nn.Module`: `model` itself.
    """
    handler = next((_HANDLERS[cls] for cls in type(config).__mro__ if cls in _HANDLERS), None)
    if handler is None:
        names = ", ".join(f"`{cls.__name__}`" for cls in _HANDLERS)
        raise TypeError(f"`quantize_` takes one of the registered configs ({names}), got {type(config).__name__}. "
                        "A new method registers its config with `register_quantize_handler`.")
    check_finite_model(model, "the model to quantize")  # NaN / inf would give NaN scales
    return handler(model, config, calibration_data)
