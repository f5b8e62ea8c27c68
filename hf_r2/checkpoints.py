"""Checkpoint folders that are either complete or absent, and the run an output folder holds.

- [`publish_folder`]: a checkpoint is written into a hidden staging folder (`.tmp-<name>`) and renamed into place
  once complete, so an interruption (Ctrl-C, `kill -9`, a full disk) never leaves a half-written `checkpoint-<n>`
  (R2Trainer) or `checkpoints/step_<n>` (the accelerate loop) that looks valid.
- [`latest_checkpoint`]: the newest *complete* checkpoint of a folder; incomplete ones (from older versions, or a
  staging folder left by an interruption) are skipped with a warning.
- [`resolve_resume`]: what `resume_from_checkpoint` means: `True` / `"true"` / `"latest"` for the newest complete
  checkpoint (none: start from the beginning, with a warning), or a path that must be a complete checkpoint.
- [`run_files`] / [`clear_run`]: what of an output folder belongs to a run (so that another run is not mixed into
  it), and removing it for `overwrite_output_dir`.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from typing import Callable

__all__ = [
    "LATEST",
    "STAGING_PREFIX",
    "checkpoint_step",
    "clear_run",
    "is_complete_loop_checkpoint",
    "is_complete_trainer_checkpoint",
    "latest_checkpoint",
    "publish_folder",
    "resolve_resume",
    "run_files",
    "staging_folder",
    "wants_latest",
]

logger = logging.getLogger(__name__)

#: The `resume_from_checkpoint` values that mean "the newest complete checkpoint of the output folder".
LATEST = ("latest", "true", "yes", "1")
STAGING_PREFIX = ".tmp-"
TRAINER_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
LOOP_CHECKPOINT_RE = re.compile(r"^step_(\d+)$")
_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json",
            "adapter_model.safetensors")
# What a run writes to its output folder (R2Trainer, hf-r2 train, the loop, hf-r2 evaluate / ptq / qat, the card).
_RUN_NAMES = {
    "model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "config.json",
    "preprocessor_config.json", "training_args.bin", "trainer_state.json", "all_results.json", "train_results.json",
    "eval_results.json", "low_bit_results.json", "README.md", "loop_config.json", "checkpoints", "model", "runs",
}
_RUN_PATTERNS = (TRAINER_CHECKPOINT_RE, re.compile(r"^r2_.*\.json$"), re.compile(r"^" + re.escape(STAGING_PREFIX)))


def wants_latest(value) -> bool:
    """Whether `resume_from_checkpoint=value` asks for the newest checkpoint (`True`, `"True"`, `"latest"`)."""
    return value is True or (isinstance(value, str) and value.strip().lower() in LATEST)


def staging_folder(final: str) -> str:
    """The hidden sibling `.tmp-<name>` that a checkpoint is written into before [`publish_folder`]."""
    final = os.path.normpath(final)
    return os.path.join(os.path.dirname(final), STAGING_PREFIX + os.path.basename(final))


def publish_folder(staging: str, final: str) -> str:
    """Move the complete folder `staging` to `final` (an atomic rename); a folder already at `final` (a checkpoint
    of the same step from before a resume) is replaced."""
    if os.path.isdir(final):
        old = staging_folder(final) + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, final)
    return final


def checkpoint_step(folder: str) -> int:
    """The `global_step` of a Trainer checkpoint (its `trainer_state.json`)."""
    import json

    with open(os.path.join(folder, "trainer_state.json")) as f:
        return int(json.load(f)["global_step"])


def is_complete_trainer_checkpoint(folder: str) -> bool:
    """A Trainer `checkpoint-<n>` folder with its weights and `trainer_state.json` (which the Trainer writes last)."""
    return os.path.isfile(os.path.join(folder, "trainer_state.json")) and any(
        os.path.isfile(os.path.join(folder, name)) for name in _WEIGHTS
    )


def is_complete_loop_checkpoint(folder: str) -> bool:
    """An `accelerator.save_state` folder with its weights and random states (which accelerate writes last)."""
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return any(n in names for n in _WEIGHTS) and any(n.startswith("random_states") for n in names)


def latest_checkpoint(root: str, loop: bool = False) -> str | None:
    """The complete checkpoint of `root` with the highest step (`checkpoint-<n>`, or `step_<n>` with `loop=True`), or
    `None`. Incomplete ones and staging folders left by an interruption are skipped with a warning."""
    pattern = LOOP_CHECKPOINT_RE if loop else TRAINER_CHECKPOINT_RE
    complete: Callable[[str], bool] = is_complete_loop_checkpoint if loop else is_complete_trainer_checkpoint
    names = sorted(os.listdir(root)) if os.path.isdir(root) else []
    found = []
    for name in names:
        path = os.path.join(root, name)
        if name.startswith(STAGING_PREFIX) and pattern.match(name[len(STAGING_PREFIX):]):
            logger.warning("Skipping %s: an incomplete checkpoint left by an interrupted save.", path)
        elif (m := pattern.match(name)) and os.path.isdir(path):
            if complete(path):
                found.append((int(m.group(1)), path))
            else:
                logger.warning("Skipping %s: an incomplete checkpoint (files missing).", path)
    return max(found)[1] if found else None


def resolve_resume(value, root: str, loop: bool = False) -> str | None:
    """The checkpoint folder that `resume_from_checkpoint=value` names, or `None` to start from the beginning.

    `None` / `False` / `""`: none. `True` / `"true"` / `"latest"`: the newest complete checkpoint under `root`
    (`output_dir`, or `output_dir/checkpoints` for the loop); if there is none yet (a run interrupted before its
    first save), training starts from the beginning, with a warning. A path must be a complete checkpoint.
    """
    if value is None or value is False or (isinstance(value, str) and value.strip().lower() in ("", "false", "no")):
        return None
    if wants_latest(value):
        path = latest_checkpoint(root, loop=loop)
        if path is None:
            logger.warning("`resume_from_checkpoint=%s`: no complete checkpoint in %s yet; training starts from the "
                           "beginning.", value, root)
        return path
    path = os.fspath(value)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"`resume_from_checkpoint={path!r}` is not a folder: pass a checkpoint folder, or "
                                "`latest` for the newest complete checkpoint of the output folder.")
    if not (is_complete_loop_checkpoint if loop else is_complete_trainer_checkpoint)(path):
        raise ValueError(f"`resume_from_checkpoint={path!r}` is an incomplete checkpoint (an interrupted save); pass "
                         "an earlier one, or `latest` for the newest complete one.")
    return path


def run_files(folder: str) -> list[str]:
    """The entries of `folder` that belong to a training run (model files, checkpoints, results, `r2_*.json`, the
    card); empty if the folder is missing or holds only other files."""
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    return [n for n in names if n in _RUN_NAMES or any(p.match(n) for p in _RUN_PATTERNS)]


def clear_run(folder: str) -> list[str]:
    """Remove what [`run_files`] lists (for `overwrite_output_dir`); other files stay. Returns the removed names."""
    removed = run_files(folder)
    for name in removed:
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    return removed
