"""DKM: differentiable k-means palettization during training, as a prepare / finalize pair, in bounded memory.

Paper: "DKM: Differentiable K-Means Clustering Layer for Neural Network Compression", Cho et al., ICLR 2022
(https://huggingface.co/papers/2108.12659). Apple's coremltools (`coremltools.optimize.torch.palettization`)
ships the authors' method; this is an independent implementation of the paper's equations.

[`prepare_dkm`] registers a [`DKMParametrization`] (`torch.nn.utils.parametrize`) on each target weight, so the
model trains unchanged with [`~hf_r2.R2Trainer`], the Accelerate loop or any loop: every read of `module.weight`
returns the DKM-clustered weight `w~`, and the gradient reaches the latent weight `w`
(`module.parametrizations.weight.original`). [`finalize_dkm`] (or [`~hf_r2.quant.palettize_`] with
`method="dkm"`) then snaps each weight to its nearest centroid and removes the parametrizations.

The maths, per group of weights `x_1..x_n` (see [`hf_r2.quant.cluster.palettize`] for groups) with `K = 2^bits`
centroids `c_1..c_K` and temperature `tau` (the paper's Section 3, with the squared distance):

    d_ij = x_i - c_j,    L_ij = -d_ij^2 / tau,    A_ij = softmax_j(L_ij)                 (attention, n x K)
    centroid update:     c'_j = S_j / N_j,    S_j = sum_i A_ij x_i,    N_j = sum_i A_ij
    soft assignment:     y_i = sum_j A_ij c_j                                             (the weight used, w~)

The forward pass starts from the centroids of the previous pass (a buffer, first set by
[`~hf_r2.quant.kmeans_1d`]), applies `dkm_iters` centroid updates and then the soft assignment; the
gradient flows through all of them, as in the paper.

Memory. Under plain autograd every iteration of every layer keeps several `n x K` tensors (the distances, the
attention, products) until the backward pass: for resnet18 at 2 bits and 3 iterations that is gigabytes. Here
each step is a `torch.autograd.Function` that saves only `x` (the latent weight itself, no copy) and `O(K)`
vectors, and recomputes `A` in the backward pass in chunks of at most `_CHUNK_ELEMENTS` entries. The backward
formulas, with `g` the incoming gradient:

- soft assignment, `g_i = dl/dy_i`: with `B_ij = g_i A_ij (c_j - y_i)` (`dl/dL_ij`),
  `dl/dx_i = -(2/tau) sum_j B_ij d_ij` and `dl/dc_j = sum_i g_i A_ij + (2/tau) sum_i B_ij d_ij`;
- centroid update, `g_j = dl/dc'_j`: with `u_ij = g_j (x_i - c'_j) / N_j` (`dl/dA_ij`) and
  `E_ij = A_ij (u_ij - sum_m A_im u_im)` (`dl/dL_ij`, the softmax backward),
  `dl/dx_i = sum_j g_j A_ij / N_j - (2/tau) sum_j E_ij d_ij` and `dl/dc_j = (2/tau) sum_i E_ij d_ij`.

(`dL_ij/dx_i = -2 d_ij / tau`, `dL_ij/dc_j = 2 d_ij / tau`.) The attention of a weight to a centroid is floored at
`exp(-50)` times its attention to its nearest one (`_EXP_FLOOR`: far below float32 resolution, and it keeps the
CPU out of slow subnormal arithmetic). A *dead* centroid, whose total attention `N_j` is within what the floor can
add (`2 n exp(-50)`), would then become the mean of floored weights, so it is left as it is instead (`c'_j = c_j`,
gradient passed straight through), as the plain equations leave it once its attention underflows to 0. Both
Functions are checked against plain autograd ([`_dkm_reference`]) with `torch.autograd.gradcheck` in float64.
The one weight-sized tensor DKM adds to a training step is `w~` itself, which the layer keeps for its own
backward pass.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.utils import parametrize

from ..._targets import find_target_modules
from ._palette import (
    LearnedPalette,
    count_groups,
    finalize_learned_palettes_,
    kmeans_1d,
    learned_palette_modules,
    set_palette,
)
from .palettize import PalettizeConfig

__all__ = ["DKMParametrization", "prepare_dkm", "finalize_dkm", "is_dkm_prepared"]

logger = logging.getLogger(__name__)

# Entries of the (groups, K, weights) attention block computed at once; each of the ~4 temporaries of a block is
# this many floats (1 MiB in float32, about the L2 cache), whatever the layer size.
_CHUNK_ELEMENTS = 1 << 18
# Attention below exp(-50) of a weight's nearest centroid is raised to it: a change far below float32 resolution
# (even summed over millions of weights) that keeps exp() and the backward products out of the subnormal range,
# where CPUs run an order of magnitude slower (logits reach -1000s for far centroids).
_EXP_FLOOR = -50.0


# ---- chunked attention --------------------------------------------------------------------------------------------


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _blocks(num_groups: int, n: int, k: int) -> Iterator[tuple[slice, slice]]:
    """Blocks `(groups, columns)` of `(G, n)` whose attention `(g, K, m)` has at most `_CHUNK_ELEMENTS` entries."""
    cols = min(n, max(1, _CHUNK_ELEMENTS // k))
    rows = max(1, min(num_groups, _CHUNK_ELEMENTS // (cols * k)))
    for g0 in range(0, num_groups, rows):
        for j0 in range(0, n, cols):
            yield slice(g0, g0 + rows), slice(j0, j0 + cols)


def _dead_mass(n: int) -> float:
    """Total attention below which a centroid counts as dead: twice the most that `n` floored entries can add."""
    return 2 * n * math.exp(_EXP_FLOOR)


def _attention(x: Tensor, c: Tensor, neg_inv_tau: Tensor, keep_d: bool) -> tuple[Tensor | None, Tensor]:
    """`d_ij = x_i - c_j` (if `keep_d`) and `A = softmax_j(-d^2 / tau)`, both `(g, K, m)` (the weights last, so
    that the softmax over the short `K` axis runs vectorised over weights), for `x` `(g, m)`, `c` `(g, K)` and
    `neg_inv_tau = -1 / tau` `(g, 1)`."""
    d = x.unsqueeze(1) - c.unsqueeze(-1)
    a = (d.square() if keep_d else d.square_()).mul_(neg_inv_tau.unsqueeze(-1))
    # softmax over K, with the exponent floored (see _EXP_FLOOR)
    a.sub_(a.amax(dim=1, keepdim=True)).clamp_(min=_EXP_FLOOR).exp_()
    return (d if keep_d else None), a.div_(a.sum(dim=1, keepdim=True))


def _no_autocast(backward):
    """Run a Function's backward with autocast off (as its forward, see [`_dkm_forward`])."""

    def wrapped(ctx, grad):
        with torch.autocast(grad.device.type, enabled=False):
            return backward(ctx, grad)

    return wrapped


class _DKMCentroidStep(torch.autograd.Function):
    """One DKM centroid update `c' = (A^T x) / (A^T 1)` per group; saves `x`, `c`, `c'`, `N` (no `n x K`)."""

    @staticmethod
    def forward(ctx, weight: Tensor, c: Tensor, tau: Tensor) -> Tensor:
        x = weight.reshape(c.shape[0], -1)
        cdt = _compute_dtype(x)
        num_groups, n = x.shape
        k = c.shape[1]
        acc = torch.float64
        sums = torch.zeros(num_groups, k, dtype=acc, device=x.device)
        counts = torch.zeros(num_groups, k, dtype=acc, device=x.device)
        cc, nit = c.to(cdt), -1 / tau.to(cdt)
        for gs, cs in _blocks(num_groups, n, k):
            xb = x[gs, cs].to(cdt)
            _, a = _attention(xb, cc[gs], nit[gs], keep_d=False)
            sums[gs] += torch.bmm(a, xb.unsqueeze(-1)).squeeze(-1).to(acc)
            counts[gs] += a.sum(dim=-1).to(acc)
        alive = counts > _dead_mass(n)
        c_new = torch.where(alive, sums / counts.clamp(min=torch.finfo(acc).tiny), c.to(acc)).to(c.dtype)
        ctx.save_for_backward(weight, c, tau, c_new, counts)
        return c_new

    @staticmethod
    @once_differentiable
    @_no_autocast
    def backward(ctx, grad_new: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        weight, c, tau, c_new, counts = ctx.saved_tensors
        x = weight.reshape(c.shape[0], -1)
        cdt = _compute_dtype(x)
        num_groups, n = x.shape
        k = c.shape[1]
        alive = counts > _dead_mass(n)
        g = grad_new.to(cdt)
        w = torch.where(alive, g / counts.to(cdt).clamp(min=torch.finfo(cdt).tiny), torch.zeros_like(g))
        cc, cn, tt = c.to(cdt), c_new.to(cdt), tau.to(cdt)
        nit, two_over_tau = -1 / tt, 2 / tt
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        grad_c = torch.where(alive, torch.zeros_like(g), g)  # dead centroids: c' = c
        for gs, cs in _blocks(num_groups, n, k):
            xb = x[gs, cs].to(cdt)
            d, a = _attention(xb, cc[gs], nit[gs], keep_d=True)
            u = (xb.unsqueeze(1) - cn[gs].unsqueeze(-1)).mul_(w[gs].unsqueeze(-1))  # u_ij = dl/dA_ij
            u_bar = (a * u).sum(dim=1, keepdim=True)
            f = u.sub_(u_bar).mul_(a).mul_(d)  # E_ij d_ij, E_ij = dl/dL_ij
            if grad_x is not None:
                direct = torch.bmm(w[gs].unsqueeze(1), a).squeeze(1)  # sum_j A_ij w_j
                grad_x[gs, cs] = direct.sub_(f.sum(dim=1).mul_(two_over_tau[gs])).to(x.dtype)
            grad_c[gs] += f.sum(dim=-1).mul_(two_over_tau[gs])
        grad_x = grad_x.reshape(weight.shape) if grad_x is not None else None
        return grad_x, grad_c.to(c.dtype) if ctx.needs_input_grad[1] else None, None


class _DKMSoftAssign(torch.autograd.Function):
    """DKM's output `y_i = sum_j A_ij c_j` per group; saves `x`, `c`, `tau` (no `n x K`)."""

    @staticmethod
    def forward(ctx, weight: Tensor, c: Tensor, tau: Tensor) -> Tensor:
        x = weight.reshape(c.shape[0], -1)
        cdt = _compute_dtype(x)
        num_groups, n = x.shape
        k = c.shape[1]
        y = torch.empty_like(x, memory_format=torch.contiguous_format)
        cc, nit = c.to(cdt), -1 / tau.to(cdt)
        for gs, cs in _blocks(num_groups, n, k):
            _, a = _attention(x[gs, cs].to(cdt), cc[gs], nit[gs], keep_d=False)
            y[gs, cs] = torch.bmm(cc[gs].unsqueeze(1), a).squeeze(1).to(x.dtype)
        ctx.save_for_backward(weight, c, tau)
        return y.reshape(weight.shape)

    @staticmethod
    @once_differentiable
    @_no_autocast
    def backward(ctx, grad_y: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        weight, c, tau = ctx.saved_tensors
        x = weight.reshape(c.shape[0], -1)
        if grad_y.is_sparse:  # R2's sparse weight gradient, when nothing else reached this weight
            grad_y = grad_y.to_dense()
        grad_y = grad_y.reshape(x.shape)
        cdt = _compute_dtype(x)
        num_groups, n = x.shape
        k = c.shape[1]
        cc, tt = c.to(cdt), tau.to(cdt)
        nit, two_over_tau = -1 / tt, 2 / tt
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        grad_c = torch.zeros(num_groups, k, dtype=cdt, device=x.device)
        for gs, cs in _blocks(num_groups, n, k):
            d, a = _attention(x[gs, cs].to(cdt), cc[gs], nit[gs], keep_d=True)
            gy = grad_y[gs, cs].to(cdt).unsqueeze(-1)  # (g, m, 1)
            y = torch.bmm(cc[gs].unsqueeze(1), a)  # (g, 1, m)
            grad_c[gs] += torch.bmm(a, gy).squeeze(-1)
            b = (cc[gs].unsqueeze(-1) - y).mul_(a)  # B_ij / g_i
            if grad_x is not None:
                grad_x[gs, cs] = (b * d).sum(dim=1).mul_(gy.squeeze(-1)).mul_(two_over_tau[gs]).neg_().to(x.dtype)
            grad_c[gs] += torch.bmm(b.mul_(d), gy).squeeze(-1).mul_(two_over_tau[gs])
        grad_x = grad_x.reshape(weight.shape) if grad_x is not None else None
        return grad_x, grad_c.to(c.dtype) if ctx.needs_input_grad[1] else None, None


def _dkm_reference(x: Tensor, c: Tensor, tau: Tensor, iters: int) -> tuple[Tensor, Tensor]:
    """Plain-autograd DKM (`(y, c_T)` for `x` `(G, n)`, `c` `(G, K)`, `tau` `(G, 1)`): the paper's equations written
    out, keeping every `n x K` intermediate. The reference the Functions are tested (and benchmarked) against."""
    for _ in range(iters):
        a = torch.softmax(-((x.unsqueeze(-1) - c.unsqueeze(1)) ** 2) / tau.unsqueeze(-1), dim=-1)
        counts = a.sum(dim=1)
        alive = counts > _dead_mass(x.shape[1])
        c = torch.where(alive, (a * x.unsqueeze(-1)).sum(dim=1) / counts.clamp(min=1e-300), c)
    a = torch.softmax(-((x.unsqueeze(-1) - c.unsqueeze(1)) ** 2) / tau.unsqueeze(-1), dim=-1)
    return (a * c.unsqueeze(1)).sum(dim=-1), c


def _dkm_forward(x: Tensor, c: Tensor, tau: Tensor, iters: int) -> tuple[Tensor, Tensor]:
    """`(y, c_T)` through the memory-bounded Functions (same maths as [`_dkm_reference`]); `x` may have any shape
    with `c.shape[0]` dividing its size (it is read as `(G, n)`), and `y` has its shape. Autocast is off inside
    (forward and backward): the centroid sums need float32, not bfloat16 products."""
    with torch.autocast(x.device.type, enabled=False):
        for _ in range(iters):
            c = _DKMCentroidStep.apply(x, c, tau)
        return _DKMSoftAssign.apply(x, c, tau), c


# ---- the parametrization ------------------------------------------------------------------------------------------


class DKMParametrization(LearnedPalette):
    """The DKM parametrization of one weight: `weight -> w~`, the soft-clustered weight (see the module docstring).

    Buffers (persistent, so a training checkpoint resumes with them; they live under
    `module.parametrizations.weight.0.` in the state dict until [`finalize_dkm`]):

    - `centroids` `(G, K)` float32 (float64 for float64 weights): the centroids the next forward pass starts
      from; set by [`~hf_r2.quant.kmeans_1d`] at preparation and to the last pass' `c_T` after every
      forward pass in training mode (the paper's warm start).
    - `tau` `(G, 1)`: the temperature of each group, `temperature * D0`, with `D0` the mean squared distance of the
      group's weights to their nearest initial centroid (its k-means distortion). Scaling by `D0` makes one
      `temperature` mean the same softness for any weight scale and any `K`: with centroids `Delta` apart,
      `D0 ~ Delta^2 / 12`, so a weight on a centroid gives its neighbour a logit `12 / temperature` lower, and a
      weight a quarter of the way to the neighbour `6 / temperature` lower (at `1.0`: 99.75 % / 0.25 %; weights
      near a midpoint share). Where `D0 = 0` (at most `K` distinct values) `var(w) / K^2` stands in for it. `tau`
      is fixed at preparation.

    Every read of `module.weight` is a DKM forward pass (and, in training mode, moves the warm start), so code that
    reads the weights several times per step (a regularizer, logging) can share one pass under
    `torch.nn.utils.parametrize.cached()`.

    Args:
        weight (`torch.Tensor`):
            The weight to cluster (its current values initialise the centroids).
        num_groups (`int`):
            `G`; `weight.shape[0]` must be a multiple of it.
        bits (`int`):
            `K = 2^bits` centroids per group.
        temperature (`float`):
            Softness relative to `D0` (above).
        iters (`int`):
            Centroid updates per forward pass.
        kmeans_iters (`int`, *optional*, defaults to `50`):
            Lloyd iterations of the initial k-means.
    """

    def __init__(
        self,
        weight: Tensor,
        num_groups: int,
        bits: int,
        temperature: float,
        iters: int,
        kmeans_iters: int = 50,
    ) -> None:
        super().__init__()
        self.num_groups = num_groups
        self.bits = bits
        self.temperature = temperature
        self.iters = iters
        # Private switch to the plain-autograd reference (kept for the memory benchmark and the tests).
        self._use_reference = False
        self._param_order: list[str] = ["weight", "bias"]  # the layer's parameter names, in order
        k = 2**bits
        cdt = _compute_dtype(weight)
        with torch.no_grad():
            rows = weight.detach().reshape(num_groups, -1).to(cdt)
            centroids, indices = kmeans_1d(rows, k, kmeans_iters)
            distortion = (rows - centroids.gather(1, indices)).square().mean(dim=1)
            fallback = rows.var(dim=1, unbiased=False) / k**2
            scale = torch.where(distortion > 0, distortion, fallback).clamp(min=torch.finfo(cdt).tiny)
        self.register_buffer("centroids", centroids)
        self.register_buffer("tau", (temperature * scale).unsqueeze(1))

    def extra_repr(self) -> str:
        return f"groups={self.num_groups}, bits={self.bits}, temperature={self.temperature}, iters={self.iters}"

    def forward(self, weight: Tensor) -> Tensor:
        cdt = _compute_dtype(weight)
        # a copy: the in-place warm-start update below must not touch a tensor saved for backward
        c0 = self.centroids.to(cdt, copy=True)
        tau = self.tau.to(cdt)
        if self._use_reference:
            y, c = _dkm_reference(weight.reshape(self.num_groups, -1).to(cdt), c0, tau, self.iters)
            y = y.to(weight.dtype).reshape(weight.shape)
        else:  # reshapes inside the Functions: R2's sparse weight gradients cannot pass a view's backward
            y, c = _dkm_forward(weight, c0, tau, self.iters)
        if self.training:
            with torch.no_grad():
                self.centroids.copy_(c)
        return y

    @torch.no_grad()
    def final_centroids(self, weight: Tensor) -> Tensor:
        """The `(G, K)` centroids `c_T` the next forward pass would use for `weight` (without gradient), sorted."""
        cdt = _compute_dtype(weight)
        _, c = _dkm_forward(weight, self.centroids.to(cdt, copy=True), self.tau.to(cdt), self.iters)
        return torch.sort(c, dim=1).values

    def finalize_(self, module: nn.Module) -> None:
        """Snap `module`'s latent weight to the nearest of its final centroids ([`final_centroids`]), put it back
        as the plain `weight` parameter (this parametrization removed) and set the `weight_palette` buffer."""
        with torch.no_grad():
            latent = module.parametrizations.weight.original
            palette = self.final_centroids(latent)
            rows = latent.detach().reshape(self.num_groups, -1).to(palette.dtype).contiguous()
            indices = torch.searchsorted(((palette[:, 1:] + palette[:, :-1]) / 2).contiguous(), rows)
            palette = palette.to(latent.dtype)
            _unparametrize(module, self._param_order)
            module.weight.copy_(palette.gather(1, indices).reshape(module.weight.shape))
        set_palette(module, palette)


def _unparametrize(module: nn.Module, param_order: list[str]) -> None:
    """Put the latent weight (the original `nn.Parameter`) back as `module.weight`, in its original place among
    the module's parameters (so `state_dict()` keys keep their order)."""
    original = module.parametrizations.weight.original
    if len(module.parametrizations) == 1:
        # torch's remove_parametrizations deletes the property from the module's parametrized class, which deep
        # copies of the module share (copy.deepcopy keeps classes): that would break every copy. Switching this
        # module back to its plain class leaves the others alone.
        plain_cls = type(module).__bases__[0]
        del module.parametrizations
        module.__class__ = plain_cls
        module.register_parameter("weight", original)
    else:  # other tensors of the module are parametrized too: torch's own removal
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
    params = module._parameters
    ordered = [k for k in param_order if k in params] + [k for k in params if k not in param_order]
    for key in ordered:
        params[key] = params.pop(key)


# ---- public entry points ------------------------------------------------------------------------------------------


def is_dkm_prepared(model: nn.Module) -> bool:
    """Whether any layer of `model` carries a [`DKMParametrization`] (prepared by [`prepare_dkm`], not finalized)."""
    return bool(learned_palette_modules(model))


def prepare_dkm(model: nn.Module, config: PalettizeConfig | None = None, **kwargs: Any) -> nn.Module:
    """Register a [`DKMParametrization`] on the weight of each target layer of `model`, in place; return `model`.

    Train the returned model as usual (same optimizer parameters: the latent weight is the layer's original
    `nn.Parameter`, now at `module.parametrizations.weight.original`), then call [`finalize_dkm`] (or
    [`~hf_r2.quant.palettize_`] with `method="dkm"`). Uses `bits`, `group_size`, `include` / `exclude` /
    `skip_first_last`, `first_last_bits`, `kmeans_iters`, `temperature` and `dkm_iters` of the config. While
    prepared, the state-dict keys of the target weights change (`<layer>.parametrizations.weight.original`, plus
    the DKM buffers); after finalizing they are the original ones again.

    Args:
        model (`torch.nn.Module`):
            A timm or transformers model (or any module with Conv/Linear layers); not already prepared.
        config ([`~hf_r2.quant.PalettizeConfig`], *optional*):
            The settings; keyword arguments build one if omitted, or override its fields if given.

    Returns:
        `torch.nn.Module`: `model` itself.

    ```python
    >>> from hf_r2.quant import PalettizeConfig, prepare_dkm, palettize_
    >>> config = PalettizeConfig(bits=2, method="dkm", skip_first_last=True)
    >>> model = prepare_dkm(model, config)
    >>> # ... train `model` (R2Trainer, the Accelerate loop, a plain loop) ...
    >>> palettize_(model, config)  # nearest trained centroid, parametrizations removed
    ```
    """
    config = PalettizeConfig.resolve(config, kwargs)
    if is_dkm_prepared(model):
        raise ValueError("`model` is already prepared for DKM; finalize it first with `finalize_dkm(model)`.")
    targets = find_target_modules(model, config.include, config.exclude, config.skip_first_last)
    groups = [count_groups(name, module.weight, config.group_size) for name, module in targets]
    for index, ((_, module), num_groups) in enumerate(zip(targets, groups)):
        param = DKMParametrization(
            module.weight,
            num_groups,
            config.layer_bits(index, len(targets)),
            config.temperature,
            config.dkm_iters,
            kmeans_iters=config.kmeans_iters,
        ).train(module.training)
        param._param_order = list(module._parameters)  # restored by finalize_dkm
        # unsafe: skip torch's trial forward pass, which would also move the fresh centroids
        parametrize.register_parametrization(module, "weight", param, unsafe=True)
    logger.info(
        "Prepared %d layers for DKM: %d centroids (%s), temperature %g, %d iterations",
        len(targets),
        config.num_centroids,
        "per tensor" if config.group_size is None else f"{config.group_size} output channels per palette",
        config.temperature,
        config.dkm_iters,
    )
    return model


def finalize_dkm(model: nn.Module) -> nn.Module:
    """Snap every DKM-prepared weight of `model` to its nearest centroid and remove the parametrizations, in place.

    For each prepared layer the centroids `c_T` of one more forward pass (from the trained latent weight and the
    warm-start buffer, no gradient) become its palette; every latent weight is assigned to its nearest centroid
    (hard assignment); the layer's `weight` is again its original `nn.Parameter`, holding exactly palette values,
    and the non-persistent buffer `weight_palette` `(G, K)` is set, as [`~hf_r2.quant.palettize_`]
    leaves it. Returns `model`; raises `ValueError` if no layer is prepared.
    """
    prepared = finalize_learned_palettes_(model)
    if not prepared:
        raise ValueError("`model` has no DKM-prepared layer; call `prepare_dkm(model, config)` before training.")
    return model
