"""`R2Regularizer`: R2-Loss over every target layer of a model, in batched form.

Paper: "R2 Loss: Range Restriction Loss for Model Compression and Quantization", Kundu et al., 2023
(https://huggingface.co/papers/2303.08253).

The total is `sum_l R(W_l)` over the target layers `l` (Conv1d/2d/3d, depthwise included, and Linear, found by
type so that timm and transformers layers alike are covered), with `R` one of the functions of
[`hf_r2.losses`]. A plain loop of those functions costs 4x to 35x an SGD step, mostly in autograd's dense
backward of `max`/`softmax` and in per-layer kernel chains. The L-inf, Margin and Soft-Min-Max forms here use
what each gradient really touches:

- one pass of `amax`/`amin` per layer (read-only, vectorised) gives every row's extremes; all further
  bookkeeping runs on the small concatenated vector of row extremes, a fixed number of kernels for the model;
- L-inf: the gradient is one element per tensor (or row), written in backward with one compare;
- Margin: only rows whose extreme passes their margin can have an excess, so only those rows are gathered
  and differentiated; a layer with no excess gets no dense gradient at all;
- Soft-Min-Max: softmax weights below `exp(-(ln n + 24))` are below float32 resolution in the sum, so only
  rows within `(ln n + 24) / alpha` of the extreme enter the softmax (exact to float32 rounding).

KURE (`loss="kurtosis"`) needs every weight's moments and is computed with plain autograd per layer.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

import torch
from torch import Tensor, nn

from .config import R2Config, R2LossType
from .losses import kurtosis_r2, soft_min_max_init_alpha

__all__ = ["R2Regularizer", "find_target_modules", "TARGET_MODULE_TYPES"]

logger = logging.getLogger(__name__)

TARGET_MODULE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

# Soft-Min-Max: elements farther than (ln n + _SMM_TAIL) / alpha from the extreme carry total softmax mass
# below n * exp(-(ln n + _SMM_TAIL)) = exp(-_SMM_TAIL) ~ 4e-11, far below float32 resolution.
_SMM_TAIL = 24.0


def find_target_modules(
    model: nn.Module,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    skip_first_last: bool = False,
) -> list[tuple[str, nn.Module]]:
    """The `(name, module)` pairs of `model` that R2 applies to, in registration order.

    A module is a target if it is a Conv1d/2d/3d or Linear (subclasses included) with a `weight`, its name
    matches one of `include` (if given, `re.search`) and none of `exclude`. Raises `ValueError` if nothing is
    left, naming the patterns that matched no module.
    """
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, TARGET_MODULE_TYPES) and isinstance(getattr(module, "weight", None), Tensor)
    ]
    if not candidates:
        raise ValueError(
            f"{type(model).__name__} has no Conv1d/Conv2d/Conv3d/Linear layer with a weight, so R2-Loss has "
            "nothing to act on."
        )
    unmatched = []
    selected = candidates
    if include:
        unmatched += [f"include={p!r}" for p in include if not any(re.search(p, n) for n, _ in candidates)]
        selected = [(n, m) for n, m in selected if any(re.search(p, n) for p in include)]
    if exclude:
        unmatched += [f"exclude={p!r}" for p in exclude if not any(re.search(p, n) for n, _ in candidates)]
        selected = [(n, m) for n, m in selected if not any(re.search(p, n) for p in exclude)]
    if skip_first_last:
        selected = selected[1:-1]
    if not selected:
        names = ", ".join(n for n, _ in candidates[:8]) + (", ..." if len(candidates) > 8 else "")
        why = f" Patterns that matched no layer: {', '.join(unmatched)}." if unmatched else ""
        raise ValueError(
            f"No target layer left in {type(model).__name__} after include={include!r}, exclude={exclude!r}, "
            f"skip_first_last={skip_first_last}.{why} Conv/Linear layers found: {names}."
        )
    for pattern in unmatched:
        logger.warning("R2 target pattern %s matched no layer", pattern)
    return selected


def _rows(w: Tensor) -> Tensor:
    """`(C, K)` view of a weight (a copy only for non-contiguous layouts such as channels_last)."""
    return w.reshape(w.shape[0], -1)


def _row_extremes(weights: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Max and min of every row of every weight, concatenated: two float32 vectors of `sum_l C_l` entries.

    Reducing the transposed `(K, C)` view over dim 0 vectorises across channels, which measured faster on
    the CPU than reducing each row along its contiguous dim.
    """
    rmax = torch.cat([_rows(w).t().amax(0) for w in weights]).float()
    rmin = torch.cat([_rows(w).t().amin(0) for w in weights]).float()
    return rmax, rmin


def _segment(values: Tensor, lengths: Tensor, reduce: str) -> Tensor:
    return torch.segment_reduce(values, reduce, lengths=lengths, unsafe=True)


class _LinfR2(torch.autograd.Function):
    """Per-layer L-inf R2 values `(L,)`; see [`hf_r2.losses.linf_r2`]. `channels[l]` is `C_l`."""

    @staticmethod
    def forward(ctx, per_channel: bool, channels: Tensor, *weights: Tensor) -> Tensor:
        rmax, rmin = _row_extremes(list(weights))
        rabs = torch.maximum(rmax, -rmin)
        values = _segment(rabs, channels, "mean" if per_channel else "max")
        # the value each gradient goes to: each row's extreme, or the layer's (the larger side wins a tie)
        if per_channel:
            target = torch.where(rmax >= -rmin, rmax, rmin)
        else:
            lmax, lmin = _segment(rmax, channels, "max"), _segment(rmin, channels, "min")
            target = torch.where(lmax >= -lmin, lmax, lmin)
        ctx.per_channel, ctx.weights = per_channel, weights
        ctx.save_for_backward(target, channels)
        return values

    @staticmethod
    def backward(ctx, grad_values: Tensor):
        target, channels = ctx.saved_tensors
        sign = torch.sign(target)
        grads = []
        if ctx.per_channel:
            sizes = channels.tolist()
            coef = sign * torch.repeat_interleave(grad_values / channels, channels)
            for w, t, c in zip(ctx.weights, target.split(sizes), coef.split(sizes)):
                w2 = _rows(w)
                mask = w2 == t.to(w.dtype)[:, None]
                share = c / mask.sum(1).clamp_min(1)  # ties share the subgradient, as autograd's amax does
                grads.append(torch.where(mask, share.to(w.dtype)[:, None], 0).view_as(w))
        else:
            coef = sign * grad_values
            for w, t, c in zip(ctx.weights, target.unbind(), coef.unbind()):
                mask = w == t.to(w.dtype)
                grads.append(torch.where(mask, (c / mask.sum().clamp_min(1)).to(w.dtype), 0))
        return None, None, *grads


class _MarginR2(torch.autograd.Function):
    """Per-layer Margin R2 values `(L,)`; see [`hf_r2.losses.margin_r2`]. Differentiates only rows with excess."""

    @staticmethod
    def forward(
        ctx, per_channel: bool, penalty: float, channels: Tensor, margin: Tensor, *weights: Tensor
    ) -> Tensor:
        n_layers = len(weights)
        rmax, rmin = _row_extremes(list(weights))
        rabs = torch.maximum(rmax, -rmin)
        m = margin.detach().float()
        m_row = m.abs() if per_channel else torch.repeat_interleave(m.abs(), channels)
        exceed = rabs > m_row
        offsets = (torch.cumsum(channels, 0) - channels).tolist()
        excess_sq = torch.zeros(n_layers, dtype=torch.float32, device=m.device)
        excess_abs = torch.zeros_like(m_row)  # sum over the row of |d|, for the margin's gradient
        saved: list[tuple[Tensor, Tensor] | None] = [None] * n_layers
        for l in _segment(exceed.float(), channels, "max").nonzero().flatten().tolist():
            start, count = offsets[l], weights[l].shape[0]
            rows_idx = exceed[start : start + count].nonzero().flatten()
            rows = _rows(weights[l]).index_select(0, rows_idx).float()
            bound = m_row[start + rows_idx][:, None]
            d = rows - torch.clamp(rows, -bound, bound)  # = sign(w) * relu(|w| - |m|)
            excess_sq[l] = d.pow(2).sum()
            excess_abs[start + rows_idx] = d.abs().sum(1)
            saved[l] = (rows_idx, d)
        penalty_sq = _segment(m.pow(2), channels, "sum") if per_channel else m.pow(2)
        ctx.per_channel, ctx.penalty, ctx.weights, ctx.rows = per_channel, penalty, weights, saved
        ctx.save_for_backward(margin, channels, excess_abs)
        return excess_sq + penalty * penalty_sq

    @staticmethod
    def backward(ctx, grad_values: Tensor):
        margin, channels, excess_abs = ctx.saved_tensors
        m = margin.detach().float()
        g_row = torch.repeat_interleave(grad_values, channels)
        # d/dm [relu(|w| - |m|)^2 summed + penalty m^2] = -2 sign(m) sum |d| + 2 penalty m
        if ctx.per_channel:
            grad_margin = g_row * (2 * ctx.penalty * m - 2 * torch.sign(m) * excess_abs)
        else:
            s1 = _segment(excess_abs, channels, "sum")
            grad_margin = grad_values * (2 * ctx.penalty * m - 2 * torch.sign(m) * s1)
        offsets = (torch.cumsum(channels, 0) - channels).tolist()
        grads: list[Tensor | None] = []
        for l, (w, item) in enumerate(zip(ctx.weights, ctx.rows)):
            if item is None:  # no weight beyond its margin: no gradient, and no dense work
                grads.append(None)
                continue
            rows_idx, d = item
            grad = torch.zeros_like(_rows(w))
            grad.index_copy_(0, rows_idx, (2 * g_row[offsets[l] + rows_idx][:, None] * d).to(w.dtype))
            grads.append(grad.view_as(w))
        return None, None, None, grad_margin.to(margin.dtype), *grads


def _softmax_sum(x: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor]:
    """`p = softmax(alpha * x)` over the last dim and `s = sum(p * x)`, in float32."""
    p = torch.softmax(alpha * x, dim=-1)
    return p, (p * x).sum(-1)


class _SoftMinMaxR2(torch.autograd.Function):
    """Per-layer Soft-Min-Max R2 values `(L,)`; see [`hf_r2.losses.soft_min_max_r2`].

    Gradients, with `p = softmax(alpha w)`, `q = softmax(-alpha w)`:
    `d smax / d w_i = p_i (1 + alpha (w_i - smax))`, `d smin / d w_i = q_i (1 - alpha (w_i - smin))`,
    `d (smax - smin) / d alpha = Var_p(w) + Var_q(w)` and `d bound / d alpha = -bound / alpha`.
    """

    @staticmethod
    def forward(
        ctx, per_channel: bool, penalty: float, channels: Tensor, log_alpha: Tensor, *weights: Tensor
    ) -> Tensor:
        n_layers = len(weights)
        alpha = log_alpha.detach().float().exp()
        sizes = channels.tolist()
        n = [w.numel() // w.shape[0] if per_channel else w.numel() for w in weights]
        log_n = torch.tensor([math.log(k) for k in n], dtype=torch.float32, device=alpha.device)
        if per_channel:
            log_n = torch.repeat_interleave(log_n, channels)
        saved = []
        if per_channel:  # every row is its own softmax: dense, one (C, K) block per layer
            spans = []
            for w, a in zip(weights, alpha.split(sizes)):
                x = _rows(w).float()
                p, smax = _softmax_sum(x, a[:, None])
                q, smin = _softmax_sum(x, -a[:, None])
                spans.append(smax - smin)
                saved.append((x, p, smax, q, smin))
            span = torch.cat(spans)
        else:  # only the rows that reach within (ln n + tail) / alpha of the extreme enter each softmax
            rmax, rmin = _row_extremes(list(weights))
            lmax, lmin = _segment(rmax, channels, "max"), _segment(rmin, channels, "min")
            reach = (log_n + _SMM_TAIL) / alpha
            rows_hi = (rmax > torch.repeat_interleave(lmax - reach, channels)).split(sizes)
            rows_lo = (rmin < torch.repeat_interleave(lmin + reach, channels)).split(sizes)
            spans = []
            for l, w in enumerate(weights):
                w2, a = _rows(w), alpha[l]
                idx_hi, idx_lo = rows_hi[l].nonzero().flatten(), rows_lo[l].nonzero().flatten()
                x_hi = w2.index_select(0, idx_hi).float()
                x_lo = w2.index_select(0, idx_lo).float()
                p, smax = _softmax_sum(x_hi.reshape(-1), a)
                q, smin = _softmax_sum(x_lo.reshape(-1), -a)
                spans.append(smax - smin)
                saved.append((idx_hi, x_hi, p.view_as(x_hi), smax, idx_lo, x_lo, q.view_as(x_lo), smin))
            span = torch.stack(spans)
        bound = 2 * log_n / alpha  # log_n = 0 (a single element) gives 0
        ctx.per_channel, ctx.penalty, ctx.weights, ctx.parts = per_channel, penalty, weights, saved
        ctx.save_for_backward(log_alpha, channels, bound)
        values = span + penalty * bound
        return _segment(values, channels, "mean") if per_channel else values

    @staticmethod
    def backward(ctx, grad_values: Tensor):
        log_alpha, channels, bound = ctx.saved_tensors
        alpha = log_alpha.detach().float().exp()
        grads = []
        if ctx.per_channel:
            g = torch.repeat_interleave(grad_values / channels, channels)
            variances = []
            for w, (x, p, smax, q, smin), a, gl in zip(ctx.weights, ctx.parts, alpha.split(channels.tolist()),
                                                      g.split(channels.tolist())):
                a, gl, smax_, smin_ = a[:, None], gl[:, None], smax[:, None], smin[:, None]
                grad = gl * (p * (1 + a * (x - smax_)) - q * (1 - a * (x - smin_)))
                grads.append(grad.to(w.dtype).view_as(w))
                variances.append((p * x * x).sum(1) - smax**2 + (q * x * x).sum(1) - smin**2)
            var = torch.cat(variances)
        else:
            g = grad_values
            variances = []
            for l, (w, parts) in enumerate(zip(ctx.weights, ctx.parts)):
                idx_hi, x_hi, p, smax, idx_lo, x_lo, q, smin = parts
                a, gl = alpha[l], g[l]
                grad = torch.zeros(_rows(w).shape, dtype=torch.float32, device=w.device)
                grad.index_add_(0, idx_hi, gl * p * (1 + a * (x_hi - smax)))
                grad.index_add_(0, idx_lo, -gl * q * (1 - a * (x_lo - smin)))
                grads.append(grad.to(w.dtype).view_as(w))
                variances.append((p * x_hi * x_hi).sum() - smax**2 + (q * x_lo * x_lo).sum() - smin**2)
            var = torch.stack(variances)
        grad_log_alpha = g * alpha * (var - ctx.penalty * bound / alpha)  # chain rule through alpha = exp(log_alpha)
        return None, None, None, grad_log_alpha.to(log_alpha.dtype), *grads


class R2Regularizer(nn.Module):
    """R2-Loss over the target layers of `model`, owning the learnable margins and temperatures.

    `regularizer()` returns `sum_l R(W_l)`, a float32 scalar (not yet multiplied by lambda: use
    [`~R2Regularizer.weight_at`], which applies `R2Config.weight` and its warm-up). The learnable parameters
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
    >>> reg = R2Regularizer(model, R2Config(loss="margin", weight=0.01))
    >>> loss = task_loss + reg.weight_at(step) * reg()
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
        targets = find_target_modules(model, config.include, config.exclude, config.skip_first_last)
        self.names: list[str] = [n for n, _ in targets]
        self._targets: list[nn.Module] = [m for _, m in targets]  # a plain list: not registered as submodules
        weights = self.weights()
        device = weights[0].device
        per_channel = config.per_channel
        self.register_buffer(
            "_channels", torch.tensor([w.shape[0] for w in weights], dtype=torch.long, device=device), persistent=False
        )
        loss = config.loss_type
        with torch.no_grad():
            if loss is R2LossType.MARGIN:
                init = [_rows(w).abs().amax(1).float() if per_channel else w.abs().amax().float()[None] for w in weights]
                self.margin = nn.Parameter(torch.cat(init))
            elif loss is R2LossType.SOFT_MIN_MAX:
                init = [soft_min_max_init_alpha(w, per_channel).reshape(-1) for w in weights]
                self.log_alpha = nn.Parameter(torch.cat(init).log())

    def weights(self) -> list[Tensor]:
        """The target weights, read from the layers now (so a reassigned weight is picked up)."""
        return [m.weight for m in self._targets]

    def extra_repr(self) -> str:
        c = self.config
        return f"loss={c.loss!r}, weight={c.weight}, per_channel={c.per_channel}, layers={len(self.names)}"

    def weight_at(self, step: int | None = None) -> float:
        """lambda at optimizer step `step`: `weight * min(1, step / warmup_steps)` (plain `weight` if no warm-up)."""
        c = self.config
        if not c.warmup_steps or step is None:
            return c.weight
        return c.weight * min(1.0, step / c.warmup_steps)

    def layer_values(self) -> Tensor:
        """`R(W_l)` for every target layer, a float32 vector of shape `(L,)` in the order of `names`."""
        weights = self.weights()
        loss, c = self.config.loss_type, self.config
        device_type = weights[0].device.type
        with torch.autocast(device_type, enabled=False):
            if loss is R2LossType.LINF:
                return _LinfR2.apply(c.per_channel, self._channels, *weights)
            if loss is R2LossType.MARGIN:
                return _MarginR2.apply(c.per_channel, c.margin_penalty, self._channels, self.margin, *weights)
            if loss is R2LossType.SOFT_MIN_MAX:
                return _SoftMinMaxR2.apply(c.per_channel, c.soft_min_max_penalty, self._channels, self.log_alpha, *weights)
            return torch.stack([kurtosis_r2(w, c.kurtosis_target, c.per_channel) for w in weights])

    def forward(self) -> Tensor:
        """`sum_l R(W_l)` over the target layers: a float32 scalar, differentiable in the weights and R2's own parameters."""
        return self.layer_values().sum()

    @torch.no_grad()
    def stats(self) -> dict[str, dict[str, Any]]:
        """Range statistics, per layer and overall, for logging and plots.

        Per layer: `min`, `max`, `std`, `max_over_std` (`max |w| / std`, the outlier ratio that a uniform grid
        pays for) and `kurtosis`. Overall: `max_abs` (largest `|w|` of any layer), the mean and max of
        `max_over_std` and the mean `kurtosis`.
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
        ratios = [s["max_over_std"] for s in per_layer.values()]
        overall = {
            "max_abs": max(max(s["max"], -s["min"]) for s in per_layer.values()),
            "mean_max_over_std": sum(ratios) / len(ratios),
            "max_max_over_std": max(ratios),
            "mean_kurtosis": sum(s["kurtosis"] for s in per_layer.values()) / len(per_layer),
        }
        return {"per_layer": per_layer, "overall": overall}
