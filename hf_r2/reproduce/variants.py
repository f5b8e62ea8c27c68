"""The vocabulary of a reproduce config: its variants (baseline and R2 regularisers), low-bit settings and sweeps,
their defaults, the normalisers that turn each into a full dict (and check it against the config), their names, and
[`quant_config`], the `hf_r2.quant` config of a setting (used to validate a config, and to apply a setting in
[`hf_r2.reproduce.apply`])."""

from __future__ import annotations

import copy
import dataclasses
import enum
import re
from typing import TYPE_CHECKING, Any

from .._utils import check_choice
from ..config import R2LossType
from ._rounding import normalise_rounding, ptq_config, rounding_label

if TYPE_CHECKING:
    from ..quant import BlockReconstructionConfig, PalettizeConfig, PTQConfig, QATConfig

__all__ = [
    "BASELINE",
    "CHOSEN",
    "SCOPE_KEYS",
    "TRAINING_KEYS",
    "WEIGHT_DECAY_SWEEP_KEYS",
    "LowBitMethod",
    "DEFAULT_VARIANTS",
    "DEFAULT_LOW_BIT",
    "normalise_variant",
    "normalise_lambda_sweep",
    "normalise_weight_decay_sweep",
    "check_variant_scope",
    "resolve_weight",
    "on_model",
    "normalise_setting",
    "setting_name",
    "quant_config",
    "slug",
]

BASELINE = "baseline"
#: A variant's `weight` that takes, per model, the lambda its `lambda_sweep` chooses on the validation split.
CHOSEN = "chosen"
VARIANT_KEYS = ("name", "loss", "weight", "per_channel", "r2", "init_from", "epochs", "lr", "warmup_ratio",
                "weight_decay", "compare_to", "seeds", "models")
#: The variant keys that change its training beyond the loss (a variant without them trains with the config's recipe).
TRAINING_KEYS = ("init_from", "epochs", "lr", "warmup_ratio", "weight_decay")
SETTING_KEYS = ("name", "method", "w_bits", "a_bits", "per_channel", "weight_range", "rounding", "iters", "drop_prob",
                "pre", "bias_correction", "finetune_steps", "headline", "variants", "models")
#: The keys of a setting that say where it is measured, not how (left out of its cache spec).
SCOPE_KEYS = ("name", "headline", "variants", "models")
SWEEP_KEYS = ("variant", "lambdas", "models", "settings")
WEIGHT_DECAY_SWEEP_KEYS = ("factors", "models", "settings")
INIT_FROM = ("baseline",)
# The R2Config fields a variant's `r2` may set (the loss, weight and per_channel are the variant's own keys).
R2_EXTRA_KEYS = ("warmup_steps", "include", "exclude", "skip_first_last", "margin_penalty", "soft_min_max_penalty",
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


def default_variants() -> list[dict[str, Any]]:
    return copy.deepcopy(DEFAULT_VARIANTS)


def default_low_bit() -> list[dict[str, Any]]:
    return copy.deepcopy(DEFAULT_LOW_BIT)


def check_keys(what: str, item: dict[str, Any], valid: tuple[str, ...]) -> None:
    unknown = sorted(set(item) - set(valid))
    if unknown:
        raise ValueError(f"{what} has unknown key(s) {unknown}; valid keys are {list(valid)}.")


def normalise_variant(item: Any, index: int) -> dict[str, Any]:
    """A variant as a full dict `{name, loss, weight, per_channel, r2, init_from, epochs, lr, warmup_ratio,
    weight_decay, compare_to, seeds, models}`; a plain string is a loss name. `weight: chosen` takes each model's
    lambda from the variant's sweep, `init_from="baseline"` makes it a fine-tune of the model's trained baseline,
    `epochs` / `lr` / `warmup_ratio` / `weight_decay` override the config's recipe for it (e.g. a re-warmed
    fine-tune schedule; `weight_decay: chosen` is the one the config's `weight_decay_sweep` of the baseline chooses
    per model), `compare_to` names the variant its gains are measured against, and `seeds` / `models` restrict it to
    some of the config's (e.g. one seed of an expensive from-scratch run); checked by [`ReproduceConfig`]."""
    what = f"`variants[{index}]`"
    if isinstance(item, str):
        item = {"loss": item}
    if not isinstance(item, dict):
        raise ValueError(f"{what} must be a mapping such as {{'loss': 'linf', 'weight': 3.0}}, got {item!r}.")
    check_keys(what, item, VARIANT_KEYS)
    loss = item.get("loss", item.get("name"))
    if loss != BASELINE:
        try:
            loss = check_choice(f"variants[{index}].loss", loss, R2LossType)
        except ValueError as err:
            raise ValueError(f"{err} Use 'baseline' for ordinary weight decay without R2.") from None
    defaults = next((v for v in DEFAULT_VARIANTS if v["loss"] == loss), {})
    weight = item.get("weight", defaults.get("weight", 0.0))
    if weight == CHOSEN and loss == BASELINE:
        raise ValueError(f"{what} is the baseline (R2 off): it has no lambda to choose; leave out its `weight`.")
    if weight != CHOSEN:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ValueError(f"{what}: `weight` must be a number (lambda) or {CHOSEN!r} (the lambda its "
                             f"`lambda_sweep` chooses on the validation split), got {weight!r}.")
        weight = float(weight)
    if loss == BASELINE and weight != 0:
        raise ValueError(f"{what} is the baseline (R2 off), so its `weight` must be 0, got {weight}.")
    if loss != BASELINE and weight != CHOSEN and not weight > 0:
        raise ValueError(f"{what} (loss {loss!r}) needs a `weight` (lambda) > 0, got {weight}; a run without R2 is "
                         "`{'loss': 'baseline'}`.")
    per_channel = bool(item.get("per_channel", defaults.get("per_channel", False))) if loss != BASELINE else False
    r2 = dict(item.get("r2") or {})
    check_keys(f"`variants[{index}].r2`", r2, R2_EXTRA_KEYS)
    if loss == BASELINE and r2:
        raise ValueError(f"{what} is the baseline: it takes no `r2` settings, got {r2}.")
    init_from = item.get("init_from")
    if init_from is not None and init_from not in INIT_FROM:
        raise ValueError(f"{what}: `init_from` must be 'baseline' (start from the model's trained baseline) or None "
                         f"(random init), got {init_from!r}.")
    if loss == BASELINE and init_from is None and (item.get("epochs") is not None or item.get("lr") is not None):
        raise ValueError(f"{what} is the baseline trained from scratch: it follows the config's `epochs` and `lr`; "
                         "a same-length control of a fine-tune is `{'loss': 'baseline', 'init_from': 'baseline', "
                         "'epochs': ...}`.")
    out = {"name": str(item.get("name", loss)), "loss": loss, "weight": weight, "per_channel": per_channel, "r2": r2,
           "init_from": init_from}
    for key in ("epochs", "lr"):
        value = item.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
            raise ValueError(f"{what}: `{key}` must be a positive number (or left out for the config's), got "
                             f"{value!r}.")
        out[key] = None if value is None else float(value)
    warmup = item.get("warmup_ratio")
    if warmup is not None and (isinstance(warmup, bool) or not isinstance(warmup, (int, float))
                               or not 0 <= warmup < 1):
        raise ValueError(f"{what}: `warmup_ratio` must be a fraction of the steps in [0, 1) (or left out for the "
                         f"config's), got {warmup!r}.")
    out["warmup_ratio"] = None if warmup is None else float(warmup)
    weight_decay = item.get("weight_decay")
    if weight_decay is not None and weight_decay != CHOSEN and (
            isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not weight_decay >= 0):
        raise ValueError(f"{what}: `weight_decay` must be a number >= 0, {CHOSEN!r} (the one the config's "
                         f"`weight_decay_sweep` chooses on the validation split) or left out for the config's, got "
                         f"{weight_decay!r}.")
    out["weight_decay"] = weight_decay if weight_decay in (None, CHOSEN) else float(weight_decay)
    out["compare_to"] = item.get("compare_to")
    for key, kind in (("seeds", int), ("models", str)):
        value = item.get(key)
        if value is not None and (not isinstance(value, (list, tuple)) or not all(
                isinstance(x, kind) and not isinstance(x, bool) for x in value)):
            raise ValueError(f"{what}: `{key}` must be a list of {'seeds' if kind is int else 'model names'} (a "
                             f"subset of the config's; left out: all of them), got {value!r}.")
        out[key] = None if value is None else list(value)
    return out


# ---- sweeps, and the variants that take their choices (checked against the config being built) -------------------


def _sweep_scope(what: str, sweep: dict[str, Any], config: Any, default_models: list[str]) -> tuple[list, list]:
    """A sweep's `models` (default `default_models`) and `settings` (default: the headline settings), each checked
    against the config's."""
    models = list(sweep.get("models") or default_models)
    unknown = [m for m in models if m not in config.models]
    if unknown:
        raise ValueError(f"`{what}.models` {unknown} are not in `models` {config.models}.")
    names = [s["name"] for s in config.low_bit]
    settings = sweep.get("settings")
    settings = [s["name"] for s in config.low_bit if s["headline"]] if settings is None else list(settings)
    unknown = [s for s in settings if s not in names]
    if unknown:
        raise ValueError(f"`{what}.settings` {unknown} are not low-bit settings; they are {names}.")
    return models, settings


def _positive_numbers(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) >= 3 and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in value)


def normalise_lambda_sweep(sweep: Any, config: Any) -> dict[str, Any]:
    """One `lambda_sweep` entry as `{variant, lambdas, models, settings}`, checked against `config` (a
    [`ReproduceConfig`] being built: its variants, models and low-bit settings are normalised already)."""
    if not isinstance(sweep, dict):
        raise ValueError(f"`lambda_sweep` must be a mapping {{'variant': ..., 'lambdas': [...]}} or None, "
                         f"got {sweep!r}.")
    check_keys("`lambda_sweep`", sweep, SWEEP_KEYS)
    r2_names = [v["name"] for v in config.variants if v["loss"] != BASELINE]
    if sweep.get("variant") not in r2_names:
        raise ValueError(f"`lambda_sweep.variant` must name one of the R2 variants {r2_names}, got "
                         f"{sweep.get('variant')!r}.")
    lambdas = sweep.get("lambdas")
    if not _positive_numbers(lambdas):
        raise ValueError(f"`lambda_sweep.lambdas` must be a list of at least 3 positive numbers, got {lambdas!r}.")
    lambdas = [float(x) for x in lambdas]
    check_unique("lambda_sweep.lambdas", lambdas)
    models, settings = _sweep_scope("lambda_sweep", sweep, config, config.models[:1])
    return {"variant": sweep["variant"], "lambdas": lambdas, "models": models, "settings": settings}


def normalise_weight_decay_sweep(sweep: Any, config: Any) -> dict[str, Any] | None:
    """The `weight_decay_sweep` as `{factors, models, settings}` (`None` without one), checked against `config`."""
    if sweep is None:
        return None
    if not isinstance(sweep, dict):
        raise ValueError(f"`weight_decay_sweep` must be a mapping {{'factors': [1, 3, 10, 30]}} or None, got "
                         f"{sweep!r}.")
    check_keys("`weight_decay_sweep`", sweep, WEIGHT_DECAY_SWEEP_KEYS)
    if config.baseline_variant is None:
        raise ValueError("`weight_decay_sweep` sweeps the baseline's weight decay, but the config has no "
                         "from-scratch `{'loss': 'baseline'}` variant.")
    factors = sweep.get("factors")
    if not _positive_numbers(factors) or 1 not in factors:
        raise ValueError(f"`weight_decay_sweep.factors` must be a list of at least 3 positive multiples of the "
                         f"recipe's weight decay with 1 among them (the default, the sweep's reference), e.g. "
                         f"[1, 3, 10, 30], got {factors!r}.")
    factors = [float(x) for x in factors]
    check_unique("weight_decay_sweep.factors", factors)
    models, settings = _sweep_scope("weight_decay_sweep", sweep, config, config.models)
    zero = [m for m in models if config.recipe(m, {})["weight_decay"] == 0]
    if zero:
        raise ValueError(f"`weight_decay_sweep` multiplies the recipe's weight decay, which is 0 for {zero}: set "
                         "a `weight_decay` (or `recipes[model].weight_decay`) > 0.")
    return {"factors": factors, "models": models, "settings": settings}


def check_variant_scope(v: dict[str, Any], config: Any) -> None:
    """A variant's `seeds` / `models` are the config's; a variant that takes a value from a sweep (`weight:
    chosen`, `weight_decay: chosen`) has that sweep on each of its models, and the config a validation split."""
    for key, allowed in (("seeds", config.seeds), ("models", config.models)):
        unknown = [x for x in v[key] or [] if x not in allowed]
        if unknown:
            raise ValueError(f"Variant {v['name']!r} has `{key}` {unknown}, which are not in the config's "
                             f"`{key}` {allowed}.")
    models = config.models if v["models"] is None else v["models"]
    if v["weight_decay"] == CHOSEN:
        swept = config.weight_decay_sweep["models"] if config.weight_decay_sweep else []
        missing = [m for m in models if m not in swept]
        if not config.validation_size or missing:
            raise ValueError(f"Variant {v['name']!r} has `weight_decay: chosen`: it trains at the weight decay "
                             f"the baseline's `weight_decay_sweep` chooses on the validation split, so the config "
                             f"needs a `validation_size` and a `weight_decay_sweep` {{'factors': [1, 3, 10]}} on "
                             f"each of its models" + (f" (none on {missing})." if missing else "."))
    if v["weight"] != CHOSEN:
        return
    sweep = next((s for s in config.lambda_sweep or [] if s["variant"] == v["name"]), None)
    missing = [m for m in models if sweep is None or m not in sweep["models"]]
    if not config.validation_size or missing:
        raise ValueError(f"Variant {v['name']!r} has `weight: chosen`: its lambda is the one its `lambda_sweep` "
                         f"chooses on the validation split, so the config needs a `validation_size` and a sweep "
                         f"`{{'variant': {v['name']!r}, 'lambdas': [...]}}` on each of its models"
                         + (f" (none on {missing})." if missing else "."))


def on_model(item: dict[str, Any], model: str) -> bool:
    """Whether a variant or a low-bit setting is trained / measured on `model`: its `models`, `None` for all."""
    return item.get("models") is None or model in item["models"]


def resolve_weight(variant: dict[str, Any], model: str, chosen: dict[str, dict[str, float | None]] | None,
                   chosen_weight_decay: dict[str, float | None] | None = None) -> dict[str, Any] | None:
    """`variant` as trained on `model`: a `weight: chosen` variant gets the lambda `chosen[name][model]` (its sweep's
    choice), a `weight_decay: chosen` one the weight decay `chosen_weight_decay[model]` (the baseline's weight-decay
    sweep's choice); `None` when the variant does not run on `model` (its `models`), or a value it takes from a sweep
    is not chosen (yet)."""
    if not on_model(variant, model):
        return None
    if variant.get("weight_decay") == CHOSEN:
        weight_decay = (chosen_weight_decay or {}).get(model)
        if weight_decay is None:
            return None
        variant = {**variant, "weight_decay": float(weight_decay)}
    if variant["weight"] != CHOSEN:
        return variant
    weight = (chosen or {}).get(variant["name"], {}).get(model)
    return None if weight is None else {**variant, "weight": float(weight)}


def setting_name(s: dict[str, Any]) -> str:
    """`"W2A8 per-channel mse"`, `"W2A2 QAT"`, `"W1 k-means"`, ...; `" + CLE"` / `" + MagR"` for its `pre` steps,
    `" + BC"` with bias correction."""
    pre = "".join(f" + {'CLE' if step == 'cle' else 'MagR'}" for step in s.get("pre") or [])
    return _base_name(s) + pre + (" + BC" if s.get("bias_correction") else "")


def _base_name(s: dict[str, Any]) -> str:
    from ..quant import format_setting

    if s["method"] == "ptq":
        grid = "per-channel" if s["per_channel"] else "per-tensor"
        how = rounding_label(s) or s["weight_range"]
        return f"{format_setting(s['w_bits'], s['a_bits'])} {grid} {how}"
    if s["method"] == "qat":
        grid = "" if s["per_channel"] else " per-tensor"
        return f"{format_setting(s['w_bits'], s['a_bits'])} QAT{grid}"
    return f"{format_setting(s['w_bits'])} " + ("k-means" if s["method"] == "kmeans" else "DKM")


def _config_defaults(method: str) -> dict[str, Any]:
    """The field defaults of the quant config a `method` setting builds ([`quant_config`]): a setting's defaults are
    its config's, not a copy of them."""
    from ..quant import PalettizeConfig, PTQConfig, QATConfig

    cls = {"ptq": PTQConfig, "qat": QATConfig}.get(method, PalettizeConfig)
    return {f.name: f.default for f in dataclasses.fields(cls)}


def normalise_setting(item: Any, index: int) -> dict[str, Any]:
    """A low-bit setting as a full dict (see [`ReproduceConfig`]'s `low_bit`), its defaults those of its quant
    config ([`quant_config`], which [`ReproduceConfig`] builds to validate it). The learnt-rounding keys `iters` and
    `drop_prob` are there only where they apply ([`~hf_r2.reproduce._rounding.normalise_rounding`])."""
    what = f"`low_bit[{index}]`"
    if not isinstance(item, dict):
        raise ValueError(f"{what} must be a mapping such as {{'method': 'ptq', 'w_bits': 2, 'a_bits': 8}}, "
                         f"got {item!r}.")
    check_keys(what, item, SETTING_KEYS)
    method = check_choice(f"low_bit[{index}].method", item.get("method"), LowBitMethod)
    d = _config_defaults(method)
    s: dict[str, Any] = {"method": method, "w_bits": item.get("w_bits", d.get("w_bits", d.get("bits")))}
    if method in ("ptq", "qat"):
        keys = ("a_bits", "per_channel") + (("weight_range", "rounding") if method == "ptq" else ())
        s.update({"weight_range": None, "rounding": None}, **{k: item.get(k, d[k]) for k in keys})
        s["per_channel"] = bool(s["per_channel"])
    else:
        extra = sorted(k for k in ("a_bits", "per_channel", "weight_range", "rounding") if item.get(k) is not None)
        if extra:
            raise ValueError(f"{what}: {method!r} clusters the weights only (one palette per tensor); it takes no "
                             f"{extra}.")
        s.update(a_bits=None, per_channel=None, weight_range=None, rounding=None)
    pre = item.get("pre")
    if pre is not None:
        if isinstance(pre, str):
            pre = [pre]
        if method not in ("ptq", "kmeans") or not pre or any(step not in ("cle", "magr") for step in pre):
            raise ValueError(f"{what}: `pre` is a list of range reductions run on the float model before a 'ptq' or "
                             f"'kmeans' row, from ['cle', 'magr'], got {item.get('pre')!r} (method {method!r}).")
        pre = list(pre)
    s["pre"] = pre
    s.update(normalise_rounding(what, method, s["rounding"], item))  # set only where they apply: old rows unchanged
    bias_correction = item.get("bias_correction")
    if bias_correction is not None and (method != "ptq" or not isinstance(bias_correction, bool)):
        raise ValueError(f"{what}: `bias_correction` (true / false) corrects the biases of a 'ptq' row after "
                         f"quantization, got {bias_correction!r} (method {method!r}).")
    s["bias_correction"] = bias_correction or None  # None: left out of the cache spec, as before the key existed
    steps = item.get("finetune_steps")
    if steps is not None and (method not in ("qat", "dkm") or isinstance(steps, bool) or not isinstance(steps, int)
                              or steps < 1):
        raise ValueError(f"{what}: `finetune_steps` (a positive integer) is the fine-tune budget of a 'qat' or 'dkm' "
                         f"row, overriding the config's `finetune_max_steps` / `finetune_epochs`; got {steps!r} "
                         f"(method {method!r}).")
    s["finetune_steps"] = steps
    cheap = (method == "ptq" and s["rounding"] == "nearest") or method == "kmeans"
    s["headline"] = bool(item.get("headline", cheap))
    s["name"] = str(item.get("name") or setting_name(s))
    for key in ("variants", "models"):
        value = item.get(key)
        if value is not None and (not isinstance(value, (list, tuple)) or not all(isinstance(x, str) for x in value)):
            raise ValueError(f"{what}: `{key}` must be a list of {key[:-1]} names (the row is measured on those "
                             f"only; left out: on all), got {value!r}.")
        s[key] = None if value is None else list(value)
    return {k: s[k] for k in SETTING_KEYS if k in s}


def check_unique(name: str, values: list[Any]) -> None:
    seen = set()
    for value in values:
        if value in seen:
            raise ValueError(f"`{name}` holds {value!r} twice; every entry needs its own name or value.")
        seen.add(value)


def slug(text: str) -> str:
    """`text` as a file-safe name (run folders, plot files)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"


def quant_config(
    setting: dict[str, Any], adaround_iters: int | None = None
) -> PTQConfig | BlockReconstructionConfig | QATConfig | PalettizeConfig:
    """The `hf_r2.quant` config of a low-bit setting.

    Every row keeps the first and the last layer at 8 bits: [`~hf_r2.quant.PTQConfig`],
    [`~hf_r2.quant.BlockReconstructionConfig`] and [`~hf_r2.quant.QATConfig`] by their default `first_last_bits=8`,
    [`~hf_r2.quant.PalettizeConfig`] (k-means and DKM) by `first_last_bits=8` (256-entry palettes on those two layers).

    Args:
        setting (`dict`):
            A full setting, as in [`ReproduceConfig`]'s `low_bit` after normalisation (every key present, e.g.
            `config.setting(name)`).
        adaround_iters (`int`, *optional*):
            AdaRound iterations of AdaRound rows without their own `iters` (default:
            [`~hf_r2.quant.AdaRoundConfig`]'s).

    Returns:
        [`~hf_r2.quant.PTQConfig`] (`method="ptq"`, BN re-estimated, all calibration batches),
        [`~hf_r2.quant.BlockReconstructionConfig`] (`"ptq"` with `rounding="brecq"`: BRECQ, or QDrop with
        `drop_prob > 0`; BN kept as trained), [`~hf_r2.quant.QATConfig`] (`"qat"`) or
        [`~hf_r2.quant.PalettizeConfig`] (`"kmeans"`, `"dkm"`).
    """
    from ..quant import PalettizeConfig, QATConfig

    method = setting["method"]
    if method == "ptq":
        return ptq_config(setting, adaround_iters)
    if method == "qat":
        return QATConfig(w_bits=setting["w_bits"], a_bits=setting["a_bits"], per_channel=setting["per_channel"])
    return PalettizeConfig(bits=setting["w_bits"], method=method, first_last_bits=8)
