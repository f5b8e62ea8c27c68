"""Turning a float model into one low-bit model: a `hf_r2.quant` config applied with the fine-tune QAT and DKM need
and the BN re-estimation palettes need. The one place where `hf-r2 ptq / qat / compress` and `hf-r2 reproduce` (and
`benchmarks/quant_toolkit.py`) apply a low-bit setting, so that they measure the same thing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from ..quant import BlockReconstructionConfig, PalettizeConfig, PTQConfig, QATConfig
    from .config import ReproduceConfig

__all__ = ["PRE_STEPS", "apply_pre_steps", "apply_low_bit_", "apply_setting"]

#: The range reductions a float model can get before quantization (`hf-r2 ptq --pre`, a setting's `pre`).
PRE_STEPS = ("cle", "magr")


def apply_pre_steps(model: nn.Module, steps: list[str], calibration: list[Any]) -> list[dict[str, Any]]:
    """Range reductions of a float model before it is quantized, in place, in the order given: `"cle"`
    ([`~hf_r2.quant.equalize_`], batch norms folded first) and `"magr"` ([`~hf_r2.quant.magr_`]), each with its
    config's defaults, on the calibration batches. Returns what an export records: `{"step", "config"}` per step."""
    from ..quant import EqualizeConfig, MagRConfig, equalize_, magr_

    steps_of = {"cle": (EqualizeConfig, equalize_), "magr": (MagRConfig, magr_)}
    done = []
    for step in steps:
        if step not in steps_of:
            raise ValueError(f"The range reductions are {', '.join(map(repr, PRE_STEPS))}, got {step!r}.")
        config_class, verb = steps_of[step]
        config = config_class()
        verb(model, config, calibration)
        done.append({"step": step, "config": config.to_dict()})
    return done


def apply_low_bit_(
    model: nn.Module,
    config: PTQConfig | BlockReconstructionConfig | QATConfig | PalettizeConfig,
    calibration: list[Any] | None,
    *,
    train_dataset: Any = None,
    finetune: dict[str, Any] | None = None,
    bn_reestimate: bool = True,
) -> nn.Module:
    """Make `model` the low-bit model of `config`, in place, and return it.

    - [`~hf_r2.quant.PTQConfig`]: [`~hf_r2.quant.quantize_`] with `calibration` (BN handled as the config says);
    - [`~hf_r2.quant.BlockReconstructionConfig`]: [`~hf_r2.quant.quantize_`] (BRECQ, or QDrop with `drop_prob > 0`:
      round-to-nearest grids, then each block's rounding and activation steps learnt on `calibration`; BN kept);
    - [`~hf_r2.quant.QATConfig`]: [`~hf_r2.quant.quantize_`] (LSQ grids initialised on `calibration`), then the
      fine-tune;
    - [`~hf_r2.quant.PalettizeConfig`] with `method="kmeans"`: [`~hf_r2.quant.quantize_`] (k-means palettes),
      then BN re-estimation on every calibration batch;
    - `method="dkm"`: [`~hf_r2.quant.quantize_`] (DKM parametrization), the fine-tune,
      [`~hf_r2.quant.finalize_dkm`] (hard palettes), then BN re-estimation.

    Args:
        model (`nn.Module`):
            A float model; pass a copy to keep the original.
        config:
            The low-bit method and its grid.
        calibration (`list` of batches, *optional*):
            `{"pixel_values", "labels"}` batches of training images with the evaluation transform: activation
            ranges, AdaRound, block reconstruction, LSQ initialisation and BN re-estimation. `None` only for
            data-free configs.
        train_dataset (*optional*):
            The fine-tuning dataset (items for [`hf_r2.data.collate_fn`]); QAT and DKM only.
        finetune (`dict`, *optional*):
            Keyword arguments of [`hf_r2.loop.finetune`] (`learning_rate`, `per_device_batch_size`, `num_epochs`,
            `max_steps`, `weight_decay`, `seed`, `r2_config`); required for QAT and DKM.
        bn_reestimate (`bool`, *optional*, defaults to `True`):
            Re-estimate BN statistics after palettization (k-means and DKM). PTQ follows its config's `bn` field.
    """
    from ..quant import PalettizeConfig, QATConfig, finalize_dkm, quantize_, reestimate_bn_stats

    trains = isinstance(config, QATConfig) or (isinstance(config, PalettizeConfig) and config.method == "dkm")
    if trains and (train_dataset is None or finetune is None):
        raise ValueError(f"{type(config).__name__}(method={getattr(config, 'method', 'qat')!r}) fine-tunes the "
                         "model: pass `train_dataset` and the `finetune` keyword arguments.")
    quantize_(model, config, calibration)
    if trains:
        from ..data import collate_fn
        from ..loop import finetune as run_finetune

        run_finetune(model, train_dataset, collate_fn=collate_fn, **finetune)
        model.eval()
    if isinstance(config, PalettizeConfig):
        if config.method == "dkm":
            finalize_dkm(model)
        if bn_reestimate:
            reestimate_bn_stats(model, calibration, num_batches=None)
    return model


def apply_setting(
    model: nn.Module,
    setting: dict[str, Any],
    config: ReproduceConfig,
    seed: int,
    *,
    calibration: list[Any],
    train_dataset: Any = None,
) -> nn.Module:
    """Make `model` the low-bit model of one `hf-r2 reproduce` setting, in place: its `pre` range reductions
    ([`apply_pre_steps`]), then [`apply_low_bit_`] with
    [`~hf_r2.reproduce.variants.quant_config`] and the config's fixed fine-tune (AdamW, cosine, no weight decay, R2
    off, the same for every variant: `batch_size`, `finetune_lr`, `finetune_epochs`, `finetune_max_steps`, or the
    setting's own `finetune_steps`).

    Args:
        model (`nn.Module`):
            A float model; pass a copy to keep the original.
        setting (`dict`):
            A full setting, as in [`ReproduceConfig`]'s `low_bit` after normalisation (`config.setting(name)`).
        config ([`ReproduceConfig`]):
            Gives the quant config's `adaround_iters` (AdaRound rows without their own `iters`) and the fine-tune's
            settings.
        seed (`int`):
            Seed of the fine-tune.
        calibration (`list` of batches):
            Calibration batches (see [`apply_low_bit_`]).
        train_dataset (*optional*):
            The fine-tuning dataset; only QAT and DKM read it.
    """
    from .variants import quant_config

    finetune = {"learning_rate": config.finetune_lr, "per_device_batch_size": config.batch_size,
                "num_epochs": config.finetune_epochs,
                "max_steps": setting.get("finetune_steps") or config.finetune_max_steps or -1, "seed": seed}
    qconfig = quant_config(setting, config.adaround_iters)
    apply_pre_steps(model, setting.get("pre") or [], calibration)
    return apply_low_bit_(model, qconfig, calibration, train_dataset=train_dataset, finetune=finetune)
