"""The weight-clustering family: post-training k-means palettization (`PalettizeConfig`, `palettize_`),
differentiable k-means during training (DKM: `prepare_dkm`, `finalize_dkm`), and the palette helper they share
(`_palette`: 1-D k-means, groups, the palette buffers). `quantize_` runs k-means or DKM for a `PalettizeConfig` by
its `method`: the handler is registered here, as `palettize.py` cannot import `dkm.py` (which imports it).
"""

from collections.abc import Iterable
from typing import Any

from torch import nn

from ..api import register_quantize_handler
from .dkm import DKMParametrization as DKMParametrization
from .dkm import finalize_dkm as finalize_dkm
from .dkm import is_dkm_prepared as is_dkm_prepared
from .dkm import prepare_dkm as prepare_dkm
from .palettize import PALETTIZE_CONFIG_NAME as PALETTIZE_CONFIG_NAME
from .palettize import PalettizeConfig as PalettizeConfig
from .palettize import PalettizeMethod as PalettizeMethod
from .palettize import kmeans_1d as kmeans_1d
from .palettize import palette_indices as palette_indices
from .palettize import palettize as palettize
from .palettize import palettize_ as palettize_

__all__ = [
    "PalettizeConfig",
    "PALETTIZE_CONFIG_NAME",
    "PalettizeMethod",
    "palettize",
    "palettize_",
    "kmeans_1d",
    "palette_indices",
    "prepare_dkm",
    "finalize_dkm",
    "is_dkm_prepared",
    "DKMParametrization",
]


@register_quantize_handler(PalettizeConfig)
def _palettize_handler(model: nn.Module, config: PalettizeConfig, calibration_data: Iterable[Any] | None) -> nn.Module:
    """k-means palettization ([`palettize_`], data-free), or DKM's preparation ([`prepare_dkm`]) with
    `method="dkm"`; `calibration_data` is not used."""
    if config.method == PalettizeMethod.DKM.value:
        return prepare_dkm(model, config)
    return palettize_(model, config)
