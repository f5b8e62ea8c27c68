"""hf-r2: R2-Loss (Range Restriction Loss) for timm and Hugging Face vision models, for 1- and 2-bit quantization."""

__version__ = "0.1.0"

from .config import R2_CONFIG_NAME as R2_CONFIG_NAME
from .config import R2Config as R2Config
from .config import R2LossType as R2LossType
from .losses import kurtosis_r2 as kurtosis_r2
from .losses import linf_r2 as linf_r2
from .losses import margin_r2 as margin_r2
from .losses import soft_min_max_init_alpha as soft_min_max_init_alpha
from .losses import soft_min_max_r2 as soft_min_max_r2
from .regularizer import R2Regularizer as R2Regularizer
from .regularizer import find_target_modules as find_target_modules
