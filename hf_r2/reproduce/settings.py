"""How one low-bit setting of `hf-r2 reproduce` (an entry of [`ReproduceConfig`]'s `low_bit`) is applied to a float
model: its `hf_r2.quant` config, and PTQ, QAT + fine-tune, k-means or DKM + fine-tune on the model.

`benchmarks/quant_toolkit.py` reuses these two functions, so both measure the same low-bit rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from ..quant import PalettizeConfig, PTQConfig, QATConfig
    from .config import ReproduceConfig

__all__ = ["quant_config", "apply_setting"]


def quant_config(setting: dict[str, Any], config: ReproduceConfig) -> PTQConfig | QATConfig | PalettizeConfig:
    """The `hf_r2.quant` config of a low-bit setting.

    Every row keeps the first and the last layer at 8 bits: [`~hf_r2.quant.PTQConfig`] and
    [`~hf_r2.quant.QATConfig`] by their default `first_last_bits=8`, [`~hf_r2.quant.PalettizeConfig`] (k-means and
    DKM) by `first_last_bits=8` (256-entry palettes on those two layers).

    Args:
        setting (`dict`):
            A full setting, as in [`ReproduceConfig`]'s `low_bit` after normalisation (every key present, e.g.
            `config.setting(name)`).
        config ([`ReproduceConfig`]):
            Gives `adaround_iters` (AdaRound rows).

    Returns:
        [`~hf_r2.quant.PTQConfig`] (`method="ptq"`, BN re-estimated, all calibration batches),
        [`~hf_r2.quant.QATConfig`] (`"qat"`) or [`~hf_r2.quant.PalettizeConfig`] (`"kmeans"`, `"dkm"`).
    """
    from ..quant import PalettizeConfig, PTQConfig, QATConfig

    method = setting["method"]
    if method == "ptq":
        adaround = setting["rounding"] == "adaround"
        return PTQConfig(
            w_bits=setting["w_bits"],
            a_bits=setting["a_bits"],
            per_channel=setting["per_channel"],
            weight_range=setting["weight_range"],
            rounding=setting["rounding"],
            adaround={"iters": config.adaround_iters} if adaround and config.adaround_iters else None,
            bn="reestimate",
            calibration_batches=10**6,  # all of them: their number is set by `calibration_samples`
        )
    if method == "qat":
        return QATConfig(w_bits=setting["w_bits"], a_bits=setting["a_bits"], per_channel=setting["per_channel"])
    return PalettizeConfig(bits=setting["w_bits"], method=method, first_last_bits=8)


def _finetune(model, train_ds, config: ReproduceConfig, seed: int) -> None:
    """The QAT / DKM fine-tune: AdamW, cosine, no weight decay, R2 off, the same for every variant."""
    from ..data import collate_fn
    from ..loop import finetune

    finetune(model, train_ds, learning_rate=config.finetune_lr, per_device_batch_size=config.batch_size,
             num_epochs=config.finetune_epochs, max_steps=config.finetune_max_steps or -1, seed=seed,
             collate_fn=collate_fn)
    model.eval()


def apply_setting(
    model: nn.Module, setting: dict[str, Any], data: dict[str, Any], config: ReproduceConfig, seed: int
) -> nn.Module:
    """Make `model` the low-bit model of `setting`, in place.

    PTQ: [`~hf_r2.quant.quantize_`] (BN re-estimated); QAT: [`~hf_r2.quant.prepare_qat`] + the fine-tune; k-means:
    [`~hf_r2.quant.palettize_`]; DKM: [`~hf_r2.quant.prepare_dkm`] + the fine-tune + [`~hf_r2.quant.finalize_dkm`];
    k-means and DKM then re-estimate BN. The fine-tune (AdamW, cosine, no weight decay, R2 off) takes `batch_size`,
    `finetune_lr`, `finetune_epochs` and `finetune_max_steps` from `config`.

    Args:
        model (`nn.Module`):
            A float model; pass a copy to keep the original.
        setting (`dict`):
            A full setting (see [`quant_config`]).
        data (`dict`):
            `"calibration"`: a list of batches (activation calibration, AdaRound, BN re-estimation); `"train"`: the
            fine-tuning dataset (items for [`hf_r2.data.collate_fn`]; only QAT and DKM read it).
        config ([`ReproduceConfig`]):
            Gives `adaround_iters` and the fine-tune's settings.
        seed (`int`):
            Seed of the fine-tune.

    Returns:
        `nn.Module`: `model` itself.
    """
    from ..quant import finalize_dkm, palettize_, prepare_dkm, prepare_qat, quantize_, reestimate_bn_stats

    calibration = data["calibration"]
    qconfig = quant_config(setting, config)
    method = setting["method"]
    if method == "ptq":
        quantize_(model, qconfig, calibration)
        return model
    if method == "qat":
        prepare_qat(model, qconfig, calibration)
        _finetune(model, data["train"], config, seed)
        return model
    if method == "dkm":
        prepare_dkm(model, qconfig)
        _finetune(model, data["train"], config, seed)
        finalize_dkm(model)
    else:
        palettize_(model, qconfig)
    reestimate_bn_stats(model, calibration, num_batches=None)
    return model
