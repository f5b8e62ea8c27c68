"""Low-bit quantization of hf-r2 models: uniform weight fake-quantization and batch-norm re-estimation.

```python
>>> from hf_r2.quant import WeightQuantConfig, quantize_weights, reestimate_bn_stats
>>> qmodel = quantize_weights(model, WeightQuantConfig(bits=2, scale_method="mse"))
>>> qmodel = reestimate_bn_stats(qmodel, train_loader, num_batches=10)
```
"""

from .api import WEIGHT_QUANT_CONFIG_NAME as WEIGHT_QUANT_CONFIG_NAME
from .api import WeightQuantConfig as WeightQuantConfig
from .api import quantize_weights as quantize_weights
from .api import quantize_weights_ as quantize_weights_
from .bn import reestimate_bn_stats as reestimate_bn_stats
from .uniform import ScaleMethod as ScaleMethod
from .uniform import compute_qparams as compute_qparams
from .uniform import dequantize as dequantize
from .uniform import fake_quantize as fake_quantize
from .uniform import fake_quantize_affine as fake_quantize_affine
from .uniform import quantize as quantize

__all__ = [
    # stable
    "WeightQuantConfig",
    "WEIGHT_QUANT_CONFIG_NAME",
    "quantize_weights",
    "quantize_weights_",
    "reestimate_bn_stats",
    "fake_quantize",
    "fake_quantize_affine",
    "compute_qparams",
    "quantize",
    "dequantize",
    "ScaleMethod",
]
