"""Push an hf-r2 model folder to the Hugging Face Hub, and load one back.

Saving and pushing are separate steps: [`push_to_hub`] first saves everything (weights in the model's own format,
`r2_config.json`, `r2_stats.json`, the model card `README.md`) into a folder that the user keeps, then uploads that
folder. An upload that fails leaves the folder whole, so it can be retried with `hf-r2 push FOLDER REPO_ID`.

A timm model is pushed in timm's own Hub layout, so `timm.create_model("hf-hub:REPO_ID", pretrained=True)` loads it
without hf-r2, and so does `AutoModelForImageClassification.from_pretrained` (transformers' `TimmWrapper`); a
transformers model in `save_pretrained` layout, so `AutoModelForImageClassification.from_pretrained` loads it.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import stat
from typing import Any, NamedTuple

from torch import nn

from ._utils import check_safetensors_files
from .config import R2_CONFIG_NAME, R2Config
from .model_card import build_model_card, folder_library, write_model_card
from .saving import R2_STATS_NAME, save_model_folder

__all__ = ["HubPushError", "R2Pretrained", "download", "from_pretrained", "push_folder", "push_to_hub", "upload_plan"]

logger = logging.getLogger(__name__)


# Left out of an upload without a word: Trainer checkpoints and TensorBoard runs, and the partial files of a write
# that was interrupted (`*.tmp` from the atomic writes; `model.onnx.tmp<pid>`, `model.tmp<pid>.mlpackage/` from
# `hf-r2 export`); patterns on the path relative to the folder, as huggingface_hub matches them. An exported
# `model.onnx` and `model.mlpackage/` (a folder) go up with the rest. [`upload_plan`] also leaves out, and names:
# hidden files and folders at every depth, symbolic links, anything that is not a regular file, and
# `training_args.bin`.
_IGNORE_PATTERNS = ["checkpoint-*", "checkpoint-*/**", "runs/**", "*.tmp", "*.tmp[0-9]*"]
_IGNORED_FOLDERS = ["checkpoint-*", "runs", "*.tmp", "*.tmp[0-9]*"]
#: Files with these names are never uploaded, at any depth: `training_args.bin` is the pickled `TrainingArguments`
#: of a Trainer run, which transformers saves with the `hub_token` in it.
NEVER_PUSHED = ("training_args.bin",)
#: A file larger than this (2 GB) gets a warning before it is uploaded: a model folder of hf-r2 rarely holds one.
LARGE_FILE_BYTES = 2 * 10**9
# Tokens shorter than this are not searched for in the files (a test token `x` would match everything).
_MIN_TOKEN_CHARS = 8


class HubPushError(RuntimeError):
    """An upload to the Hub failed; the local folder is complete and the push can be retried."""


class R2Pretrained(NamedTuple):
    """What [`from_pretrained`] returns; unpacks as `model, r2_config, stats, low_bit = hf_r2.from_pretrained(...)`.

    model (`torch.nn.Module`):
        The timm or transformers model, with its saved weights, in eval mode. For a low-bit export, the weights are
        decoded from their codes / palette (exactly the low-bit values) and quantized inputs are fake-quantized.
    r2_config ([`R2Config`] or `None`):
        The R2 settings it was trained with (`None` if the folder has no `r2_config.json`).
    stats (`dict` or `None`):
        The weight-range statistics of [`R2Regularizer.stats`] (`None` if the folder has no `r2_stats.json`).
    low_bit (`dict` or `None`):
        For a low-bit export ([`hf_r2.quant.save_low_bit`]), its `low_bit_config.json`: method, per-layer scheme
        and bits, size report, base model. `None` for a full-precision folder.
    """

    model: nn.Module
    r2_config: R2Config | None
    stats: dict[str, Any] | None
    low_bit: dict[str, Any] | None = None


def _check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(
            f"`repo_id={repo_id!r}` is not a valid Hub repo id ({err}). Use `name` or `namespace/name`, with letters, "
            "digits, `-`, `_` and `.` only (no `--` or `..`), at most 96 characters."
        ) from None


def _retry_hint(folder: str, repo_id: str) -> str:
    return f"The local folder {folder!r} is complete; retry the upload with `hf-r2 push {folder} {repo_id}`."


class UploadPlan(NamedTuple):
    """What [`push_folder`] uploads from a folder, and what it leaves out.

    files (`list[str]`):
        The files to upload, relative to the folder, `/`-separated, sorted.
    left_out (`list[tuple[str, str]]`):
        `(path, why)` for each hidden file or folder, symbolic link, other non-regular file and `training_args.bin`
        left out (a left-out folder once, with a trailing `/`). Checkpoints, TensorBoard runs and partial writes are
        left out without being listed.
    """

    files: list[str]
    left_out: list[tuple[str, str]]


def _ignored(rel: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(rel, p) for p in patterns)


def upload_plan(folder: str) -> UploadPlan:
    """The files of `folder` that [`push_folder`] uploads, and those it leaves out (see [`UploadPlan`]).

    Left out, at every depth: names starting with `.` (`.env`, `.ssh/`, `.git/`, `.cache/`), symbolic links to files
    or folders wherever they point (a link can lead out of the folder, or to a hidden file in it), anything that is
    not a regular file (FIFOs, sockets, devices), and `training_args.bin`. Links are not followed into folders.
    """
    folder = os.fspath(folder)
    files: list[str] = []
    left_out: list[tuple[str, str]] = []
    for root, dirs, names in os.walk(folder, followlinks=False):
        base = os.path.relpath(root, folder).replace(os.sep, "/")
        base = "" if base == "." else base + "/"
        keep = []
        for name in sorted(dirs):
            rel = base + name
            if os.path.islink(os.path.join(root, name)):
                left_out.append((rel + "/", "symbolic link"))
            elif name.startswith("."):
                left_out.append((rel + "/", "hidden"))
            elif not _ignored(rel, _IGNORED_FOLDERS):
                keep.append(name)
        dirs[:] = keep
        for name in sorted(names):
            rel = base + name
            mode = os.lstat(os.path.join(root, name)).st_mode
            if stat.S_ISLNK(mode):
                left_out.append((rel, "symbolic link"))
            elif name.startswith("."):
                left_out.append((rel, "hidden"))
            elif not stat.S_ISREG(mode):
                left_out.append((rel, "not a regular file"))
            elif name in NEVER_PUSHED:
                left_out.append((rel, "pickled training arguments, may hold the Hub token"))
            elif not _ignored(rel, _IGNORE_PATTERNS):
                files.append(rel)
    return UploadPlan(sorted(files), sorted(left_out))


def _holds(path: str, needle: bytes) -> bool:
    """Whether the file at `path` contains `needle` (read in chunks, overlapping by `len(needle) - 1` bytes)."""
    tail = b""
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            if needle in tail + chunk:
                return True
            tail = chunk[-(len(needle) - 1):]
    return False


def _check_plan(folder: str, plan: UploadPlan, token: str, skip: tuple[str, ...] = ()) -> None:
    """Refuse a push that would upload the token or lose the config; warn of large files; name what is left out."""
    if any(path == "config.json" for path, _ in plan.left_out):
        raise ValueError(
            f"config.json in {folder!r} is a symbolic link, and hf-r2 push uploads no links (nor anything else it "
            "points to): copy the folder without links (`cp -rL`, or `hf-r2 download --local-dir`) and push the copy."
        )
    if len(token) >= _MIN_TOKEN_CHARS:
        needle = token.encode()
        for rel in plan.files:
            if rel not in skip and _holds(os.path.join(folder, *rel.split("/")), needle):
                raise ValueError(
                    f"{rel} in {folder!r} holds the Hub token this push uses: refused, so that the token does not "
                    "reach the Hub; remove the token from that file (or delete it) and push again."
                )
    for rel in (r for r in plan.files if r not in skip):
        size = os.path.getsize(os.path.join(folder, *rel.split("/")))
        if size > LARGE_FILE_BYTES:
            logger.warning("%s in %s is %.1f GB, over the %.0f GB a model folder rarely needs: uploading it anyway; "
                           "delete it and push again if it does not belong in the repo.", rel, folder, size / 1e9,
                           LARGE_FILE_BYTES / 1e9)
    if plan.left_out:
        shown = ", ".join(f"{path} ({why})" for path, why in plan.left_out[:20])
        more = f" and {len(plan.left_out) - 20} more" if len(plan.left_out) > 20 else ""
        logger.warning("Left out of the upload of %s: %s%s.", folder, shown, more)


def _exact_pattern(path: str) -> str:
    """An fnmatch pattern that matches `path` only (its `*`, `?` and `[` made literal)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in path)


def push_folder(
    folder: str,
    repo_id: str,
    *,
    commit_message: str = "Upload model trained with hf-r2",
    token: str | None = None,
    revision: str | None = None,
    private: bool | None = None,
    create_pr: bool = False,
    exist_ok: bool = True,
    datasets: str | list[str] | None = None,
    base_model: str | None = None,
    license: str | None = None,
    write_card: bool = True,
) -> str:
    """Upload a saved model folder to the Hub repo `repo_id`, after writing its model card into the folder. The
    files `hf-r2 export` wrote into it (`model.onnx`, `model.mlpackage/`) go up too, described on the card.

    Args:
        folder (`str`):
            A folder saved by [`hf_r2.save_model_folder`], `R2Trainer.save_model` or `hf-r2 train`.
        repo_id (`str`):
            `namespace/name` (or `name`, under the token's user).
        commit_message (`str`, *optional*, defaults to `"Upload model trained with hf-r2"`):
            The commit message.
        token (`str`, *optional*):
            A token with write access; defaults to `HF_TOKEN` or the one stored by `hf auth login`.
        revision (`str`, *optional*):
            The branch to commit to (default: `main`).
        private (`bool`, *optional*):
            Make the repo private when it is created (no effect on an existing repo).
        create_pr (`bool`, *optional*, defaults to `False`):
            Open a pull request instead of committing to the branch.
        exist_ok (`bool`, *optional*, defaults to `True`):
            Push to the repo if it already exists; with `False`, an existing repo is an error.
        datasets, base_model, license:
            Model card metadata (see [`hf_r2.model_card.build_model_card`]).
        write_card (`bool`, *optional*, defaults to `True`):
            Write (overwrite) the folder's `README.md` with the hf-r2 model card before uploading; `False` keeps the
            user's own `README.md` (`hf-r2 push --keep-readme`).

    What goes up ([`upload_plan`]): every regular file of the folder except hidden files and folders (at every
    depth), symbolic links (never followed), `training_args.bin`, Trainer checkpoints, TensorBoard `runs/` and
    partial writes; what is left out for being hidden, a link or `training_args.bin` is named in a warning. A push
    is refused (`ValueError`, nothing written, nothing uploaded) when a file to upload holds the token it pushes
    with, or when `config.json` is a link; a file over 2 GB gets a warning.

    Returns:
        `str`: the URL of the commit (or pull request).
    """
    from huggingface_hub import HfApi, get_token

    from .version import __version__

    _check_repo_id(repo_id)
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"`folder={folder!r}` is not a folder: save the model first (`hf_r2.save_model_folder`)."
        )
    folder_library(folder)  # a clear error for a folder without config.json
    token = token or get_token()
    if not token:
        raise ValueError(
            "No Hugging Face token found to push with. Log in with `hf auth login`, set the `HF_TOKEN` environment "
            f"variable, or pass `token=` (`hf-r2 push --token`). {_retry_hint(folder, repo_id)}"
        )
    card = None
    if write_card:
        card = build_model_card(folder, repo_id, datasets=datasets, base_model=base_model, license=license)
    plan = upload_plan(folder)
    if card is not None:  # README.md will be the card, a regular file, whatever stands there now
        files = sorted({*plan.files, "README.md"})
        plan = UploadPlan(files, [(p, why) for p, why in plan.left_out if p != "README.md"])
    _check_plan(folder, plan, token, skip=("README.md",) if card is not None else ())
    if card is not None and len(token) >= _MIN_TOKEN_CHARS and token in str(card):
        raise ValueError(f"The model card written for {folder!r} would hold the Hub token this push uses: refused; "
                         "remove the token from the folder's JSON files (the card quotes them) and push again.")
    if card is not None:
        write_model_card(folder, card)
    api = HfApi(token=token, library_name="hf-r2", library_version=__version__)
    try:
        if not exist_ok and api.repo_exists(repo_id):
            raise FileExistsError(
                f"The Hub repo {repo_id!r} already exists and `exist_ok=False`; pick another `repo_id` or pass "
                "`exist_ok=True` (`hf-r2 push` without `--no-exist-ok`) to push a new commit to it."
            )
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_url.repo_id,
            folder_path=folder,
            commit_message=commit_message,
            revision=revision,
            create_pr=create_pr,
            allow_patterns=[_exact_pattern(p) for p in plan.files],  # the planned files and nothing else
            ignore_patterns=_IGNORE_PATTERNS,
        )
    except FileExistsError:
        raise
    except Exception as err:  # network down, bad token, 5xx, ...
        status = getattr(getattr(err, "response", None), "status_code", None)
        what = f"HTTP {status}" if status else type(err).__name__
        hint = " Check that the token has write access (`hf auth whoami`)." if status in (401, 403) else ""
        raise HubPushError(
            f"Uploading {folder!r} to the Hub repo {repo_id!r} failed ({what}: {err}).{hint} "
            f"{_retry_hint(folder, repo_id)}"
        ) from err
    return str(getattr(info, "pr_url", None) or getattr(info, "commit_url", None) or info)


def push_to_hub(
    model: nn.Module | str,
    repo_id: str,
    save_directory: str | None = None,
    *,
    r2_config: R2Config | None = None,
    stats: dict[str, Any] | None = None,
    **push_kwargs: Any,
) -> str:
    """Save `model` into `save_directory` (which you keep), then push that folder to the Hub repo `repo_id`.

    Args:
        model (`torch.nn.Module` or `str`):
            A timm or transformers model, or the path of a folder already saved (then `save_directory`, `r2_config`
            and `stats` are not used).
        repo_id (`str`):
            `namespace/name` of the Hub repo (created if missing).
        save_directory (`str`):
            The local folder to save into first; required when `model` is a module.
        r2_config ([`R2Config`], *optional*):
            The R2 settings it was trained with (`r2_config.json`).
        stats (`dict`, *optional*):
            The weight-range statistics, `R2Regularizer(model, r2_config).stats()` (`r2_stats.json`).
        push_kwargs:
            Passed on to [`push_folder`]: `commit_message`, `token`, `revision`, `private`, `create_pr`, `exist_ok`,
            `datasets`, `base_model`, `license`, `write_card`.

    Returns:
        `str`: the URL of the commit (or pull request).

    ```python
    >>> import hf_r2
    >>> hf_r2.push_to_hub(model, "me/resnet18-r2", "out/resnet18-r2", r2_config=cfg, stats=reg.stats(),
    ...                   datasets="uoft-cs/cifar10")
    ```
    """
    _check_repo_id(repo_id)
    if isinstance(model, (str, os.PathLike)):
        return push_folder(os.fspath(model), repo_id, **push_kwargs)
    if save_directory is None:
        raise ValueError(
            "`save_directory` is required to push a model: hf-r2 saves into a folder you keep, then uploads it. "
            f"Pass e.g. `save_directory={repo_id.split('/')[-1]!r}`."
        )
    save_model_folder(model, save_directory, r2_config=r2_config, stats=stats)
    return push_folder(save_directory, repo_id, **push_kwargs)


def download(
    repo_id: str,
    *,
    local_dir: str | None = None,
    revision: str | None = None,
    token: str | None = None,
    cache_dir: str | None = None,
    local_files_only: bool = False,
) -> str:
    """Download the Hub repo `repo_id` (into the cache, or into `local_dir`) and return the folder's path.

    Works offline from the cache (`HF_HUB_OFFLINE=1` or `local_files_only=True`) once downloaded.
    """
    from huggingface_hub import snapshot_download

    _check_repo_id(repo_id)
    return snapshot_download(
        repo_id,
        revision=revision,
        token=token,
        cache_dir=cache_dir,
        local_dir=local_dir,
        local_files_only=local_files_only,
    )


def from_pretrained(repo_id_or_path: str, **download_kwargs: Any) -> R2Pretrained:
    """Load a model pushed (or saved) by hf-r2, with its R2 settings and weight-range statistics.

    Args:
        repo_id_or_path (`str`):
            A local folder, or a Hub repo id (downloaded with [`download`]; from the cache when offline).
        download_kwargs:
            `revision`, `token`, `cache_dir`, `local_dir`, `local_files_only` for [`download`].

    Returns:
        [`R2Pretrained`]: `(model, r2_config, stats, low_bit)`, each of the last three `None` when not saved.

    ```python
    >>> model, r2_config, stats, _ = hf_r2.from_pretrained("me/resnet18-r2")
    >>> model, _, _, low_bit = hf_r2.from_pretrained("me/resnet18-r2-w2a8")  # a low-bit export
    >>> low_bit["size"]["bits_per_weight"]
    ```
    """
    from .models import create_model

    path = os.fspath(repo_id_or_path)
    if os.path.isdir(path):
        folder = path
    elif path.startswith((".", "/", "~")) or path.count("/") > 1 or os.sep in path.replace("/", ""):
        raise FileNotFoundError(f"`repo_id_or_path={path!r}` is neither a folder nor a Hub repo id.")
    else:
        folder = download(path, **download_kwargs)
    from .quant import is_low_bit_folder, load_low_bit

    check_safetensors_files(folder)
    low_bit = None
    if is_low_bit_folder(folder):
        model, low_bit = load_low_bit(folder)
    else:
        model = create_model(folder, pretrained=True).eval()
    config_path = os.path.join(folder, R2_CONFIG_NAME)
    r2_config = R2Config.from_pretrained(folder) if os.path.isfile(config_path) else None
    stats = None
    stats_path = os.path.join(folder, R2_STATS_NAME)
    if os.path.isfile(stats_path):
        with open(stats_path, encoding="utf-8") as f:
            stats = json.load(f)
    return R2Pretrained(model, r2_config, stats, low_bit)
