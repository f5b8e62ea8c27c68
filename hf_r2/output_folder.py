"""Output folders that may hold the user's own files: what a run wrote, so that only that is ever replaced.

A run records itself in a manifest, `.hf-r2-output.json` (hidden: `hf-r2 push` leaves it out), written before the
run writes anything (temp file, then rename): `kept` lists the entries the folder held before, which are the
user's; when the run ends, is interrupted or fails, `written` lists the entries it added (and `finished` says
that list is complete). Replacing a run
(`overwrite_output_dir`) removes what `written` lists, and entries added later with a name a run writes (the card
`hf-r2 push` writes, results of `hf-r2 evaluate`); a run killed before it could say what it wrote
(`finished: false`) loses every entry that is not in `kept`. Nothing in `kept` is touched, ever.

A folder without a manifest that holds a run of an older hf-r2, or of the Trainer (it has a file only a run writes:
`trainer_state.json`, `r2_*.json`, a checkpoint, ...), is a run's: its entries with the names a run writes are
the run's ([`run_files`]). A folder that holds other files and no run is the user's: [`check_output_folder`]
refuses it unless the caller opts in, and then refuses it still if one of the user's entries has a name the run
would write (it would be overwritten).

Only the folder's top-level entries are tracked: a run's folders (`checkpoint-<n>/`, `runs/`, `model/`) are its
own whole.

Exports (a low-bit folder, a Core ML package) follow the same rule without a manifest, as they are known by their
own files: [`check_export_folder`] refuses an existing folder that is not empty and not an export of that kind, and
[`replace_folder`] puts a complete new export in place of the old one, keeping the folder's mode and (for a low-bit
folder) the entries added beside the export, moved rather than copied, so a link stays a link. A target that is
itself a link to a folder is followed: the export goes where it points, and the link stays. An export that is one
file (an ONNX file) is the same: [`check_export_file`] refuses a folder in its place and follows a link,
[`replace_file`] renames the complete new file over the old one, which keeps its mode.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable
from typing import Any

from ._utils import read_json, write_json_atomic

__all__ = [
    "MANIFEST_NAME",
    "STAGING_PREFIX",
    "TRAINER_CHECKPOINT_RE",
    "WEIGHT_NAMES",
    "check_export_file",
    "check_export_folder",
    "EXPORT_RESULTS_NAME",
    "check_output_folder",
    "clear_run",
    "exported_entries",
    "read_export_results",
    "finish_run",
    "is_run_name",
    "replace_file",
    "replace_folder",
    "run_files",
    "start_run",
]

MANIFEST_NAME = ".hf-r2-output.json"
#: The hidden sibling a checkpoint is written into before it is renamed into place ([`hf_r2.checkpoints`]).
STAGING_PREFIX = ".tmp-"
TRAINER_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
#: What `hf-r2 export` records of the files it wrote inside a model folder (`{"exports": {format: {"path": ...}}}`).
EXPORT_RESULTS_NAME = "export_results.json"
#: The names a model's weights are saved under (Trainer / transformers / timm), whole or sharded.
WEIGHT_NAMES = (
    "model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json",
)
# What a run writes to its output folder (R2Trainer, hf-r2 train, the loop, hf-r2 evaluate / ptq / qat, the card).
_RUN_NAMES = {
    *WEIGHT_NAMES, "config.json", "preprocessor_config.json", "training_args.bin", "trainer_state.json",
    "all_results.json", "train_results.json", "eval_results.json", "low_bit_results.json", "README.md",
    "loop_config.json", "checkpoints", "model", "runs",
}
#: Files only a run writes: their presence (or a checkpoint / `r2_*.json`) is what makes a folder a run's.
_RUN_MARKERS = {"trainer_state.json", "training_args.bin", "loop_config.json", "low_bit_results.json"}
_RUN_PATTERNS = (TRAINER_CHECKPOINT_RE, re.compile(r"^r2_.*\.json$"), re.compile(r"^" + re.escape(STAGING_PREFIX)))


def is_run_name(name: str) -> bool:
    """Whether a training run may write an entry called `name` at the top of its output folder."""
    return name in _RUN_NAMES or any(p.match(name) for p in _RUN_PATTERNS)


def _entries(folder: str) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n != MANIFEST_NAME) if os.path.isdir(folder) else []


def _manifest(folder: str) -> dict[str, Any] | None:
    """The folder's manifest, or `None`; one that does not parse is a `ValueError` (nothing is guessed)."""
    path = os.path.join(folder, MANIFEST_NAME)
    try:
        data = read_json(path)
    except ValueError:
        data = {}
    if data is None:
        return None
    if not (isinstance(data, dict) and all(isinstance(data.get(k), list) for k in ("kept", "written"))):
        raise ValueError(f"{path} is damaged: remove the run's files from {folder} by hand (and that file), or "
                         "choose another folder.")
    return data


def run_files(folder: str) -> list[str]:
    """The entries of `folder` that belong to a training run; empty if the folder is missing or holds no run.

    With a manifest: what the run wrote, plus later entries with a name a run writes (every entry not in `kept`
    if the run never finished). Without one: the entries with a run's names, if the folder has a file that only a
    run writes (`r2_*.json`, `trainer_state.json`, `training_args.bin`, `loop_config.json`,
    `low_bit_results.json`, a checkpoint or staging folder); a project folder with a README, a `config.json` or a
    `model/` of the user's own is not a run."""
    names = _entries(folder)
    manifest = _manifest(folder)
    if manifest is not None:
        kept, written = set(manifest["kept"]), set(manifest["written"])
        finished = manifest.get("finished", False)
        return [n for n in names if n not in kept and (n in written or not finished or is_run_name(n))]
    if not any(n in _RUN_MARKERS or any(p.match(n) for p in _RUN_PATTERNS) for n in names):
        return []
    return [n for n in names if is_run_name(n)]


def check_output_folder(folder: str, *, replace: bool, add: bool, replace_flag: str = "--overwrite_output_dir",
                        add_flag: str = "--add_to_output_dir") -> list[str]:
    """Refuse, in one line naming the fix, an output folder a new run would harm; returns the run files that
    `replace` will remove ([`clear_run`]). Nothing is changed here.

    - a folder that holds a run ([`run_files`]): refused unless `replace`;
    - a folder that holds other entries and no run, and no manifest (a folder of the user's): refused unless `add`;
    - then, an entry that is not the run's (the user's) with a name the run writes: refused (it would be
      overwritten), whatever the flags.
    """
    found = run_files(folder)
    if found and not replace:
        listed = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        raise ValueError(f"`--output_dir {folder}` already holds a training run ({listed}): pass `{replace_flag}` to "
                         "replace that run, `--resume_from_checkpoint latest` to continue it, or choose another "
                         "folder.")
    yours = [n for n in _entries(folder) if n not in found]
    if yours and not found and _manifest(folder) is None and not add:
        listed = ", ".join(yours[:4]) + (", ..." if len(yours) > 4 else "")
        raise ValueError(f"`--output_dir {folder}` holds files that are not a training run's ({listed}): choose a "
                         f"new or empty folder, or pass `{add_flag}` to train beside them (none of them is "
                         "overwritten or removed).")
    clashes = [n for n in yours if is_run_name(n)]
    if clashes:
        raise ValueError(f"`--output_dir {folder}` holds {', '.join(clashes)} of yours, which the run would "
                         "overwrite: move them out of the folder, or choose another folder.")
    return found


def clear_run(folder: str) -> list[str]:
    """Remove what [`run_files`] lists (for `overwrite_output_dir`); other entries stay. Returns the removed names.
    A link is removed, never followed."""
    removed = run_files(folder)
    for name in removed:
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    return removed


def start_run(folder: str) -> None:
    """Write the manifest of a new run into `folder` (created if missing) before the run writes anything: every
    entry already there is the user's (`kept`). Call it after [`clear_run`]."""
    os.makedirs(folder, exist_ok=True)
    write_json_atomic(os.path.join(folder, MANIFEST_NAME), {"kept": _entries(folder), "written": [],
                                                              "finished": False})


def finish_run(folder: str) -> list[str]:
    """Record in the manifest what the run wrote (every entry not in `kept`), when it ended, failed or was
    interrupted; returns it. Nothing happens in a folder without a manifest (a run of an older hf-r2, resumed)."""
    manifest = _manifest(folder)
    if manifest is None:
        return []
    kept = manifest["kept"]
    written = [n for n in _entries(folder) if n not in set(kept)]
    write_json_atomic(os.path.join(folder, MANIFEST_NAME), {"kept": kept, "written": written, "finished": True})
    return written


def check_export_folder(folder: str, is_export: Callable[[str], bool], what: str, option: str) -> str:
    """Refuse, in one line naming the fix, an existing `folder` that an export would replace but that is neither
    empty nor `what` (`is_export(folder)` is false): a folder of the user's. Returns the path to write: `folder`, or
    the folder a link named `folder` points to (followed, so the link stays; a dangling link is refused). `option`
    is how the caller names the folder (`--output-dir`, `save_directory`). Nothing is changed here."""
    if os.path.islink(folder) and not os.path.exists(folder):
        raise ValueError(f"`{option} {folder}` is a link to {os.readlink(folder)}, which does not exist: create that "
                         f"folder, or choose another `{option}`.")
    real = os.path.realpath(folder)
    if os.path.exists(real) and not os.path.isdir(real):
        raise ValueError(f"`{option} {folder}` is a file, not {what}: choose another `{option}`, or remove the file.")
    names = sorted(os.listdir(real)) if os.path.isdir(real) else []
    if names and not is_export(real):
        listed = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        raise ValueError(f"`{option} {folder}` holds files that are not {what} ({listed}): choose a new or empty "
                         f"folder for `{option}`, or remove that one yourself (hf-r2 replaces only its own exports).")
    return real


def check_export_file(path: str, what: str, option: str, name: str) -> str:
    """The file an export of one file (`what`, e.g. "an ONNX file") writes for `path`: `path`, or the file a link
    named `path` points to (followed, so the link stays). A folder (or a path ending in a separator) and a link to
    nothing are refused in one line naming the fix; `name` is the file name the message suggests inside a folder.
    Nothing is changed here."""
    if os.path.islink(path) and not os.path.exists(path):
        raise ValueError(f"`{option} {path}` is a link to {os.readlink(path)}, which does not exist: choose another "
                         f"`{option}`, or remove the link.")
    real = os.path.realpath(path)
    if path.endswith(os.sep) or os.path.isdir(real):
        raise ValueError(f"`{option} {path}` is a folder, not {what}: name the file, e.g. "
                         f"`{option} {os.path.join(path, name)}`.")
    return real


def replace_file(new: str, target: str) -> None:
    """Rename the complete file `new` over `target` (a path [`check_export_file`] returned, in the same folder), so
    an existing file is only ever replaced by a complete one, and give `new` the mode of an existing `target`."""
    if os.path.isfile(target):
        os.chmod(new, stat.S_IMODE(os.stat(target).st_mode))
    os.replace(new, target)


def read_export_results(folder: str) -> dict[str, dict[str, Any]]:
    """`{format: entry}` from the folder's `export_results.json` (`{}` when there is none): what `hf-r2 export`
    wrote (`path` relative to the folder, `file_bytes`, `bits_per_weight`, ...) and measured (`check`, `accuracy`)."""
    data = read_json(os.path.join(folder, EXPORT_RESULTS_NAME))
    exports = data.get("exports") if isinstance(data, dict) else None
    return {k: v for k, v in exports.items() if isinstance(v, dict)} if isinstance(exports, dict) else {}


def exported_entries(folder: str) -> set[str]:
    """The top-level entries of `folder` that `hf-r2 export` wrote from its weights (`model.onnx`, a Core ML
    package, ...: the `path` of each entry of its `export_results.json`, when that names an entry inside the folder)
    and the record itself. They encode the weights they were exported from, so a new export of the folder must not
    carry them over: a push would ship an ONNX file of the old weights beside the new ones."""
    if not os.path.isfile(os.path.join(folder, EXPORT_RESULTS_NAME)):
        return set()
    names = {EXPORT_RESULTS_NAME}
    for entry in read_export_results(folder).values():
        path = entry.get("path")
        if isinstance(path, str) and path and not os.path.isabs(path):
            first = os.path.normpath(path).split(os.sep)[0]
            if first not in (os.curdir, os.pardir, ""):  # only names inside the folder, never `../x`
                names.add(first)
    return names


def replace_folder(new: str, target: str, *, keep_entries: bool = False, leave: set[str] | frozenset[str] = frozenset()
                   ) -> None:
    """Rename the complete folder `new` to `target` (a path [`check_export_folder`] returned; both in one parent),
    so that an existing export is replaced only by a complete one. An existing `target` gives `new` its mode, and
    with `keep_entries` the entries of `target` that `new` lacks (a card, results, the user's links) are moved into
    `new` as they are: renamed, never copied, so a link stays a link; the names in `leave` (what was derived from
    the old export: [`exported_entries`]) go with the old folder. If a step fails, `target` is left as it was and
    `new` is removed (kept only if one of the moved entries could not be moved back)."""
    moved: list[str] = []
    old = None
    try:
        if os.path.isdir(target):
            os.chmod(new, stat.S_IMODE(os.stat(target).st_mode))
            if keep_entries:
                for name in sorted(set(os.listdir(target)) - set(os.listdir(new)) - set(leave)):
                    os.rename(os.path.join(target, name), os.path.join(new, name))
                    moved.append(name)
            old = tempfile.mkdtemp(prefix=".old-", dir=os.path.dirname(target))
            os.rename(target, os.path.join(old, "x"))
        try:
            os.rename(new, target)
        except BaseException:
            if old is not None:
                os.rename(os.path.join(old, "x"), target)
            raise
    except BaseException:
        for name in moved:
            os.rename(os.path.join(new, name), os.path.join(target, name))
        shutil.rmtree(new, ignore_errors=True)
        if old is not None and not os.listdir(old):  # never the old export, if it could not be put back
            os.rmdir(old)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
