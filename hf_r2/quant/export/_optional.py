"""The optional packages the exporters need, in one place: whether `onnx` / `onnxruntime` / `coremltools` are
installed, and an import that raises one `ImportError` naming the minimum version and the `pip install` line of the
extra that brings it. Nothing here imports them at load time, so `import hf_r2.quant` works without them.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

__all__ = [
    "MIN_VERSIONS",
    "ONNX_MIN_VERSIONS",
    "is_available",
    "require_module",
    "is_onnx_available",
    "require_onnx",
    "is_coremltools_available",
    "require_coremltools",
]

#: The oldest version hf-r2 supports of each optional package (coremltools 8.0: the iOS 18 compression ops).
MIN_VERSIONS = {"onnx": "1.17", "onnxruntime": "1.20", "coremltools": "8.0"}
ONNX_MIN_VERSIONS = {name: MIN_VERSIONS[name] for name in ("onnx", "onnxruntime")}
# package -> (the extra that installs it, how its error names the extra, the plain pip packages)
_EXTRAS = {
    "onnx": ("onnx", "ONNX", "onnx onnxruntime"),
    "onnxruntime": ("onnx", "ONNX", "onnx onnxruntime"),
    "coremltools": ("coreml", "Core ML", "coremltools"),
}


def is_available(*names: str) -> bool:
    """Whether every package of `names` is installed (without importing it)."""
    try:
        return all(importlib.util.find_spec(name) is not None for name in names)
    except ValueError:  # a module set to None in sys.modules (blocked)
        return False


def require_module(name: str, what: str) -> Any:
    """Import the optional package `name` (a key of [`MIN_VERSIONS`]), or raise an `ImportError` that says `what`
    needs it, at which version, and the install line."""
    extra, label, plain = _EXTRAS[name]
    install = f"pip install 'hf-r2[{extra}]'"
    try:
        module = importlib.import_module(name)
    except ImportError as err:
        raise ImportError(
            f"{what} needs `{name}>={MIN_VERSIONS[name]}`, which is not installed. Install the {label} extra with "
            f"`{install}` (or `pip install {plain}`)."
        ) from err
    version = tuple(int(p) for p in module.__version__.split(".")[:2] if p.isdigit())
    if version < tuple(int(p) for p in MIN_VERSIONS[name].split(".")):
        raise ImportError(
            f"{what} needs `{name}>={MIN_VERSIONS[name]}`, found {module.__version__}. Upgrade with `{install}`."
        )
    return module


def is_onnx_available() -> bool:
    """Whether `onnx` (needed to export) and `onnxruntime` (needed to run a file) are installed."""
    return is_available(*ONNX_MIN_VERSIONS)


def require_onnx(runtime: bool = False) -> None:
    """Raise an `ImportError` naming `pip install 'hf-r2[onnx]'` unless `onnx` (and, with `runtime=True`,
    `onnxruntime`) is installed at a version hf-r2 supports."""
    require_module("onnx", "ONNX export")
    if runtime:
        require_module("onnxruntime", "Checking an ONNX file")


def is_coremltools_available() -> bool:
    """Whether `coremltools` (needed by Core ML export and its weight check) is installed."""
    return is_available("coremltools")


def require_coremltools() -> Any:
    """Import `coremltools`, or raise an `ImportError` naming `pip install 'hf-r2[coreml]'` when it is missing or
    older than 8.0."""
    return require_module("coremltools", "Core ML export")
