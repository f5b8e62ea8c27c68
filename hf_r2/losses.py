"""R2-Loss: Range Restriction Loss, as pure functions of one weight tensor.

Paper: "R2 Loss: Range Restriction Loss for Model Compression and Quantization", Kundu et al., 2023
(https://huggingface.co/papers/2303.08253). No official code exists; the definitions below are the ones hf-r2
adopts, each written out in its docstring. KURE (Shkolnik et al., "Robust Quantization: One Model to Rule Them
All", https://huggingface.co/papers/2002.07686) is included as the comparison regulariser.

Conventions, for every function here:

| symbol | meaning |
|---|---|
| `W` | one layer's weight, any shape `(C, ...)`; dim 0 is the output channel |
| `w_i` | the elements of `W` (all of them, or those of one channel when per channel) |
| `n` | the number of elements reduced over (`W.numel()` per tensor, `W[0].numel()` per channel) |

Each returns a float32 scalar, whatever the dtype of `W` and even under bf16/fp16 autocast: a range is a
difference of extremes, and low precision would round it away. Per-channel values are averaged over channels
(so a layer counts once, whatever its width), except `margin_r2`, which sums, as its definition does.

These functions are the reference semantics: [`~hf_r2.R2Regularizer`] computes the same values for a whole
model in batched form, and is tested against them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["linf_r2", "margin_r2", "soft_min_max_r2", "kurtosis_r2", "soft_min_max_init_alpha", "has_spread",
           "KURTOSIS_MIN_SPREAD"]

# `soft_min_max_init_alpha` picks alpha so that the soft range is at least (1 - _SMM_INIT_GAP) of the true range.
_SMM_INIT_GAP = 0.1
_SMM_MAX_ALPHA = 1e30


def _f32(weight: Tensor) -> Tensor:
    """`weight` as float32, outside any autocast region (autocast would cast reductions back down)."""
    return weight.float()


def _rows(weight: Tensor, per_channel: bool) -> Tensor:
    """`(rows, n)` view: one row per output channel, or a single row for the whole tensor."""
    w = _f32(weight)
    return w.reshape(w.shape[0], -1) if per_channel and w.dim() > 0 else w.reshape(1, -1)


def _check_param(name: str, value: Tensor, weight: Tensor) -> bool:
    """Whether a learnable `value` (margin or alpha) is per channel; raise if its size fits neither case."""
    if value.numel() == 1:
        return False
    if value.dim() == 1 and value.numel() == weight.shape[0]:
        return True
    raise ValueError(
        f"`{name}` must be a scalar or a vector with one entry per output channel ({weight.shape[0]}), "
        f"got shape {tuple(value.shape)} for a weight of shape {tuple(weight.shape)}."
    )


def linf_r2(weight: Tensor, per_channel: bool = False) -> Tensor:
    """L-inf R2: the largest absolute weight.

    `R(W) = max_i |w_i|`; with `per_channel=True`, `R(W) = (1/C) sum_c max_i |W[c, i]|`.

    Its gradient touches one weight per tensor (or per channel): exactly the outlier that stretches the
    quantization grid, and nothing else.

    Args:
        weight (`torch.Tensor` of shape `(C, ...)`):
            The layer's weight.
        per_channel (`bool`, *optional*, defaults to `False`):
            Average the per-output-channel maxima instead of taking the maximum of the whole tensor.

    Returns:
        `torch.Tensor`: a float32 scalar.
    """
    with torch.autocast(weight.device.type, enabled=False):
        return _rows(weight, per_channel).abs().amax(dim=1).mean()


def margin_r2(weight: Tensor, margin: Tensor, penalty: float = 1.0) -> Tensor:
    """Margin R2: penalise weights beyond a learnable margin, and shrink the margin.

    `R(W, m) = sum_i relu(|w_i| - |m|)^2 + penalty * m^2`.

    `m` is a scalar (one margin for the tensor) or a vector of shape `(C,)` (one margin per output channel;
    channel `c` uses `m_c`, and the penalty is `penalty * sum_c m_c^2`). Initialise `m` at the current `max |w|`
    (see [`~hf_r2.R2Regularizer`]) so that training starts with no excess: the penalty then pulls the margin
    in, and the first term pulls the weights that it uncovers back inside.

    Args:
        weight (`torch.Tensor` of shape `(C, ...)`):
            The layer's weight.
        margin (`torch.Tensor` of shape `()`, `(1,)` or `(C,)`):
            The learnable margin(s).
        penalty (`float`, *optional*, defaults to `1.0`):
            Strength of the `m^2` term that shrinks the margin.

    Returns:
        `torch.Tensor`: a float32 scalar.
    """
    per_channel = _check_param("margin", margin, weight)
    with torch.autocast(weight.device.type, enabled=False):
        w = _rows(weight, per_channel)
        m = margin.float().abs().reshape(-1, 1)
        excess = torch.relu(w.abs() - m)
        return excess.pow(2).sum() + penalty * margin.float().pow(2).sum()


def soft_min_max_r2(weight: Tensor, alpha: Tensor, penalty: float = 1.0) -> Tensor:
    """Soft-Min-Max R2: a smooth, temperature-controlled `max(W) - min(W)`.

    With `p = softmax(alpha * w)` and `q = softmax(-alpha * w)` over the `n` elements:

        smax = sum_i w_i p_i,    smin = sum_i w_i q_i,
        R(W, alpha) = smax - smin + penalty * 2 ln(n) / alpha.

    `alpha > 0` is the learnable inverse temperature (a scalar, or a vector of shape `(C,)` for one per output
    channel, then `R` is averaged over channels). As `alpha -> inf`, `smax -> max` and `smin -> min`; as
    `alpha -> 0`, both tend to the mean and the soft range to 0, so an unpenalised learnable alpha would simply
    collapse. The penalty stops that, and its form is not arbitrary: since `ln sum_j exp(alpha w_j) =
    alpha * smax + H(p)` with the entropy `H(p) <= ln n`, we have `max - smax <= ln(n) / alpha`, and likewise
    `smin - min <= ln(n) / alpha`. Hence with `penalty=1`

        max - min <= R(W, alpha) <= max - min + 2 ln(n) / alpha:

    `R` is an upper bound of the true range for every alpha, and minimising it over alpha tightens the bound
    instead of collapsing it. It is asymmetric (it moves `max` and `min` separately), which suits asymmetric
    quantization grids and weight clustering.

    Both softmax-weighted sums are computed with log-sum-exp shifts (stable for any alpha), in float32.

    Args:
        weight (`torch.Tensor` of shape `(C, ...)`):
            The layer's weight.
        alpha (`torch.Tensor` of shape `()`, `(1,)` or `(C,)`):
            The inverse temperature(s), positive. [`~hf_r2.R2Regularizer`] keeps it positive by learning
            `log(alpha)` and initialises it with [`soft_min_max_init_alpha`].
        penalty (`float`, *optional*, defaults to `1.0`):
            Scale of the `2 ln(n) / alpha` term; `1.0` makes `R` an upper bound of the range.

    Returns:
        `torch.Tensor`: a float32 scalar.
    """
    per_channel = _check_param("alpha", alpha, weight)
    with torch.autocast(weight.device.type, enabled=False):
        w = _rows(weight, per_channel)
        a = alpha.float().reshape(-1, 1)
        smax = (w * torch.softmax(a * w, dim=1)).sum(dim=1)
        smin = (w * torch.softmax(-a * w, dim=1)).sum(dim=1)
        bound = 2.0 * math.log(w.shape[1]) / a.reshape(-1) if w.shape[1] > 1 else torch.zeros_like(smax)
        return (smax - smin + penalty * bound).mean()


def soft_min_max_init_alpha(weight: Tensor, per_channel: bool = False) -> Tensor:
    """The initial inverse temperature of Soft-Min-Max R2: `alpha_0 = 2 ln(n) / (0.1 * (max - min))`.

    By the entropy bound in [`soft_min_max_r2`], the soft range then lies within 10 % of the true range,
    `0.9 (max - min) <= smax - smin <= max - min`, for any weight distribution (in practice it is much closer,
    since `H(p)` is far below `ln n` at this alpha). A fixed alpha could not promise this: the needed alpha
    scales as `1 / range`, and ranges differ by orders of magnitude across layers and initialisations.

    Returns:
        `torch.Tensor`: float32, shape `()` or `(C,)`.
    """
    with torch.no_grad():
        w = _rows(weight, per_channel)
        span = (w.amax(dim=1) - w.amin(dim=1)).clamp_min(torch.finfo(torch.float32).tiny)
        n = max(w.shape[1], 2)
        # a constant row (span 0) has nothing to approximate: cap alpha so that log(alpha) stays finite
        alpha = (2.0 * math.log(n) / (_SMM_INIT_GAP * span)).clamp_max(_SMM_MAX_ALPHA)
        return alpha if per_channel else alpha.reshape(())


#: KURE leaves out (kurtosis 0, no gradient) a row whose standard deviation is below this fraction of its root mean
#: square: float32 rounding of its mean alone gives such a spread, whose kurtosis is noise with a huge gradient.
KURTOSIS_MIN_SPREAD = 1e-5


def has_spread(m2: Tensor, mean: Tensor) -> Tensor:
    """Per row: does a row of variance `m2` and mean `mean` have a kurtosis ([`kurtosis_r2`])? `m2 > s^2 (m2 + mean^2)`
    with `s` [`KURTOSIS_MIN_SPREAD`] (`m2 + mean^2` is the mean square), and `m2^2` a normal float32."""
    return (m2 > KURTOSIS_MIN_SPREAD**2 * (m2 + mean * mean)) & (m2 * m2 > torch.finfo(torch.float32).tiny)


def kurtosis_r2(weight: Tensor, target: float = 1.8, per_channel: bool = False) -> Tensor:
    """KURE: pull the kurtosis of the weights towards that of a uniform distribution.

    `R(W) = (kurt(W) - target)^2` with `kurt(W) = mean((w - mu)^4) / mean((w - mu)^2)^2` (population moments,
    `mu = mean(w)`). The uniform distribution has kurtosis 1.8 (the default target); a Gaussian has 3.
    With `per_channel=True`, the per-channel terms are averaged. A row without spread (a layer or channel of one
    weight, or of equal weights: its standard deviation below `KURTOSIS_MIN_SPREAD` times its root mean square,
    where float32 rounding alone sets `w - mu`, or its `m2^2` below float32's smallest normal number) has no
    kurtosis: it counts as kurtosis 0 (a constant term `target^2`) and passes no gradient, not a NaN or huge one.

    Args:
        weight (`torch.Tensor` of shape `(C, ...)`):
            The layer's weight.
        target (`float`, *optional*, defaults to `1.8`):
            The kurtosis to aim for.
        per_channel (`bool`, *optional*, defaults to `False`):
            One kurtosis per output channel instead of one per tensor.

    Returns:
        `torch.Tensor`: a float32 scalar.
    """
    with torch.autocast(weight.device.type, enabled=False):
        w = _rows(weight, per_channel)
        mean = w.mean(dim=1, keepdim=True)
        centred = w - mean
        m2 = centred.pow(2).mean(dim=1)
        var2 = m2.pow(2)
        spread = has_spread(m2, mean.squeeze(1))
        # no spread: kurtosis 0, and the division never sees 0 (its gradient would be NaN even where not selected)
        kurt = torch.where(spread, centred.pow(4).mean(dim=1) / torch.where(spread, var2, 1.0), 0.0)
        return (kurt - target).pow(2).mean()
