"""Low-bit quantization and compression of hf-r2 models: PTQ, QAT (LSQ) and weight clustering (k-means, DKM),
with one verb per step, plain dataclass configs that round-trip through JSON, and a low-bit export.

```python
>>> from hf_r2.quant import PTQConfig, QATConfig, PalettizeConfig, quantize_, prepare_qat, palettize_, save_low_bit
>>> quantize_(model, PTQConfig(w_bits=2, a_bits=8, rounding="adaround"), calibration_data=train_loader)  # PTQ
>>> prepare_qat(model, QATConfig(w_bits=2, a_bits=2), calibration_data=train_loader)  # then train as usual
>>> palettize_(model, PalettizeConfig(bits=1, method="kmeans"))  # 2 shared values per tensor
>>> save_low_bit(model, "outputs/resnet18-w2a8")  # integer codes + scales, or palette + indices
```
"""

from .adaround import ADAROUND_CONFIG_NAME as ADAROUND_CONFIG_NAME
from .adaround import AdaRoundConfig as AdaRoundConfig
from .adaround import adaround as adaround
from .adaround import adaround_ as adaround_
from .api import WEIGHT_QUANT_CONFIG_NAME as WEIGHT_QUANT_CONFIG_NAME
from .api import WeightQuantConfig as WeightQuantConfig
from .api import quantize_weights as quantize_weights
from .api import quantize_weights_ as quantize_weights_
from .bn import reestimate_bn_stats as reestimate_bn_stats
from .bn_fold import fold_bn as fold_bn
from .bn_fold import fold_bn_ as fold_bn_
from .dkm import DKMParametrization as DKMParametrization
from .dkm import finalize_dkm as finalize_dkm
from .dkm import is_dkm_prepared as is_dkm_prepared
from .dkm import prepare_dkm as prepare_dkm
from .export import LowBitLayer as LowBitLayer
from .export import convert as convert
from .export import is_low_bit_folder as is_low_bit_folder
from .export import load_low_bit as load_low_bit
from .export import save_low_bit as save_low_bit
from .export import size_report as size_report
from .layers import FakeQuantizer as FakeQuantizer
from .layers import QuantConv1d as QuantConv1d
from .layers import QuantConv2d as QuantConv2d
from .layers import QuantConv3d as QuantConv3d
from .layers import QuantLinear as QuantLinear
from .layers import dequantize_layers_ as dequantize_layers_
from .layers import quantized_layers as quantized_layers
from .observers import RangeObserver as RangeObserver
from .palettize import PALETTIZE_CONFIG_NAME as PALETTIZE_CONFIG_NAME
from .palettize import PalettizeConfig as PalettizeConfig
from .palettize import PalettizeMethod as PalettizeMethod
from .palettize import kmeans_1d as kmeans_1d
from .palettize import palette_indices as palette_indices
from .palettize import palettize as palettize
from .palettize import palettize_ as palettize_
from .ptq import PTQConfig as PTQConfig
from .ptq import calibrate_activations_ as calibrate_activations_
from .ptq import quantize_ as quantize_
from .qat import QATConfig as QATConfig
from .qat import prepare_qat as prepare_qat
from .report import evaluate as evaluate
from .report import format_table as format_table
from .report import low_bit_table as low_bit_table
from .uniform import ScaleMethod as ScaleMethod
from .uniform import compute_qparams as compute_qparams
from .uniform import dequantize as dequantize
from .uniform import fake_quantize as fake_quantize
from .uniform import fake_quantize_affine as fake_quantize_affine
from .uniform import quantize as quantize

__all__ = [
    # PTQ
    "PTQConfig",
    "quantize_",
    "calibrate_activations_",
    "WeightQuantConfig",
    "WEIGHT_QUANT_CONFIG_NAME",
    "quantize_weights",
    "quantize_weights_",
    "reestimate_bn_stats",
    "fold_bn",
    "fold_bn_",
    "AdaRoundConfig",
    "ADAROUND_CONFIG_NAME",
    "adaround",
    "adaround_",
    # QAT
    "QATConfig",
    "prepare_qat",
    # weight clustering
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
    # layers and grids
    "FakeQuantizer",
    "QuantConv1d",
    "QuantConv2d",
    "QuantConv3d",
    "QuantLinear",
    "dequantize_layers_",
    "quantized_layers",
    "RangeObserver",
    "fake_quantize",
    "fake_quantize_affine",
    "compute_qparams",
    "quantize",
    "dequantize",
    "ScaleMethod",
    # export and measurement
    "LowBitLayer",
    "convert",
    "save_low_bit",
    "load_low_bit",
    "is_low_bit_folder",
    "size_report",
    "evaluate",
    "low_bit_table",
    "format_table",
]
