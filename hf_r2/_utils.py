"""Shared helpers for hf-r2's plain-data configs: choice validation, atomic JSON writes, reading a YAML / JSON config
file, the machine facts runs record, and the JSON round trip (`to_dict` / `from_dict` / `save_pretrained` /
`from_pretrained`) that every config has, as peft's configs do."""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import os
import re
import tempfile
import warnings
from collections.abc import Iterable
from typing import Any, ClassVar, TypeVar

__all__ = [
    "CONFIG_FILE_SUFFIXES",
    "JsonConfigMixin",
    "UsageError",
    "accept_init_aliases",
    "check_choice",
    "check_patterns",
    "check_safetensors_files",
    "current_umask",
    "give_default_mode",
    "give_default_modes",
    "format_choices",
    "format_seconds",
    "is_plain_path",
    "machine_info",
    "read_config_file",
    "read_json",
    "rename_aliases",
    "write_json_atomic",
    "write_text_atomic",
]

_C = TypeVar("_C", bound="JsonConfigMixin")


class UsageError(ValueError):
    """A mistake in what the user asked for (a flag, a path, a value): `hf-r2` prints it as one line, `hf-r2 <cmd>:
    error: ...`, and exits non-zero; `prog` names the command when the error comes from a parser."""

    def __init__(self, message: str, prog: str | None = None):
        super().__init__(message)
        self.prog = prog


def format_choices(choices: Iterable[Any]) -> str:
    """`'a', 'b', 'c'`: the choices (str enum members or strings), for error and help messages."""
    return ", ".join(repr(getattr(c, "value", c)) for c in choices)


def format_seconds(seconds: float) -> str:
    """`42 s`, `3 min 05 s`, `2 h 07 min`: every progress line of the package (training, quantization)."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def check_choice(name: str, value: Any, enum_cls: type[enum.Enum]) -> str:
    """The plain-string value of `value` (a member of `enum_cls` or its string), or a `ValueError` that names the
    parameter, shows the bad value, lists the valid ones and, for a near miss (`soft-min-max`), the fix."""
    value = getattr(value, "value", value)
    valid = [e.value for e in enum_cls]
    if value not in valid:
        norm = str(value).lower().replace("-", "").replace("_", "")
        close = [v for v in valid if v.replace("_", "") == norm]
        hint = f" Did you mean `{name}={close[0]!r}`?" if close else ""
        raise ValueError(f"`{name}` must be one of {format_choices(enum_cls)}, got {value!r}.{hint}")
    return value


def check_positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    """A `ValueError` naming `name` unless `value` is an `int` >= 1 (not a `bool`), or `None` with `allow_none`."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer{' or `None`' if allow_none else ''}, got {value!r}.")


def check_patterns(name: str, value: Any) -> list[str] | None:
    """`value` (`None`, one regex or a list of them) as a list of valid regular expressions, or a `ValueError`."""
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"`{name}` must be a list of regular expressions or `None`, got {value!r}.")
    for pattern in value:
        try:
            re.compile(pattern)
        except (re.error, TypeError) as err:
            raise ValueError(f"`{name}` holds an invalid regular expression {pattern!r}: {err}.") from None
    return list(value)


def read_json(path: str | os.PathLike) -> Any:
    """The JSON value in `path`, or `None` if there is no such file (the counterpart of [`write_json_atomic`])."""
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


#: The file names [`read_config_file`] reads: JSON, or YAML.
CONFIG_FILE_SUFFIXES = (".json", ".yaml", ".yml")


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping of field names to values in a YAML (`.yaml`, `.yml`) or JSON (`.json`) config file.

    Raises `FileNotFoundError` when there is no such file and `ValueError`, in one line naming the file, for another
    suffix, a file that does not parse, and a file that does not hold a mapping. YAML is read with `safe_load`: a
    tag that would build a Python object (`!!python/object/apply:os.system`) is such an error, never run.
    """
    import yaml

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No config file at {path!r}.")
    lower = path.lower()
    if not lower.endswith(CONFIG_FILE_SUFFIXES):
        raise ValueError(f"A config file must be a .yaml, .yml or .json file, got {path!r}.")
    kind = "JSON" if lower.endswith(".json") else "YAML"
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f) if kind == "JSON" else yaml.safe_load(f)
    except (ValueError, yaml.YAMLError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"config file {path!r} is not valid {kind}: {' '.join(str(err).split())}") from None
    if not isinstance(data, dict):
        raise ValueError(f"The config file {path!r} must hold a mapping of field names to values.")
    return data


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def machine_info() -> dict[str, str]:
    """The machine and library facts a run records and `hf-r2 env` prints: versions of hf-r2, Python and the
    libraries, the platform, the accelerator, torch's thread count, the CPU count and the load average."""
    import platform

    from .version import __version__

    info = {"hf-r2 version": __version__, "Platform": platform.platform(),
            "Python version": platform.python_version()}
    for package in ("torch", "torchvision", "timm", "transformers", "accelerate", "datasets", "huggingface_hub",
                    "safetensors", "numpy"):
        info[f"{package} version"] = _version(package)
    try:
        import torch

        info["PyTorch accelerator"] = (
            f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "none (CPU)"
        )
        info["torch threads"] = str(torch.get_num_threads())
    except Exception as err:  # pragma: no cover - only for a broken install
        info["PyTorch accelerator"] = f"unknown ({err})"
    info["Machine"] = platform.machine()
    info["CPU count"] = str(os.cpu_count())
    try:
        info["Load average"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover - not on every OS
        info["Load average"] = "n/a"
    return info


# bits per element of each safetensors dtype (safetensors 0.8), and the largest header it reads
_SAFETENSORS_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}
_SAFETENSORS_MAX_HEADER = 100_000_000


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _safetensors_problem(path: str) -> str | None:
    """What makes `path` no valid safetensors file (the checks safetensors itself makes), or `None`."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if length < 0 or 8 + length > size:
            return "its header is cut short"
        if length > _SAFETENSORS_MAX_HEADER:
            return f"its header length {length} is over safetensors' {_SAFETENSORS_MAX_HEADER}"
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except ValueError:
        return "its header does not parse"
    if not isinstance(header, dict):
        return "its header is not a mapping of tensor names"
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        return "its __metadata__ is not a mapping of strings"
    spans = []
    for name, info in header.items():
        info = info if isinstance(info, dict) else {}
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _SAFETENSORS_BITS:
            return f"tensor {name!r} has an unknown dtype {dtype!r}"
        if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
            return f"tensor {name!r} has no valid shape"
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            return f"tensor {name!r} has no valid data_offsets"
        bits = _SAFETENSORS_BITS[dtype]
        for n in shape:
            bits *= n
        if bits != 8 * (offsets[1] - offsets[0]):
            return f"tensor {name!r} ({dtype} {shape}) does not fill its {offsets[1] - offsets[0]} bytes"
        spans.append((offsets[0], offsets[1], name))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            return f"tensor {name!r} {'overlaps another' if begin < end else 'leaves a gap before it'}"
        end = stop
    if 8 + length + end > size:
        return f"it holds {size} bytes of the {8 + length + end} its header describes"
    if 8 + length + end < size:
        return f"it holds {size - 8 - length - end} bytes after its last tensor"
    return None


def check_safetensors_files(folder: str | os.PathLike) -> None:
    """A `ValueError` naming the file when a `*.safetensors` file in `folder` is damaged, incomplete or crafted (a
    header that does not parse or is no mapping of tensors, an unknown dtype, a shape that does not fill its bytes,
    tensors that overlap, leave gaps or run past the end of the file: an interrupted copy or download, or a file
    made to break a loader), before a loader fails on it with a `SafetensorError` that names no file."""
    folder = os.fspath(folder)
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not name.endswith(".safetensors") or not os.path.isfile(path):
            continue
        problem = _safetensors_problem(path)
        if problem:
            raise ValueError(f"{path} is damaged or incomplete ({problem}): copy or download it again.")


def current_umask() -> int:
    """The process' umask (read from `/proc/self/status` where there is one, so that no other thread sees it
    change)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_default_mode(path: str | os.PathLike) -> None:
    """Give `path` the mode a plain `open()` / `mkdir` would have (0666 / 0777 less the umask, typically 0644 /
    0755), for a file from `mkstemp` (0600) or a folder from `mkdtemp` (0700) that is renamed into place."""
    base = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, base & ~current_umask())


def give_default_modes(folder: str | os.PathLike, suffix: str = ".safetensors") -> None:
    """[`give_default_mode`] for each file of `folder` ending in `suffix`: safetensors' `save_file` (and so
    `save_pretrained`) creates its files at 0600."""
    folder = os.fspath(folder)
    for name in os.listdir(folder):
        if name.endswith(suffix) and os.path.isfile(os.path.join(folder, name)):
            give_default_mode(os.path.join(folder, name))


# `/`-separated plain names, none empty, hidden, `.` or `..`: a path that stays inside its folder, names nothing that
# `hf-r2 push` leaves out, and can be quoted in a model card as it is.
_PLAIN_PATH = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+ -]*(/[A-Za-z0-9_][A-Za-z0-9_.+ -]*)*")


def is_plain_path(name: Any) -> bool:
    """Whether `name` (from a file that may come from anyone) is a plain relative path inside a folder: `a/b.onnx`,
    not `../x`, `/etc/passwd`, `.x/y`, `a//b` or `` (decided on the string alone, before the file system is asked)."""
    return isinstance(name, str) and _PLAIN_PATH.fullmatch(name) is not None


def write_text_atomic(path: str | os.PathLike, text: str) -> str:
    """Write `text` to `path` atomically (a temp file in the same folder, then `os.replace`), so that a crash
    mid-write never leaves a truncated file where a good one was. The file gets the usual permissions (the umask's,
    typically 0644), not `mkstemp`'s 0600."""
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        give_default_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json_atomic(path: str | os.PathLike, data: Any, **dump_kwargs: Any) -> str:
    """Write `data` as indented JSON to `path` atomically ([`write_text_atomic`]); nothing is written if `data`
    does not serialise. NaN and infinite floats are written as `null` ([`hf_r2._finite.json_safe`]): Python's
    `NaN` / `Infinity` are not JSON, and most readers (jq, JavaScript, pandas' strict mode) refuse them."""
    from ._finite import json_safe

    return write_text_atomic(path, json.dumps(json_safe(data), indent=2, allow_nan=False, **dump_kwargs) + "\n")


def _release(version: Any) -> tuple[int, ...] | None:
    """`(1, 2, 0)` for `"1.2.0"` / `"1.2.0.dev1"` / `"1.2.0rc1"`: the release numbers, or `None` for no version."""
    match = re.match(r"\d+(\.\d+)*", version) if isinstance(version, str) else None
    return tuple(int(n) for n in match.group().split(".")) if match else None


def _is_newer(writer: Any, running: str) -> bool:
    """Whether the hf-r2 version `writer` (from a saved file) is a later release than `running`; a missing or
    unreadable version is not newer."""
    ours, theirs = _release(running), _release(writer)
    if ours is None or theirs is None:
        return False
    width = max(len(ours), len(theirs))
    return theirs + (0,) * (width - len(theirs)) > ours + (0,) * (width - len(ours))


def rename_aliases(cls: type, data: dict[str, Any], aliases: dict[str, str]) -> dict[str, Any]:
    """`data` with each older field name of `cls` (`aliases`: `{old: new}`) renamed to the current one; a
    `ValueError` if both are given, since they would disagree about one setting."""
    out = dict(data)
    for old, new in aliases.items():
        if old in out:
            if new in out:
                raise ValueError(f"`{cls.__name__}` got both `{new}` and `{old}` (its older name): give only `{new}`.")
            out[new] = out.pop(old)
    return out


def accept_init_aliases(cls: type, aliases: dict[str, str]) -> None:
    """Let the dataclass `cls` be built with older field names (`cls(weight=0.1)` as `cls(r2_lambda=0.1)`), by
    wrapping its generated `__init__`, so that its signature and `repr` show only the current names."""
    dataclass_init = cls.__init__

    @functools.wraps(dataclass_init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        dataclass_init(self, *args, **rename_aliases(cls, kwargs, aliases))

    cls.__init__ = __init__  # type: ignore[method-assign]


class JsonConfigMixin:
    """JSON round trip for a config dataclass whose file name is `config_name`.

    `to_dict()` adds the hf-r2 version that wrote it; `from_dict()` rejects unknown keys (likely typos) but drops,
    with a warning, those of a file a newer hf-r2 wrote; `save_pretrained(dir)` writes `dir/<config_name>`
    atomically; `from_pretrained(path)` reads a folder, the file itself or (through `hf_hub_download`) a Hub repo id.
    """

    config_name: ClassVar[str]
    #: Older field names still read (`{"weight": "r2_lambda"}`): saved files and code written before a rename.
    _aliases: ClassVar[dict[str, str]] = {}

    @classmethod
    def _rename_aliases(cls, data: dict[str, Any]) -> dict[str, Any]:
        return rename_aliases(cls, data, cls._aliases)

    def to_dict(self) -> dict[str, Any]:
        from .version import __version__

        return {**dataclasses.asdict(self), "hf_r2_version": __version__}

    @classmethod
    def _check_fields(cls, data: dict[str, Any]) -> None:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"Unknown `{cls.__name__}` field(s) {unknown}; valid fields are {sorted(names)}.")

    @classmethod
    def from_dict(cls: type[_C], data: dict[str, Any]) -> _C:
        """The config in `data` (as [`to_dict`] wrote it). Keys it does not know are an error (a typo must not pass
        silently), unless `data` records a newer hf-r2 than this one: then they are fields added since, dropped with
        one warning, as peft's `from_peft_type` does, so that an older install still reads a newer file."""
        from .version import __version__

        writer = data.get("hf_r2_version")
        data = cls._rename_aliases({k: v for k, v in data.items() if k != "hf_r2_version"})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown and _is_newer(writer, __version__):
            warnings.warn(
                f"`{cls.__name__}` was written by hf-r2 {writer} (this is {__version__}); its field(s) {unknown} are "
                "newer than this version and ignored: upgrade hf-r2 (`pip install -U hf-r2`) to use them.",
                UserWarning, stacklevel=2,
            )
            data = {k: v for k, v in data.items() if k in names}
        cls._check_fields(data)
        return cls(**data)

    @classmethod
    def resolve(cls: type[_C], config: _C | None, overrides: dict[str, Any]) -> _C:
        """The config of a verb called as `verb(model, config=None, **overrides)`: `cls(**overrides)` without a
        config, else `config` with `overrides` replacing its fields (unknown names are an error either way)."""
        overrides = cls._rename_aliases(overrides)
        cls._check_fields(overrides)
        if config is None:
            return cls(**overrides)
        if not isinstance(config, cls):
            article = "an" if cls.__name__[0] in "AEIOU" else "a"
            raise TypeError(f"`config` must be {article} `{cls.__name__}` or `None`, got {type(config).__name__}.")
        return dataclasses.replace(config, **overrides) if overrides else config

    def save_pretrained(self, save_directory: str | os.PathLike) -> str:
        """Write `<config_name>` into `save_directory` (atomically: a temp file, then a rename)."""
        return write_json_atomic(os.path.join(save_directory, self.config_name), self.to_dict(), sort_keys=True)

    @classmethod
    def from_pretrained(cls: type[_C], path_or_repo_id: str | os.PathLike, **hub_kwargs: Any) -> _C:
        """Load from a folder, the JSON file itself, or a Hub repo id (`hub_kwargs` go to `hf_hub_download`)."""
        given = os.fspath(path_or_repo_id)
        path = os.path.join(given, cls.config_name) if os.path.isdir(given) else given
        if not os.path.isfile(path):
            if os.path.exists(given) or given.startswith((".", "/", "~")) or given.count("/") > 1:
                raise FileNotFoundError(f"No {cls.config_name} in {given!r}.")
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(given, cls.config_name, **hub_kwargs)
        with open(path) as f:
            return cls.from_dict(json.load(f))
