"""The weight-clustering family: post-training k-means palettization (`PalettizeConfig`, `palettize_`),
differentiable k-means during training (DKM: `prepare_dkm`, `finalize_dkm`), and the palette helper they share
(`_palette`: 1-D k-means, groups, the palette buffers).
"""

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
