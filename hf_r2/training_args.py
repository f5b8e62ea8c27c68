"""`R2TrainingArguments`: [`~transformers.TrainingArguments`] plus the R2-Loss fields of [`R2Config`].

Paper: "R2 Loss: Range Restriction Loss for Model Compression and Quantization", Kundu et al., 2023
(https://huggingface.co/papers/2303.08253).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from dataclasses import dataclass, field

from transformers import TrainingArguments

from ._utils import accept_init_aliases
from .config import R2Config, R2LossType

__all__ = ["R2TrainingArguments"]


# The R2Config fields that R2TrainingArguments carries as `r2_<name>` (all but the format `version`; `r2_lambda`
# keeps its name).
_R2_FIELDS = [f.name for f in dataclasses.fields(R2Config) if f.name != "version"]
_ARG_NAMES = {name: name if name.startswith("r2_") else f"r2_{name}" for name in _R2_FIELDS}
# A backticked R2Config field name at the start of a code span, e.g. `loss` or `loss='margin'`.
_R2_NAME = re.compile(r"`(" + "|".join(n for n in _R2_FIELDS if not n.startswith("r2_")) + r")\b")


def _has_accelerator() -> bool:
    import torch

    mps = getattr(torch.backends, "mps", None)
    return torch.cuda.is_available() or bool(mps is not None and mps.is_available())


@dataclass
class R2TrainingArguments(TrainingArguments):
    # docstyle-ignore
    r"""
    Configuration class for the [`R2Trainer`].

    This class holds only the parameters specific to R2-Loss training; every other field is a
    [`~transformers.TrainingArguments`] field. The `r2_*` fields are those of [`R2Config`] with an `r2_` prefix, and
    [`~R2TrainingArguments.r2_config`] turns them into one (so an invalid value fails here, at construction).

    Using [`~transformers.HfArgumentParser`] this class becomes command-line flags (`--r2_loss margin
    --r2_lambda 0.01`) or a JSON / YAML config file.

    A baseline run (same training, no R2 term) is `r2_lambda=0`: R2 is then not computed, but `task_loss` and the
    range statistics (`r2_max_abs`, ...) are still logged, so that baseline and R2 runs compare on one chart. There
    is no `r2_loss="none"`: one switch for "off" is enough, and `r2_loss` always names a real variant.

    Parameters:
        > Parameters that control the R2 term

        r2_loss (`str`, *optional*, defaults to `"linf"`):
            Which R2 variant: `"linf"` (largest absolute weight), `"margin"` (learnable margin), `"soft_min_max"`
            (smooth max minus min, learnable temperature) or `"kurtosis"` (KURE, the comparison regulariser).
        r2_lambda (`float`, *optional*, defaults to `0.01`):
            The paper's lambda, the coefficient of the R2 term in the total loss `task_loss + lambda * R`. `0` trains
            a baseline. `r2_weight` (and `--r2_weight` / `--r2-weight`) is its older name, still accepted.
        r2_warmup_steps (`int`, *optional*, defaults to `0`):
            Optimizer steps over which lambda ramps linearly from 0 to `r2_lambda`.
        r2_per_channel (`bool`, *optional*, defaults to `False`):
            Compute the loss per output channel instead of per tensor, for per-channel quantization.

        > Parameters that control which layers R2 acts on

        r2_include (`list[str]`, *optional*):
            Regular expressions (`re.search`) over module names; only matching Conv/Linear layers are targets. `None`
            targets every Conv1d/2d/3d and Linear layer.
        r2_exclude (`list[str]`, *optional*):
            Regular expressions over module names to leave out, applied after `r2_include`.
        r2_skip_first_last (`bool`, *optional*, defaults to `False`):
            Leave out the first and the last target layer (often kept at high precision).
        r2_skip_frozen (`bool`, *optional*, defaults to `True`):
            Leave out layers whose weight is frozen (`requires_grad=False`).

        > Parameters of each R2 variant

        r2_margin_penalty (`float`, *optional*, defaults to `1.0`):
            Margin R2: strength of the `m^2` term that shrinks the learnable margin.
        r2_soft_min_max_penalty (`float`, *optional*, defaults to `1.0`):
            Soft-Min-Max R2: scale of the `2 ln(n) / alpha` term that keeps the temperature from collapsing.
        r2_kurtosis_target (`float`, *optional*, defaults to `1.8`):
            KURE: target kurtosis (1.8 is the uniform distribution's).

    > [!NOTE]
    > These parameters have default values different from [`~transformers.TrainingArguments`]:
    > - `remove_unused_columns`: Defaults to `False` instead of `True`. A timm model's `forward(x)` names no input
    >   column, so the Trainer's column filter would drop `pixel_values` and `labels`.
    > - `dataloader_pin_memory`: `False` when there is no CUDA or MPS device (pinned memory needs an accelerator, and
    >   torch warns on every CPU run otherwise).

    `overwrite_output_dir` (`bool`, *optional*, defaults to `False`): `hf-r2 train` refuses an `output_dir` that
    holds another run unless it is set, and then clears what the old run wrote (see [`hf_r2.train.run_train`]).

    `add_to_output_dir` (`bool`, *optional*, defaults to `False`): `hf-r2 train` refuses an `output_dir` that holds
    the user's files and no run unless it is set; then it trains beside them and touches none of them
    ([`hf_r2.output_folder`]).

    ```python
    >>> from hf_r2 import R2TrainingArguments
    >>> args = R2TrainingArguments(output_dir="out", r2_loss="margin", r2_lambda=0.01, r2_warmup_steps=100)
    >>> args.r2_config.loss
    'margin'
    ```
    """

    # Parameters whose default values are overridden from TrainingArguments
    remove_unused_columns: bool = field(
        default=False,
        metadata={
            "help": "Whether or not to automatically remove the columns unused by the model forward method. Defaults "
            "to `False` here: a timm model's `forward(x)` names no column, so `pixel_values` and `labels` would go."
        },
    )

    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Train into an output_dir that holds another run: what that run wrote (its checkpoints, "
                  "model, results, r2_*.json files) is removed first; other files stay (without it, such a folder is "
                  "refused)."},
    )
    add_to_output_dir: bool = field(
        default=False,
        metadata={"help": "Train into an output_dir that holds files of yours and no run: they stay as they are, "
                  "and a later --overwrite_output_dir removes only what the run wrote (without it, such a folder is "
                  "refused; a file of yours with a name the run writes, such as config.json, is refused always)."},
    )

    # Parameters that control the R2 term
    r2_loss: str = field(
        default="linf",
        metadata={
            "help": "Which R2 variant: 'linf' (largest absolute weight), 'margin' (learnable margin), 'soft_min_max' "
            "(smooth max minus min, learnable temperature) or 'kurtosis' (KURE, the comparison regulariser).",
            "choices": [e.value for e in R2LossType],
        },
    )
    r2_lambda: float = field(
        default=0.01,
        metadata={
            "help": "The paper's lambda: the coefficient of the R2 term in the total loss `task_loss + lambda * R`. "
            "0 trains a baseline (R2 is not computed; task_loss and the range statistics are still logged). "
            "--r2_weight is its older name.",
            "aliases": ["--r2-weight", "--r2_weight"],
        },
    )
    r2_warmup_steps: int = field(
        default=0, metadata={"help": "Optimizer steps over which lambda ramps linearly from 0 to `r2_lambda`."}
    )
    r2_per_channel: bool = field(
        default=False,
        metadata={"help": "Compute the loss per output channel instead of per tensor, for per-channel quantization."},
    )

    # Parameters that control which layers R2 acts on
    r2_include: list[str] | None = field(
        default=None,
        metadata={
            "help": "Regular expressions (re.search) over module names; only matching Conv/Linear layers are "
            "targets. Default: every Conv1d/2d/3d and Linear layer."
        },
    )
    r2_exclude: list[str] | None = field(
        default=None,
        metadata={"help": "Regular expressions over module names to leave out, applied after `r2_include`."},
    )
    r2_skip_first_last: bool = field(
        default=False,
        metadata={"help": "Leave out the first and the last target layer (often kept at high precision)."},
    )
    r2_skip_frozen: bool = field(
        default=True,
        metadata={"help": "Leave out layers whose weight is frozen (requires_grad=False); false keeps them."},
    )

    # Parameters of each R2 variant
    r2_margin_penalty: float = field(
        default=1.0, metadata={"help": "Margin R2: strength of the m^2 term that shrinks the learnable margin."}
    )
    r2_soft_min_max_penalty: float = field(
        default=1.0,
        metadata={
            "help": "Soft-Min-Max R2: scale of the 2 ln(n) / alpha term that keeps the temperature from collapsing."
        },
    )
    r2_kurtosis_target: float = field(
        default=1.8, metadata={"help": "KURE: target kurtosis (1.8 is the uniform distribution's)."}
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # NaN passes every range check (`x < 0` is False) and trains as NaN
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"`{f.name}` must be a finite number, got {value!r}.")
        super().__post_init__()
        if self.dataloader_pin_memory and not _has_accelerator():
            self.dataloader_pin_memory = False  # nothing to pin for: torch would warn at every DataLoader
        if self.r2_loss is None or str(self.r2_loss).lower() in ("none", "off", ""):
            raise ValueError(
                f"`r2_loss` must be one of {[e.value for e in R2LossType]}, got {self.r2_loss!r}. For a baseline run "
                "without the R2 term keep a variant and set `r2_lambda=0`."
            )
        for name in ("r2_include", "r2_exclude"):
            if isinstance(getattr(self, name), str):
                setattr(self, name, [getattr(self, name)])
        self.r2_config  # noqa: B018 - build once so that R2Config's checks run at construction

    # Written without the tokens: the Trainer saves these arguments as a pickle (`torch.save(args,
    # "training_args.bin")`, in the run and in every checkpoint), and its `push_to_hub` uploads that file. A pickle
    # (and a process that unpickles one) gets every `*_token` field as `None`, as `to_dict` / `str` write
    # `<HUB_TOKEN>`; copies in memory (`copy.copy`, `copy.deepcopy`) keep them, and so does this object.

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for name in state:
            if name.endswith("_token"):
                state[name] = None
        return state

    def __copy__(self) -> R2TrainingArguments:
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    def __deepcopy__(self, memo: dict) -> R2TrainingArguments:
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    @property
    def r2_config(self) -> R2Config:
        """The [`R2Config`] built from the `r2_*` fields (a new object at each access)."""
        try:
            return R2Config(**{name: getattr(self, arg) for name, arg in _ARG_NAMES.items()})
        except ValueError as err:
            # R2Config names its own fields (`loss`, `include`, ...): name the arguments the user actually set.
            raise ValueError(_R2_NAME.sub(r"`r2_\1", str(err))) from None

    @property
    def r2_weight(self) -> float:
        """The older name of `r2_lambda`, kept so that code written against it still reads the value."""
        return self.r2_lambda


# `r2_weight=` (the older name) sets `r2_lambda`; both at once is an error, as in `R2Config`
accept_init_aliases(R2TrainingArguments, {"r2_weight": "r2_lambda"})
