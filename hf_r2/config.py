"""`R2Config`: what R2-Loss to apply, how strongly, and to which layers. Plain data with a JSON round trip."""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["R2Config", "R2LossType", "R2_CONFIG_NAME"]

R2_CONFIG_NAME = "r2_config.json"


class R2LossType(str, enum.Enum):
    """The R2 variants. Plain strings are accepted wherever a `R2LossType` is."""

    LINF = "linf"
    MARGIN = "margin"
    SOFT_MIN_MAX = "soft_min_max"
    KURTOSIS = "kurtosis"


def _choices(enum_cls: type[enum.Enum]) -> str:
    return ", ".join(repr(e.value) for e in enum_cls)


@dataclass
class R2Config:
    """Configuration of R2-Loss (Range Restriction Loss) for one model.

    The total auxiliary loss is `weight * ramp(step) * sum_l R(W_l)` over the target layers `l`, where `R` is the
    chosen loss of [`hf_r2.losses`] and `ramp` rises linearly from 0 to 1 over `warmup_steps`.

    > Parameters that choose the loss

    loss (`str` or [`R2LossType`], *optional*, defaults to `"linf"`):
        Which R2 variant: `"linf"` (largest absolute weight), `"margin"` (learnable margin), `"soft_min_max"`
        (smooth max minus min, learnable temperature) or `"kurtosis"` (KURE, the comparison regulariser).
    weight (`float`, *optional*, defaults to `0.01`):
        The coefficient lambda of the R2 term in the total loss.
    warmup_steps (`int`, *optional*, defaults to `0`):
        Optimizer steps over which lambda ramps linearly from 0 to `weight`.
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

    > Parameters of each loss

    margin_penalty (`float`, *optional*, defaults to `1.0`):
        Margin R2: strength of the `m^2` term that shrinks the learnable margin.
    soft_min_max_penalty (`float`, *optional*, defaults to `1.0`):
        Soft-Min-Max R2: scale of the `2 ln(n) / alpha` term that keeps the temperature from collapsing.
    kurtosis_target (`float`, *optional*, defaults to `1.8`):
        KURE: target kurtosis (1.8 is the uniform distribution's).
    """

    # the loss
    loss: str = field(
        default="linf",
        metadata={"help": f"Which R2 variant: one of {_choices(R2LossType)}."},
    )
    weight: float = field(default=0.01, metadata={"help": "Coefficient lambda of the R2 term in the total loss."})
    warmup_steps: int = field(
        default=0, metadata={"help": "Optimizer steps over which lambda ramps linearly from 0 to `weight`."}
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
        if isinstance(self.loss, R2LossType):
            self.loss = self.loss.value
        valid = [e.value for e in R2LossType]
        if self.loss not in valid:
            hint = ""
            close = [v for v in valid if v.replace("_", "") == str(self.loss).lower().replace("_", "").replace("-", "")]
            if close:
                hint = f" Did you mean `loss={close[0]!r}`?"
            raise ValueError(f"`loss` must be one of {_choices(R2LossType)}, got {self.loss!r}.{hint}")
        if self.weight < 0:
            raise ValueError(f"`weight` must be >= 0, got {self.weight}.")
        if self.warmup_steps < 0:
            raise ValueError(f"`warmup_steps` must be >= 0, got {self.warmup_steps}.")
        for name in ("margin_penalty", "soft_min_max_penalty"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)}.")
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = [value]
                setattr(self, name, value)
            for pattern in value or []:
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise ValueError(f"`{name}` holds an invalid regular expression {pattern!r}: {err}.") from None

    @property
    def loss_type(self) -> R2LossType:
        return R2LossType(self.loss)

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-ready dict, with the hf-r2 version that wrote it."""
        from . import __version__

        return {**asdict(self), "hf_r2_version": __version__}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> R2Config:
        """Build from a dict; unknown keys are an error (they are likely typos), except bookkeeping keys."""
        data = {k: v for k, v in data.items() if k != "hf_r2_version"}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"Unknown `R2Config` field(s) {unknown}; valid fields are {sorted(names)}.")
        return cls(**data)

    def save_pretrained(self, save_directory: str | os.PathLike) -> str:
        """Write `r2_config.json` into `save_directory` (atomically: a temp file, then a rename)."""
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, R2_CONFIG_NAME)
        fd, tmp = tempfile.mkstemp(dir=save_directory, prefix=".r2_config.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, **hub_kwargs: Any) -> R2Config:
        """Load from a folder, a `r2_config.json` file, or a Hub repo id (through `hf_hub_download`)."""
        path = os.fspath(path_or_repo_id)
        if os.path.isdir(path):
            path = os.path.join(path, R2_CONFIG_NAME)
        if not os.path.isfile(path):
            if os.path.exists(os.fspath(path_or_repo_id)):
                raise FileNotFoundError(f"No {R2_CONFIG_NAME} in {os.fspath(path_or_repo_id)!r}.")
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(os.fspath(path_or_repo_id), R2_CONFIG_NAME, **hub_kwargs)
        with open(path) as f:
            return cls.from_dict(json.load(f))
