"""`R2Regularizer`: R2-Loss over every target layer of a model, in batched form.

Paper: "R2 Loss: Range Restriction Loss for Model Compression and Quantization", Kundu et al., 2023
(https://huggingface.co/papers/2303.08253).

The total is `sum_l R(W_l)` over the target layers `l` (Conv1d/2d/3d, depthwise included, and Linear, found by
type so that timm and transformers layers alike are covered), with `R` one of the functions of
[`hf_r2.losses`]. The batched autograd Functions that compute it, at a fraction of a plain per-layer loop's cost,
live in `hf_r2/_r2_kernels.py`; they match the functional losses to float32 rounding (tested against them).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ._r2_kernels import KurtosisR2Function, LinfR2Function, MarginR2Function, SoftMinMaxR2Function
from ._r2_plan import GroupPlan, as_rows, ensure_dense_grads
from ._targets import find_target_modules
from .config import R2Config, R2LossType
from .losses import soft_min_max_init_alpha

logger = logging.getLogger(__name__)

__all__ = ["R2Regularizer"]


class R2Regularizer(nn.Module):
    """R2-Loss over the target layers of `model`, owning the learnable margins and temperatures.

    `regularizer()` returns `sum_l R(W_l)`, a float32 scalar (not yet multiplied by lambda: use
    [`~R2Regularizer.lambda_at`], which applies `R2Config.r2_lambda` and its warm-up). The learnable parameters
    are `margin` (Margin R2: one per layer, or per output channel; initialised at `max |w|` so that training
    starts with no excess) and `log_alpha` (Soft-Min-Max R2: `alpha = exp(log_alpha)` stays positive;
    initialised with [`~hf_r2.losses.soft_min_max_init_alpha`], so the soft range starts within 10 % of the
    true range). Train them with the model, without weight decay, and checkpoint `regularizer.state_dict()`.

    The model's weights are referenced, not registered: `regularizer.parameters()` holds only R2's own
    parameters, and the model's `state_dict` is unchanged.

    Args:
        model (`torch.nn.Module`):
            Any timm or transformers model (unwrapped, or wrapped by DDP: the same layers are found).
        config ([`R2Config`], *optional*):
            The settings; keyword arguments build one if omitted (`R2Regularizer(model, loss="margin")`).

    ```python
    >>> import timm
    >>> from hf_r2 import R2Config, R2Regularizer
    >>> model = timm.create_model("resnet18", num_classes=10)
    >>> reg = R2Regularizer(model, R2Config(loss="margin", r2_lambda=0.01))
    >>> loss = task_loss + reg.lambda_at(step) * reg()
    ```
    """

    def __init__(self, model: nn.Module, config: R2Config | None = None, **kwargs: Any) -> None:
        super().__init__()
        if config is None:
            config = R2Config(**kwargs)
        elif kwargs:
            raise TypeError("Pass either an `R2Config` or keyword arguments, not both.")
        self.config = config
        model = getattr(model, "module", model) if isinstance(model, nn.parallel.DistributedDataParallel) else model
        targets = _distinct_weights(find_target_modules(model, config.include, config.exclude, config.skip_first_last))
        #: target layers left out because their weight is frozen (`requires_grad=False`; see `R2Config.skip_frozen`)
        self.skipped_frozen: list[str] = []
        if config.skip_frozen:
            self.skipped_frozen = [n for n, m in targets if not _trainable(m)]
            targets = [(n, m) for n, m in targets if n not in self.skipped_frozen]
            if self.skipped_frozen:
                logger.info("R2 leaves out %d frozen layer(s) (requires_grad=False): %s", len(self.skipped_frozen),
                            ", ".join(self.skipped_frozen[:8]) + (", ..." if len(self.skipped_frozen) > 8 else ""))
            if not targets:
                raise ValueError(
                    f"Every target layer of {type(model).__name__} is frozen (requires_grad=False), so R2-Loss has "
                    "nothing to train. Unfreeze the layers to regularise, or set `skip_frozen=False` "
                    "(`--r2_skip_frozen false`) to add their constant R2 terms anyway."
                )
        self.names: list[str] = [n for n, _ in targets]
        self._targets: list[nn.Module] = [m for _, m in targets]  # a plain list: not registered as submodules
        # The R2 gradient of a weight is handed to autograd as a sparse tensor where it touches few elements (L-inf,
        # Margin, per-tensor Soft-Min-Max): added to the task loss's dense gradient, autograd absorbs it in place
        # at no cost, where a dense one would cost a weight-sized buffer per layer and step. A weight that only R2
        # reaches (R2 backpropagated alone, or a layer unused in the forward) would keep a sparse `.grad`, which
        # optimizers reject: this hook densifies it after accumulation.
        ensure_dense_grads([m.weight for m in self._targets])
        weights = self.weights()
        device = weights[0].device
        per_channel = config.per_channel
        self.register_buffer(
            "_channels", torch.tensor([w.shape[0] for w in weights], dtype=torch.long, device=device), persistent=False
        )
        loss = config.loss_type
        with torch.no_grad():
            if loss is R2LossType.MARGIN:
                init = [
                    as_rows(w).abs().amax(1).float() if per_channel else w.abs().amax().float()[None] for w in weights
                ]
                self.margin = nn.Parameter(torch.cat(init))
            elif loss is R2LossType.SOFT_MIN_MAX:
                init = [soft_min_max_init_alpha(w, per_channel).reshape(-1) for w in weights]
                self.log_alpha = nn.Parameter(torch.cat(init).log())

    def weights(self) -> list[Tensor]:
        """The target weights, read from the layers now (so a reassigned weight is picked up)."""
        return [m.weight for m in self._targets]

    def extra_repr(self) -> str:
        c = self.config
        return f"loss={c.loss!r}, r2_lambda={c.r2_lambda}, per_channel={c.per_channel}, layers={len(self.names)}"

    def lambda_at(self, step: int | None = None) -> float:
        """lambda at optimizer step `step`: `r2_lambda * min(1, step / warmup_steps)` (plain `r2_lambda` if no
        warm-up)."""
        c = self.config
        if not c.warmup_steps or step is None:
            return c.r2_lambda
        return c.r2_lambda * min(1.0, step / c.warmup_steps)

    #: The older name of [`lambda_at`], kept for code written against it.
    weight_at = lambda_at

    def layer_values(self) -> Tensor:
        """`R(W_l)` for every target layer, a float32 vector of shape `(L,)` in the order of `names`."""
        weights = self.weights()
        ids = tuple(map(id, weights))
        if self.__dict__.get("_hooked") != ids:  # a reassigned weight, or a deep copy's: it needs the hook too
            ensure_dense_grads(weights)
            self.__dict__["_hooked"] = ids
        loss, c = self.config.loss_type, self.config
        device_type = weights[0].device.type
        with torch.autocast(device_type, enabled=False):
            # per tensor, L-inf and Margin need each layer's extremes only: rows of ROW_BLOCK weights, not channels
            plan = self._plan(weights, blocks=not c.per_channel and loss in (R2LossType.LINF, R2LossType.MARGIN))
            if loss is R2LossType.KURTOSIS:
                return KurtosisR2Function.apply(plan, c.per_channel, c.kurtosis_target, *weights)
            if loss is R2LossType.LINF:
                return LinfR2Function.apply(plan, c.per_channel, *weights)
            if loss is R2LossType.MARGIN:
                return MarginR2Function.apply(plan, c.per_channel, c.margin_penalty, self.margin, *weights)
            return SoftMinMaxR2Function.apply(plan, c.per_channel, c.soft_min_max_penalty, self.log_alpha, *weights)

    def _plan(self, weights: list[Tensor], blocks: bool) -> GroupPlan:
        """The batched layout for these weights, rebuilt only when a shape, dtype or device changes."""
        key = (blocks, *((w.shape, w.dtype, w.device) for w in weights))
        cached = self.__dict__.get("_plan_cache")
        if cached is None or cached[0] != key:
            cached = (key, GroupPlan(weights, blocks=blocks))
            self.__dict__["_plan_cache"] = cached
        return cached[1]

    def forward(self) -> Tensor:
        """`sum_l R(W_l)` over the target layers: a float32 scalar, differentiable in the weights and R2's own
        parameters."""
        return self.layer_values().sum()

    @torch.no_grad()
    def stats(self) -> dict[str, dict[str, Any]]:
        """Range statistics, per layer and overall, for logging and plots.

        Per layer: `min`, `max`, `std`, `max_over_std` (`max |w| / std`, the outlier ratio that a uniform grid
        pays for) and `kurtosis`. Overall: `max_abs` (largest `|w|` of any layer), the mean and max of
        `max_over_std` and the mean `kurtosis`. `skipped_frozen`: the frozen layers left out (not in `per_layer`).
        A constant layer (a zero-initialised head) has `std` 0: its `max_over_std` is inf and its `kurtosis` NaN,
        which the overall figures leave out (they are means and maxima over the layers where each is defined), so
        the logs and `trainer_state.json` stay finite; NaN only if no layer has one.
        """
        per_layer: dict[str, dict[str, float]] = {}
        for name, w in zip(self.names, self.weights()):
            x = w.detach().float().reshape(-1)
            mean, std = x.mean(), x.std(correction=0)
            c = x - mean
            m2 = c.pow(2).mean()
            kurt = c.pow(4).mean() / m2.pow(2) if m2 > 0 else torch.tensor(float("nan"))
            lo, hi = x.aminmax()
            per_layer[name] = {
                "min": lo.item(),
                "max": hi.item(),
                "std": std.item(),
                "max_over_std": (torch.maximum(hi, -lo) / std).item() if std > 0 else float("inf"),
                "kurtosis": kurt.item(),
            }
        ratios = [s["max_over_std"] for s in per_layer.values() if math.isfinite(s["max_over_std"])]
        kurtoses = [s["kurtosis"] for s in per_layer.values() if math.isfinite(s["kurtosis"])]
        overall = {
            "max_abs": max(max(s["max"], -s["min"]) for s in per_layer.values()),
            "mean_max_over_std": sum(ratios) / len(ratios) if ratios else float("nan"),
            "max_max_over_std": max(ratios, default=float("nan")),
            "mean_kurtosis": sum(kurtoses) / len(kurtoses) if kurtoses else float("nan"),
        }
        return {"per_layer": per_layer, "overall": overall, "skipped_frozen": list(self.skipped_frozen)}

    def logged_stats(self) -> dict[str, float]:
        """The overall range statistics as R2Trainer and the accelerate loop log them: `r2_max_abs`,
        `r2_mean_max_over_std`, `r2_max_max_over_std`, `r2_mean_kurtosis`."""
        return {f"r2_{name}": value for name, value in self.stats()["overall"].items()}


def _weight_parameters(module: nn.Module) -> list[Tensor]:
    """The leaf tensors `module.weight` is made of: itself, or a parametrization's originals (without computing the
    parametrized weight, which for DKM is a clustering pass)."""
    if parametrize.is_parametrized(module, "weight"):
        return list(module.parametrizations.weight.parameters())
    return [module.weight]


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in _weight_parameters(module))


def _distinct_weights(targets: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """`targets` without the layers whose weight is another target's (one tensor shared by two layers counts once,
    under its first name: R2 on it is one term, with one margin / temperature)."""
    seen: set[tuple[int, ...]] = set()
    kept = []
    for name, module in targets:
        key = tuple(id(p) for p in _weight_parameters(module))
        if key in seen:
            logger.info("R2 counts the weight of %s once: it is shared with an earlier target layer", name)
            continue
        seen.add(key)
        kept.append((name, module))
    return kept
