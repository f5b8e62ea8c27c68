"""[`ReproduceConfig`] (what one `hf-r2 reproduce` run trains and measures) and its file names (the demo's preset
is in [`hf_r2.reproduce.presets`]); the variants and low-bit settings it holds are defined in
[`hf_r2.reproduce.variants`]."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .._utils import JsonConfigMixin
from .variants import (
    BASELINE,
    CHOSEN,
    check_keys,
    check_unique,
    check_variant_scope,
    default_low_bit,
    default_variants,
    normalise_lambda_sweep,
    normalise_setting,
    normalise_variant,
    normalise_weight_decay_sweep,
    quant_config,
    resolve_weight,
)

__all__ = [
    "ReproduceConfig",
    "REPRODUCE_CONFIG_NAME",
    "RUN_INFO_NAME",
    "RESULTS_NAME",
    "REPORT_NAME",
]

REPRODUCE_CONFIG_NAME = "reproduce_config.json"
RUN_INFO_NAME = "reproduce_run.json"
RESULTS_NAME = "results.json"
REPORT_NAME = "results.md"


@dataclass
class ReproduceConfig(JsonConfigMixin):
    """Configuration of [`run_reproduce`] (`hf-r2 reproduce CONFIG.yaml`); load a YAML or JSON file with
    [`~ReproduceConfig.from_file`].

    > Parameters of the output

    output_dir (`str`, *optional*, defaults to `"outputs/reproduce"`):
        Where the runs (`runs/`), `results.json`, `results.md` and the plots (`plots/`) go; a rerun with the same
        folder continues the run, and several processes of one config may share it (each trains what no other is
        training). `~` is the user's home: long studies keep their cache outside the work tree
        (`~/.cache/hf-r2/...`).

    > Parameters of the data

    dataset (`str`, *optional*, defaults to `"cifar10"`):
        Anything [`hf_r2.data.load_image_dataset`] takes (`cifar10`, `cifar10-small`, `cifar10-tiny`, ...).
    data_dir (`str`, *optional*):
        Folder of the local CIFAR-10 copies (default: `$HF_R2_DATA_DIR`, which the Makefile and the tests point at
        `../shared/data`).
    input_size (`int`, *optional*, defaults to `32`):
        Input side in pixels (32 trains CIFAR-10 at native size, padded-crop + flip).
    max_train_samples (`int`, *optional*):
        Train on this many training images (a subset drawn with `data_seed`); `None` uses all.
    max_eval_samples (`int`, *optional*):
        Evaluate on this many test images (drawn with `data_seed`); `None` uses all.
    data_seed (`int`, *optional*, defaults to `0`):
        Seed of the data subsets and of the calibration images, the same for every seed and variant.
    validation_size (`int`, *optional*):
        Hold out this many training images (a fixed seed, the same for every run) as a validation split: the
        trainings use the rest, every row is measured on it too (`val_accuracy`), and the lambda sweeps choose on it;
        the test split is only reported.

    > Parameters of the models and variants

    models (`list[str]`, *optional*, defaults to `["mobilenetv3_small_100", "resnet10t"]`):
        Models trained from scratch (timm names, or anything [`~hf_r2.models.create_model`] takes).
    model_kwargs (`dict[str, dict]`, *optional*):
        Keyword arguments of [`~hf_r2.models.create_model`] per model name, e.g.
        `{"mobilenetv3_small_100": {"act_layer": "relu6"}}`; timm records them in the saved `config.json`, so the
        trained folders load back as trained.
    variants (`list[dict]`, *optional*, defaults to [`DEFAULT_VARIANTS`]):
        One entry per column: `{"name": label, "loss": "baseline" | "linf" | "margin" | "soft_min_max" |
        "kurtosis", "weight": lambda, "per_channel": bool, "r2": {more R2Config fields}}`; `baseline` is R2 off
        (ordinary weight decay); a plain string is a loss name with its default lambda. Fine-tunes of a trained
        model add `"init_from": "baseline"` (start from the model's baseline: the `baselines` folder, else the
        from-scratch baseline variant's first-seed training), `"epochs"` / `"lr"` (their own, shorter recipe) and
        `"compare_to"` (the variant their gains are measured against, e.g. the same-length fine-tune without R2).
        `"weight": "chosen"` takes each model's lambda from the variant's `lambda_sweep` (chosen on the validation
        split; the variant's other seeds train after the sweep), `"weight_decay"` overrides the recipe's for the
        variant (`"chosen"`: the one `weight_decay_sweep` chooses for the model, e.g. the tuned baseline and R2
        trained at it), and `"seeds"` / `"models"` restrict a variant to some of the config's (e.g. one seed of an
        expensive from-scratch run).
    baselines (`dict[str, str]`, *optional*):
        A trained folder per model name (e.g. saved by `hf-r2 train`): that model's baseline is this folder, copied
        into the run instead of trained, and its fine-tunes start from it.

    > Parameters of the training recipe (the same for every variant)

    epochs (`float`, *optional*, defaults to `5.0`):
        Training epochs of each run.
    max_steps (`int`, *optional*, defaults to `-1`):
        Optimizer steps of each run; overrides `epochs` when positive.
    batch_size (`int`, *optional*, defaults to `64`):
        Training batch size (also of the QAT / DKM fine-tunes).
    optimizer (`str`, *optional*, defaults to `"adamw"`):
        `"adamw"` (decoupled weight decay) or `"sgd"` (momentum `momentum`, L2 weight decay: the recipe the paper's
        ImageNet baselines were trained with).
    momentum (`float`, *optional*, defaults to `0.9`):
        SGD momentum.
    lr (`float`, *optional*, defaults to `3e-3`):
        Peak learning rate (cosine decay after a `warmup_ratio` warm-up).
    weight_decay (`float`, *optional*, defaults to `0.05`):
        Weight decay, the same in every variant.
    recipes (`dict[str, dict]`, *optional*):
        Per model name, overrides of `lr`, `weight_decay` and `epochs` (e.g. `{"mobilenetv2_100": {"weight_decay":
        4e-5}}`); a variant's own `epochs` / `lr` override these in turn.
    warmup_ratio (`float`, *optional*, defaults to `0.05`):
        Fraction of the steps of linear learning-rate warm-up.
    seeds (`list[int]`, *optional*, defaults to `[0, 1, 2]`):
        Seeds of the initialisation and the data order. Headline rows use all of them, the other rows and the
        lambda sweep the first.

    > Parameters of the lambda sweep

    lambda_sweep (`dict` or `list[dict]`, *optional*):
        `{"variant": name of a configured R2 variant, "lambdas": [at least 3 values], "models": [...] (default:
        the first model), "settings": [setting names] (default: the headline settings)}`: that variant trained
        at each lambda on the first seed; a list sweeps several variants. `None` runs no sweep. With a
        `validation_size`, each sweep chooses its lambda by [`SWEEP_RULE`].

    weight_decay_sweep (`dict`, *optional*):
        `{"factors": [at least 3 multiples of the recipe's weight decay, 1 among them], "models": [...] (default:
        all), "settings": [setting names] (default: the headline settings)}`: the baseline variant trained at each
        factor times its model's weight decay on the first seed (factor 1 is the baseline itself), so that R2 is
        compared with a tuned baseline, not only the default one. With a `validation_size` it chooses by
        [`WEIGHT_DECAY_RULE`]; variants with `weight_decay: chosen` train at the choice (their lambda sweeps too).
        The sweep runs before the lambda sweeps.

    > Parameters of the low-bit rows

    low_bit (`list[dict]`, *optional*, defaults to [`DEFAULT_LOW_BIT`]):
        One entry per row: `{"method": "ptq" | "qat" | "kmeans" | "dkm", "w_bits": int, "a_bits": int or None
        (ptq, qat), "per_channel": bool (ptq, qat), "weight_range": "maxabs" | "mse" (ptq), "rounding": "nearest"
        | "adaround" (ptq), "pre": ["cle", "magr"] (ptq, kmeans), "bias_correction": bool (ptq),
        "finetune_steps": int (qat, dkm: this row's fine-tune budget, overriding `finetune_max_steps`),
        "headline": bool, "name": label, "variants" / "models": [names]}`. PTQ rows re-estimate BN; `pre` runs range
        reductions on the float model first (cross-layer equalization, MagR: the post-training alternatives to R2);
        `bias_correction` corrects the biases last (what CLE's folded BN needs); `headline` defaults to true for
        round-to-nearest PTQ and k-means (cheap), false for AdaRound, QAT and DKM; `variants` / `models` measure an
        expensive row (QAT, DKM) on those columns / models only.
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
    onnx_settings (`list[str]`, *optional*):
        Settings whose low-bit models are also exported to ONNX (`runs/.../onnx/<setting>.onnx`) and measured in
        ONNX Runtime on the test images, beside hf-r2's top-1 (needs `pip install 'hf-r2[onnx]'`; skipped, with a
        note, without it).

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
    validation_size: int | None = field(
        default=None, metadata={"help": "Training images held out as a validation split (choices are made on it)."}
    )
    # models and variants
    models: list[str] = field(default_factory=lambda: ["mobilenetv3_small_100", "resnet10t"],
                              metadata={"help": "Models trained from scratch."})
    model_kwargs: dict[str, dict[str, Any]] = field(
        default_factory=dict, metadata={"help": "create_model keyword arguments per model name."}
    )
    variants: list[Any] = field(default_factory=default_variants,
                                metadata={"help": "Variants (columns): baseline and R2 losses with their lambda."})
    baselines: dict[str, str] = field(
        default_factory=dict, metadata={"help": "A trained baseline folder per model (copied, not trained)."}
    )
    # recipe
    epochs: float = field(default=5.0, metadata={"help": "Training epochs of each run."})
    max_steps: int = field(default=-1, metadata={"help": "Training steps of each run; overrides epochs if > 0."})
    batch_size: int = field(default=64, metadata={"help": "Training batch size."})
    optimizer: str = field(default="adamw", metadata={"help": "'adamw' or 'sgd'."})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum."})
    lr: float = field(default=3e-3, metadata={"help": "Peak learning rate."})
    weight_decay: float = field(default=0.05, metadata={"help": "Weight decay (every variant)."})
    recipes: dict[str, dict[str, float]] = field(
        default_factory=dict, metadata={"help": "Per model: overrides of lr, weight_decay, epochs."}
    )
    warmup_ratio: float = field(default=0.05, metadata={"help": "Fraction of steps of learning-rate warm-up."})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2],
                             metadata={"help": "Seeds; headline rows use all, other rows the first."})
    # lambda sweep
    lambda_sweep: dict[str, Any] | list[dict[str, Any]] | None = field(
        default_factory=lambda: {"variant": "linf", "lambdas": [1.0, 3.0, 10.0]},
        metadata={"help": "{variant, lambdas (>= 3), models, settings}: a variant at several lambdas, first seed."},
    )
    weight_decay_sweep: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "{factors (>= 3, with 1), models, settings}: the baseline at several weight decays."},
    )
    # low-bit rows
    low_bit: list[dict[str, Any]] = field(default_factory=default_low_bit,
                                          metadata={"help": "Low-bit rows (ptq / qat / kmeans / dkm settings)."})
    calibration_samples: int = field(default=512, metadata={"help": "Calibration / BN re-estimation images."})
    adaround_iters: int | None = field(default=None, metadata={"help": "AdaRound iterations per layer."})
    finetune_epochs: int = field(default=1, metadata={"help": "Fine-tuning epochs of QAT and DKM."})
    finetune_max_steps: int | None = field(default=None, metadata={"help": "Fine-tuning steps of QAT and DKM."})
    finetune_lr: float = field(default=1e-3, metadata={"help": "Fine-tuning learning rate."})
    onnx_settings: list[str] | None = field(default=None,
                                            metadata={"help": "Settings also exported to ONNX and run there."})
    # report
    plot_layers: int = field(default=4, metadata={"help": "Layers in the weight histograms."})
    version: int = field(default=1, metadata={"help": "Format version of this config."})

    def __post_init__(self) -> None:
        self.output_dir = os.path.expanduser(os.fspath(self.output_dir))  # `~/.cache/...`: outside the work tree
        if not self.output_dir:
            raise ValueError("`output_dir` must be a non-empty path, got ''.")
        if isinstance(self.models, str):
            self.models = [self.models]
        if not self.models or not all(isinstance(m, str) and m for m in self.models):
            raise ValueError(f"`models` must be a non-empty list of model names, got {self.models!r}.")
        odd = [m for m in self.models if not re.fullmatch(r"(hf-hub:)?\w[\w.-]*(/\w[\w.-]*)?", m, re.A) or ".." in m]
        if odd:  # each name becomes a folder under runs/: `..` would leave it
            raise ValueError(f"`models` holds {odd}, which are not plain model names: use a timm name (`resnet10t`) "
                             "or a Hub id (`org/name`, `hf-hub:org/name`), without `..`, spaces or other path parts.")
        if len(set(self.models)) != len(self.models):
            raise ValueError(f"`models` lists a model twice: {self.models}.")
        self.model_kwargs = dict(self.model_kwargs or {})
        for model, kwargs in self.model_kwargs.items():
            if model not in self.models:
                raise ValueError(f"`model_kwargs` names {model!r}, which is not in `models` {self.models}.")
            if not isinstance(kwargs, dict):
                raise ValueError(f"`model_kwargs[{model!r}]` must be a mapping of create_model keyword arguments, "
                                 f"such as {{'act_layer': 'relu6'}}, got {kwargs!r}.")
        if not isinstance(self.variants, (list, tuple)) or not self.variants:
            raise ValueError(f"`variants` must be a non-empty list, got {self.variants!r}.")
        self.variants = [normalise_variant(v, i) for i, v in enumerate(self.variants)]
        check_unique("variants", [v["name"] for v in self.variants])
        if isinstance(self.seeds, int):
            self.seeds = [self.seeds]
        if not self.seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in self.seeds):
            raise ValueError(f"`seeds` must be a non-empty list of integers, got {self.seeds!r}.")
        check_unique("seeds", self.seeds)
        for name in ("max_train_samples", "max_eval_samples", "adaround_iters", "finetune_max_steps",
                     "validation_size"):
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
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"`optimizer` must be 'adamw' or 'sgd', got {self.optimizer!r}.")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"`momentum` must be in [0, 1), got {self.momentum}.")
        self.recipes = {m: dict(r) for m, r in (self.recipes or {}).items()}
        for model, recipe in self.recipes.items():
            if model not in self.models:
                raise ValueError(f"`recipes` names {model!r}, which is not in `models` {self.models}.")
            check_keys(f"`recipes[{model!r}]`", recipe, ("lr", "weight_decay", "epochs"))
            if any(isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 for v in recipe.values()):
                raise ValueError(f"`recipes[{model!r}]` values must be numbers >= 0, got {recipe}.")
        self.baselines = {m: os.path.expanduser(os.fspath(p)) for m, p in (self.baselines or {}).items()}
        unknown = [m for m in self.baselines if m not in self.models]
        if unknown:
            raise ValueError(f"`baselines` names {unknown}, which are not in `models` {self.models}.")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"`warmup_ratio` must be in [0, 1), got {self.warmup_ratio}.")
        if not isinstance(self.low_bit, (list, tuple)):
            raise ValueError(f"`low_bit` must be a list of settings, got {self.low_bit!r}.")
        self.low_bit = [normalise_setting(s, i) for i, s in enumerate(self.low_bit)]
        names = [s["name"] for s in self.low_bit]
        check_unique("low_bit", names)
        if "FP" in names:
            raise ValueError("`low_bit` has a setting named 'FP': that name is the float row, measured always.")
        for setting in self.low_bit:
            quant_config(setting, self.adaround_iters)  # the quant configs' own checks, now rather than an hour in
        names = [v["name"] for v in self.variants]
        for v in self.variants:
            if v["compare_to"] is not None and v["compare_to"] not in names:
                raise ValueError(f"Variant {v['name']!r} has `compare_to={v['compare_to']!r}`, which is not a "
                                 f"variant; the variants are {names}.")
        if any(v["init_from"] for v in self.variants):
            missing = [m for m in self.models if m not in self.baselines]
            if missing and self.baseline_variant is None:
                raise ValueError(f"Variants with `init_from: baseline` start from each model's baseline, but "
                                 f"{missing} have none: add a from-scratch `{{'loss': 'baseline'}}` variant or give "
                                 f"their trained folders in `baselines`.")
        sweeps = self.lambda_sweep
        sweeps = [] if sweeps is None else (sweeps if isinstance(sweeps, (list, tuple)) else [sweeps])
        self.lambda_sweep = [normalise_lambda_sweep(sweep, self) for sweep in sweeps] or None
        if self.lambda_sweep:
            check_unique("lambda_sweep.variant", [sweep["variant"] for sweep in self.lambda_sweep])
        self.weight_decay_sweep = normalise_weight_decay_sweep(self.weight_decay_sweep, self)
        for v in self.variants:
            check_variant_scope(v, self)
        self.onnx_settings = None if self.onnx_settings is None else list(self.onnx_settings)
        unknown = [name for name in self.onnx_settings or [] if name not in [s["name"] for s in self.low_bit]]
        if unknown:
            raise ValueError(f"`onnx_settings` {unknown} are not low-bit settings; they are "
                             f"{[s['name'] for s in self.low_bit]}.")
        for setting in self.low_bit:
            for key, allowed in (("variants", names), ("models", self.models)):
                unknown = [x for x in setting[key] or [] if x not in allowed]
                if unknown:
                    raise ValueError(f"Setting {setting['name']!r} has `{key}` {unknown}, which are not in the "
                                     f"config's {key} {allowed}.")

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> ReproduceConfig:
        """Load a config from a YAML (`.yaml`, `.yml`) or JSON (`.json`) file of the fields above; a folder loads
        its `reproduce_config.json` (the copy every run writes into `output_dir`)."""
        from .._utils import read_config_file

        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, cls.config_name)
        return cls.from_dict(read_config_file(path))

    # ---- derived views ----

    def select_models(self, models: list[str]) -> ReproduceConfig:
        """A copy restricted to `models` (a subset of `models`, in their order; the sweep keeps its models among
        them, or is dropped), e.g. to run one process per model in parallel into the same `output_dir`."""
        unknown = [m for m in models if m not in self.models]
        if unknown or not models:
            raise ValueError(f"Models to select must be a non-empty subset of `models` {self.models}, got {models}.")
        data = self.to_dict()
        data["models"] = [m for m in self.models if m in models]
        data["model_kwargs"] = {m: kw for m, kw in self.model_kwargs.items() if m in models}
        data["recipes"] = {m: r for m, r in self.recipes.items() if m in models}
        data["baselines"] = {m: p for m, p in self.baselines.items() if m in models}
        for key in ("variants", "low_bit"):  # their `models` follow
            data[key] = [x if x.get("models") is None else {**x, "models": [m for m in x["models"] if m in models]}
                         for x in data[key]]
        sweeps = [{**sweep, "models": [m for m in sweep["models"] if m in models]}
                  for sweep in self.lambda_sweep or []]
        data["lambda_sweep"] = [sweep for sweep in sweeps if sweep["models"]] or None
        if self.weight_decay_sweep:
            kept = [m for m in self.weight_decay_sweep["models"] if m in models]
            data["weight_decay_sweep"] = {**self.weight_decay_sweep, "models": kept} if kept else None
        return type(self).from_dict(data)

    def select_variants(self, names: list[str]) -> ReproduceConfig:
        """A copy with only the variants `names` and those they need: the baseline they start from (`init_from`)
        and the variant they are compared to (`compare_to`, else the baseline). Settings limited to `variants` keep
        those among them (or are dropped), sweeps of dropped variants go; the cache is the same, so a last run of
        the whole config reuses every training."""
        known = [v["name"] for v in self.variants]
        if not names or any(n not in known for n in names):
            raise ValueError(f"Variants to select must be a non-empty subset of the variants {known}, got {names}.")
        keep, todo = set(), list(names)
        while todo:
            name = todo.pop()
            v = next(v for v in self.variants if v["name"] == name)
            keep.add(v["name"])
            needs = ((v["init_from"] or v["weight_decay"] == CHOSEN) and self.baseline_variant, self.reference_of(v))
            todo += [n for n in needs if n and n not in keep]
        data = self.to_dict()
        data["variants"] = [v for v in data["variants"] if v["name"] in keep]
        limited = [s if s.get("variants") is None else {**s, "variants": [n for n in s["variants"] if n in keep]}
                   for s in data["low_bit"]]
        data["low_bit"] = [s for s in limited if s.get("variants") is None or s["variants"]]
        names_left = [s["name"] for s in data["low_bit"]]
        data["onnx_settings"] = [n for n in self.onnx_settings or [] if n in names_left] or None
        data["lambda_sweep"] = [sw for sw in self.lambda_sweep or [] if sw["variant"] in keep] or []
        return type(self).from_dict(data)

    def setting(self, name: str) -> dict[str, Any]:
        """The low-bit setting called `name`."""
        for s in self.low_bit:
            if s["name"] == name:
                return s
        raise KeyError(name)

    @property
    def baseline_variant(self) -> str | None:
        """Name of the baseline variant (R2 off, not a fine-tune), `None` if the config has none."""
        return next((v["name"] for v in self.variants if v["loss"] == BASELINE and not v["init_from"]), None)

    def reference_of(self, variant: dict[str, Any]) -> str | None:
        """The variant whose top-1 `variant`'s gains are measured against: its `compare_to`, else the baseline."""
        return variant["compare_to"] or self.baseline_variant

    def recipe(self, model: str, variant: dict[str, Any]) -> dict[str, float]:
        """`{lr, weight_decay, epochs, warmup_ratio}` of `variant`'s training of `model`: the config's, then
        `recipes[model]`'s, then the variant's own `epochs` / `lr` / `warmup_ratio` / `weight_decay` (resolved: a
        number)."""
        out = {"lr": self.lr, "weight_decay": self.weight_decay, "epochs": self.epochs,
               "warmup_ratio": self.warmup_ratio, **self.recipes.get(model, {})}
        out.update({k: variant[k] for k in ("epochs", "lr", "warmup_ratio", "weight_decay")
                    if variant.get(k) is not None and variant.get(k) != CHOSEN})
        return out

    def resolve(self, variant: dict[str, Any], model: str, chosen: dict[str, dict[str, float | None]] | None = None,
                chosen_weight_decay: dict[str, float | None] | None = None) -> dict[str, Any] | None:
        """`variant` as trained on `model`, its chosen values filled in ([`resolve_weight`]; `None`: not on that
        model, or not chosen yet). A `weight_decay` equal to the model's recipe is dropped, so that a variant at the
        default weight decay is the same training (the same folder) as one without the key."""
        resolved = resolve_weight(variant, model, chosen, chosen_weight_decay)
        if resolved is not None and resolved.get("weight_decay") is not None and resolved["weight_decay"] == (
                self.recipe(model, {**resolved, "weight_decay": None})["weight_decay"]):
            resolved = {**resolved, "weight_decay": None}
        return resolved

    def weight_decay_of(self, model: str, factor: float) -> float:
        """The weight decay of `model`'s baseline at `factor` times its recipe's (a `weight_decay_sweep` point)."""
        return float(f"{factor * self.recipe(model, {})['weight_decay']:.12g}")  # 1.2e-4, not 1.2000000000000002e-4

    @property
    def headline_settings(self) -> list[str]:
        """Names of the settings measured on every seed."""
        return [s["name"] for s in self.low_bit if s["headline"]]
