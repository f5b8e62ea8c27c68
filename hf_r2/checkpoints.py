"""Checkpoint folders that are either complete or absent, and the run an output folder holds.

- [`publish_folder`]: a checkpoint is written into a hidden staging folder (`.tmp-<name>`) and renamed into place
  once complete, so an interruption (Ctrl-C, `kill -9`, a full disk) never leaves a half-written `checkpoint-<n>`
  (R2Trainer) or `checkpoints/step_<n>` (the accelerate loop) that looks valid.
- [`latest_checkpoint`]: the newest *complete* checkpoint of a folder; incomplete ones (from older versions, or a
  staging folder left by an interruption) are skipped with a warning, and one that an interrupted replacement left
  moved aside is restored.
- [`resolve_resume`]: what `resume_from_checkpoint` means: `True` / `"true"` / `"latest"` for the newest complete
  checkpoint (none: start from the beginning, with a warning), or a path that must be a complete checkpoint.
- [`remove_if_empty`]: an output folder a failed run left empty (what of an output folder belongs to a run, and
  removing it for `overwrite_output_dir`, is [`hf_r2.output_folder`]).
- What a loop checkpoint holds besides accelerate's files: R2's learnable parameters as safetensors
  ([`save_r2_state`] / [`load_r2_state`], shared with R2Trainer's checkpoints) and the step counter as JSON
  ([`LOOP_STATE_NAME`]), so that resuming never unpickles anything: accelerate's `register_for_checkpointing` files
  (`custom_checkpoint_<i>.pkl`) are read with `torch.load(weights_only=False)`, which runs whatever code the file
  holds. [`safe_torch_load`] is the `weights_only=True` read (plain tensors and containers) of the rest.
  [`check_r2_state`] refuses in one line a checkpoint and a run that disagree on R2 (its learnable parameters, and
  the R2 settings a checkpoint records: the loop's in `loop_state.json`, R2Trainer's in [`R2_RECORD_NAME`]).
- Interruptions: [`sigterm_as_interrupt`] makes SIGTERM (what a cluster scheduler sends) raise [`Terminated`], a
  `KeyboardInterrupt`, so that it is handled as Ctrl-C is; [`interrupted_line`] says where the run can resume and
  [`interrupt_exit_code`] is 130 for Ctrl-C, 143 for SIGTERM; [`resumable_on_interrupt`] does all of it for the
  accelerate loop.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import pickle
import re
import shutil
import signal
import threading
from typing import Any, Callable, Iterator

from ._utils import write_json_atomic
from .config import R2_CONFIG_NAME
from .output_folder import STAGING_PREFIX, TRAINER_CHECKPOINT_RE, WEIGHT_NAMES

__all__ = [
    "CheckpointError",
    "LATEST",
    "LOOP_STATE_NAME",
    "R2_RECORD_NAME",
    "R2_STATE_NAME",
    "STAGING_PREFIX",
    "Terminated",
    "interrupt_exit_code",
    "interrupted_line",
    "remove_if_empty",
    "resumable_on_interrupt",
    "sigterm_as_interrupt",
    "check_r2_state",
    "checkpoint_step",
    "is_complete_loop_checkpoint",
    "is_complete_trainer_checkpoint",
    "latest_checkpoint",
    "load_r2_state",
    "publish_folder",
    "publish_trainer_checkpoint",
    "resolve_resume",
    "safe_torch_load",
    "save_r2_state",
    "save_trainer_r2_state",
    "staging_folder",
    "wants_latest",
]

logger = logging.getLogger(__name__)

#: The `resume_from_checkpoint` values that mean "the newest complete checkpoint of the output folder".
LATEST = ("latest", "true", "yes", "1")
OLD_SUFFIX = ".old"  # a checkpoint moved aside by `publish_folder` while its replacement is renamed into place
LOOP_CHECKPOINT_RE = re.compile(r"^step_(\d+)$")
_WEIGHTS = (*WEIGHT_NAMES, "adapter_model.safetensors")
#: R2's learnable parameters (margins, temperatures) in a checkpoint of R2Trainer or of the accelerate loop.
R2_STATE_NAME = "r2_regularizer.safetensors"
#: The accelerate loop's step counter and R2 settings in its checkpoints: `{"global_step": <int>, "r2_config":
#: <R2Config.to_dict(), or null without R2>}` (checkpoints written before the record hold the step counter only).
LOOP_STATE_NAME = "loop_state.json"
#: The same R2 record in R2Trainer's checkpoints: `{"r2_config": <R2Config.to_dict(), or null for r2_lambda=0, its run
#: without R2>}` (checkpoints of older hf-r2 versions have none).
R2_RECORD_NAME = "r2_state.json"
#: R2Config fields that a resume must keep (another objective or other layers) and those it may change with a
#: warning (coefficients; a loss's own knob only counts for that loss). See [`check_r2_state`].
_R2_KEPT = ("loss", "per_channel", "include", "exclude", "skip_first_last", "skip_frozen")
_R2_CHANGEABLE = ("r2_lambda", "warmup_steps")
_FIX = "resume with the R2 settings it was saved with, or start a new run without resume_from_checkpoint."
_LOSS_KNOBS = {"margin": "margin_penalty", "soft_min_max": "soft_min_max_penalty", "kurtosis": "kurtosis_target"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from (incomplete, or holding what hf-r2 will not load), said in one line
    that names it and the fix."""


def wants_latest(value) -> bool:
    """Whether `resume_from_checkpoint=value` asks for the newest checkpoint (`True`, `"True"`, `"latest"`)."""
    return value is True or (isinstance(value, str) and value.strip().lower() in LATEST)


def staging_folder(final: str, clear: bool = False) -> str:
    """The hidden sibling `.tmp-<name>` that a checkpoint is written into before [`publish_folder`]; with `clear`
    (on the saving process, before the others write into it), what an interrupted save left there is removed."""
    final = os.path.normpath(final)
    staging = os.path.join(os.path.dirname(final), STAGING_PREFIX + os.path.basename(final))
    if clear:
        shutil.rmtree(staging, ignore_errors=True)
    return staging


def publish_folder(staging: str, final: str) -> str:
    """Move the complete folder `staging` to `final` (one rename, atomic on one file system).

    A folder already at `final` (a checkpoint of the same step from before a resume) is replaced in two renames: it
    is first moved aside to `.tmp-<name>.old`, removed once `staging` is in place. An interruption between the two
    renames leaves that complete old checkpoint under `.tmp-<name>.old` alone: [`latest_checkpoint`] renames it
    back, so no complete checkpoint is ever lost.
    """
    old = staging_folder(final) + OLD_SUFFIX
    if os.path.isdir(final):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def publish_trainer_checkpoint(state, staging_run_dir: str, final: str, write: bool) -> None:
    """The end of a Trainer checkpoint written as `<staging_run_dir>/<name>` in place of `final`: the best
    checkpoint the Trainer recorded there (`state.best_model_checkpoint`, the staged path) is pointed at its
    published place, on every process; with `write` (the saving process), the checkpoint's own
    `trainer_state.json` is rewritten with it, then the checkpoint is published and `staging_run_dir` removed."""
    staged = os.path.join(staging_run_dir, os.path.basename(final))
    best = state.best_model_checkpoint
    moved = bool(best) and os.path.normpath(best).startswith(os.path.normpath(staging_run_dir) + os.sep)
    if moved:
        state.best_model_checkpoint = os.path.join(os.path.dirname(final), os.path.relpath(best, staging_run_dir))
    if write:
        if moved and os.path.isfile(os.path.join(staged, "trainer_state.json")):
            state.save_to_json(os.path.join(staged, "trainer_state.json"))
        publish_folder(staged, final)
        shutil.rmtree(staging_run_dir, ignore_errors=True)


def checkpoint_step(folder: str) -> int:
    """The `global_step` of a Trainer checkpoint (its `trainer_state.json`)."""
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
    `None`. Incomplete ones and staging folders left by an interruption are skipped with a warning. A complete
    checkpoint that an interrupted [`publish_folder`] left moved aside (`.tmp-<name>.old`, nothing at `<name>`) is
    first renamed back to `<name>`."""
    pattern = LOOP_CHECKPOINT_RE if loop else TRAINER_CHECKPOINT_RE
    complete: Callable[[str], bool] = is_complete_loop_checkpoint if loop else is_complete_trainer_checkpoint
    names = sorted(os.listdir(root)) if os.path.isdir(root) else []
    for name in names:
        inner = name[len(STAGING_PREFIX): -len(OLD_SUFFIX)]
        if name.startswith(STAGING_PREFIX) and name.endswith(OLD_SUFFIX) and pattern.match(inner):
            path, restored = os.path.join(root, name), os.path.join(root, inner)
            if not os.path.exists(restored) and complete(path):
                try:  # several processes may try at once: one wins
                    os.replace(path, restored)
                    logger.warning("Restored %s from %s, where an interrupted save had moved it.", restored, path)
                except OSError:
                    pass
    names = sorted(os.listdir(root)) if names else []
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
    (`output_dir`, or `output_dir/checkpoints` for the loop), named in one log line (INFO, main process); if there
    is none yet (a run interrupted before its first save), training starts from the beginning, with a warning. A
    path must be a complete checkpoint.
    """
    if value is None or value is False or (isinstance(value, str) and value.strip().lower() in ("", "false", "no")):
        return None
    if wants_latest(value):
        path = latest_checkpoint(root, loop=loop)
        if path is None:
            logger.warning("`resume_from_checkpoint=%s`: no complete checkpoint in %s yet; training starts from the "
                           "beginning.", value, root)
        elif os.environ.get("RANK", "0") == "0":  # one line per run, not one per process
            logger.info("Resuming from %s, the newest complete checkpoint in %s.", path, root)
        return path
    path = os.fspath(value)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"`resume_from_checkpoint={path!r}` is not a folder: pass a checkpoint folder, or "
                                "`latest` for the newest complete checkpoint of the output folder.")
    if not (is_complete_loop_checkpoint if loop else is_complete_trainer_checkpoint)(path):
        raise CheckpointError(f"`resume_from_checkpoint={path!r}` is an incomplete checkpoint (an interrupted save); "
                              "pass an earlier one, or `latest` for the newest complete one.")
    return path


def remove_if_empty(folder: str) -> bool:
    """Remove `folder` if it holds no file at any depth (only empty folders): what a run that failed before writing
    anything left (the Trainer creates its output folder when it is built). Returns whether it was removed."""
    if not os.path.isdir(folder) or os.path.islink(folder):
        return False
    for _, _, files in os.walk(folder):
        if files:
            return False
    shutil.rmtree(folder, ignore_errors=True)
    return not os.path.exists(folder)


def save_r2_state(regularizer, folder: str) -> None:
    """Write R2's learnable parameters (`regularizer.state_dict()`: margins, temperatures) to
    `folder/r2_regularizer.safetensors`, plain tensors that load without unpickling; nothing when it has none."""
    state = regularizer.state_dict()
    if state:
        import safetensors.torch

        tensors = {k: v.detach().contiguous() for k, v in state.items()}
        safetensors.torch.save_file(tensors, os.path.join(folder, R2_STATE_NAME), metadata={"format": "pt"})


def load_r2_state(regularizer, folder: str) -> bool:
    """Load what [`save_r2_state`] wrote into `regularizer`, on its device. Returns `False` if `folder` has no such
    file (the caller says what that means); a file that does not load, or holds other parameters, is a
    [`CheckpointError`] naming it. A regularizer without learnable parameters needs nothing (`True`)."""
    if not len(regularizer.state_dict()):
        return True
    path = os.path.join(folder, R2_STATE_NAME)
    if not os.path.isfile(path):
        return False
    import safetensors.torch

    device = next(iter(regularizer.state_dict().values())).device
    try:
        regularizer.load_state_dict(safetensors.torch.load_file(path, device=str(device)))
    except Exception as err:  # safetensors' own errors name no file; a strict load's mismatch is several lines
        raise CheckpointError(f"{path} does not hold this run's R2 parameters ({str(err).splitlines()[0]}): resume "
                         "from a checkpoint of the same model and R2 settings.") from None
    return True


def _r2_settings(regularizer, trainer: bool = True) -> dict[str, Any] | None:
    off = regularizer is None or (trainer and regularizer.config.r2_lambda == 0)
    return None if off else regularizer.config.to_dict()


def save_trainer_r2_state(regularizer, folder: str) -> None:
    """What R2Trainer adds to a checkpoint: R2's learnable parameters ([`save_r2_state`]) and its R2 settings
    ([`R2_RECORD_NAME`], written atomically), which [`check_r2_state`] compares on resume."""
    save_r2_state(regularizer, folder)
    write_json_atomic(os.path.join(folder, R2_RECORD_NAME), {"r2_config": _r2_settings(regularizer)})


def check_r2_state(folder: str, regularizer, *, main_process: bool = True) -> None:
    """Refuse, in one line, to resume the checkpoint `folder` (the accelerate loop's or R2Trainer's) with other R2
    than it was saved with, so the run never goes on silently with another objective.

    First R2's learnable parameters: saved with them (`r2_regularizer.safetensors`) but resumed without R2 or with an
    R2 loss that has none, or the reverse (accelerate would otherwise stop on the optimizer's state, "loaded state
    dict has a different number of parameter groups"). Then the R2 settings that `loop_state.json` (R2Trainer:
    [`R2_RECORD_NAME`]) records (`R2Config.to_dict()`, or null without R2: for R2Trainer, `r2_lambda=0`), which tell
    a parameter-free loss (`linf`, `kurtosis`) from no R2:

    - refused: R2 on / off, another `loss`, `per_channel`, or other target layers (`include`, `exclude`,
      `skip_first_last`, `skip_frozen`): another objective, which a resumed optimizer state does not fit;
    - allowed with one warning (on the main process): another `r2_lambda` or `warmup_steps`, or the loss's own knob
      (`margin_penalty`, `soft_min_max_penalty`, `kurtosis_target`): a coefficient a user may change on purpose, as
      transformers resumes with changed `TrainingArguments`; the rest of the run uses the new value.

    A checkpoint saved before that record keeps only the parameter check (R2Trainer's: none); hf-r2 0.1.0 loop
    checkpoints (no `loop_state.json`) are checked as they load. A checkpoint without any R2 file (a plain
    Trainer's) resumed with R2 goes on with one warning, not an error: only a record that disagrees proves another
    objective, and refusing would break users who rely on it (R2 on a trained model is rather a new run from it)."""
    loop = os.path.isfile(os.path.join(folder, LOOP_STATE_NAME))
    record = LOOP_STATE_NAME if loop else R2_RECORD_NAME
    if not os.path.isfile(os.path.join(folder, record)):
        if main_process and (run := _r2_settings(regularizer)) is not None and [os.path.isfile(os.path.join(
                folder, n)) for n in ("trainer_state.json", R2_STATE_NAME, R2_CONFIG_NAME)] == [True, False, False]:
            logger.warning("Resuming %s, a checkpoint without R2 (no %s), with R2-Loss (%s): the rest of the run adds "
                           "the R2 term.", folder, R2_RECORD_NAME, _settings(run, ["loss", "r2_lambda"]))
        return
    path = os.path.join(folder, R2_STATE_NAME)
    learnt = sorted(regularizer.state_dict()) if regularizer is not None else []
    loss = None if regularizer is None else getattr(regularizer.config.loss, "value", regularizer.config.loss)
    run = "this run has no R2" if regularizer is None else f"this run's R2 (loss={loss!r}) learns " + (
        ", ".join(f"`{k}`" for k in learnt) if learnt else "none")
    if os.path.isfile(path) and not learnt:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:  # the names only: nothing is unpickled
            saved = ", ".join(f"`{k}`" for k in sorted(f.keys()))
        raise CheckpointError(f"checkpoint {folder} was saved with R2-Loss ({R2_STATE_NAME} holds its learnable "
                              f"{saved}) but {run}: {_FIX}")
    if learnt and not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {folder} was saved without R2's learnable parameters (no {R2_STATE_NAME}: "
                              f"no R2, or a loss without any) but {run}: {_FIX}")
    _check_r2_record(folder, record, _r2_settings(regularizer, trainer=not loop), main_process)


def _settings(values: dict[str, Any], names: list[str]) -> str:
    return ", ".join(f"{name}={values.get(name)!r}" for name in names)


def _check_r2_record(folder: str, record: str, run: dict[str, Any] | None, main_process: bool) -> None:
    """The R2 settings part of [`check_r2_state`]: `record` is the file that holds them, `run` this run's
    `R2Config.to_dict()` (`None`: no R2)."""
    path, trainer = os.path.join(folder, record), record == R2_RECORD_NAME
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError):
        if trainer:  # nothing else reads it: a silent skip would resume unchecked
            raise CheckpointError(f"{path} is not readable JSON: resume from a checkpoint R2Trainer wrote.") from None
        return  # load_checkpoint names the loop_state.json it cannot read
    if not isinstance(state, dict) or "r2_config" not in state:
        return  # written before the record: the parameter check is all there is
    saved = state["r2_config"]
    if saved is not None and not isinstance(saved, dict):
        raise CheckpointError(f"{path} holds `r2_config` {saved!r}, neither R2Config's fields nor null: resume from a "
                              f"checkpoint that {'R2Trainer' if trainer else 'train_with_accelerate'} wrote.")
    if (saved is None) != (run is None):
        main, off = ["loss", "r2_lambda"], " (r2_lambda=0)" if trainer else ""
        was = f"without R2-Loss{off}" if saved is None else f"with R2-Loss ({_settings(saved, main)})"
        now = f"this run has no R2{off}" if run is None else f"this run has R2-Loss ({_settings(run, main)})"
        raise CheckpointError(f"checkpoint {folder} was saved {was} (its {record}) but {now}: {_FIX}")
    if saved is None or run is None:
        return
    kept = [name for name in _R2_KEPT if name in saved and saved[name] != run[name]]
    if kept:
        raise CheckpointError(f"checkpoint {folder} was saved with R2-Loss {_settings(saved, kept)} (its {record}) "
                              f"but this run has {_settings(run, kept)}: {_FIX}")
    changed = [name for name in (*_R2_CHANGEABLE, _LOSS_KNOBS.get(run["loss"])) if name and name in saved
               and saved[name] != run[name]]
    if changed and main_process:
        logger.warning("Resuming %s with R2 %s where it was saved with %s: the rest of the run uses the new "
                       "value%s.", folder, _settings(run, changed), _settings(saved, changed),
                       "s" if len(changed) > 1 else "")


def safe_torch_load(path: str, **kwargs: Any) -> Any:
    """`torch.load(path, weights_only=True)` with accelerate's allow-list (the numpy arrays of its random states):
    tensors, numbers, strings and containers, never an arbitrary object. A file that holds anything else (a pickle
    that would run code when loaded) is a [`CheckpointError`] naming it."""
    from accelerate.utils.other import load

    try:
        return load(path, weights_only=True, **kwargs)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path} holds more than tensors and plain values (a pickle that could run code when "
                              "loaded fully), so hf-r2 did not load it: resume only from checkpoints you made, or "
                              "start over without resume_from_checkpoint.") from None


class Terminated(KeyboardInterrupt):
    """SIGTERM (what a cluster scheduler or `kill` sends), raised in the main thread by [`sigterm_as_interrupt`]:
    a `KeyboardInterrupt`, so that every `except KeyboardInterrupt` (and every `finally`) treats it as Ctrl-C."""

    exit_code = 128 + signal.SIGTERM  # 143: what the shell reports for a process that SIGTERM ended


def interrupt_exit_code(err: BaseException) -> int:
    """The exit status of a process stopped by `err`: 143 for [`Terminated`] (SIGTERM), 130 for Ctrl-C."""
    return Terminated.exit_code if isinstance(err, Terminated) else 128 + signal.SIGINT


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[list[int]]:
    """Within it, SIGTERM raises [`Terminated`] in the main thread, as Ctrl-C raises `KeyboardInterrupt`, so that a
    run stopped by a scheduler ends as one stopped by Ctrl-C: its `finally` blocks run, staged checkpoints stay
    complete or absent, and the command says where to resume. Only the first SIGTERM raises; later ones are ignored
    until the block ends (SIGKILL still ends the process at once). The previous handler comes back afterwards.
    Yields a list that holds `SIGTERM` once one came (for a caller whose code handled the interrupt itself). Does
    nothing outside the main thread, or when SIGTERM is not at its default (ignored, or someone's handler)."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) not in (
            signal.SIG_DFL, None):
        yield received
        return

    def handler(signum: int, frame: Any) -> None:
        if not received:
            received.append(signum)
            raise Terminated()

    signal.signal(signal.SIGTERM, handler)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def interrupted_line(err: BaseException, root: str, loop: bool = False) -> str:
    """`interrupted` or `terminated (SIGTERM)`, then where the run stands: the last complete checkpoint of `root`
    ([`latest_checkpoint`]), or that none was completed yet (a rerun starts over)."""
    checkpoint = latest_checkpoint(root, loop=loop)
    where = (f"the last complete checkpoint is {checkpoint}" if checkpoint else
             f"no checkpoint was completed in {root} yet (it starts over)")
    return f"{'terminated (SIGTERM)' if isinstance(err, Terminated) else 'interrupted'}; {where}"


def resumable_on_interrupt(function: Callable) -> Callable:
    """Decorate a training function whose keyword argument `config` has an `output_dir` (the accelerate loop's
    `LoopConfig`): while it runs SIGTERM is an interrupt ([`sigterm_as_interrupt`]), and an interrupt (Ctrl-C or
    SIGTERM) logs one line on the main process, with the last complete checkpoint under `output_dir/checkpoints`
    and how to resume, then goes on up ([`Terminated`] for SIGTERM: [`interrupt_exit_code`] gives 143)."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with sigterm_as_interrupt():
            try:
                return function(*args, **kwargs)
            except KeyboardInterrupt as err:
                output_dir = getattr(kwargs.get("config"), "output_dir", None)
                if output_dir and int(os.environ.get("RANK", "0") or 0) == 0:
                    root = os.path.join(output_dir, "checkpoints")
                    logger.warning("%s: %s; rerun with resume_from_checkpoint='latest' (--resume_from_checkpoint "
                                   "latest) to continue.", function.__name__, interrupted_line(err, root, loop=True))
                raise

    return wrapper
