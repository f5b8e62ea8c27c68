"""`R2Config`: what R2-Loss to apply, how strongly, and to which layers. Plain data with a JSON round trip."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import ClassVar

from ._finite import check_finite_number
from ._utils import JsonConfigMixin, accept_init_aliases, check_choice, check_patterns, format_choices

__all__ = ["R2Config", "R2LossType", "R2_CONFIG_NAME"]

R2_CONFIG_NAME = "r2_config.json"


class R2LossType(str, enum.Enum):
    """The R2 variants. Plain strings are accepted wherever a `R2LossType` is."""

    LINF = "linf"
    MARGIN = "margin"
    SOFT_MIN_MAX = "soft_min_max"
    KURTOSIS = "kurtosis"


@dataclass
class R2Config(JsonConfigMixin):
    """Configuration of R2-Loss (Range Restriction Loss) for one model.

    The total auxiliary loss is `r2_lambda * ramp(step) * sum_l R(W_l)` over the target layers `l`, where `R` is the
    chosen loss of [`hf_r2.losses`] and `ramp` rises linearly from 0 to 1 over `warmup_steps`.

    > Parameters that choose the loss

    loss (`str` or [`R2LossType`], *optional*, defaults to `"linf"`):
        Which R2 variant: `"linf"` (largest absolute weight), `"margin"` (learnable margin), `"soft_min_max"`
        (smooth max minus min, learnable temperature) or `"kurtosis"` (KURE, the comparison regulariser).
    r2_lambda (`float`, *optional*, defaults to `0.01`):
        The paper's lambda, the coefficient of the R2 term in the total loss: a finite number >= 0 (NaN, inf and
        strings are refused, as are NaN / inf in the other numbers). `weight` is its older name, still accepted by
        the constructor and in saved `r2_config.json` files and readable as the `weight` property.
    warmup_steps (`int`, *optional*, defaults to `0`):
        Optimizer steps over which lambda ramps linearly from 0 to `r2_lambda`.
    per_channel (`bool`, *optional*, defaults to `False`):
        Compute the loss per output channel (dim 0) instead of per tensor, for per-channel quantization.

    > Parameters that choose the layers

    include (`list[str]`, *optional*):
        Regular expressions (`re.search`) over module names; only matching Conv/Linear layers are targets.
        `None` targets every Conv1d/2d/3d (depthwise too) and Linear layer.
    exclude (`list[str]`, *optional*):
        Regular expressions over module names to leave out, applied after `include`.
    skip_first_last (`bool`, *optional*, defaults to `False`):
        Leave out the first and the last target layer (often kept at high precision).
    skip_frozen (`bool`, *optional*, defaults to `True`):
        Leave out layers whose weight is frozen (`requires_grad=False`): R2 cannot move them, so they would only add
        constant terms (and margins that never move). `False` keeps them.

    > Parameters of each loss

    margin_penalty (`float`, *optional*, defaults to `1.0`):
        Margin R2: strength of the `m^2` term that shrinks the learnable margin.
    soft_min_max_penalty (`float`, *optional*, defaults to `1.0`):
        Soft-Min-Max R2: scale of the `2 ln(n) / alpha` term that keeps the temperature from collapsing.
    kurtosis_target (`float`, *optional*, defaults to `1.8`):
        KURE: target kurtosis (1.8 is the uniform distribution's).
    """

    config_name: ClassVar[str] = R2_CONFIG_NAME
    _aliases: ClassVar[dict[str, str]] = {"weight": "r2_lambda"}

    # the loss
    loss: str = field(
        default="linf",
        metadata={"help": f"Which R2 variant: one of {format_choices(R2LossType)}."},
    )
    r2_lambda: float = field(
        default=0.01,
        # `aliases`: the older flag of a parser built from this class (HfArgumentParser, examples/train_accelerate.py)
        metadata={"help": "The paper's lambda: coefficient of the R2 term in the total loss.",
                  "aliases": ["--weight"]},
    )
    warmup_steps: int = field(
        default=0, metadata={"help": "Optimizer steps over which lambda ramps linearly from 0 to `r2_lambda`."}
    )
    per_channel: bool = field(
        default=False, metadata={"help": "Compute the loss per output channel instead of per tensor."}
    )
    # the layers
    include: list[str] | None = field(
        default=None,
        metadata={"help": "Regexes over module names: only matching Conv/Linear layers are targets (default: all)."},
    )
    exclude: list[str] | None = field(
        default=None, metadata={"help": "Regexes over module names to leave out, applied after `include`."}
    )
    skip_first_last: bool = field(
        default=False, metadata={"help": "Leave out the first and the last target layer."}
    )
    skip_frozen: bool = field(
        default=True, metadata={"help": "Leave out layers whose weight is frozen (requires_grad=False)."}
    )
    # each loss's own knobs
    margin_penalty: float = field(
        default=1.0, metadata={"help": "Margin R2: strength of the m^2 term that shrinks the margin."}
    )
    soft_min_max_penalty: float = field(
        default=1.0, metadata={"help": "Soft-Min-Max R2: scale of the 2 ln(n)/alpha term on the temperature."}
    )
    kurtosis_target: float = field(default=1.8, metadata={"help": "KURE: target kurtosis (1.8 = uniform)."})
    # bookkeeping
    version: int = field(default=1, metadata={"help": "Format version of this config."})

    def __post_init__(self) -> None:
        self.loss = check_choice("loss", self.loss, R2LossType)
        # NaN passes every `< 0` test and would train (and be saved) as lambda = NaN: each number is checked finite
        for name in ("r2_lambda", "margin_penalty", "soft_min_max_penalty"):
            setattr(self, name, check_finite_number(name, getattr(self, name), minimum=0))
        self.kurtosis_target = check_finite_number("kurtosis_target", self.kurtosis_target)
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int):
            raise ValueError(f"`warmup_steps` must be an integer, got {type(self.warmup_steps).__name__} "
                             f"{self.warmup_steps!r}.")
        if self.warmup_steps < 0:
            raise ValueError(f"`warmup_steps` must be >= 0, got {self.warmup_steps}.")
        self.include = check_patterns("include", self.include)
        self.exclude = check_patterns("exclude", self.exclude)

    @property
    def loss_type(self) -> R2LossType:
        return R2LossType(self.loss)

    @property
    def weight(self) -> float:
        """The older name of `r2_lambda`, kept so that code written against it still reads the value."""
        return self.r2_lambda


# `R2Config(weight=0.1)` (the older name) builds `R2Config(r2_lambda=0.1)`; both at once is an error
accept_init_aliases(R2Config, R2Config._aliases)
