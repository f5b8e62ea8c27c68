"""`hf-r2 reproduce CONFIG.yaml`: the paper's claim side by side, baseline and R2 variants trained alike, then every
low-bit result measured on each, in one resumable run.

Paper: "R2 Loss: Range Restriction Loss for Model Compression and Quantization", Kundu et al., 2023
(https://huggingface.co/papers/2303.08253). Its claim: a model trained with R2-Loss keeps more of its float accuracy
once quantized or palettized to 1 to 4 bits than the same model trained with ordinary weight decay alone.

What one [`ReproduceConfig`] runs:

1. **Trainings.** Every model x variant x seed with [`~hf_r2.R2Trainer`]: the same data, recipe (AdamW, cosine,
   `weight_decay`, augmentation) and seed for every variant; the `baseline` variant is `r2_weight=0` (ordinary
   weight decay only). The lambda sweep trains its variant at each lambda on the first seed. Each training is
   saved in `output_dir/runs/<model>/<variant>/seed<k>/` ([`~hf_r2.models.create_model`] loads it back).
2. **Low-bit rows.** For each trained model: FP top-1 and every configured low-bit setting, each on a copy of the
   float model: PTQ ([`~hf_r2.quant.quantize_`], BN re-estimated), QAT ([`~hf_r2.quant.prepare_qat`] + a fixed
   fine-tune), k-means ([`~hf_r2.quant.palettize_`], BN re-estimated) and DKM ([`~hf_r2.quant.prepare_dkm`] + the
   same fine-tune + [`~hf_r2.quant.finalize_dkm`], BN re-estimated). *Headline* settings run on every seed, the
   others on the first seed only; the sweep's trainings run the sweep's settings.
3. **Report.** `results.json` (every number per seed, mean and std over seeds for the headline rows),
   `results.md` (one table per model: rows = settings, columns = variants; the lambda sweep; time, seeds, data)
   and PNG plots ([`hf_r2.plots`]): weight histograms and per-layer ranges, baseline vs R2, and accuracy against
   bits.

First and last layer: every low-bit row keeps the first conv and the classifier at 8 bits, as the paper's
baselines do: PTQ and QAT through `first_last_bits=8`, k-means and DKM by a 256-entry palette on those two layers.
The QAT and DKM fine-tunes are the same for every variant and run without R2, so the columns differ by their
trained weights only. Calibration and BN re-estimation use `calibration_samples` training images (evaluation
transform); the data subsets are drawn with `data_seed`, so every seed and variant sees the same images.

Resuming: a training is done when its folder holds `reproduce_run.json` (written last); a rerun skips it, and
retrains a folder without it (an interrupted training). A folder trained with other settings is an error, not
silently reused. Each low-bit row is cached in the run folder's `low_bit_results.json` with the settings that
produced it and reused while they match, so an interrupted run continues where it stopped.

```bash
hf-r2 reproduce configs/reproduce.yaml              # about an hour on 2 CPU cores
hf-r2 reproduce configs/reproduce_tiny.yaml         # seconds: a smoke run of the whole pipeline
```
"""

from __future__ import annotations

import argparse
import copy
import enum
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from ._utils import JsonConfigMixin, check_choice, write_json_atomic, write_text_atomic
from .config import R2LossType

__all__ = [
    "ReproduceConfig",
    "LowBitMethod",
    "REPRODUCE_CONFIG_NAME",
    "RUN_INFO_NAME",
    "RESULTS_NAME",
    "REPORT_NAME",
    "DEFAULT_VARIANTS",
    "DEFAULT_LOW_BIT",
    "run_reproduce",
    "format_report",
    "reproduce_command_parser",
    "reproduce_command",
]

logger = logging.getLogger(__name__)

REPRODUCE_CONFIG_NAME = "reproduce_config.json"
RUN_INFO_NAME = "reproduce_run.json"
RESULTS_NAME = "results.json"
REPORT_NAME = "results.md"

BASELINE = "baseline"
_VARIANT_KEYS = ("name", "loss", "weight", "per_channel", "r2")
_SETTING_KEYS = ("name", "method", "w_bits", "a_bits", "per_channel", "weight_range", "rounding", "headline")
_SWEEP_KEYS = ("variant", "lambdas", "models", "settings")
# The R2Config fields a variant's `r2` may set (the loss, weight and per_channel are the variant's own keys).
_R2_EXTRA_KEYS = ("warmup_steps", "include", "exclude", "skip_first_last", "margin_penalty", "soft_min_max_penalty",
                  "kurtosis_target")


class LowBitMethod(str, enum.Enum):
    """How a low-bit row is made: post-training quantization, QAT, k-means or DKM palettization."""

    PTQ = "ptq"
    QAT = "qat"
    KMEANS = "kmeans"
    DKM = "dkm"


#: The default variants: the baseline and the four regularisers, each with its lambda (AdamW scale).
DEFAULT_VARIANTS: list[dict[str, Any]] = [
    {"name": "baseline", "loss": "baseline", "weight": 0.0},
    {"name": "linf", "loss": "linf", "weight": 3.0, "per_channel": True},
    {"name": "margin", "loss": "margin", "weight": 0.03, "per_channel": True},
    {"name": "soft_min_max", "loss": "soft_min_max", "weight": 3.0, "per_channel": True},
    {"name": "kurtosis", "loss": "kurtosis", "weight": 1.0, "per_channel": False},
]

#: The default low-bit rows: W8A8; W4A8 and W2A8 per tensor and per channel with max-abs / MSE ranges (headline) and
#: AdaRound; W2A2 QAT; 2- and 1-bit k-means (headline) and DKM.
DEFAULT_LOW_BIT: list[dict[str, Any]] = (
    [{"method": "ptq", "w_bits": 8, "a_bits": 8, "per_channel": True, "weight_range": "mse"}]
    + [
        {"method": "ptq", "w_bits": w, "a_bits": 8, "per_channel": pc, "weight_range": r, "rounding": rounding}
        for w in (4, 2)
        for pc in (False, True)
        for r, rounding in (("maxabs", "nearest"), ("mse", "nearest"), ("mse", "adaround"))
    ]
    + [{"method": "qat", "w_bits": 2, "a_bits": 2}]
    + [{"method": m, "w_bits": b} for m in ("kmeans", "dkm") for b in (2, 1)]
)


def _default_variants() -> list[dict[str, Any]]:
    return copy.deepcopy(DEFAULT_VARIANTS)


def _default_low_bit() -> list[dict[str, Any]]:
    return copy.deepcopy(DEFAULT_LOW_BIT)


# ----------------------------------------------------------------------------------------------------------------
# Config


def _check_keys(what: str, item: dict[str, Any], valid: tuple[str, ...]) -> None:
    unknown = sorted(set(item) - set(valid))
    if unknown:
        raise ValueError(f"{what} has unknown key(s) {unknown}; valid keys are {list(valid)}.")


def _normalise_variant(item: Any, index: int) -> dict[str, Any]:
    """A variant as a full dict `{name, loss, weight, per_channel, r2}`; a plain string is a loss name."""
    what = f"`variants[{index}]`"
    if isinstance(item, str):
        item = {"loss": item}
    if not isinstance(item, dict):
        raise ValueError(f"{what} must be a mapping such as {{'loss': 'linf', 'weight': 3.0}}, got {item!r}.")
    _check_keys(what, item, _VARIANT_KEYS)
    loss = item.get("loss", item.get("name"))
    if loss != BASELINE:
        try:
            loss = check_choice(f"variants[{index}].loss", loss, R2LossType)
        except ValueError as err:
            raise ValueError(f"{err} Use 'baseline' for ordinary weight decay without R2.") from None
    defaults = next((v for v in DEFAULT_VARIANTS if v["loss"] == loss), {})
    weight = float(item.get("weight", defaults.get("weight", 0.0)))
    if loss == BASELINE and weight != 0:
        raise ValueError(f"{what} is the baseline (R2 off), so its `weight` must be 0, got {weight}.")
    if loss != BASELINE and not weight > 0:
        raise ValueError(f"{what} (loss {loss!r}) needs a `weight` (lambda) > 0, got {weight}; a run without R2 is "
                         "`{'loss': 'baseline'}`.")
    per_channel = bool(item.get("per_channel", defaults.get("per_channel", False))) if loss != BASELINE else False
    r2 = dict(item.get("r2") or {})
    _check_keys(f"`variants[{index}].r2`", r2, _R2_EXTRA_KEYS)
    if loss == BASELINE and r2:
        raise ValueError(f"{what} is the baseline: it takes no `r2` settings, got {r2}.")
    return {"name": str(item.get("name", loss)), "loss": loss, "weight": weight, "per_channel": per_channel, "r2": r2}


def _setting_name(s: dict[str, Any]) -> str:
    from .quant.report import format_setting

    if s["method"] == "ptq":
        grid = "per-channel" if s["per_channel"] else "per-tensor"
        how = "adaround" if s["rounding"] == "adaround" else s["weight_range"]
        return f"{format_setting(s['w_bits'], s['a_bits'])} {grid} {how}"
    if s["method"] == "qat":
        grid = "" if s["per_channel"] else " per-tensor"
        return f"{format_setting(s['w_bits'], s['a_bits'])} QAT{grid}"
    return f"{format_setting(s['w_bits'])} " + ("k-means" if s["method"] == "kmeans" else "DKM")


def _normalise_setting(item: Any, index: int) -> dict[str, Any]:
    """A low-bit setting as a full dict (see [`ReproduceConfig`]'s `low_bit`)."""
    what = f"`low_bit[{index}]`"
    if not isinstance(item, dict):
        raise ValueError(f"{what} must be a mapping such as {{'method': 'ptq', 'w_bits': 2, 'a_bits': 8}}, "
                         f"got {item!r}.")
    _check_keys(what, item, _SETTING_KEYS)
    method = check_choice(f"low_bit[{index}].method", item.get("method"), LowBitMethod)
    s: dict[str, Any] = {"method": method, "w_bits": item.get("w_bits", 2)}
    if method == "ptq":
        s.update(a_bits=item.get("a_bits", 8), per_channel=bool(item.get("per_channel", True)),
                 weight_range=item.get("weight_range", "mse"), rounding=item.get("rounding", "nearest"))
    elif method == "qat":
        s.update(a_bits=item.get("a_bits", 2), per_channel=bool(item.get("per_channel", True)),
                 weight_range=None, rounding=None)
    else:
        extra = sorted(k for k in ("a_bits", "per_channel", "weight_range", "rounding") if item.get(k) is not None)
        if extra:
            raise ValueError(f"{what}: {method!r} clusters the weights only (one palette per tensor); it takes no "
                             f"{extra}.")
        s.update(a_bits=None, per_channel=None, weight_range=None, rounding=None)
    cheap = (method == "ptq" and s["rounding"] == "nearest") or method == "kmeans"
    s["headline"] = bool(item.get("headline", cheap))
    s["name"] = str(item.get("name") or _setting_name(s))
    return {k: s[k] for k in _SETTING_KEYS}


@dataclass
class ReproduceConfig(JsonConfigMixin):
    """Configuration of [`run_reproduce`] (`hf-r2 reproduce CONFIG.yaml`); load a YAML or JSON file with
    [`~ReproduceConfig.from_file`].

    > Parameters of the output

    output_dir (`str`, *optional*, defaults to `"outputs/reproduce"`):
        Where the runs (`runs/`), `results.json`, `results.md` and the plots (`plots/`) go; a rerun with the same
        folder continues the run.

    > Parameters of the data

    dataset (`str`, *optional*, defaults to `"cifar10"`):
        Anything [`hf_r2.data.load_image_dataset`] takes (`cifar10`, `cifar10-small`, `cifar10-tiny`, ...).
    data_dir (`str`, *optional*):
        Folder of the local CIFAR-10 copies (default: `$HF_R2_DATA_DIR` or `../shared/data`).
    input_size (`int`, *optional*, defaults to `32`):
        Input side in pixels (32 trains CIFAR-10 at native size, padded-crop + flip).
    max_train_samples (`int`, *optional*):
        Train on this many training images (a subset drawn with `data_seed`); `None` uses all.
    max_eval_samples (`int`, *optional*):
        Evaluate on this many test images (drawn with `data_seed`); `None` uses all.
    data_seed (`int`, *optional*, defaults to `0`):
        Seed of the data subsets and of the calibration images, the same for every seed and variant.

    > Parameters of the models and variants

    models (`list[str]`, *optional*, defaults to `["mobilenetv3_small_100", "resnet10t"]`):
        Models trained from scratch (timm names, or anything [`~hf_r2.models.create_model`] takes).
    variants (`list[dict]`, *optional*, defaults to [`DEFAULT_VARIANTS`]):
        One entry per column: `{"name": label, "loss": "baseline" | "linf" | "margin" | "soft_min_max" |
        "kurtosis", "weight": lambda, "per_channel": bool, "r2": {more R2Config fields}}`; `baseline` is R2 off
        (ordinary weight decay); a plain string is a loss name with its default lambda.

    > Parameters of the training recipe (the same for every variant)

    epochs (`float`, *optional*, defaults to `5.0`):
        Training epochs of each run.
    max_steps (`int`, *optional*, defaults to `-1`):
        Optimizer steps of each run; overrides `epochs` when positive.
    batch_size (`int`, *optional*, defaults to `64`):
        Training batch size (also of the QAT / DKM fine-tunes).
    lr (`float`, *optional*, defaults to `3e-3`):
        Peak learning rate of AdamW (cosine decay after a `warmup_ratio` warm-up).
    weight_decay (`float`, *optional*, defaults to `0.05`):
        Decoupled weight decay, the same in every variant.
    warmup_ratio (`float`, *optional*, defaults to `0.05`):
        Fraction of the steps of linear learning-rate warm-up.
    seeds (`list[int]`, *optional*, defaults to `[0, 1, 2]`):
        Seeds of the initialisation and the data order. Headline rows use all of them, the other rows and the
        lambda sweep the first.

    > Parameters of the lambda sweep

    lambda_sweep (`dict`, *optional*):
        `{"variant": name of a configured R2 variant, "lambdas": [at least 3 values], "models": [...] (default:
        the first model), "settings": [setting names] (default: the headline settings)}`: that variant trained
        at each lambda on the first seed. `None` runs no sweep.

    > Parameters of the low-bit rows

    low_bit (`list[dict]`, *optional*, defaults to [`DEFAULT_LOW_BIT`]):
        One entry per row: `{"method": "ptq" | "qat" | "kmeans" | "dkm", "w_bits": int, "a_bits": int or None
        (ptq, qat), "per_channel": bool (ptq, qat), "weight_range": "maxabs" | "mse" (ptq), "rounding": "nearest"
        | "adaround" (ptq), "headline": bool, "name": label}`. PTQ rows re-estimate BN; `headline` defaults to
        true for round-to-nearest PTQ and k-means (cheap), false for AdaRound, QAT and DKM.
    calibration_samples (`int`, *optional*, defaults to `512`):
        Training images (evaluation transform) for activation calibration, AdaRound and BN re-estimation.
    adaround_iters (`int`, *optional*):
        AdaRound iterations per layer (`None`: [`~hf_r2.quant.AdaRoundConfig`]'s default).
    finetune_epochs (`int`, *optional*, defaults to `1`):
        Fine-tuning epochs of the QAT and DKM rows (AdamW, cosine, no weight decay, R2 off).
    finetune_max_steps (`int`, *optional*):
        Fine-tuning steps of the QAT and DKM rows; overrides `finetune_epochs` (a fixed budget).
    finetune_lr (`float`, *optional*, defaults to `1e-3`):
        Peak learning rate of the fine-tunes.

    > Parameters of the report

    plot_layers (`int`, *optional*, defaults to `4`):
        Layers shown in the weight histograms.
    """

    config_name: ClassVar[str] = REPRODUCE_CONFIG_NAME

    # output
    output_dir: str = field(default=os.path.join("outputs", "reproduce"),
                            metadata={"help": "Where runs, results and plots go; a rerun continues there."})
    # data
    dataset: str = field(default="cifar10", metadata={"help": "Dataset (cifar10, cifar10-small, ...)."})
    data_dir: str | None = field(default=None, metadata={"help": "Folder of the local CIFAR-10 copies."})
    input_size: int = field(default=32, metadata={"help": "Input side in pixels."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Training images (seeded subset)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Test images (seeded subset)."})
    data_seed: int = field(default=0, metadata={"help": "Seed of the data subsets and calibration images."})
    # models and variants
    models: list[str] = field(default_factory=lambda: ["mobilenetv3_small_100", "resnet10t"],
                              metadata={"help": "Models trained from scratch."})
    variants: list[Any] = field(default_factory=_default_variants,
                                metadata={"help": "Variants (columns): baseline and R2 losses with their lambda."})
    # recipe
    epochs: float = field(default=5.0, metadata={"help": "Training epochs of each run."})
    max_steps: int = field(default=-1, metadata={"help": "Training steps of each run; overrides epochs if > 0."})
    batch_size: int = field(default=64, metadata={"help": "Training batch size."})
    lr: float = field(default=3e-3, metadata={"help": "Peak AdamW learning rate."})
    weight_decay: float = field(default=0.05, metadata={"help": "Decoupled weight decay (every variant)."})
    warmup_ratio: float = field(default=0.05, metadata={"help": "Fraction of steps of learning-rate warm-up."})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2],
                             metadata={"help": "Seeds; headline rows use all, other rows the first."})
    # lambda sweep
    lambda_sweep: dict[str, Any] | None = field(
        default_factory=lambda: {"variant": "linf", "lambdas": [1.0, 3.0, 10.0]},
        metadata={"help": "{variant, lambdas (>= 3), models, settings}: a variant at several lambdas, first seed."},
    )
    # low-bit rows
    low_bit: list[dict[str, Any]] = field(default_factory=_default_low_bit,
                                          metadata={"help": "Low-bit rows (ptq / qat / kmeans / dkm settings)."})
    calibration_samples: int = field(default=512, metadata={"help": "Calibration / BN re-estimation images."})
    adaround_iters: int | None = field(default=None, metadata={"help": "AdaRound iterations per layer."})
    finetune_epochs: int = field(default=1, metadata={"help": "Fine-tuning epochs of QAT and DKM."})
    finetune_max_steps: int | None = field(default=None, metadata={"help": "Fine-tuning steps of QAT and DKM."})
    finetune_lr: float = field(default=1e-3, metadata={"help": "Fine-tuning learning rate."})
    # report
    plot_layers: int = field(default=4, metadata={"help": "Layers in the weight histograms."})
    version: int = field(default=1, metadata={"help": "Format version of this config."})

    def __post_init__(self) -> None:
        self.output_dir = os.fspath(self.output_dir)
        if not self.output_dir:
            raise ValueError("`output_dir` must be a non-empty path, got ''.")
        if isinstance(self.models, str):
            self.models = [self.models]
        if not self.models or not all(isinstance(m, str) and m for m in self.models):
            raise ValueError(f"`models` must be a non-empty list of model names, got {self.models!r}.")
        if len(set(self.models)) != len(self.models):
            raise ValueError(f"`models` lists a model twice: {self.models}.")
        if not isinstance(self.variants, (list, tuple)) or not self.variants:
            raise ValueError(f"`variants` must be a non-empty list, got {self.variants!r}.")
        self.variants = [_normalise_variant(v, i) for i, v in enumerate(self.variants)]
        _check_unique("variants", [v["name"] for v in self.variants])
        if isinstance(self.seeds, int):
            self.seeds = [self.seeds]
        if not self.seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in self.seeds):
            raise ValueError(f"`seeds` must be a non-empty list of integers, got {self.seeds!r}.")
        _check_unique("seeds", self.seeds)
        for name in ("max_train_samples", "max_eval_samples", "adaround_iters", "finetune_max_steps"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"`{name}` must be a positive integer or None, got {value!r}.")
        for name in ("input_size", "batch_size", "calibration_samples", "finetune_epochs", "plot_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"`max_steps` must be > 0, or -1 to use `epochs`, got {self.max_steps}.")
        if self.max_steps < 0 and not self.epochs > 0:
            raise ValueError(f"`epochs` must be > 0 (or set `max_steps`), got {self.epochs}.")
        for name in ("lr", "finetune_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"`{name}` must be > 0, got {getattr(self, name)}.")
        if self.weight_decay < 0:
            raise ValueError(f"`weight_decay` must be >= 0, got {self.weight_decay}.")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"`warmup_ratio` must be in [0, 1), got {self.warmup_ratio}.")
        if not isinstance(self.low_bit, (list, tuple)):
            raise ValueError(f"`low_bit` must be a list of settings, got {self.low_bit!r}.")
        self.low_bit = [_normalise_setting(s, i) for i, s in enumerate(self.low_bit)]
        names = [s["name"] for s in self.low_bit]
        _check_unique("low_bit", names)
        if "FP" in names:
            raise ValueError("`low_bit` has a setting named 'FP': that name is the float row, measured always.")
        for setting in self.low_bit:
            _quant_config(setting, self)  # the quant configs' own checks, now rather than an hour in
        self.lambda_sweep = self._normalise_sweep(self.lambda_sweep)

    def _normalise_sweep(self, sweep: Any) -> dict[str, Any] | None:
        if sweep is None:
            return None
        if not isinstance(sweep, dict):
            raise ValueError(f"`lambda_sweep` must be a mapping {{'variant': ..., 'lambdas': [...]}} or None, "
                             f"got {sweep!r}.")
        _check_keys("`lambda_sweep`", sweep, _SWEEP_KEYS)
        r2_names = [v["name"] for v in self.variants if v["loss"] != BASELINE]
        if sweep.get("variant") not in r2_names:
            raise ValueError(f"`lambda_sweep.variant` must name one of the R2 variants {r2_names}, got "
                             f"{sweep.get('variant')!r}.")
        lambdas = sweep.get("lambdas")
        if not isinstance(lambdas, (list, tuple)) or len(lambdas) < 3 or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in lambdas
        ):
            raise ValueError(f"`lambda_sweep.lambdas` must be a list of at least 3 positive numbers, got {lambdas!r}.")
        lambdas = [float(x) for x in lambdas]
        _check_unique("lambda_sweep.lambdas", lambdas)
        models = sweep.get("models") or self.models[:1]
        unknown = [m for m in models if m not in self.models]
        if unknown:
            raise ValueError(f"`lambda_sweep.models` {unknown} are not in `models` {self.models}.")
        names = [s["name"] for s in self.low_bit]
        settings = sweep.get("settings")
        settings = [s["name"] for s in self.low_bit if s["headline"]] if settings is None else list(settings)
        unknown = [s for s in settings if s not in names]
        if unknown:
            raise ValueError(f"`lambda_sweep.settings` {unknown} are not low-bit settings; they are {names}.")
        return {"variant": sweep["variant"], "lambdas": lambdas, "models": list(models), "settings": settings}

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> ReproduceConfig:
        """Load a config from a YAML (`.yaml`, `.yml`) or JSON (`.json`) file of the fields above; a folder loads
        its `reproduce_config.json` (the copy every run writes into `output_dir`)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, cls.config_name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No config file at {path!r}.")
        lower = path.lower()
        if not lower.endswith((".json", ".yaml", ".yml")):
            raise ValueError(f"A reproduce config must be a .yaml, .yml or .json file, got {path!r}.")
        with open(path, encoding="utf-8") as f:
            if lower.endswith(".json"):
                data = json.load(f)
            else:
                import yaml

                data = yaml.safe_load(f)
        if not isinstance(data, dict):
            raise ValueError(f"The config file {path!r} must hold a mapping of field names to values.")
        return cls.from_dict(data)

    # ---- derived views ----

    def setting(self, name: str) -> dict[str, Any]:
        """The low-bit setting called `name`."""
        for s in self.low_bit:
            if s["name"] == name:
                return s
        raise KeyError(name)

    @property
    def headline_settings(self) -> list[str]:
        """Names of the settings measured on every seed."""
        return [s["name"] for s in self.low_bit if s["headline"]]


def _check_unique(name: str, values: list[Any]) -> None:
    seen = set()
    for value in values:
        if value in seen:
            raise ValueError(f"`{name}` holds {value!r} twice; every entry needs its own name or value.")
        seen.add(value)


def _quant_config(setting: dict[str, Any], config: ReproduceConfig):
    """The hf_r2.quant config object of a low-bit setting (PTQConfig, QATConfig or PalettizeConfig)."""
    from .quant import PalettizeConfig, PTQConfig, QATConfig

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
    return PalettizeConfig(bits=setting["w_bits"], method=method, skip_first_last=True)


# ----------------------------------------------------------------------------------------------------------------
# The plan: which trainings, which rows on each


@dataclass
class _Run:
    model: str
    variant: dict[str, Any]
    seed: int
    run_dir: str
    settings: list[str]
    roles: list[str]  # "headline" and / or "sweep:<lambda>"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"


def _variant_dir(variant: dict[str, Any]) -> str:
    if variant["loss"] == BASELINE:
        return BASELINE
    name = f"{variant['loss']}{'-pc' if variant['per_channel'] else ''}-w{variant['weight']:g}"
    if variant["r2"]:
        digest = hashlib.sha1(json.dumps(variant["r2"], sort_keys=True).encode()).hexdigest()[:8]
        name += f"-{digest}"
    return _slug(name)


def _plan(config: ReproduceConfig) -> list[_Run]:
    """Every training, once, with the union of the rows it needs, in a stable order."""
    runs: dict[str, _Run] = {}
    first = config.seeds[0]

    def add(model: str, variant: dict[str, Any], seed: int, settings: list[str], role: str) -> None:
        run_dir = os.path.join(config.output_dir, "runs", _slug(model), _variant_dir(variant), f"seed{seed}")
        run = runs.setdefault(run_dir, _Run(model, variant, seed, run_dir, [], []))
        run.settings = [s["name"] for s in config.low_bit if s["name"] in set(run.settings) | set(settings)]
        run.roles.append(role)

    for model in config.models:
        for seed in config.seeds:
            settings = [s["name"] for s in config.low_bit] if seed == first else config.headline_settings
            for variant in config.variants:
                add(model, variant, seed, settings, "headline")
    sweep = config.lambda_sweep
    if sweep:
        base = next(v for v in config.variants if v["name"] == sweep["variant"])
        for model in sweep["models"]:
            for lam in sweep["lambdas"]:
                variant = {**base, "name": f"{base['name']} lambda={lam:g}", "weight": lam}
                add(model, variant, first, sweep["settings"], f"sweep:{lam:g}")
    return list(runs.values())


def _train_spec(run: _Run, config: ReproduceConfig) -> dict[str, Any]:
    """What a training depends on: a folder trained with another spec is not reused."""
    variant = {k: run.variant[k] for k in ("loss", "weight", "per_channel", "r2")}
    return _jsonable({
        "model": run.model, "variant": variant, "seed": run.seed, "dataset": config.dataset,
        "max_train_samples": config.max_train_samples, "data_seed": config.data_seed,
        "input_size": config.input_size, "epochs": config.epochs, "max_steps": config.max_steps,
        "batch_size": config.batch_size, "lr": config.lr, "weight_decay": config.weight_decay,
        "warmup_ratio": config.warmup_ratio,
    })


def _row_spec(setting: dict[str, Any] | None, config: ReproduceConfig) -> dict[str, Any]:
    """What a low-bit row depends on besides the trained model: a cached row with another spec is recomputed."""
    spec: dict[str, Any] = {"dataset": config.dataset, "max_eval_samples": config.max_eval_samples,
                            "data_seed": config.data_seed, "input_size": config.input_size}
    if setting is None:
        return _jsonable(spec)
    spec["setting"] = {k: v for k, v in setting.items() if k not in ("name", "headline")}
    spec["calibration_samples"] = config.calibration_samples
    if setting["method"] == "ptq" and setting["rounding"] == "adaround":
        spec["adaround_iters"] = config.adaround_iters
    if setting["method"] in ("qat", "dkm"):
        spec.update(finetune_epochs=config.finetune_epochs, finetune_max_steps=config.finetune_max_steps,
                    finetune_lr=config.finetune_lr, batch_size=config.batch_size,
                    max_train_samples=config.max_train_samples)
    return _jsonable(spec)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


# ----------------------------------------------------------------------------------------------------------------
# Training


def _read_json(path: str) -> dict[str, Any] | None:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _training_done(run: _Run, config: ReproduceConfig) -> bool:
    """Whether `run` is trained already (and with the same settings); removes an interrupted training's folder."""
    info = _read_json(os.path.join(run.run_dir, RUN_INFO_NAME))
    if info is None:
        if os.path.isdir(run.run_dir):
            logger.warning("%s holds an unfinished training (no %s): training it again.", run.run_dir, RUN_INFO_NAME)
            shutil.rmtree(run.run_dir)
        return False
    spec = _train_spec(run, config)
    if info.get("spec") != spec:
        old = info.get("spec") or {}
        diff = sorted(k for k in set(spec) | set(old) if spec.get(k) != old.get(k))
        raise ValueError(
            f"{run.run_dir} was trained with other settings (differing: {diff}). Use another `output_dir`, or "
            f"delete that folder to train it again."
        )
    return True


def _train(run: _Run, data: dict[str, Any], config: ReproduceConfig, progress: bool) -> dict[str, Any]:
    """Train `run` with R2Trainer, save it, then write `reproduce_run.json` (last: it marks the training done)."""
    from transformers import set_seed

    from .cli import DataArguments, record_data_config
    from .data import collate_fn, hub_dataset_id, with_transforms
    from .models import create_model
    from .saving import update_training_info
    from .trainer import R2Trainer
    from .training_args import R2TrainingArguments

    variant = run.variant
    set_seed(run.seed)
    model = create_model(run.model, label_names=data["label_names"])
    record_data_config(model, DataArguments(dataset_name=config.dataset, input_size=config.input_size))
    baseline = variant["loss"] == BASELINE
    args = R2TrainingArguments(
        output_dir=run.run_dir,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.lr,
        weight_decay=config.weight_decay,
        lr_scheduler_type="cosine",
        warmup_steps=config.warmup_ratio,
        logging_steps=50,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        seed=run.seed,
        dataloader_pin_memory=False,
        disable_tqdm=None if progress else True,
        r2_loss="linf" if baseline else variant["loss"],
        r2_weight=0.0 if baseline else variant["weight"],
        r2_per_channel=variant["per_channel"],
        **{f"r2_{k}": v for k, v in variant["r2"].items()},
    )
    train_ds = with_transforms(data["raw"]["train"], model, train=True, input_size=config.input_size)
    trainer = R2Trainer(model=model, args=args, train_dataset=train_ds, data_collator=collate_fn)
    start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - start
    trainer.save_model(run.run_dir)
    update_training_info(run.run_dir, dataset=config.dataset, dataset_id=hub_dataset_id(config.dataset))
    info = {
        "spec": _train_spec(run, config),
        "train_seconds": seconds,
        "global_step": trainer.state.global_step,
        "train_metrics": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))},
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    write_json_atomic(os.path.join(run.run_dir, RUN_INFO_NAME), info)
    return info


# ----------------------------------------------------------------------------------------------------------------
# Low-bit rows


def _batches(dataset, batch_size: int) -> list[dict[str, Any]]:
    import torch

    from .data import collate_fn

    return list(torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn))


def _model_data(model, key: str, data: dict[str, Any], config: ReproduceConfig) -> dict[str, Any]:
    """Eval batches, calibration batches and the fine-tuning set in `model`'s preprocessing, cached under `key`
    (the model name: every training of one architecture preprocesses alike)."""
    import torch

    from .data import with_transforms

    cache = data["per_model"]
    if key not in cache:
        raw, size = data["raw"], {"input_size": config.input_size}
        plain_train = with_transforms(raw["train"], model, train=False, **size)
        count = min(config.calibration_samples, len(plain_train))
        generator = torch.Generator().manual_seed(config.data_seed)
        index = torch.randperm(len(plain_train), generator=generator)[:count].tolist()
        cache[key] = {
            "eval": _batches(with_transforms(raw["test"], model, train=False, **size), 256),
            "calibration": _batches(torch.utils.data.Subset(plain_train, index), 64),
            "train": with_transforms(raw["train"], model, train=True, **size),
        }
    return cache[key]


def _first_last_patterns(model) -> list[str]:
    from .regularizer import find_target_modules

    targets = find_target_modules(model)
    return [f"^{re.escape(targets[0][0])}$", f"^{re.escape(targets[-1][0])}$"]


def _finetune(model, train_ds, config: ReproduceConfig, seed: int) -> None:
    """The QAT / DKM fine-tune: AdamW, cosine, no weight decay, R2 off, the same for every variant."""
    from .data import collate_fn
    from .loop import finetune

    finetune(model, train_ds, learning_rate=config.finetune_lr, per_device_batch_size=config.batch_size,
             num_epochs=config.finetune_epochs, max_steps=config.finetune_max_steps or -1, seed=seed,
             collate_fn=collate_fn)
    model.eval()


def _apply_setting(model, setting: dict[str, Any], data: dict[str, Any], config: ReproduceConfig, seed: int):
    """Make `model` (a copy, changed in place) the low-bit model of `setting`."""
    from .quant import finalize_dkm, palettize_, prepare_dkm, prepare_qat, quantize_, reestimate_bn_stats
    from .quant.palettize import PalettizeConfig

    calibration = data["calibration"]
    first_last = _first_last_patterns(model)
    quant_config = _quant_config(setting, config)
    method = setting["method"]
    if method == "ptq":
        quantize_(model, quant_config, calibration)
        return model
    if method == "qat":
        prepare_qat(model, quant_config, calibration)
        _finetune(model, data["train"], config, seed)
        return model
    if method == "dkm":
        prepare_dkm(model, quant_config)
        _finetune(model, data["train"], config, seed)
        finalize_dkm(model)
    else:
        palettize_(model, quant_config)
    palettize_(model, PalettizeConfig(bits=8, method="kmeans", include=first_last))
    reestimate_bn_stats(model, calibration, num_batches=None)
    return model


def _load_float(run_dir: str):
    from .models import create_model

    return create_model(run_dir, pretrained=True).eval()


def _measure(run: _Run, data: dict[str, Any], config: ReproduceConfig, progress: bool) -> dict[str, Any]:
    """FP and every low-bit row of `run`, from the cache where its spec matches; new rows are cached at once."""
    import torch
    from tqdm.auto import tqdm

    from .config import R2Config
    from .quant.report import evaluate, read_results, update_results
    from .regularizer import R2Regularizer

    cached = {(row["setting"], row.get("method")): row for row in read_results(run.run_dir)}
    float_model = _load_float(run.run_dir)
    stats = R2Regularizer(float_model, R2Config()).stats()
    rows: dict[str, Any] = {}
    todo = ["FP", *run.settings]
    bar = tqdm(todo, desc=f"low-bit {run.model}/{run.variant['name']}/seed{run.seed}", leave=False,
               disable=not progress)
    for name in bar:
        setting = None if name == "FP" else config.setting(name)
        method = "float" if setting is None else setting["method"]
        spec = _row_spec(setting, config)
        row = cached.get((name, method))
        if row is not None and row.get("spec") == spec:
            rows[name] = {**row, "cached": True}
            continue
        bar.set_postfix_str(name)
        model_data = _model_data(float_model, run.model, data, config)
        start = time.perf_counter()
        if setting is None:
            model = float_model
        else:
            torch.manual_seed(run.seed)
            model = _apply_setting(copy.deepcopy(float_model), setting, model_data, config, run.seed)
        accuracy = evaluate(model, model_data["eval"])
        row = {
            "setting": name,
            "method": method,
            "w_bits": None if setting is None else setting["w_bits"],
            "a_bits": None if setting is None else setting["a_bits"],
            "accuracy": accuracy,
            "seconds": time.perf_counter() - start,
            "spec": spec,
        }
        update_results(run.run_dir, [row])
        rows[name] = {**row, "cached": False}
        del model
    return {"rows": rows, "stats": stats, "float_model": float_model}


# ----------------------------------------------------------------------------------------------------------------
# Summaries


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (`ddof=1`; `None` for a single value)."""
    import numpy as np

    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), (float(array.std(ddof=1)) if array.size > 1 else None)


def _summarise(config: ReproduceConfig, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """`summary[model][setting][variant] = {seeds, values, mean, std, headline}` over the headline runs."""
    first = config.seeds[0]
    summary: dict[str, Any] = {}
    for model in config.models:
        table: dict[str, Any] = {}
        for setting in ["FP", *(s["name"] for s in config.low_bit)]:
            headline = setting == "FP" or config.setting(setting)["headline"]
            seeds = config.seeds if headline else [first]
            table[setting] = {}
            for variant in config.variants:
                found = [
                    (r["seed"], r["rows"][setting]["accuracy"])
                    for r in runs
                    if r["model"] == model and variant["name"] in r["variant_names"] and r["seed"] in seeds
                    and setting in r["rows"]
                ]
                found.sort(key=lambda pair: config.seeds.index(pair[0]))
                if not found:
                    continue
                mean, std = _mean_std([a for _, a in found])
                table[setting][variant["name"]] = {"seeds": [s for s, _ in found], "values": [a for _, a in found],
                                                   "mean": mean, "std": std, "headline": headline}
        summary[model] = table
    return summary


def _summarise_stats(config: ReproduceConfig, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Overall weight statistics per model and variant, averaged over the headline seeds."""
    out: dict[str, Any] = {}
    for model in config.models:
        out[model] = {}
        for variant in config.variants:
            found = [r["stats"]["overall"] for r in runs
                     if r["model"] == model and variant["name"] in r["variant_names"] and r["seed"] in config.seeds]
            if found:
                out[model][variant["name"]] = {k: _mean_std([f[k] for f in found])[0] for k in found[0]}
    return out


def _sweep_table(config: ReproduceConfig, runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    sweep = config.lambda_sweep
    if not sweep:
        return None
    first = config.seeds[0]
    baseline = next((v["name"] for v in config.variants if v["loss"] == BASELINE), None)
    out: dict[str, Any] = {"variant": sweep["variant"], "settings": sweep["settings"], "seed": first, "models": {}}
    for model in sweep["models"]:
        rows = []
        base = next((r for r in runs if r["model"] == model and r["seed"] == first
                     and baseline in r["variant_names"]), None)
        if base is not None:
            rows.append({"lambda": 0.0, "variant": baseline, "run_dir": base["run_dir"],
                         "accuracy": {s: base["rows"][s]["accuracy"] for s in ["FP", *sweep["settings"]]
                                      if s in base["rows"]}})
        for lam in sweep["lambdas"]:
            run = next(r for r in runs if r["model"] == model and f"sweep:{lam:g}" in r["roles"])
            rows.append({"lambda": lam, "variant": run["variant"]["name"], "run_dir": run["run_dir"],
                         "accuracy": {s: run["rows"][s]["accuracy"] for s in ["FP", *sweep["settings"]]}})
        out["models"][model] = rows
    return out


# ----------------------------------------------------------------------------------------------------------------
# Report


def _variant_label(variant: dict[str, Any]) -> str:
    if variant["loss"] == BASELINE:
        return f"{variant['name']} (no R2)"
    grid = ", per channel" if variant["per_channel"] else ""
    return f"{variant['name']} (λ={variant['weight']:g}{grid})"


def _cell(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "-"
    if entry["std"] is None:
        return f"{100 * entry['mean']:.2f}"
    return f"{100 * entry['mean']:.2f} ± {100 * entry['std']:.2f}"


def format_report(results: dict[str, Any]) -> str:
    """The markdown of `results.md` from a [`run_reproduce`] result (or a loaded `results.json`)."""
    config = ReproduceConfig.from_dict(results["config"])
    data = results["data"]
    seeds = config.seeds
    recipe = (f"{config.max_steps} steps" if config.max_steps > 0 else f"{config.epochs:g} epoch(s)") + (
        f", batch {config.batch_size}, AdamW lr {config.lr:g} (cosine, {config.warmup_ratio:g} warm-up), weight "
        f"decay {config.weight_decay:g}"
    )
    finetune = (f"{config.finetune_max_steps} steps" if config.finetune_max_steps
                else f"{config.finetune_epochs} epoch(s)")
    lines = [
        "# R2-Loss side by side: baseline vs R2 variants, float and low-bit top-1",
        "",
        f"Data: {config.dataset}, {data['train_images']} training / {data['test_images']} test images at "
        f"{config.input_size}x{config.input_size} (subsets drawn with data seed {config.data_seed}); top-1 (%) on "
        "the test images.",
        f"Recipe, the same for every variant: {recipe}. Seeds: {seeds}; cells are mean ± std (sample std, ddof=1) "
        f"over the seeds for the headline rows; rows marked † ran on the first seed ({seeds[0]}) only. FP is the "
        "float model as trained; the low-bit rows re-estimate BN, which can put them above FP after a short training.",
        f"Low-bit: first and last layer at 8 bits in every row; PTQ rows re-estimate BN on "
        f"{data['calibration_images']} training images; QAT and DKM fine-tune {finetune} (AdamW lr "
        f"{config.finetune_lr:g}, R2 off); AdaRound "
        + (f"{config.adaround_iters} iterations per layer." if config.adaround_iters else "at its default length."),
        "",
    ]
    variants = config.variants
    for model, table in results["summary"].items():
        lines += [f"## {model}", "", "| setting | " + " | ".join(_variant_label(v) for v in variants) + " |",
                  "|---|" + "---|" * len(variants)]
        for setting, cells in table.items():
            headline = setting == "FP" or config.setting(setting)["headline"]
            label = setting if headline else f"{setting} †"
            lines.append(f"| {label} | " + " | ".join(_cell(cells.get(v["name"])) for v in variants) + " |")
        stats = results["weight_stats"].get(model, {})
        if stats:
            lines.append("| largest abs(w) | " + " | ".join(
                f"{stats[v['name']]['max_abs']:.3f}" if v["name"] in stats else "-" for v in variants) + " |")
            lines.append("| mean max abs(w)/std | " + " | ".join(
                f"{stats[v['name']]['mean_max_over_std']:.2f}" if v["name"] in stats else "-" for v in variants)
                + " |")
        plots = results.get("plots", {}).get(model, {})
        if plots:
            lines += [""] + [f"![{kind}]({os.path.relpath(path, results['output_dir'])})"
                             for kind, path in plots.items()]
        lines.append("")
    sweep = results.get("lambda_sweep")
    if sweep:
        for model, rows in sweep["models"].items():
            columns = ["FP", *sweep["settings"]]
            lines += [f"## Lambda sweep: {sweep['variant']} on {model} (seed {sweep['seed']})", "",
                      "| λ | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
            for row in rows:
                lam = "0 (baseline)" if row["lambda"] == 0 else f"{row['lambda']:g}"
                lines.append(f"| {lam} | " + " | ".join(
                    f"{100 * row['accuracy'][c]:.2f}" if c in row["accuracy"] else "-" for c in columns) + " |")
            lines.append("")
    timing = results["timing"]
    lines += [
        "## Time",
        "",
        f"This invocation: {timing['seconds']:.0f} s ({timing['trained_now']} trainings run, "
        f"{timing['reused_trainings']} reused; {timing['rows_computed']} low-bit rows computed, "
        f"{timing['rows_cached']} from the cache).",
        f"All steps, including those of earlier invocations: training {timing['train_seconds_total']:.0f} s over "
        f"{timing['trainings']} trainings, low-bit rows {timing['low_bit_seconds_total']:.0f} s.",
        f"Machine: {timing['machine']}.",
        "",
    ]
    return "\n".join(lines)


def _plots(config: ReproduceConfig, results: dict[str, Any], weights: dict[str, Any],
           layer_stats: dict[str, Any]) -> dict[str, dict[str, str]]:
    """Write the PNGs of each model; returns `{model: {kind: path}}`."""
    from .plots import plot_accuracy_vs_bits, plot_layer_ranges, plot_weight_histograms

    out: dict[str, dict[str, str]] = {}
    folder = os.path.join(config.output_dir, "plots")
    families = {"ptq": "PTQ", "kmeans": "k-means / DKM", "dkm": "k-means / DKM"}
    for model, table in results["summary"].items():
        slug = _slug(model)
        paths: dict[str, str] = {}
        if weights.get(model):
            count = len(next(iter(weights[model].values())))
            paths["weight histograms"] = plot_weight_histograms(
                weights[model], os.path.join(folder, f"{slug}_weight_hist.png"),
                title=f"{model}: weights of {count} layers (seed {config.seeds[0]})")
        if layer_stats.get(model):
            paths["per-layer ranges"] = plot_layer_ranges(
                layer_stats[model], os.path.join(folder, f"{slug}_layer_ranges.png"),
                title=f"{model}: per-layer max |w|, std and their ratio (seed {config.seeds[0]})")
        curves: dict[str, dict[str, dict[int, float]]] = {}
        fp: dict[str, float] = {}
        for variant in config.variants:
            name = variant["name"]
            if name in table.get("FP", {}):
                fp[name] = 100 * table["FP"][name]["mean"]
            for setting in config.low_bit:
                entry = table.get(setting["name"], {}).get(name)
                family = families.get(setting["method"])
                if entry is None or family is None:
                    continue
                points = curves.setdefault(name, {}).setdefault(family, {})
                points[setting["w_bits"]] = max(points.get(setting["w_bits"], -1.0), 100 * entry["mean"])
        if curves:
            paths["accuracy vs bits"] = plot_accuracy_vs_bits(
                curves, os.path.join(folder, f"{slug}_accuracy_vs_bits.png"), fp=fp,
                title=f"{model}: top-1 against weight bits (per family, the best configured row at each bit width)")
        out[model] = paths
    return out


def _machine() -> str:
    import platform

    import torch

    try:
        load = "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover - not on every OS
        load = "load average n/a"
    return (f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads, {'CUDA' if torch.cuda.is_available() else 'no GPU'}, {load}")


# ----------------------------------------------------------------------------------------------------------------
# Entry points


def run_reproduce(
    config: ReproduceConfig | str | os.PathLike,
    *,
    progress: bool = True,
    print_fn: Callable[[str], Any] | None = print,
) -> dict[str, Any]:
    """Train, measure and report everything `config` describes (see the module docstring); resumable.

    Args:
        config ([`ReproduceConfig`], `str` or `os.PathLike`):
            The config, or a YAML / JSON file of it.
        progress (`bool`, *optional*, defaults to `True`):
            Show progress bars (over the trainings, the runs' low-bit rows, and the Trainer's and fine-tunes' own).
        print_fn (`Callable[[str], Any]`, *optional*, defaults to `print`):
            Where the report goes at the end; `None` prints nothing.

    Returns:
        `dict`: the contents of `output_dir/results.json`: `config`, `data`, `runs` (one per training: model,
        variant, seed, `run_dir`, `trained_now`, `train_seconds`, `stats` and `rows` = `{setting: {accuracy,
        seconds, cached, ...}}`), `summary` (`[model][setting][variant]` = `{seeds, values, mean, std,
        headline}`), `weight_stats`, `lambda_sweep`, `timing`, `plots`.
    """
    import numpy as np
    from tqdm.auto import tqdm

    from .data import label_names, load_image_dataset
    from .plots import select_layers
    from .regularizer import find_target_modules

    if not isinstance(config, ReproduceConfig):
        config = ReproduceConfig.from_file(config)
    start = time.perf_counter()
    os.makedirs(config.output_dir, exist_ok=True)
    config.save_pretrained(config.output_dir)

    raw = load_image_dataset(config.dataset, data_dir=config.data_dir, max_train_samples=config.max_train_samples,
                             max_eval_samples=config.max_eval_samples, seed=config.data_seed)
    data: dict[str, Any] = {"raw": raw, "label_names": label_names(raw), "per_model": {}}
    plan = _plan(config)

    # 1. trainings
    infos: dict[str, dict[str, Any]] = {}
    trained_now: set[str] = set()
    for run in tqdm(plan, desc="trainings", disable=not progress):
        if not _training_done(run, config):
            _train(run, data, config, progress)
            trained_now.add(run.run_dir)
        infos[run.run_dir] = _read_json(os.path.join(run.run_dir, RUN_INFO_NAME))

    # 2. low-bit rows (and what the plots need from the first seed's models)
    first = config.seeds[0]
    runs: list[dict[str, Any]] = []
    weights: dict[str, dict[str, dict[str, Any]]] = {}
    layer_stats: dict[str, dict[str, Any]] = {}
    plot_layers: dict[str, list[str]] = {}
    for run in tqdm(plan, desc="low-bit rows", disable=not progress):
        measured = _measure(run, data, config, progress)
        names = [v["name"] for v in config.variants if _variant_dir(v) == _variant_dir(run.variant)
                 and "headline" in run.roles]
        info = infos[run.run_dir]
        runs.append({
            "model": run.model, "variant": run.variant, "variant_names": names, "seed": run.seed,
            "roles": run.roles, "run_dir": run.run_dir, "trained_now": run.run_dir in trained_now,
            "train_seconds": info["train_seconds"], "global_step": info.get("global_step"),
            "train_loss": info.get("train_metrics", {}).get("train_loss"),
            "stats": {"overall": measured["stats"]["overall"]}, "rows": measured["rows"],
        })
        if run.seed == first and names:
            model = measured["float_model"]
            if run.model not in plot_layers:
                targets = find_target_modules(model)
                depthwise = [n for n, m in targets if getattr(m, "groups", 1) > 1]
                plot_layers[run.model] = select_layers([n for n, _ in targets], config.plot_layers, depthwise)
            for name in names:
                weights.setdefault(run.model, {})[name] = {
                    layer: model.get_submodule(layer).weight.detach().float().numpy().ravel().astype(np.float32)
                    for layer in plot_layers[run.model]
                }
                layer_stats.setdefault(run.model, {})[name] = measured["stats"]["per_layer"]

    # 3. results, report, plots
    rows_all = [row for r in runs for row in r["rows"].values()]
    results: dict[str, Any] = {
        "config": config.to_dict(),
        "output_dir": os.path.abspath(config.output_dir),
        "data": {"dataset": config.dataset, "train_images": raw["train"].num_rows,
                 "test_images": raw["test"].num_rows,
                 "calibration_images": min(config.calibration_samples, raw["train"].num_rows)},
        "runs": runs,
        "summary": _summarise(config, runs),
        "weight_stats": _summarise_stats(config, runs),
        "lambda_sweep": _sweep_table(config, runs),
    }
    results["plots"] = _plots(config, results, weights, layer_stats)
    results["timing"] = {
        "seconds": time.perf_counter() - start,
        "trainings": len(plan),
        "trained_now": len(trained_now),
        "reused_trainings": len(plan) - len(trained_now),
        "rows_computed": sum(not row["cached"] for row in rows_all),
        "rows_cached": sum(bool(row["cached"]) for row in rows_all),
        "train_seconds_total": sum(r["train_seconds"] for r in runs),
        "low_bit_seconds_total": sum(row.get("seconds", 0.0) for row in rows_all),
        "machine": _machine(),
    }
    write_json_atomic(os.path.join(config.output_dir, RESULTS_NAME), results)
    report = format_report(results)
    write_text_atomic(os.path.join(config.output_dir, REPORT_NAME), report)
    if print_fn:
        print_fn(report)
    return results


def reproduce_command_parser(subparsers=None) -> argparse.ArgumentParser:
    """The `reproduce` sub-command: `hf-r2 reproduce CONFIG.yaml [--output-dir DIR] [--no-progress]`."""
    description = (
        "Reproduce the paper's claim side by side: train baseline and R2 variants alike (models x variants x seeds, "
        "plus a lambda sweep), measure FP and every low-bit row on each, and write results.json, results.md and "
        "plots. Resumable: rerun the same command to continue."
    )
    if subparsers is None:
        parser = argparse.ArgumentParser("hf-r2 reproduce", description=description)
    else:
        parser = subparsers.add_parser("reproduce", description=description, help="Baseline vs R2, end to end.")
    parser.add_argument("config", help="A YAML or JSON file of ReproduceConfig fields (see configs/reproduce.yaml).")
    parser.add_argument("--output-dir", "--output_dir", default=None, help="Override the config's output_dir.")
    parser.add_argument("--data-dir", "--data_dir", default=None, help="Override the config's data_dir.")
    parser.add_argument("--no-progress", "--no_progress", dest="progress", action="store_false",
                        help="Hide the progress bars.")
    parser.set_defaults(func=reproduce_command)
    return parser


def reproduce_command(args: argparse.Namespace) -> int:
    try:
        config = ReproduceConfig.from_file(args.config)
        overrides = {k: getattr(args, k) for k in ("output_dir", "data_dir") if getattr(args, k, None)}
        if overrides:
            config = ReproduceConfig.from_dict({**config.to_dict(), **overrides})
        results = run_reproduce(config, progress=args.progress)
    except (ValueError, OSError) as err:
        print(f"hf-r2 reproduce: error: {err}", file=sys.stderr)
        return 1
    print(f"\nResults: {os.path.join(results['output_dir'], RESULTS_NAME)} (and {REPORT_NAME}, plots/)")
    return 0


if __name__ == "__main__":
    raise SystemExit(reproduce_command(reproduce_command_parser().parse_args()))
