"""MagR: weight magnitude reduction before post-training quantization: `MagRConfig` and `magr_`.

"MagR: Weight Magnitude Reduction for Enhancing Post-Training Quantization", Zhang et al., 2024,
https://huggingface.co/papers/2406.00800; after the authors' code (https://github.com/AozhongZhang/MagR, MIT) and
Brevitas' `brevitas.graph.magr`.

A layer's weight is replaced by one with smaller per-channel maxima that computes nearly the same outputs on the
calibration inputs, so a uniform grid (whose step is set by the largest `|w|`) resolves the weights more finely.
For each output channel (row `w0` of the weight, `K = in_features / groups * prod(kernel_size)` entries; a conv row
is applied to input patches, as `unfold` gathers them), with `H = sum_x x x^T` the `(K, K)` Gram matrix of the
layer's input rows `x` over the calibration batches (the paper's problem, solved row by row):

    w* = argmin_w  1/2 (w - w0)^T H^ (w - w0)  +  t ||w||_inf,        t = alpha * ||w0||_inf
    H^ = (H + damping * mean(diag H) * I) / lambda_max(H + damping * mean(diag H) * I)

Normalising `H` so that its largest eigenvalue is 1 (as the reference code normalises `X`) and `t` relative to the
row's own maximum makes one `alpha` fit every layer, however the weights and activations are scaled (folded batch
norms make them differ by orders of magnitude). The damping keeps the directions the calibration inputs barely
excite from being treated as free. The problem is solved by proximal gradient descent with step 1 (= 1 / lambda_max):

    w <- prox_{t ||.||_inf}(w - H^ (w - w0)),        prox_{t ||.||_inf}(v) = v - t P_{B1}(v / t)

(Moreau decomposition: the prox of a norm is the identity minus the projection onto the unit ball of the dual norm,
here the L1 ball, [`project_l1_ball`], by the sort of Duchi et al., 2008). Each step decreases the objective, which
is `t ||w0||_inf` at the start, hence a bound on the output change over the calibration rows:

    || X (w* - w0) ||^2  <=  (w* - w0)^T (H + damping mean(diag H) I) (w* - w0)  <=  2 lambda_max alpha ||w0||_inf^2

Grouped and depthwise convolutions are handled per group (a depthwise filter is its own problem, `K = k * k`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..._targets import find_target_modules
from ..._utils import JsonConfigMixin, check_patterns, check_positive_int
from ...models import forward_logits
from .._batches import first_batches, model_device, pixel_values
from ..api import register_quantize_handler
from ._layer_rows import UnsupportedLayer, check_rows, grouped_weight, row_source

__all__ = ["MAGR_CONFIG_NAME", "MagRConfig", "project_l1_ball", "prox_linf", "layer_grams", "magr_"]

logger = logging.getLogger(__name__)

MAGR_CONFIG_NAME = "magr_config.json"

# values of the Gram matrices gathered at once (rows x groups x features), to bound the memory of `unfold`
_CHUNK = 1 << 22


@dataclass
class MagRConfig(JsonConfigMixin):
    """MagR settings (see [`magr_`]).

    > The problem

    alpha (`float`, *optional*, defaults to `0.003`):
        Weight of the L-inf penalty relative to each row's largest `|w|`: `t = alpha * max |w0|`. Larger shrinks
        more and changes the outputs more (the output change is bounded by `2 alpha max |w0|^2` in the normalised
        metric, see the module docstring). On a CIFAR-10 ResNet-10t, 0.003 kept the float accuracy and 0.03 cost
        6 points.
    damping (`float`, *optional*, defaults to `0.01`):
        Added to the Gram matrix's diagonal, as a fraction of its mean diagonal, before normalising.

    > The solver

    iterations (`int`, *optional*, defaults to `200`):
        Proximal gradient steps per layer (the paper's 200).

    > The data and the layers

    calibration_batches (`int`, *optional*, defaults to `16`):
        Batches of the calibration data whose layer inputs form the Gram matrices.
    include (`list[str]`, *optional*):
        Regular expressions over module names; only matching Conv/Linear layers are changed.
    exclude (`list[str]`, *optional*):
        Regular expressions over module names of layers to leave alone.
    """

    config_name: ClassVar[str] = MAGR_CONFIG_NAME

    # the problem
    alpha: float = field(default=0.003, metadata={"help": "L-inf penalty, relative to each row's max |w|."})
    damping: float = field(default=0.01, metadata={"help": "Diagonal damping, as a fraction of the mean diagonal."})
    # the solver
    iterations: int = field(default=200, metadata={"help": "Proximal gradient steps per layer."})
    # the data and the layers
    calibration_batches: int = field(default=16, metadata={"help": "Calibration batches used."})
    include: list[str] | None = field(default=None, metadata={"help": "Regexes of the layers to change."})
    exclude: list[str] | None = field(default=None, metadata={"help": "Regexes of layers to leave alone."})
    version: int = field(default=1, metadata={"help": "Format version of this config."})

    def __post_init__(self) -> None:
        for name in ("iterations", "calibration_batches"):
            check_positive_int(name, getattr(self, name))
        for name in ("alpha", "damping"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}.")
            setattr(self, name, float(value))
        self.include = check_patterns("include", self.include)
        self.exclude = check_patterns("exclude", self.exclude)


# ---- the proximal operator ----------------------------------------------------------------------------------------


def project_l1_ball(v: Tensor, radius: float | Tensor = 1.0) -> Tensor:
    """Euclidean projection of each row of `v` (last dim) onto the L1 ball `{u : sum |u| <= radius}`.

    Rows inside the ball are returned as they are; the others become `sign(v) max(|v| - theta, 0)`, with `theta`
    such that the result has L1 norm `radius`: with `mu` the sorted `|v|` (descending) and `rho` the largest `j`
    with `mu_j > (sum_{i<=j} mu_i - radius) / j`, `theta = (sum_{i<=rho} mu_i - radius) / rho` (Duchi et al.,
    "Efficient Projections onto the l1-Ball for Learning in High Dimensions", 2008, figure 1). `O(K log K)` per row.

    Args:
        v (`torch.Tensor`):
            `(..., K)`.
        radius (`float` or `torch.Tensor`, *optional*, defaults to `1.0`):
            Positive; a tensor broadcasts against `v[..., :1]` (one radius per row).
    """
    a = v.abs()
    radius = torch.as_tensor(radius, dtype=v.dtype, device=v.device).expand_as(a[..., :1])
    mu = a.sort(dim=-1, descending=True).values
    excess = mu.cumsum(-1) - radius
    j = torch.arange(1, v.shape[-1] + 1, device=v.device, dtype=v.dtype)
    rho = (mu * j > excess).sum(-1, keepdim=True).clamp_min(1)  # the condition holds exactly for j <= rho
    theta = excess.gather(-1, rho - 1) / rho.to(v.dtype)
    projected = v.sign() * (a - theta).clamp_min(0)
    return torch.where(a.sum(-1, keepdim=True) <= radius, v, projected)


def prox_linf(v: Tensor, t: float | Tensor) -> Tensor:
    """`prox_{t ||.||_inf}(v) = argmin_u 1/2 ||u - v||^2 + t max |u|`, row by row (last dim): by Moreau's
    decomposition `v - t P_{B1}(v / t)`, which clips `v` at `+-tau` with `sum max(|v| - tau, 0) = t` (0 if
    `sum |v| <= t`). Rows with `t = 0` are returned unchanged.

    Args:
        v (`torch.Tensor`):
            `(..., K)`.
        t (`float` or `torch.Tensor`):
            `>= 0`; a tensor broadcasts against `v[..., :1]`.
    """
    t = torch.as_tensor(t, dtype=v.dtype, device=v.device).expand_as(v[..., :1])
    safe = torch.where(t > 0, t, torch.ones_like(t))
    return torch.where(t > 0, v - safe * project_l1_ball(v / safe), v)


# ---- the Gram matrices --------------------------------------------------------------------------------------------


def _eligible(module: nn.Module) -> str:
    if parametrize.is_parametrized(module):
        return "its weight is parametrized"
    if getattr(module, "weight_quantizer", None) is not None:
        return "it is already quantized (run MagR before quantizing)"
    return ""


@torch.no_grad()
def layer_grams(model: nn.Module, layers: dict[str, nn.Module], batches: Iterable[Any]) -> dict[str, Tensor]:
    """`H = sum_x x x^T` per group, `(groups, K, K)` (float32; float64 for a float64 layer), over the input rows `x`
    (tokens of a Linear layer, input patches of a conv, padded as the layer pads) of each of `layers` in forward
    passes of `model` on `batches`.

    A layer that does not run, or whose output is not its weight applied to those rows (its own forward), is left
    out and logged.
    """
    grams: dict[str, Tensor] = {}
    unsupported: dict[str, str] = {}
    busy = [False]

    def make_hook(name: str):
        def hook(module: nn.Module, args: Any) -> None:
            if busy[0] or name in unsupported or not args:
                return
            x = args[0].detach()
            num_rows, gather = row_source(module, x)
            if name not in grams:
                busy[0] = True  # `check_rows` runs the layer again
                try:
                    check_rows(module, x, num_rows, gather, grouped_weight(module, module.weight.detach()))
                except UnsupportedLayer as err:
                    unsupported[name] = str(err)
                    return
                finally:
                    busy[0] = False
            weight = grouped_weight(module, module.weight)
            groups, features = weight.shape[0], weight.shape[2]
            dtype = torch.float64 if module.weight.dtype == torch.float64 else torch.float32
            if name not in grams:
                grams[name] = x.new_zeros(groups, features, features, dtype=dtype)
            gram = grams[name]
            chunk = max(1, _CHUNK // (groups * features))
            for start in range(0, num_rows, chunk):
                rows = gather(torch.arange(start, min(num_rows, start + chunk), device=x.device)).to(dtype)
                gram += torch.einsum("mgk,mgl->gkl", rows, rows)

        return hook

    handles = [module.register_forward_pre_hook(make_hook(name)) for name, module in layers.items()]
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        for batch in batches:
            forward_logits(model, pixel_values(batch).to(model_device(model)))
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training
    for name, why in unsupported.items():
        logger.info("MagR skips %s: %s", name, why)
    missing = [name for name in layers if name not in grams and name not in unsupported]
    if missing:
        logger.info("MagR skips %d layers that do not run in a forward pass: %s", len(missing), missing)
    return grams


# ---- the solver ---------------------------------------------------------------------------------------------------


def _largest_eigenvalue(h: Tensor, steps: int = 50) -> Tensor:
    """`lambda_max` of each symmetric PSD `(K, K)` matrix in `h` `(G, K, K)`, by power iteration (from below: the
    Rayleigh quotient; step `1 / lambda` stays below `2 / lambda_max`, all descent needs)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    v = torch.rand(h.shape[:-1], generator=g, dtype=torch.float64).to(h) + 1.0
    for _ in range(steps):
        v = torch.nn.functional.normalize((h @ v.unsqueeze(-1)).squeeze(-1), dim=-1)
    return (v * (h @ v.unsqueeze(-1)).squeeze(-1)).sum(-1)


def _solve(w0: Tensor, gram: Tensor, config: MagRConfig) -> Tensor:
    """MagR's rows for the grouped weight `w0` `(G, O, K)` and Gram matrices `(G, K, K)` (see the module docstring)."""
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    mean_diag = gram.diagonal(dim1=-2, dim2=-1).mean(-1)
    h = gram + config.damping * mean_diag[:, None, None] * eye
    lam = _largest_eigenvalue(h)
    live = lam > 0  # a group whose inputs were all zero keeps its weights
    h = h / torch.where(live, lam, torch.ones_like(lam))[:, None, None]
    t = config.alpha * w0.abs().amax(-1, keepdim=True) * live[:, None, None]
    w = w0.clone()
    for _ in range(config.iterations):
        w = prox_linf(w - (w - w0) @ h, t)  # `h` is symmetric: (w - w0) h is the gradient of each row
    return w


@register_quantize_handler(MagRConfig)
def magr_(
    model: nn.Module, config: MagRConfig | None = None, calibration_data: Iterable[Any] | None = None, **kwargs: Any
) -> nn.Module:
    """MagR on the Conv/Linear layers of `model`, in place: each weight is replaced by the solution of the L-inf
    penalised least-squares problem of the module docstring, on the layer's inputs in the float model over the first
    `calibration_batches` batches (one pass gathers every layer's Gram matrix). Biases are unchanged. Run it before
    quantizing (with [`~hf_r2.quant.post_training_quantize_`]); it pays off most with per-channel grids.

    Memory: one float32 `(K, K)` matrix per layer and group at once, e.g. 85 MB for a 3x3 conv with 512 inputs.

    ```python
    >>> from hf_r2.quant import MagRConfig, PTQConfig, magr_, post_training_quantize_
    >>> magr_(model, MagRConfig(alpha=0.003), calibration_data=train_loader)
    >>> post_training_quantize_(model, PTQConfig(w_bits=2, a_bits=8), train_loader)
    ```

    Args:
        model (`torch.nn.Module`):
            A timm or transformers model (or any module taking one image tensor).
        config ([`MagRConfig`], *optional*):
            Defaults to `MagRConfig()`; keyword arguments replace its fields.
        calibration_data (iterable of batches):
            Batches as dicts with `"pixel_values"` (or `(images, labels)` pairs).

    Returns:
        `torch.nn.Module`: `model`.
    """
    config = MagRConfig.resolve(config, kwargs)
    batches = first_batches(calibration_data, config.calibration_batches, "MagR")
    layers = {}
    for name, module in find_target_modules(model, config.include, config.exclude):
        why = _eligible(module)
        if why:
            logger.info("MagR skips %s: %s", name, why)
        else:
            layers[name] = module
    grams = layer_grams(model, layers, batches)
    before = after = 0.0
    with torch.no_grad():
        for name, gram in grams.items():
            module = layers[name]
            w0 = grouped_weight(module, module.weight.detach()).to(gram.dtype)
            before += float(w0.abs().amax(-1).sum())  # now: w0 may be a view of the weight, overwritten below
            w = _solve(w0, gram, config)
            after += float(w.abs().amax(-1).sum())
            module.weight.copy_(w.reshape(module.weight.shape))
    logger.info("MagR on %d layers: the mean of the per-channel max |w| went down by %.1f%%", len(grams),
                100 * (1 - after / max(before, 1e-30)))
    return model
