"""A training that diverges stops at once and saves nothing non-finite: [`check_step_loss`] (the loss of each
(micro-)batch, before the optimizer steps on its gradient), [`check_weights`] (the model before a checkpoint or the
run's model is written) and [`DivergedError`], whose one-line message names the step, the first non-finite value,
the likely cause and the last checkpoint (which holds finite weights, since every save is checked).

[`hf_r2.trainer.R2Trainer`] runs both checks itself (so a user's own script gets them too), as does the accelerate
loop ([`hf_r2.loop.train_with_accelerate`], and so QAT and DKM fine-tunes); `hf-r2 train` prints the message as
`hf-r2 train: error: ...` and exits with status 1. A NaN loss is not skipped or averaged away (the Trainer's
`logging_nan_inf_filter` only hides it from the logs): its gradient would make every weight NaN at the next step.
"""

from __future__ import annotations

import os
from typing import Callable

import torch
from torch import Tensor, nn

from ._finite import DIVERGENCE_HINT, NonFiniteError, first_nonfinite
from .checkpoints import latest_checkpoint

__all__ = ["DivergedError", "check_step_loss", "check_weights"]


class DivergedError(NonFiniteError):
    """The loss or the weights of a training turned NaN or infinite. `step` is the optimizer step (1-based) whose
    loss or update was non-finite; `checkpoint` the last complete checkpoint (finite weights), or `None`."""

    def __init__(self, message: str, step: int, checkpoint: str | None) -> None:
        super().__init__(message)
        self.step = step
        self.checkpoint = checkpoint


def diverged(what: str, step: int, root: str, *, loop: bool = False, when: str = "at") -> DivergedError:
    """The [`DivergedError`] of a training whose checkpoints are in `root` (`checkpoint-<n>`, or `step_<n>` with
    `loop`): one line, `the training diverged <when> step <step>: <what>; <the likely cause>; <the last
    checkpoint>; the model was not saved`."""
    checkpoint = latest_checkpoint(root, loop=loop) if root and os.path.isdir(root) else None
    last = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was saved before it"
    return DivergedError(f"the training diverged {when} step {step}: {what}; {DIVERGENCE_HINT}; {last}; the model was "
                         "not saved", step, checkpoint)


def check_step_loss(
    loss: Tensor, step: int, root: str, *, loop: bool = False, reduce: Callable[[Tensor], Tensor] | None = None
) -> None:
    """Raise [`diverged`]'s error if `loss` (of optimizer step `step`, 1-based) is NaN or infinite. `reduce` sums a
    tensor over processes (`accelerator.reduce`): with several processes, all of them stop when one sees a
    non-finite loss (the others would wait for it in the next collective). One device-to-host read per call."""
    bad = (~torch.isfinite(loss.detach())).any().float().reshape(1)
    if reduce is not None:
        bad = reduce(bad)
    if bool(bad.item()):
        value = loss.detach().float().reshape(-1)
        local = value[~torch.isfinite(value)]
        what = f"the loss is {local[0].item():g}" if local.numel() else "the loss is not finite on another process"
        raise diverged(what, step, root, loop=loop)


def check_weights(model: nn.Module, step: int, root: str, *, loop: bool = False) -> None:
    """Raise [`diverged`]'s error if a weight or buffer of `model` is NaN or infinite (after optimizer step `step`),
    naming the first such tensor; called before a checkpoint or the run's model is written."""
    bad = first_nonfinite(model)
    if bad is not None:
        raise diverged(f"{bad[0]} holds {bad[1]}", step, root, loop=loop, when="by")
