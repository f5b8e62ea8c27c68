"""Low-bit quantization and compression of hf-r2 models: one verb, `quantize_(model, config, calibration_data)`,
that dispatches on the config (PTQ, QAT with LSQ, weight clustering by k-means or DKM), the per-method verbs beside
it, plain dataclass configs that round-trip through JSON, a low-bit export, and the results table.

```python
>>> from hf_r2.quant import PTQConfig, QATConfig, PalettizeConfig, quantize_, save_low_bit
>>> quantize_(model, PTQConfig(w_bits=2, a_bits=8, rounding="adaround"), calibration_data=train_loader)  # PTQ
>>> quantize_(model, QATConfig(w_bits=2, a_bits=2), calibration_data=train_loader)  # then train as usual
>>> quantize_(model, PalettizeConfig(bits=1, method="kmeans"))  # 2 shared values per tensor
>>> save_low_bit(model, "outputs/resnet18-w2a8")  # integer codes + scales, or palette + indices
```
"""

from .api import quantize_ as quantize_
from .api import register_quantize_handler as register_quantize_handler
from .api import registered_quantize_configs as registered_quantize_configs
from .calibrate import calibrate_activations_ as calibrate_activations_
from .cluster import PALETTIZE_CONFIG_NAME as PALETTIZE_CONFIG_NAME
from .cluster import DKMParametrization as DKMParametrization
from .cluster import PalettizeConfig as PalettizeConfig
from .cluster import PalettizeMethod as PalettizeMethod
from .cluster import finalize_dkm as finalize_dkm
from .cluster import is_dkm_prepared as is_dkm_prepared
from .cluster import kmeans_1d as kmeans_1d
from .cluster import palette_indices as palette_indices
from .cluster import palettize as palettize
from .cluster import palettize_ as palettize_
from .cluster import prepare_dkm as prepare_dkm
from .export import LOW_BIT_CONFIG_NAME as LOW_BIT_CONFIG_NAME
from .export import LowBitLayer as LowBitLayer
from .export import compare_coreml_weights as compare_coreml_weights
from .export import compare_onnx as compare_onnx
from .export import export_coreml as export_coreml
from .export import export_onnx as export_onnx
from .export import is_low_bit_folder as is_low_bit_folder
from .export import load_low_bit as load_low_bit
from .export import low_bit_layers as low_bit_layers
from .export import onnx_accuracy as onnx_accuracy
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
from .ptq import ADAROUND_CONFIG_NAME as ADAROUND_CONFIG_NAME
from .ptq import BLOCK_RECONSTRUCTION_CONFIG_NAME as BLOCK_RECONSTRUCTION_CONFIG_NAME
from .ptq import EQUALIZE_CONFIG_NAME as EQUALIZE_CONFIG_NAME
from .ptq import MAGR_CONFIG_NAME as MAGR_CONFIG_NAME
from .ptq import PTQ_CONFIG_NAME as PTQ_CONFIG_NAME
from .ptq import AdaRoundConfig as AdaRoundConfig
from .ptq import BlockReconstructionConfig as BlockReconstructionConfig
from .ptq import EqualizeConfig as EqualizeConfig
from .ptq import MagRConfig as MagRConfig
from .ptq import PTQConfig as PTQConfig
from .ptq import adaround as adaround
from .ptq import adaround_ as adaround_
from .ptq import correct_bias_ as correct_bias_
from .ptq import equalize_ as equalize_
from .ptq import find_blocks as find_blocks
from .ptq import fold_bn as fold_bn
from .ptq import fold_bn_ as fold_bn_
from .ptq import low_bit_table as low_bit_table
from .ptq import magr_ as magr_
from .ptq import post_training_quantize_ as post_training_quantize_
from .ptq import reconstruct_blocks_ as reconstruct_blocks_
from .ptq import reestimate_bn_stats as reestimate_bn_stats
from .qat import QAT_CONFIG_NAME as QAT_CONFIG_NAME
from .qat import QATConfig as QATConfig
from .qat import prepare_qat as prepare_qat
from .results import DATA_FIELDS as DATA_FIELDS
from .results import LOW_BIT_RESULTS_NAME as LOW_BIT_RESULTS_NAME
from .results import float_row as float_row
from .results import format_setting as format_setting
from .results import format_table as format_table
from .results import parse_setting as parse_setting
from .results import read_results as read_results
from .results import row_key as row_key
from .results import update_results as update_results
from .uniform import ScaleMethod as ScaleMethod
from .uniform import compute_qparams as compute_qparams
from .uniform import dequantize_tensor as dequantize_tensor
from .uniform import fake_quantize as fake_quantize
from .uniform import fake_quantize_affine as fake_quantize_affine
from .uniform import quantize_tensor as quantize_tensor

__all__ = [
    # the one verb, dispatching on the config type
    "quantize_",
    "register_quantize_handler",
    "registered_quantize_configs",
    # PTQ
    "PTQConfig",
    "PTQ_CONFIG_NAME",
    "post_training_quantize_",
    "calibrate_activations_",
    "AdaRoundConfig",
    "ADAROUND_CONFIG_NAME",
    "adaround",
    "adaround_",
    "BlockReconstructionConfig",
    "BLOCK_RECONSTRUCTION_CONFIG_NAME",
    "reconstruct_blocks_",
    "find_blocks",
    # batch norms
    "reestimate_bn_stats",
    "fold_bn",
    "fold_bn_",
    # range reduction before PTQ, and bias correction after it
    "EqualizeConfig",
    "EQUALIZE_CONFIG_NAME",
    "equalize_",
    "correct_bias_",
    "MagRConfig",
    "MAGR_CONFIG_NAME",
    "magr_",
    # QAT
    "QATConfig",
    "QAT_CONFIG_NAME",
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
    "ScaleMethod",
    "compute_qparams",
    "quantize_tensor",
    "dequantize_tensor",
    "fake_quantize",
    "fake_quantize_affine",
    # export
    "LowBitLayer",
    "LOW_BIT_CONFIG_NAME",
    "low_bit_layers",
    "save_low_bit",
    "load_low_bit",
    "is_low_bit_folder",
    "size_report",
    "export_onnx",
    "compare_onnx",
    "onnx_accuracy",
    "export_coreml",
    "compare_coreml_weights",
    # results
    "LOW_BIT_RESULTS_NAME",
    "parse_setting",
    "format_setting",
    "float_row",
    "low_bit_table",
    "format_table",
    "read_results",
    "update_results",
    "row_key",
    "DATA_FIELDS",
]
