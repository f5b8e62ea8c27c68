"""Block reconstruction: learn the rounding of every weight of a block jointly, block by block (BRECQ), optionally
with QDrop's random dropping of activation quantization.

BRECQ (Li et al., "BRECQ: Pushing the Limit of Post-Training Quantization by Block Reconstruction",
https://huggingface.co/papers/2102.05426) extends AdaRound ([`~hf_r2.quant.ptq.adaround`]) from one layer to one
block (a residual or inverted-residual block, [`~hf_r2.quant.ptq.blocks.find_blocks`]): with the rectified sigmoid
`h(V)` of AdaRound for every weight `W_l` of the block's layers, `x_l = W_l / s_l + z_l`,

    W~_l = s_l * (clamp(floor(x_l) + h(V_l), 0, 2^b - 1) - z_l),

it minimises, with Adam on all the `V_l` together (and, where the block's activation grids are below 8 bits, on
their LSQ step sizes, https://huggingface.co/papers/1902.08153, with a second Adam and a cosine-annealed rate),

    mean_positions sum_channels (f_q(x_q; W~) - f(x_f; W))^2  +  lambda * sum_l sum (1 - |2 h(V_l) - 1|^beta)

where `f` is the block, `f(x_f; W)` its output in the float model (the target), `x_q` its input in the model whose
earlier blocks are already reconstructed and quantized (BRECQ's "asymmetric" reconstruction, as
AdaRound's `x_q` here), and `f_q` the block with its input quantizers on. The squared error is summed over output
channels and averaged over images and positions (tokens, pixels), as in BRECQ's and QDrop's code; `beta` is
annealed from `beta_start` to `beta_end` after a warm-up, as in AdaRound. At the end each weight rounds up where
`h(V) >= 0.5`, so it lies on its grid; where that does worse on the cached inputs than rounding to nearest (with
the initial activation steps), the block keeps round-to-nearest.

QDrop (Wei et al., "QDrop: Randomly Dropping Quantization for Extremely Low-bit Post-Training Quantization",
https://huggingface.co/papers/2203.05740): during reconstruction every element of every activation quantizer's
output in the block keeps its float value with probability `drop_prob` (and the block's input is the float
model's one, element-wise, with the same probability, as the authors' code mixes the two cached inputs), which
makes the learnt rounding fit a flatter loss. `drop_prob=0` is plain BRECQ; the paper uses 0.5. (The authors'
`drop_prob` is the probability of keeping the quantized value; the two agree at 0.5.)

Credit: the BRECQ (yhhhli/BRECQ) and QDrop (wimh966/QDrop) reference implementations, whose defaults (batch of 32
images, `lambda = 0.01`, `beta` 20 to 2 after 20 % warm-up) are kept; the iterations are scaled down for a CPU.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..._utils import JsonConfigMixin, check_choice, check_positive_int
from .._batches import first_batches, model_device, pixel_values
from .._grid import check_grid_fields
from ..api import register_quantize_handler
from ..uniform import ScaleMethod
from ._layer_rows import layer_input
from ._progress import UnitProgress
from .adaround import (
    annealed_beta,
    check_rounding_fields,
    inverse_rectified_sigmoid,
    rectified_sigmoid,
    weight_qparams,
)
from .blocks import block_layers, find_blocks, run_order
from .post_training import PTQConfig, post_training_quantize_

__all__ = ["BLOCK_RECONSTRUCTION_CONFIG_NAME", "BlockReconstructionConfig", "reconstruct_block", "reconstruct_blocks_"]

logger = logging.getLogger(__name__)

BLOCK_RECONSTRUCTION_CONFIG_NAME = "block_reconstruction_config.json"


@dataclass
class BlockReconstructionConfig(JsonConfigMixin):
    """Configuration of block reconstruction (see [`reconstruct_blocks_`]): BRECQ, or QDrop with `drop_prob > 0`.

    > The grids (as [`~hf_r2.quant.PTQConfig`]'s)

    w_bits (`int`, *optional*, defaults to `2`):
        Weight bit width, 1 to 8.
    a_bits (`int`, *optional*, defaults to `8`):
        Input bit width of the quantized layers, 2 to 8, or `None` (weight-only); below 8 the step sizes are learnt.
    per_channel (`bool`, *optional*, defaults to `True`):
        One weight scale per output channel instead of one per tensor.
    weight_range (`str`, *optional*, defaults to `"mse"`):
        How the weight grids are set before the rounding is learnt: `"maxabs"` or `"mse"`.
    act_observer (`str`, *optional*, defaults to `"mse"`):
        How the initial activation ranges are calibrated: `"minmax"`, `"percentile"` or `"mse"`.
    first_last_bits (`int`, *optional*, defaults to `8`):
        Weight and input bits of the first and the last quantized layer (at least the others'); `None`: the same.

    > The optimisation

    iters (`int`, *optional*, defaults to `1000`):
        Adam steps per block (the papers use 20,000 on a GPU).
    lr (`float`, *optional*, defaults to `1e-2`):
        Learning rate of Adam on the rounding variables `V` (the papers: 1e-3 for 20 times more steps).
    act_lr (`float`, *optional*, defaults to `4e-4`):
        Initial learning rate of Adam on the activation step sizes, annealed by a cosine to 0 (the papers: 4e-5).
    batch_size (`int`, *optional*, defaults to `32`):
        Images per step, drawn with replacement from the cached block inputs.
    drop_prob (`float`, *optional*, defaults to `0.0`):
        QDrop: the probability, in `[0, 1)`, that an activation element keeps its float value during
        reconstruction; `0` is plain BRECQ, the QDrop paper uses `0.5`.

    > The rounding regulariser (as [`~hf_r2.quant.AdaRoundConfig`]'s)

    reg_weight (`float`, *optional*, defaults to `0.01`):
        `lambda`, the weight of `sum (1 - |2 h(V) - 1|^beta)` in the loss.
    beta_start (`float`, *optional*, defaults to `20.0`):
        The exponent `beta` when the regulariser starts.
    beta_end (`float`, *optional*, defaults to `2.0`):
        The exponent `beta` at the last step; at most `beta_start`.
    warmup (`float`, *optional*, defaults to `0.2`):
        Fraction of the iterations, in `[0, 1)`, without the regulariser.

    > The data and the layers

    calibration_batches (`int`, *optional*, defaults to `16`):
        Batches of the calibration data used (each block's inputs and float outputs on all of them are cached).
    seed (`int`, *optional*, defaults to `0`):
        Seed of the minibatch draws and of QDrop's dropping.
    include (`list[str]`, *optional*):
        Regular expressions over module names; only matching Conv/Linear layers are quantized.
    exclude (`list[str]`, *optional*):
        Regular expressions over module names to leave in float.
    """

    config_name: ClassVar[str] = BLOCK_RECONSTRUCTION_CONFIG_NAME

    # the grids
    w_bits: int = field(default=2, metadata={"help": "Weight bit width, 1 to 8."})
    a_bits: int | None = field(default=8, metadata={"help": "Activation bit width, 2 to 8, or None (weight-only)."})
    per_channel: bool = field(default=True, metadata={"help": "One weight scale per output channel."})
    weight_range: str = field(default="mse", metadata={"help": "Initial weight grids: 'maxabs' or 'mse'."})
    act_observer: str = field(default="mse", metadata={"help": "'minmax', 'percentile' or 'mse'."})
    first_last_bits: int | None = field(default=8, metadata={"help": "Bits of the first and last layer (None: same)."})
    # the optimisation
    iters: int = field(default=1000, metadata={"help": "Adam steps per block."})
    lr: float = field(default=1e-2, metadata={"help": "Learning rate of Adam on the rounding variables V."})
    act_lr: float = field(default=4e-4, metadata={"help": "Initial learning rate of the activation step sizes."})
    batch_size: int = field(default=32, metadata={"help": "Images per optimisation step."})
    drop_prob: float = field(
        default=0.0, metadata={"help": "QDrop: probability an activation stays float (0: BRECQ; 0.5: paper)."}
    )
    # the rounding regulariser
    reg_weight: float = field(default=0.01, metadata={"help": "lambda, the weight of the rounding regulariser."})
    beta_start: float = field(default=20.0, metadata={"help": "The regulariser's exponent beta when it starts."})
    beta_end: float = field(default=2.0, metadata={"help": "The regulariser's exponent beta at the last step."})
    warmup: float = field(default=0.2, metadata={"help": "Fraction of the iterations without the regulariser."})
    # the data and the layers
    calibration_batches: int = field(default=16, metadata={"help": "Calibration batches used."})
    seed: int = field(default=0, metadata={"help": "Seed of the minibatch draws and of QDrop's dropping."})
    include: list[str] | None = field(default=None, metadata={"help": "Regexes of the layers to quantize."})
    exclude: list[str] | None = field(default=None, metadata={"help": "Regexes of layers to leave in float."})
    version: int = field(default=1, metadata={"help": "Format version of this config."})

    def __post_init__(self) -> None:
        check_grid_fields(self)
        self.weight_range = check_choice("weight_range", self.weight_range, ScaleMethod)
        for name in ("iters", "batch_size"):
            check_positive_int(name, getattr(self, name))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"`seed` must be an integer, got {self.seed!r}.")
        check_rounding_fields(self, numbers=("lr", "act_lr", "drop_prob"))
        if self.lr <= 0 or self.act_lr <= 0:
            raise ValueError(f"`lr` and `act_lr` must be positive, got lr={self.lr!r}, act_lr={self.act_lr!r}.")
        if not 0 <= self.drop_prob < 1:
            raise ValueError(f"`drop_prob` must be in [0, 1) (0: BRECQ, 0.5: QDrop's paper), got {self.drop_prob!r}.")

    def ptq_config(self) -> PTQConfig:
        """The round-to-nearest [`~hf_r2.quant.PTQConfig`] that sets the grids reconstruction starts from."""
        return PTQConfig(w_bits=self.w_bits, a_bits=self.a_bits, per_channel=self.per_channel,
                         weight_range=self.weight_range, act_observer=self.act_observer,
                         first_last_bits=self.first_last_bits, rounding="nearest", bn="keep",
                         calibration_batches=self.calibration_batches, include=self.include, exclude=self.exclude)


# --------------------------------------------------------------------------------------------------------------
# one block
# --------------------------------------------------------------------------------------------------------------


class _LearntRounding(nn.Module):
    """Stands in for a layer's weight quantizer while its rounding is learnt: the soft weight `W~` (`mode="soft"`),
    the hard learnt one (`"learnt"`: up where `h(V) >= 0.5`) or round-to-nearest (`"nearest"`)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.scale, self.zero_point, self.quant_min, self.quant_max = weight_qparams(module)
        safe = torch.where(self.scale > 0, self.scale, torch.ones_like(self.scale))
        x = module.weight.detach().to(self.scale.dtype) / safe + self.zero_point
        self.floor, self.nearest = torch.floor(x), torch.clamp(torch.round(x), self.quant_min, self.quant_max)
        self.v = nn.Parameter(inverse_rectified_sigmoid(x - self.floor))
        self.mode = "soft"

    def h(self) -> Tensor:
        return rectified_sigmoid(self.v)

    def codes(self) -> Tensor:
        if self.mode == "nearest":
            return self.nearest
        up = (self.h().detach() >= 0.5).to(self.floor.dtype)
        return torch.clamp(self.floor + up, self.quant_min, self.quant_max)

    def forward(self, weight: Tensor) -> Tensor:
        if self.mode == "soft":
            return (self.scale * (torch.clamp(self.floor + self.h(), self.quant_min, self.quant_max) - self.zero_point)
                    ).to(weight.dtype)
        # `(q - z) * s`: the expression fake_quantize_affine ends with, so the weight quantizer returns it as is
        return ((self.codes() - self.zero_point) * self.scale).to(weight.dtype)


def _enabled(quantizer: Any) -> bool:
    return quantizer is not None and getattr(quantizer, "enabled", True)


def _quantized(unit: nn.Module) -> bool:
    return any(_enabled(getattr(m, "weight_quantizer", None)) for _, m in block_layers(unit))


def _error(block: nn.Module, inputs: Tensor, targets: Tensor, channel_dim: int, batch_size: int) -> float:
    """`mean_positions sum_channels (f_q(x_q) - f(x_f))^2` over all cached images, in float64."""
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, inputs.shape[0], batch_size):
            err = (block(inputs[i : i + batch_size]).double() - targets[i : i + batch_size].double()).square()
            per_position = err.sum(channel_dim)
            total, count = total + per_position.sum().item(), count + per_position.numel()
    return total / count


def reconstruct_block(
    block: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    config: BlockReconstructionConfig,
    generator: torch.Generator | None = None,
    float_inputs: Tensor | None = None,
) -> dict[str, Any]:
    """Learn the rounding of every quantized weight of `block` jointly (and its activation step sizes below 8 bits)
    so that `block(inputs)` matches `targets`, then round its weights onto their grids, in place.

    `block` holds quantized layers (a `weight_quantizer` with `scale`, `zero_point`, `bits`, as
    [`~hf_r2.quant.layers`] builds them); `inputs` are its inputs in the quantized model `(N, ...)`, `targets` its
    float outputs, `float_inputs` its inputs in the float model (used by QDrop's dropping, `config.drop_prob > 0`).
    Each step draws `config.batch_size` images with `torch.randint` from `generator` (then, with `drop_prob > 0`,
    the dropping masks, with `torch.rand`); nothing else is drawn. Returns the block's error (see the module
    docstring) after reconstruction and with round-to-nearest (where the hard rounding starts: `h(V)` starts at
    `x - floor(x)`), which of the two was kept, the mean loss of the last tenth of the steps (soft rounding and
    QDrop's dropping included), the fraction of `h(V)` strictly inside `(0.01, 0.99)` at the end, and the fraction
    of weights rounded the other way than to nearest.
    """
    generator = torch.Generator().manual_seed(config.seed) if generator is None else generator
    layers = [m for _, m in block_layers(block) if _enabled(getattr(m, "weight_quantizer", None))]
    if not layers:
        raise ValueError(f"{type(block).__name__} holds no layer with a `weight_quantizer`: quantize it first.")
    if not torch.isfinite(targets).all():
        raise ValueError(f"The float outputs of {type(block).__name__} hold NaN / inf: check the model and the data.")
    act_qs = [m.input_quantizer for _, m in block_layers(block) if _enabled(getattr(m, "input_quantizer", None))]
    learnt_acts = [q for q in act_qs if int(q.bits) < 8 and isinstance(getattr(q, "scale", None), nn.Parameter)]
    channel_dim = -1 if isinstance(layers[-1], nn.Linear) else 1
    frozen = [(p, p.requires_grad) for p in block.parameters()]
    quantizers = [m.weight_quantizer for m in layers]
    act_state = [(q, q.learnable, q.scale.detach().clone()) for q in learnt_acts]
    for p, _ in frozen:
        p.requires_grad_(False)
    roundings = [_LearntRounding(m) for m in layers]
    for m, rounding in zip(layers, roundings):
        m.weight_quantizer = rounding
    for q in learnt_acts:  # LSQ: FakeQuantizer scales the step's gradient when learnable
        q.learnable = True
        q.scale.requires_grad_(True)
    handles = []
    if config.drop_prob > 0:
        def drop(module: nn.Module, args: tuple, out: Tensor) -> Tensor:
            keep_float = torch.rand(out.shape, generator=generator) < config.drop_prob
            return torch.where(keep_float.to(out.device), args[0], out)

        handles = [q.register_forward_hook(drop) for q in act_qs]
    w_opt = torch.optim.Adam([r.v for r in roundings], lr=config.lr)
    a_opt = torch.optim.Adam([q.scale for q in learnt_acts], lr=config.act_lr) if learnt_acts else None
    a_sched = torch.optim.lr_scheduler.CosineAnnealingLR(a_opt, T_max=config.iters) if a_opt else None
    losses = []
    try:
        with torch.enable_grad():
            for step in range(config.iters):
                idx = torch.randint(inputs.shape[0], (config.batch_size,), generator=generator).to(inputs.device)
                x = inputs[idx]
                if config.drop_prob > 0 and float_inputs is not None:
                    keep_float = torch.rand(x.shape, generator=generator) < config.drop_prob
                    x = torch.where(keep_float.to(x.device), float_inputs[idx], x)
                rec = (block(x) - targets[idx]).square().sum(channel_dim).mean()
                loss = rec
                beta = annealed_beta(config, step)
                if beta is not None and config.reg_weight > 0:
                    reg = sum((1 - (2 * r.h() - 1).abs().pow(beta)).sum() for r in roundings)
                    loss = loss + config.reg_weight * reg
                w_opt.zero_grad(set_to_none=True)
                if a_opt is not None:
                    a_opt.zero_grad(set_to_none=True)
                loss.backward()
                w_opt.step()
                if a_opt is not None:
                    a_opt.step()
                    a_sched.step()
                losses.append(rec.item())
        for handle in handles:
            handle.remove()
        handles = []
        for r in roundings:
            r.mode = "learnt"
        error = _error(block, inputs, targets, channel_dim, config.batch_size)
        learnt_scales = [q.scale.detach().clone() for q in learnt_acts]
        for r in roundings:
            r.mode = "nearest"
        with torch.no_grad():
            for q, _, initial in act_state:
                q.scale.copy_(initial)
        nearest_error = _error(block, inputs, targets, channel_dim, config.batch_size)
        keep_learnt = error <= nearest_error  # a NaN error (diverged) keeps round-to-nearest
        with torch.no_grad():
            if keep_learnt:
                for r in roundings:
                    r.mode = "learnt"
                for q, scale in zip(learnt_acts, learnt_scales):
                    q.scale.copy_(scale)
            for m, r in zip(layers, roundings):
                m.weight.copy_(((r.codes() - r.zero_point) * r.scale).to(m.weight.dtype))
        h = torch.cat([r.h().detach().reshape(-1) for r in roundings])
        flipped = torch.cat([(r.codes() != r.nearest).reshape(-1) for r in roundings]).double().mean().item()
    finally:
        for handle in handles:
            handle.remove()
        for m, quantizer in zip(layers, quantizers):
            m.weight_quantizer = quantizer
        for q, learnable, _ in act_state:
            q.learnable = learnable
        for p, requires_grad in frozen:
            p.requires_grad_(requires_grad)
    tenth = max(1, len(losses) // 10)
    return {
        "error": error,
        "nearest_error": nearest_error,
        "kept": "learnt" if keep_learnt else "nearest",
        "loss_last": sum(losses[-tenth:]) / tenth,
        "soft": ((h > 0.01) & (h < 0.99)).double().mean().item(),
        "flipped": flipped if keep_learnt else 0.0,
    }


# --------------------------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------------------------


def _float_copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model` with every weight and input quantizer removed (its float forward)."""
    float_model = copy.deepcopy(model)
    for module in float_model.modules():
        for attr in ("weight_quantizer", "input_quantizer"):
            if getattr(module, attr, None) is not None:
                setattr(module, attr, None)
    return float_model


def _cache(model: nn.Module, float_model: nn.Module, name: str, images: list[Tensor], with_float_inputs: bool):
    """The unit's inputs in `model`, its outputs in `float_model` (and its float inputs), on all the images."""
    unit, float_unit = model.get_submodule(name), float_model.get_submodule(name)
    inputs, targets, float_inputs = [], [], []
    with torch.no_grad():
        for x in images:
            inputs.append(layer_input(model, unit, x))
            x_f = layer_input(float_model, float_unit, x)
            targets.append(float_unit(x_f))
            if with_float_inputs:
                float_inputs.append(x_f)
    return torch.cat(inputs), torch.cat(targets), torch.cat(float_inputs) if with_float_inputs else None


@register_quantize_handler(BlockReconstructionConfig)
def reconstruct_blocks_(
    model: nn.Module, config: BlockReconstructionConfig | None = None, calibration_data: Iterable[Any] | None = None
) -> nn.Module:
    """Quantize `model` in place with block reconstruction (BRECQ, or QDrop with `drop_prob > 0`) and return it.

    First the grids: [`~hf_r2.quant.post_training_quantize_`] with round-to-nearest, batch norms kept (the
    reconstruction matches the float blocks' outputs, BN included) and activation ranges calibrated. Then each unit
    of [`~hf_r2.quant.ptq.blocks.find_blocks`] (a residual / inverted-residual block, or a layer outside blocks), in
    the order they run, is reconstructed with [`reconstruct_block`] on its inputs in `model` (earlier units already
    reconstructed) against its outputs in a float copy of the model (see the module docstring). Every weight ends
    on its grid; activation step sizes below 8 bits are learnt. The result exports with `save_low_bit` like PTQ's.
    Each unit ends with one progress line (what it gave, `block 3/12`, time spent and left): an INFO record where
    hf-r2's are shown, else on stderr (`HF_R2_DISABLE_PROGRESS_BARS=1` turns that off; see `ptq/_progress.py`).

    ```python
    >>> from hf_r2.quant import BlockReconstructionConfig, quantize_
    >>> quantize_(model, BlockReconstructionConfig(w_bits=2, a_bits=4, drop_prob=0.5), calibration_data=loader)
    ```

    Args:
        model (`torch.nn.Module`):
            A timm or transformers image classifier (or any module with Conv/Linear layers), in float.
        config ([`BlockReconstructionConfig`], *optional*):
            Defaults to `BlockReconstructionConfig()` (W2A8 BRECQ).
        calibration_data (iterable of batches):
            Batches as dicts with `"pixel_values"` (or `(images, labels)` pairs); the first
            `config.calibration_batches` are used, and every unit's inputs and outputs on them are held in memory.

    Returns:
        `torch.nn.Module`: `model`.
    """
    config = BlockReconstructionConfig() if config is None else config
    if not isinstance(config, BlockReconstructionConfig):
        raise TypeError(f"`config` must be a `BlockReconstructionConfig`, got {type(config).__name__}.")
    batches = first_batches(calibration_data, config.calibration_batches, "Block reconstruction")
    post_training_quantize_(model, config.ptq_config(), batches)
    device = model_device(model)
    images = [pixel_values(b).to(device) for b in batches]
    modes = [(m, m.training) for m in model.modules()]
    generator = torch.Generator().manual_seed(config.seed)
    try:
        model.eval()
        float_model = _float_copy(model)
        units = run_order(model, [(n, u) for n, u in find_blocks(model) if _quantized(u)], images[0])
        with UnitProgress(logger, "Block reconstruction", len(units), unit="block") as progress:
            for name, unit in units:
                if not _quantized(unit):  # a layer of a split block left in float
                    progress.step()
                    continue
                inputs, targets, float_inputs = _cache(model, float_model, name, images, config.drop_prob > 0)
                stats = reconstruct_block(unit, inputs, targets, config, generator, float_inputs)
                progress.step(f"Block reconstruction {name}: error {stats['error']:.4g} (round to nearest: "
                              f"{stats['nearest_error']:.4g}, {stats['kept']} kept), {100 * stats['flipped']:.1f}% "
                              "of the weights flipped")
    finally:
        for module, training in modes:
            module.training = training
    return model
