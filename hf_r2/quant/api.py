"""The one quantization verb, `quantize_(model, config, calibration_data)`: it dispatches on the config's type, as
torchao's `quantize_` does, to the per-method verb that stays public beside it.

| config | verb run | then |
|---|---|---|
| `PTQConfig` | [`~hf_r2.quant.ptq.post_training_quantize_`] | evaluate, or export with `save_low_bit` |
| `QATConfig` | [`~hf_r2.quant.qat.prepare_qat`] | train (LSQ step sizes learnt), then export |
| `PalettizeConfig(method="kmeans")` | [`~hf_r2.quant.palettize_`] | export |
| `PalettizeConfig(method="dkm")` | [`~hf_r2.quant.prepare_dkm`] | train, then [`~hf_r2.quant.finalize_dkm`] |

Data-free weight-only PTQ is `PTQConfig(a_bits=None, bn="keep")` (round to nearest): no calibration data needed,
and the result exports with `save_low_bit` like any other.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from .._finite import check_finite_model
from .cluster.dkm import prepare_dkm
from .cluster.palettize import PalettizeConfig, PalettizeMethod, palettize_
from .ptq.post_training import PTQConfig, post_training_quantize_
from .qat import QATConfig, prepare_qat

__all__ = ["quantize_"]


def quantize_(
    model: nn.Module, config: PTQConfig | QATConfig | PalettizeConfig, calibration_data: Iterable[Any] | None = None
) -> nn.Module:
    """Quantize or palettize `model` in place as `config` says, and return it.

    - `PTQConfig`: post-training quantization ([`~hf_r2.quant.ptq.post_training_quantize_`]); `calibration_data`
      is needed for activations, AdaRound and BN folding / re-estimation, not for
      `PTQConfig(a_bits=None, bn="keep")`.
    - `QATConfig`: prepares quantization-aware training ([`~hf_r2.quant.qat.prepare_qat`]; `calibration_data`
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
        config (`PTQConfig`, `QATConfig` or `PalettizeConfig`):
            What to do; any other type raises a `TypeError`.
        calibration_data (iterable of batches, *optional*):
            Batches as dicts with `"pixel_values"` (or `(images, labels)` pairs), for PTQ and QAT; palettization
            uses none.

    Returns:
        `torch.nn.Module`: `model` itself.
    """
    check_finite_model(model, "the model to quantize")  # NaN / inf would give NaN scales
    if isinstance(config, PTQConfig):
        return post_training_quantize_(model, config, calibration_data)
    if isinstance(config, QATConfig):
        return prepare_qat(model, config, calibration_data)
    if isinstance(config, PalettizeConfig):
        if config.method == PalettizeMethod.DKM.value:
            return prepare_dkm(model, config)
        return palettize_(model, config)
    raise TypeError(
        f"`quantize_` takes a `PTQConfig`, `QATConfig` or `PalettizeConfig` (method 'kmeans' or 'dkm'), got "
        f"{type(config).__name__}."
    )
