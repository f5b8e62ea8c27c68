"""The layout behind R2's batched kernels: which layers are reduced together ([`GroupPlan`]: same-row-length layers
concatenated into one `(sum C, K)` matrix, big ones in place), the row helpers every kernel shares, and the hook that
keeps the kernels' sparse gradients away from optimizers ([`ensure_dense_grads`])."""

from __future__ import annotations

import itertools
import weakref
from typing import Any

import torch
from torch import Tensor

__all__ = ["SMM_BLOCK", "GroupPlan", "as_rows", "ensure_dense_grads", "row_extremes", "segment", "to_f32"]

#: Soft-Min-Max's truncation works on blocks of at most this many strided weights of a row.
SMM_BLOCK = 8


def as_rows(w: Tensor) -> Tensor:
    """`(C, K)` view of a weight (a copy only for non-contiguous layouts such as channels_last)."""
    return w.reshape(w.shape[0], -1)


# Layers with at least this many weights are reduced in place; smaller layers with the same row length are
# concatenated into one `(sum C, K)` matrix, so that a model costs a few kernels per row length, not per layer.
_GROUP_MAX_NUMEL = 1 << 18


class GroupPlan:
    """The static layout of the batched computation, built once per set of weight shapes.

    Layers are put in "group order": layers with the same row length `K = numel / C` (and dtype and device)
    form a group, whose rows are stacked into one `(R, K)` matrix (a view for a single big layer). All rows of
    the model, in group order, make the small "row vectors" on which the bookkeeping runs in a fixed number of
    kernels. `order[j]` is the layer at group position `j`; `inv` maps back.
    """

    def __init__(self, weights: list[Tensor]) -> None:
        device = weights[0].device
        channels = [w.shape[0] for w in weights]
        buckets: dict[Any, list[int]] = {}
        for i, w in enumerate(weights):
            key = ("alone", i) if w.numel() >= _GROUP_MAX_NUMEL else (w.numel() // max(w.shape[0], 1), w.dtype)
            buckets.setdefault(key, []).append(i)
        self.groups = list(buckets.values())
        self.order = [i for g in self.groups for i in g]
        self.group_channels = [[channels[i] for i in g] for g in self.groups]
        self.group_rows = [sum(c) for c in self.group_channels]
        self.group_k = [weights[g[0]].numel() // max(weights[g[0]].shape[0], 1) for g in self.groups]
        # block size for the Soft-Min-Max truncation: the largest divisor of K up to SMM_BLOCK
        self.group_block = [max(d for d in range(1, min(k, SMM_BLOCK) + 1) if k % d == 0) for k in self.group_k]
        self.group_offsets = [0]
        for r in self.group_rows:
            self.group_offsets.append(self.group_offsets[-1] + r)
        n_layers = len(weights)
        self.order_t = torch.tensor(self.order, device=device)
        self.inv = torch.empty_like(self.order_t)
        self.inv[self.order_t] = torch.arange(n_layers, device=device)
        self.channels = torch.tensor([channels[i] for i in self.order], device=device)  # per layer, group order
        self.group_rows_t = torch.tensor(self.group_rows, device=device)
        self.row_layer = torch.repeat_interleave(torch.arange(n_layers, device=device), self.channels)
        starts = [0]
        for c in channels[:-1]:
            starts.append(starts[-1] + c)
        self.row_perm = torch.cat([torch.arange(starts[i], starts[i] + channels[i]) for i in self.order]).to(device)
        self.row_inv = torch.empty_like(self.row_perm)
        self.row_inv[self.row_perm] = torch.arange(len(self.row_perm), device=device)
        row_len = torch.tensor([w.numel() // max(w.shape[0], 1) for w in weights], dtype=torch.float32)
        layer_len = torch.tensor([w.numel() for w in weights], dtype=torch.float32)
        self.row_len = row_len[self.order_t.cpu()].to(device)  # n per channel, per layer (group order)
        self.numel = layer_len[self.order_t.cpu()].to(device)  # n per tensor, per layer (group order)
        self.log_k, self.log_numel = self.row_len.log(), self.numel.log()
        self._scratch: dict[Any, tuple[Tensor, Any]] = {}
        self._views: dict[int, tuple[Tensor, list[Tensor]]] = {}

    def scratch(self, owner: Any, key: Any, like: Tensor) -> Tensor:
        """A float32 buffer shaped like `like`, kept from step to step under `key`.

        A fresh weight-sized tensor page-faults on its first touch on the CPU (glibc hands big freed chunks back
        to the OS), which measured 3-7x the arithmetic of the pass that fills it. A buffer is lent to one
        autograd node (`owner`, the Function's `ctx`) until [`release`] or until that node is freed; a call
        while it is lent gets a fresh tensor. A borrower must not use it after releasing it, nor return it (or a
        view of it) as a gradient except through [`grad_buffer`] and [`split`]: autograd may keep a returned
        gradient as `.grad` without copying it.
        """
        slot = self._scratch.get(key)
        if slot is not None:
            buf, holder = slot
            if holder is not None and holder() is not None:  # lent out: fall back to a fresh tensor
                return torch.empty(like.shape, dtype=torch.float32, device=like.device)
            if buf.shape != like.shape or buf.device != like.device:
                slot = None
        if slot is None:
            buf = torch.empty(like.shape, dtype=torch.float32, device=like.device)
        self._scratch[key] = (buf, weakref.ref(owner))
        return buf

    def grad_buffer(self, owner: Any, group: int, like: Tensor) -> Tensor:
        """[`scratch`] for group `group`'s `(R, K)` gradient matrix, to be returned through [`split`] (which keeps
        its views: a gradient autograd could keep as `.grad` must not be a buffer that is written again)."""
        return self.scratch(owner, ("grad", group), like)

    def __getstate__(self) -> dict[str, Any]:
        # a copy (deepcopy, pickle) gets its own buffers: sharing them would let two models overwrite each other's
        return {**self.__dict__, "_scratch": {}, "_views": {}}

    def release(self, owner: Any) -> None:
        """Give back every buffer lent to `owner` (see [`scratch`])."""
        for key, (buf, holder) in self._scratch.items():
            if holder is not None and holder() is owner:
                self._scratch[key] = (buf, None)

    def matrices(self, weights: tuple[Tensor, ...]) -> list[Tensor]:
        """One `(R, K)` matrix per group (a view of a contiguous single layer, else a concatenation)."""
        return [
            as_rows(weights[g[0]]) if len(g) == 1 else torch.cat([as_rows(weights[i]) for i in g]) for g in self.groups
        ]

    def split(self, weights: tuple[Tensor, ...], grads: list[Tensor | None]) -> list[Tensor | None]:
        """Per-layer gradients (layer order) from per-group `(R, K)` gradients (`None`: no gradient).

        For a group's [`grad_buffer`], the views are made once and kept here: autograd keeps a returned gradient
        as `.grad` (or adds into it in place) only when nothing else holds it, so a kept view is copied into
        `.grad`, or added into the task's gradient, and the buffer stays this plan's."""
        out: list[Tensor | None] = [None] * len(weights)
        for gi, (g, sizes, grad) in enumerate(zip(self.groups, self.group_channels, grads)):
            if grad is None:
                continue
            slot = self._scratch.get(("grad", gi))
            kept = self._views.get(gi)
            if slot is not None and grad is slot[0] and kept is not None and kept[0] is grad:
                parts = kept[1]
            else:
                parts = [p.view(weights[i].shape) for i, p in zip(g, (grad,) if len(g) == 1 else grad.split(sizes))]
                if slot is not None and grad is slot[0]:
                    self._views[gi] = (grad, parts)
            for i, part in zip(g, parts):
                out[i] = part
        return out

    def split_sparse(
        self, weights: tuple[Tensor, ...], items: list[tuple[Tensor, Tensor] | None]
    ) -> list[Tensor | None]:
        """Per-layer gradients (layer order) as sparse COO tensors with dense rows (`sparse_dim=1`), from per-group
        `(rows, values)`: sorted row indices into the group's `(R, K)` matrix and their `(n, K)` gradient rows.
        A layer with no row gets no gradient (`None`)."""
        out: list[Tensor | None] = [None] * len(weights)
        for g, sizes, item in zip(self.groups, self.group_channels, items):
            if item is None:
                continue
            rows, vals = item
            if len(g) == 1:
                parts = [(rows, vals)]
            else:  # rows are sorted: cut them at the layer boundaries
                starts = [0, *itertools.accumulate(sizes)][:-1]
                cuts = torch.searchsorted(rows, rows.new_tensor(starts[1:])).tolist()
                counts = [b - a for a, b in zip([0, *cuts], [*cuts, len(rows)])]
                parts = [(r - start, v) for r, v, start in zip(rows.split(counts), vals.split(counts), starts)]
            for i, (r, v) in zip(g, parts):
                if r.numel():
                    w = weights[i]
                    grad = torch.sparse_coo_tensor(
                        r[None],
                        v.to(w.dtype).view(-1, *w.shape[1:]),
                        w.shape,
                        is_coalesced=True,
                        check_invariants=False,
                    )
                    # only a leaf's AccumulateGrad absorbs a sparse gradient; a computed weight (weight_norm,
                    # spectral_norm, DKM: a parametrization's output) passes it to backward ops that need dense
                    out[i] = grad if w.is_leaf else grad.to_dense()
        return out

    def chunks(self, rows: Tensor) -> list[Tensor]:
        """A row vector (group order) split into one chunk per group."""
        return list(rows.split(self.group_rows))


def to_f32(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float32 else x.float()


def row_extremes(mats: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Max and min of every row of every group matrix, concatenated: two float32 row vectors (group order).

    Reducing the transposed `(K, R)` view over dim 0 vectorises across rows, which measured faster on the CPU
    than reducing each row along its contiguous dim.
    """
    rmax = torch.cat([to_f32(x.t().amax(0)) for x in mats])
    rmin = torch.cat([to_f32(x.t().amin(0)) for x in mats])
    return rmax, rmin


def segment(values: Tensor, lengths: Tensor, reduce: str) -> Tensor:
    return torch.segment_reduce(values, reduce, lengths=lengths, unsafe=True)



def _densify_grad(param: Tensor) -> None:
    if param.grad is not None and param.grad.is_sparse:
        param.grad = param.grad.to_dense()


def ensure_dense_grads(weights: list[Tensor]) -> None:
    """Put [`_densify_grad`] on each weight once (several regularizers on one model share it; a deep copy of the
    model, which drops hooks, gets its own)."""
    for w in weights:
        hooks = getattr(w, "_post_accumulate_grad_hooks", None) or {}
        # a non-leaf weight (a parametrization's output, e.g. DKM) passes its gradient on; only leaves accumulate
        if w.requires_grad and w.is_leaf and not any(h is _densify_grad for h in hooks.values()):
            w.register_post_accumulate_grad_hook(_densify_grad)
