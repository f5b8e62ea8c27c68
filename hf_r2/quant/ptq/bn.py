"""Batch norms around quantization: re-estimating their statistics ([`reestimate_bn_stats`]) and folding them
into the Conv / Linear layer before them ([`fold_bn_`]).

Re-estimation. Recompute BN running statistics after the weights changed (e.g. were quantized).

Quantizing the weights shifts every layer's output distribution, so the running mean / variance a BN layer learnt
in float no longer match what it sees; recomputing them on a few batches recovers much of the lost accuracy at
low bit widths (as in "Data-Free Quantization Through Weight Equalization and Bias Correction", Nagel et al.,
https://huggingface.co/papers/1906.04721, and "Overcoming Oscillations in Quantization-Aware Training", Nagel et
al., https://huggingface.co/papers/2203.11086, which re-estimates BN after QAT).

Folding. Merge every BatchNorm that directly follows a Conv or Linear layer into that layer's weights.

In eval mode a batch norm is a per-channel affine map, so a Conv / Linear layer `y = W x + b` followed by it,
`BN(y) = gamma (y - mean) / sqrt(var + eps) + beta`, is the single layer

    W' = W * gamma / sqrt(var + eps)                    (per output channel, dim 0 of the weight)
    b' = (b - mean) * gamma / sqrt(var + eps) + beta

(Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference",
https://huggingface.co/papers/1712.05877, section 3.2). Folding before quantization is what deployment does, so the
weights that get quantized are those the integer kernels will use.

The Conv/BN pairs are found by running the model once with forward hooks (no tracing: `torch.fx` fails on many
Hugging Face models): a BN is paired with the Conv / Linear whose output tensor *is* the BN's input (the same
object, not modified in place since), where both modules ran once, the channel counts match and, from the autograd
graph of that forward, the BN is the only consumer of the Conv's output on the way to the logits.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..._targets import TARGET_LAYER_TYPES
from ...models import forward_logits
from .._batches import model_device, pixel_values

__all__ = ["reestimate_bn_stats", "fold_bn", "fold_bn_", "folded_pairs", "refold_structure_"]

logger = logging.getLogger(__name__)


# ---- re-estimation ------------------------------------------------------------------------------------------------

_STAT_NAMES = ("running_mean", "running_var", "num_batches_tracked")


def reestimate_bn_stats(model: nn.Module, dataloader: Iterable[Any], num_batches: int | None = 10) -> nn.Module:
    """Recompute the running mean and variance of every batch-norm layer of `model` from `num_batches` batches.

    Every module that inherits `torch.nn.modules.batchnorm._BatchNorm` and tracks running statistics is covered:
    `BatchNorm1d/2d/3d`, timm's `BatchNormAct2d`, `SyncBatchNorm`. Their statistics are reset and, with
    `momentum=None`, accumulated as the cumulative average over the batches, while the rest of the model stays in
    eval mode (dropout and drop-path off). For a BN layer with input `x_t` `(N, C, ...)` in batch `t = 1..T`:

        running_mean[c] = (1 / T) sum_t mean(x_t[:, c])
        running_var[c]  = (1 / T) sum_t var(x_t[:, c])    (unbiased: divided by N * spatial - 1)

    the statistics that torch's own cumulative average gives. With equal batches the mean is the mean over all
    the data; the variance is the average within-batch variance, below the pooled variance by the (small)
    variance of the batch means. Each BN layer sees the activations of the layers before it normalised with batch
    statistics, as in training.

    Momentum, the train/eval mode of every module, and (on error) the previous statistics are restored.

    Args:
        model (`torch.nn.Module`):
            A timm or transformers model (run through [`~hf_r2.models.forward_logits`]).
        dataloader (iterable of batches):
            Batches as dicts with `"pixel_values"` (the hf-r2 convention), `(images, labels)` pairs or image
            tensors; moved to the model's device.
        num_batches (`int`, *optional*, defaults to `10`):
            How many batches to use; `None` uses the whole dataloader.

    Returns:
        `torch.nn.Module`: `model`, with its BN statistics updated in place.
    """
    bad_count = isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1
    if num_batches is not None and bad_count:
        raise ValueError(f"`num_batches` must be a positive integer or `None`, got {num_batches!r}.")
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not bns:
        logger.info("No batch-norm layer with running statistics in %s: nothing to re-estimate", type(model).__name__)
        return model
    modes = [(m, m.training) for m in model.modules()]
    momenta = [bn.momentum for bn in bns]
    saved = [{k: getattr(bn, k).clone() for k in _STAT_NAMES if getattr(bn, k, None) is not None} for bn in bns]
    device = model_device(model)
    seen = 0
    try:
        model.eval()
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
            bn.train()
        with torch.no_grad():
            for batch in dataloader:
                if num_batches is not None and seen >= num_batches:
                    break
                forward_logits(model, pixel_values(batch).to(device))
                seen += 1
        if seen == 0:
            raise ValueError("`dataloader` gave no batch: cannot re-estimate batch-norm statistics.")
    except BaseException:
        with torch.no_grad():
            for bn, state in zip(bns, saved):
                for name, value in state.items():
                    getattr(bn, name).copy_(value)
        raise
    finally:
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
        for module, training in modes:
            module.training = training
    logger.info("Re-estimated the statistics of %d batch-norm layers on %d batches", len(bns), seen)
    return model


# ---- folding ------------------------------------------------------------------------------------------------------


class _FoldedBatchNormAct(nn.Module):
    """What is left of timm's `BatchNormAct2d` once its batch norm is folded away: its dropout and activation.

    The submodules keep their names (`drop`, `act`), so the state dict keys of an activation with parameters (such
    as PReLU) are unchanged.
    """

    def __init__(self, drop: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.drop = drop
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(x))


def _timm_bn_act_forwards() -> tuple[Any, ...]:
    try:
        from timm.layers.norm_act import BatchNormAct2d, SyncBatchNormAct
    except ImportError:  # pragma: no cover - timm is a dependency, but keep folding usable without it
        return ()
    return (BatchNormAct2d.forward, SyncBatchNormAct.forward)


def _replacement(bn: _BatchNorm) -> nn.Module | None:
    """The module that computes what `bn` computes after its affine map moved into the layer before; `None` if
    `bn` is a subclass whose forward we do not know (it is then left alone)."""
    forward = type(bn).forward
    if forward in (_BatchNorm.forward, nn.SyncBatchNorm.forward):
        return nn.Identity()
    if forward in _timm_bn_act_forwards():
        return _FoldedBatchNormAct(bn.drop, bn.act)
    return None


def _consumer_counts(output: Tensor) -> dict[tuple[Any, int], int] | None:
    """For every autograd node output reachable from `output`, how many edges of the graph use it (`None` when
    `output` has no graph)."""
    if not isinstance(output, Tensor) or output.grad_fn is None:
        return None
    counts: dict[tuple[Any, int], int] = {}
    seen = {output.grad_fn}
    stack = [output.grad_fn]
    while stack:
        node = stack.pop()
        for child, index in node.next_functions:
            if child is None:
                continue
            counts[(child, index)] = counts.get((child, index), 0) + 1
            if child not in seen:
                seen.add(child)
                stack.append(child)
    return counts


def _find_pairs(model: nn.Module, images: Tensor) -> list[tuple[str, str, str]]:
    """`(layer_name, bn_name, why_not)` for each BN fed by a Conv/Linear output; `why_not` is "" if foldable."""
    names = {}
    for name, module in model.named_modules():
        names.setdefault(module, name)
    calls: dict[nn.Module, int] = {}
    layer_out: dict[int, tuple[nn.Module, Tensor, int]] = {}  # id(output) -> (layer, output, its version counter)
    bn_in: dict[nn.Module, tuple[Tensor, int]] = {}
    handles = []

    def layer_hook(module: nn.Module, args: Any, output: Any) -> None:
        calls[module] = calls.get(module, 0) + 1
        if isinstance(output, Tensor):
            layer_out[id(output)] = (module, output, output._version)

    def bn_hook(module: nn.Module, args: Any) -> None:
        calls[module] = calls.get(module, 0) + 1
        if args and isinstance(args[0], Tensor):
            bn_in[module] = (args[0], args[0]._version)

    for module in names:
        if isinstance(module, TARGET_LAYER_TYPES):
            handles.append(module.register_forward_hook(layer_hook))
        elif isinstance(module, _BatchNorm):
            handles.append(module.register_forward_pre_hook(bn_hook))
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        # a leaf input that requires grad gives every activation a grad_fn, from which the consumers are counted
        x = images.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            logits = forward_logits(model, x)
        counts = _consumer_counts(logits)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training

    pairs = []
    for bn, (inp, version) in bn_in.items():
        layer, out, layer_version = layer_out.get(id(inp), (None, None, None))
        if out is not inp:
            continue
        why = ""
        if version != layer_version:
            why = "the layer's output was modified in place before the BN"
        elif calls.get(layer, 0) != 1 or calls.get(bn, 0) != 1:
            why = "the layer or the BN runs more than once per forward (shared module)"
        elif isinstance(layer, nn.Linear) and inp.dim() != 2:
            why = f"a Linear output of shape {tuple(inp.shape)} is normalised over dim 1, not over its features"
        elif not isinstance(layer, nn.Linear) and layer.out_channels != bn.num_features:
            why = "channel counts differ"
        elif isinstance(layer, nn.Linear) and layer.out_features != bn.num_features:
            why = "feature counts differ"
        elif getattr(layer, "weight_quantizer", None) is not None:
            why = "the layer is already quantized (fold before quantizing)"
        elif bn.running_mean is None or bn.running_var is None:
            why = "the BN has no running statistics (it always normalises with batch statistics)"
        elif _replacement(bn) is None:
            why = f"unknown BatchNorm subclass {type(bn).__name__} (its forward is not torch's or timm's)"
        elif counts is not None and counts.get((inp.grad_fn, inp.output_nr), 0) > 1:
            why = "the layer's output is used by more than the BN"
        pairs.append((names[layer], names[bn], why))
    return pairs


@torch.no_grad()
def _fold_into(layer: nn.Module, bn: _BatchNorm) -> None:
    """`layer.weight, layer.bias <- W', b'` (computed in float64); adds a bias if `layer` had none."""
    weight = layer.weight
    mean = bn.running_mean.double()
    inv_std = torch.rsqrt(bn.running_var.double() + bn.eps)
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(mean)
    factor = gamma * inv_std
    bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(mean)
    shape = [-1] + [1] * (weight.dim() - 1)
    weight.copy_(weight.double() * factor.reshape(shape))
    new_bias = ((bias - mean) * factor + beta).to(weight.dtype)
    if layer.bias is None:
        layer.bias = nn.Parameter(new_bias, requires_grad=weight.requires_grad)
    else:
        layer.bias.copy_(new_bias)


def _replace_module(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put `new` wherever `old` is registered in `model` (every name, if it is shared)."""
    for name, module in list(model.named_modules(remove_duplicate=False)):
        for child_name, child in list(module._modules.items()):
            if child is old:
                setattr(module, child_name, new)


def fold_bn_(model: nn.Module, example_inputs: Tensor | Any) -> list[tuple[str, str]]:
    """Fold every batch norm that directly follows a Conv1d/2d/3d (depthwise included) or Linear layer into that
    layer, in place; returns the folded `(layer_name, bn_name)` pairs in the order the BNs ran.

    For each pair the layer's weight and bias become `W' = W * gamma / sqrt(var + eps)` and
    `b' = (b - mean) * gamma / sqrt(var + eps) + beta` (computed in float64; a bias is added where the layer had
    none), and the BN is replaced by `torch.nn.Identity`, or, for timm's `BatchNormAct2d`, by a module that keeps
    its dropout and activation (named `drop` and `act` as before). In eval mode the model then computes the same
    function up to float rounding; its training-mode behaviour changes (there are no BN layers left to use batch
    statistics), so fold for inference or post-training quantization only.

    Pairs are detected by one forward pass on `example_inputs` with hooks, in eval mode (the train/eval mode of
    every module is restored): a BN is folded into the Conv/Linear whose output tensor it receives, unchanged, when
    both modules run once per forward, the channel counts match, nothing else on the way to the logits uses that
    output, the BN has running statistics and is torch's `BatchNorm1d/2d/3d` / `SyncBatchNorm` or timm's
    `BatchNormAct2d` / `SyncBatchNormAct` (subclasses that keep their forward count too). Pairs that fail a check
    are skipped and logged at INFO level with the reason. Layers that already carry a `weight_quantizer` are
    skipped: fold before quantizing.

    Args:
        model (`torch.nn.Module`):
            A timm or transformers model (run through [`~hf_r2.models.forward_logits`]), or any module taking one
            image tensor.
        example_inputs (`torch.Tensor` or batch):
            Images `(B, C, H, W)` for the detection forward, or a batch dict with `"pixel_values"` / an
            `(images, labels)` pair; moved to the model's device. One or two small images are enough.

    Returns:
        `list[tuple[str, str]]`: the `(layer_name, bn_name)` pairs that were folded.

    ```python
    >>> import timm, torch
    >>> from hf_r2.quant import fold_bn_
    >>> model = timm.create_model("resnet18").eval()
    >>> pairs = fold_bn_(model, torch.randn(1, 3, 224, 224))
    >>> pairs[0]
    ('conv1', 'bn1')
    ```
    """
    images = pixel_values(example_inputs).to(model_device(model))
    folded = []
    for layer_name, bn_name, why in _find_pairs(model, images):
        if why:
            logger.info("Not folding %s into %s: %s", bn_name, layer_name, why)
            continue
        layer, bn = model.get_submodule(layer_name), model.get_submodule(bn_name)
        _fold_into(layer, bn)
        _replace_module(model, bn, _replacement(bn))
        folded.append((layer_name, bn_name))
    # recorded on the model, so that a low-bit export can rebuild the folded structure (see `refold_structure_`)
    model._hf_r2_folded_bn = [*getattr(model, "_hf_r2_folded_bn", []), *folded]
    logger.info("Folded %d batch-norm layers into the Conv/Linear layers before them", len(folded))
    return folded


def folded_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """The `(layer_name, bn_name)` pairs that [`fold_bn_`] folded in `model` (empty if none)."""
    return [tuple(pair) for pair in getattr(model, "_hf_r2_folded_bn", [])]


def refold_structure_(model: nn.Module, pairs: list[tuple[str, str]]) -> nn.Module:
    """Give a fresh (unfolded) `model` the structure that folding `pairs` leaves: each BN replaced as
    [`fold_bn_`] replaces it, each layer given a (zero) bias if it had none; the weights are not touched. Used to
    load a folded model's state dict into its original architecture."""
    for layer_name, bn_name in pairs:
        layer, bn = model.get_submodule(layer_name), model.get_submodule(bn_name)
        replacement = _replacement(bn) if isinstance(bn, _BatchNorm) else None
        if replacement is None:
            raise ValueError(f"{bn_name!r} in {type(model).__name__} is not a batch norm that can be folded.")
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0], dtype=layer.weight.dtype))
        _replace_module(model, bn, replacement)
    model._hf_r2_folded_bn = [tuple(pair) for pair in pairs]
    return model


def fold_bn(model: nn.Module, example_inputs: Tensor | Any) -> nn.Module:
    """A deep copy of `model` with its batch norms folded into the layers before them (see [`fold_bn_`]); `model`
    is left untouched.

    ```python
    >>> folded = fold_bn(model, torch.randn(1, 3, 224, 224))
    ```
    """
    model = copy.deepcopy(model)
    fold_bn_(model, example_inputs)
    return model
