"""hf-r2: R2-Loss (Range Restriction Loss) for timm and Hugging Face vision models, for 1- and 2-bit quantization.

Paper: "R2 Loss: Range Restriction Loss for Model Compression and Quantization", Kundu et al., 2023
(https://huggingface.co/papers/2303.08253).

The top level holds the R2 core (losses, [`R2Config`], [`R2Regularizer`]), training ([`R2Trainer`] with
[`R2TrainingArguments`], [`train_with_accelerate`]), data, models and the Hub. The low-bit toolkit is `hf_r2.quant`
(`from hf_r2.quant import quantize_, PTQConfig, ...`) and the paper's comparison `hf_r2.reproduce`; neither is
imported by `import hf_r2`.
"""

from typing import TYPE_CHECKING

# The names below load on first use (PEP 562), so that `hf-r2 --help` and `import hf_r2.cli` do not import torch,
# transformers and timm; `from hf_r2 import R2Trainer` works as before.
_LAZY = {
    "find_target_modules": "._targets",
    "R2_CONFIG_NAME": ".config",
    "R2Config": ".config",
    "R2LossType": ".config",
    "build_transform": ".data",
    "collate_fn": ".data",
    "label_names": ".data",
    "load_image_dataset": ".data",
    "with_transforms": ".data",
    "HubPushError": ".hub",
    "R2Pretrained": ".hub",
    "download": ".hub",
    "from_pretrained": ".hub",
    "push_to_hub": ".hub",
    "train_with_accelerate": ".loop",
    "LoopConfig": ".loop_config",
    "kurtosis_r2": ".losses",
    "linf_r2": ".losses",
    "margin_r2": ".losses",
    "soft_min_max_init_alpha": ".losses",
    "soft_min_max_r2": ".losses",
    "compute_accuracy": ".metrics",
    "evaluate_accuracy": ".metrics",
    "build_model_card": ".model_card",
    "classification_loss": ".models",
    "create_model": ".models",
    "R2Regularizer": ".regularizer",
    "R2_STATS_NAME": ".saving",
    "save_model_folder": ".saving",
    "R2_STATE_NAME": ".trainer",
    "R2Trainer": ".trainer",
    "R2TrainingArguments": ".training_args",
    "__version__": ".version",
}
# Generated from the table, so a name cannot be importable yet missing from `__all__` (or the reverse);
# tests/test_init.py checks the TYPE_CHECKING block below against the same table.
__all__ = list(_LAZY)

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from ._targets import find_target_modules as find_target_modules
    from .config import R2_CONFIG_NAME as R2_CONFIG_NAME
    from .config import R2Config as R2Config
    from .config import R2LossType as R2LossType
    from .data import build_transform as build_transform
    from .data import collate_fn as collate_fn
    from .data import label_names as label_names
    from .data import load_image_dataset as load_image_dataset
    from .data import with_transforms as with_transforms
    from .hub import HubPushError as HubPushError
    from .hub import R2Pretrained as R2Pretrained
    from .hub import download as download
    from .hub import from_pretrained as from_pretrained
    from .hub import push_to_hub as push_to_hub
    from .loop import train_with_accelerate as train_with_accelerate
    from .loop_config import LoopConfig as LoopConfig
    from .losses import kurtosis_r2 as kurtosis_r2
    from .losses import linf_r2 as linf_r2
    from .losses import margin_r2 as margin_r2
    from .losses import soft_min_max_init_alpha as soft_min_max_init_alpha
    from .losses import soft_min_max_r2 as soft_min_max_r2
    from .metrics import compute_accuracy as compute_accuracy
    from .metrics import evaluate_accuracy as evaluate_accuracy
    from .model_card import build_model_card as build_model_card
    from .models import classification_loss as classification_loss
    from .models import create_model as create_model
    from .regularizer import R2Regularizer as R2Regularizer
    from .saving import R2_STATS_NAME as R2_STATS_NAME
    from .saving import save_model_folder as save_model_folder
    from .trainer import R2_STATE_NAME as R2_STATE_NAME
    from .trainer import R2Trainer as R2Trainer
    from .training_args import R2TrainingArguments as R2TrainingArguments
    from .version import __version__ as __version__


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))

