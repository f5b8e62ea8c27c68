"""The post-training quantization family: the PTQ verb (`PTQConfig`, `post_training_quantize_`) and the methods it
runs or that run before it: AdaRound (learned rounding), batch-norm folding and re-estimation, bias correction,
cross-layer equalization (CLE) and MagR, with the per-layer row helper AdaRound and MagR share (`_layer_rows`);
block reconstruction (BRECQ / QDrop: `block_reconstruction`, and `blocks`, which finds the blocks); and the PTQ
sweep over settings (`low_bit_table`).

`hf_r2.quant.ptq` was one module before; its names (`PTQConfig`, `post_training_quantize_`, ...) still import
from here.
"""

from ..calibrate import calibrate_activations_ as calibrate_activations_
from .adaround import ADAROUND_CONFIG_NAME as ADAROUND_CONFIG_NAME
from .adaround import AdaRoundConfig as AdaRoundConfig
from .adaround import adaround as adaround
from .adaround import adaround_ as adaround_
from .bias_correction import correct_bias_ as correct_bias_
from .block_reconstruction import BLOCK_RECONSTRUCTION_CONFIG_NAME as BLOCK_RECONSTRUCTION_CONFIG_NAME
from .block_reconstruction import BlockReconstructionConfig as BlockReconstructionConfig
from .block_reconstruction import reconstruct_blocks_ as reconstruct_blocks_
from .blocks import find_blocks as find_blocks
from .bn import fold_bn as fold_bn
from .bn import fold_bn_ as fold_bn_
from .bn import reestimate_bn_stats as reestimate_bn_stats
from .cle import EQUALIZE_CONFIG_NAME as EQUALIZE_CONFIG_NAME
from .cle import EqualizeConfig as EqualizeConfig
from .cle import equalize_ as equalize_
from .magr import MAGR_CONFIG_NAME as MAGR_CONFIG_NAME
from .magr import MagRConfig as MagRConfig
from .magr import magr_ as magr_
from .post_training import PTQ_CONFIG_NAME as PTQ_CONFIG_NAME
from .post_training import BNHandling as BNHandling
from .post_training import PTQConfig as PTQConfig
from .post_training import Rounding as Rounding
from .post_training import post_training_quantize_ as post_training_quantize_
from .sweep import low_bit_table as low_bit_table

__all__ = [
    # the verb (the names of the former module hf_r2.quant.ptq)
    "PTQConfig",
    "PTQ_CONFIG_NAME",
    "BNHandling",
    "Rounding",
    "post_training_quantize_",
    "calibrate_activations_",
    "low_bit_table",
    # learned rounding
    "AdaRoundConfig",
    "ADAROUND_CONFIG_NAME",
    "adaround",
    "adaround_",
    # block reconstruction (BRECQ / QDrop)
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
    "MagRConfig",
    "MAGR_CONFIG_NAME",
    "magr_",
    "correct_bias_",
]
