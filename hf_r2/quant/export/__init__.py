"""The export family: what the quantized and palettized models become on disk. `low_bit` (safetensors: integer
codes + scales, or palette + indices, and the loader back), `onnx_export` (QDQ graphs, with its graph helper
`_onnx_graph`, the int8 storage `_onnx_int8` and `onnx_latency`), `coreml_export` (`.mlpackage`, with its weights
helper `_coreml_weights`), and `_optional`, the one copy of the checks for the optional packages they need.

`hf_r2.quant.export` was one module before (the safetensors export); its names (`save_low_bit`, `load_low_bit`, ...)
still import from here. ONNX and Core ML load only their optional packages inside their functions.
"""

from ._optional import is_coremltools_available as is_coremltools_available
from ._optional import is_onnx_available as is_onnx_available
from .coreml_export import compare_coreml_weights as compare_coreml_weights
from .coreml_export import export_coreml as export_coreml
from .low_bit import FORMAT_VERSION as FORMAT_VERSION
from .low_bit import LOW_BIT_CONFIG_NAME as LOW_BIT_CONFIG_NAME
from .low_bit import LOW_BIT_WEIGHTS_NAME as LOW_BIT_WEIGHTS_NAME
from .low_bit import LowBitLayer as LowBitLayer
from .low_bit import is_low_bit_folder as is_low_bit_folder
from .low_bit import load_low_bit as load_low_bit
from .low_bit import low_bit_layers as low_bit_layers
from .low_bit import pack_bits as pack_bits
from .low_bit import save_low_bit as save_low_bit
from .low_bit import size_report as size_report
from .low_bit import unpack_bits as unpack_bits
from .onnx_export import compare_onnx as compare_onnx
from .onnx_export import export_onnx as export_onnx
from .onnx_export import onnx_accuracy as onnx_accuracy

__all__ = [
    # safetensors (the names of the former module hf_r2.quant.export)
    "LOW_BIT_CONFIG_NAME",
    "LOW_BIT_WEIGHTS_NAME",
    "LowBitLayer",
    "low_bit_layers",
    "pack_bits",
    "unpack_bits",
    "size_report",
    "save_low_bit",
    "load_low_bit",
    "is_low_bit_folder",
    # ONNX and Core ML
    "export_onnx",
    "compare_onnx",
    "onnx_accuracy",
    "is_onnx_available",
    "export_coreml",
    "compare_coreml_weights",
    "is_coremltools_available",
]
