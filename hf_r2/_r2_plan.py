"""The layout behind R2's batched kernels: which layers are reduced together ([`GroupPlan`]: same-row-length layers
concatenated into one `(sum C, K)` matrix, big ones in place), the row helpers every kernel shares, and the hook that
keeps the kernels' sparse gradients away from optimizers ([`ensure_dense_grads`])."""

from __future__ import annotations

import itertools
import math
import weakref
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "ROW_BLOCK", "SMM_BLOCK", "GroupPlan", "as_rows", "ensure_dense_grads", "row_extremes", "segment",
    "to_f32",
]

#: Soft-Min-Max's truncation works on blocks of at most this many strided weights of a row.
SMM_BLOCK = 8


def as_rows(w: Tensor) -> Tensor:
    """`(C, K)` view of a weight (a copy only for non-contiguous layouts such as channels_last)."""
    return w.reshape(w.shape[0], -1)


#: Row length of a small layer cut into blocks ([`GroupPlan`] with `blocks`): per-tensor L-inf and Margin need a
#: layer's extremes, not its channels', so all small layers get rows of this length and share one buffer: a model of
#: many small layers costs a few kernels in all, not a few per distinct row length.
ROW_BLOCK = 256

# Layers with at least this many weights are reduced in place; smaller layers with the same row length are
# concatenated into one `(sum C, K)` matrix, so that a model costs a few kernels per row length, not per layer.
_GROUP_MAX_NUMEL = 1 << 18


class GroupPlan:
    """The static layout of the batched computation, built once per set of weight shapes.

    Layers are put in "group order": layers with the same row length `K = numel / C` (and dtype and device)
    form a group, whose rows are stacked into one `(R, K)` matrix (a view for a single big layer). All rows of
    the model, in group order, make the small "row vectors" on which the bookkeeping runs in a fixed number of
    kernels. `order[j]` is the layer at group position `j`; `inv` maps back.

    With `blocks` (per-tensor L-inf and Margin, which need each layer's extremes, not its channels'), every small
    layer is cut into rows of `ROW_BLOCK` weights (its last row zero-padded) and copied into one float32 buffer:
    one group for all of them, where a model of many small layers has dozens of row lengths (mobilenetv2_100: 16
    groups become 3; per-tensor L-inf measured 2.1x -> 1.4x an SGD step for the kernel, 2.26x -> 1.70x through
    `R2Regularizer` in `benchmarks/r2_overhead.py`). A zero never wins a layer's extreme
    over a weight of the other sign, and a zero extreme has a zero gradient, so the padding changes nothing.
    """

    def __init__(self, weights: list[Tensor], blocks: bool = False) -> None:
        device = weights[0].device
        self.blocks = blocks
        # rows per layer: its output channels; with `blocks`, a small layer's flat weights cut into rows of
        # ROW_BLOCK (the last row zero-padded), all in one group (big layers keep their channels: long rows reduce
        # faster, measured)
        alone = [w.numel() >= _GROUP_MAX_NUMEL for w in weights]
        channels = [-(-w.numel() // ROW_BLOCK) if blocks and not a else w.shape[0] for w, a in zip(weights, alone)]
        ks = [w.numel() // max(c, 1) if not blocks or a else ROW_BLOCK for w, c, a in zip(weights, channels, alone)]
        self.layer_rows = channels
        buckets: dict[Any, list[int]] = {}
        for i, w in enumerate(weights):
            key = ("alone", i) if alone[i] else "flat" if blocks else (ks[i], w.dtype)
            buckets.setdefault(key, []).append(i)
        self.groups = list(buckets.values())
        #: with `blocks`, the group of the small layers' zero-padded ROW_BLOCK rows (rows that are not channels)
        self.flat_group = list(buckets).index("flat") if "flat" in buckets else None
        self.order = [i for g in self.groups for i in g]
        self.group_channels = [[channels[i] for i in g] for g in self.groups]
        self.group_rows = [sum(c) for c in self.group_channels]
        self.group_k = [ks[g[0]] for g in self.groups]
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
        row_len = torch.tensor(ks, dtype=torch.float32)
        layer_len = torch.tensor([w.numel() for w in weights], dtype=torch.float32)
        self.row_len = row_len[self.order_t.cpu()].to(device)  # n per channel, per layer (group order)
        self.numel = layer_len[self.order_t.cpu()].to(device)  # n per tensor, per layer (group order)
        self.log_k, self.log_numel = self.row_len.log(), self.numel.log()
        self._scratch: dict[Any, tuple[Tensor, Any]] = {}
        self._views: dict[Any, tuple[Tensor, list[Tensor]]] = {}
        if self.flat_group is not None:  # its rows' layers (index into the group), first rows, shapes and strides
            flat = self.group_channels[self.flat_group]
            self._row_pos = torch.repeat_interleave(torch.arange(len(flat)), torch.tensor(flat)).to(device)
            self._row_start = torch.tensor([0, *itertools.accumulate(flat)][:-1], device=device)
            self._shape_table = _shape_table([weights[i].shape for i in self.groups[self.flat_group]], device)

    def scratch(self, owner: Any, key: Any, like: Tensor) -> Tensor:
        """A float32 buffer shaped like `like`, kept from step to step under `key`.

        A fresh weight-sized tensor page-faults on its first touch on the CPU (glibc hands big freed chunks back
        to the OS), which measured 3-7x the arithmetic of the pass that fills it. A buffer is lent to one
        autograd node (`owner`, the Function's `ctx`) until [`release`] or until that node is freed; a call
        while it is lent gets a fresh tensor. A borrower must not use it after releasing it, nor return it (or a
        view of it) as a gradient except through [`grad_buffer`] and [`split`]: autograd may keep a returned
        gradient as `.grad` without copying it.
        """
        return self._lend(owner, key, like.shape, like.device, torch.empty)

    def _lend(self, owner: Any, key: Any, shape: torch.Size, device: torch.device, new: Any) -> Tensor:
        slot = self._scratch.get(key)
        if slot is not None:
            buf, holder = slot
            if holder is not None and holder() is not None:  # lent out: fall back to a fresh tensor
                return new(shape, dtype=torch.float32, device=device)
            if buf.shape != shape or buf.device != device:
                slot = None
        if slot is None:
            buf = new(shape, dtype=torch.float32, device=device)
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

    def matrices(self, weights: tuple[Tensor, ...], owner: Any = None) -> list[Tensor]:
        """One `(R, K)` matrix per group: a view of a contiguous single layer, else a concatenation; with `blocks`,
        the small layers are copied (as float32) into one zero-padded `(R, ROW_BLOCK)` buffer lent to `owner`."""
        rows = self.layer_rows
        out = []
        for gi, g in enumerate(self.groups):
            if len(g) == 1 and rows[g[0]] * self.group_k[gi] == weights[g[0]].numel():
                out.append(weights[g[0]].reshape(rows[g[0]], -1))
            elif self.blocks:
                shape = torch.Size((self.group_rows[gi], ROW_BLOCK))
                buf = self._lend(owner, ("rows", gi), shape, weights[g[0]].device, torch.zeros)  # padding stays 0
                torch._foreach_copy_(self._layer_views(("rows", gi), buf, weights, g), [weights[i] for i in g])
                out.append(buf)
            else:
                out.append(torch.cat([weights[i].reshape(rows[i], -1) for i in g]))
        return out

    def _layer_views(self, key: Any, buf: Tensor, weights: tuple[Tensor, ...], g: list[int]) -> list[Tensor]:
        """Each layer of group `g` as a view (its own shape) of its rows of `buf` (a layer's last row may be padded);
        kept while `buf` is the plan's buffer under `key`."""
        kept = self._views.get(key)
        if kept is not None and kept[0] is buf:
            return kept[1]
        parts = buf.split([self.layer_rows[i] for i in g])
        views = [p.reshape(-1)[: weights[i].numel()].view(weights[i].shape) for i, p in zip(g, parts)]
        if self._scratch.get(key, (None,))[0] is buf:
            self._views[key] = (buf, views)
        return views

    def split(self, weights: tuple[Tensor, ...], grads: list[Tensor | None]) -> list[Tensor | None]:
        """Per-layer gradients (layer order) from per-group `(R, K)` gradients (`None`: no gradient).

        For a group's [`grad_buffer`], the views are made once and kept here: autograd keeps a returned gradient
        as `.grad` (or adds into it in place) only when nothing else holds it, so a kept view is copied into
        `.grad`, or added into the task's gradient, and the buffer stays this plan's."""
        out: list[Tensor | None] = [None] * len(weights)
        for gi, (g, grad) in enumerate(zip(self.groups, grads)):
            if grad is not None:
                for i, part in zip(g, self._layer_views(("grad", gi), grad, weights, g)):
                    out[i] = part
        return out

    def split_sparse(
        self, weights: tuple[Tensor, ...], items: list[tuple[Tensor, Tensor] | None]
    ) -> list[Tensor | None]:
        """Per-layer gradients (layer order) as sparse COO tensors with dense rows (`sparse_dim=1`), from per-group
        `(rows, values)`: sorted row indices into the group's `(R, K)` matrix and their `(n, K)` gradient rows.
        In the `flat_group` (rows are not channels) the non-zero entries go out one by one (`sparse_dim = w.dim()`).
        A layer with no row gets no gradient (`None`)."""
        out: list[Tensor | None] = [None] * len(weights)
        for gi, (g, sizes, item) in enumerate(zip(self.groups, self.group_channels, items)):
            if item is None:
                continue
            if gi == self.flat_group:
                self._split_elements(weights, gi, item, out)
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
                    out[i] = _leaf_grad(w, grad)
        return out

    def _split_elements(
        self, weights: tuple[Tensor, ...], gi: int, item: tuple[Tensor, Tensor], out: list[Tensor | None]
    ) -> None:
        """[`split_sparse`] for block rows: every non-zero entry with its coordinates in its layer's shape, found for
        the whole group at once (a few small kernels), then one sparse tensor per layer."""
        rows, vals = item
        nz = vals.nonzero()
        r = rows[nz[:, 0]]
        pos = self._row_pos[r]
        local = (r - self._row_start[pos]) * vals.shape[1] + nz[:, 1]  # flat index within its layer
        strides, sizes = self._shape_table
        coords = (local[:, None] // strides[pos] % sizes[pos]).t()  # sorted: flat order is coalesced COO order
        counts = torch.bincount(pos, minlength=len(self.groups[gi])).tolist()
        v = vals[nz[:, 0], nz[:, 1]].split(counts)
        for i, n, c, x in zip(self.groups[gi], counts, coords.split(counts, dim=1), v):
            if n:
                w = weights[i]
                grad = torch.sparse_coo_tensor(c[: w.dim()], x.to(w.dtype), w.shape, is_coalesced=True,
                                               check_invariants=False)
                out[i] = _leaf_grad(w, grad)

    def chunks(self, rows: Tensor) -> list[Tensor]:
        """A row vector (group order) split into one chunk per group."""
        return list(rows.split(self.group_rows))


def _shape_table(shapes: list[torch.Size], device: torch.device) -> tuple[Tensor, Tensor]:
    """`(strides, sizes)`, `(len(shapes), D)` each, D the largest rank: a flat index `i` of layer `j` sits at
    `i // strides[j] % sizes[j]` (ranks below D padded with size 1)."""
    rank = max(len(s) for s in shapes)
    sizes = [list(s) + [1] * (rank - len(s)) for s in shapes]
    strides = [[math.prod(s[d + 1 :]) for d in range(rank)] for s in sizes]
    return torch.tensor(strides, device=device), torch.tensor(sizes, device=device)


def _leaf_grad(w: Tensor, grad: Tensor) -> Tensor:
    # only a leaf's AccumulateGrad absorbs a sparse gradient; a computed weight (weight_norm, spectral_norm, DKM: a
    # parametrization's output) passes it to backward ops that need dense
    return grad if w.is_leaf else grad.to_dense()


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
