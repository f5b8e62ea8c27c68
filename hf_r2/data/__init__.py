"""Image-classification data for hf-r2: loading through 🤗 Datasets ([`loading`]), each model's own preprocessing
([`transforms`]) and the data flags of `hf-r2 train` ([`arguments`]).

```python
>>> from hf_r2.data import collate_fn, label_names, load_image_dataset, with_transforms
>>> ds = load_image_dataset("cifar10-tiny")  # the local copy under $HF_R2_DATA_DIR, else uoft-cs/cifar10
>>> train = with_transforms(ds["train"], model, train=True)  # rows {"pixel_values", "labels"}
```
"""

from .arguments import DataArguments as DataArguments
from .arguments import ModelArguments as ModelArguments
from .arguments import describe_data as describe_data
from .arguments import fit_input_size as fit_input_size
from .arguments import load_data as load_data
from .arguments import record_data_config as record_data_config
from .checks import canonical_dataset as canonical_dataset
from .checks import check_local_path as check_local_path
from .checks import match_labels as match_labels
from .checks import model_label_names as model_label_names
from .loading import HUB_FALLBACKS as HUB_FALLBACKS
from .loading import LOCAL_DATASETS as LOCAL_DATASETS
from .loading import VALIDATION_SEED as VALIDATION_SEED
from .loading import calibration_batches as calibration_batches
from .loading import find_local_data_dir as find_local_data_dir
from .loading import hub_dataset_id as hub_dataset_id
from .loading import label_names as label_names
from .loading import load_image_dataset as load_image_dataset
from .transforms import AugmentType as AugmentType
from .transforms import SeededTransformDataset as SeededTransformDataset
from .transforms import build_transform as build_transform
from .transforms import collate_fn as collate_fn
from .transforms import with_transforms as with_transforms

__all__ = [
    # loading
    "load_image_dataset",
    "label_names",
    "hub_dataset_id",
    "find_local_data_dir",
    "calibration_batches",
    "LOCAL_DATASETS",
    "HUB_FALLBACKS",
    "VALIDATION_SEED",
    # transforms
    "AugmentType",
    "SeededTransformDataset",
    "build_transform",
    "with_transforms",
    "collate_fn",
    # arguments
    "ModelArguments",
    "DataArguments",
    "load_data",
    "record_data_config",
    "fit_input_size",
    "describe_data",
    # checks
    "canonical_dataset",
    "check_local_path",
    "match_labels",
    "model_label_names",
]
