"""Peak resident memory of one measured phase of a benchmark, each configuration in a fresh subprocess (Linux only).

Shared by `benchmarks/dkm_memory.py` and `benchmarks/peers.py`. The parent starts one worker per configuration with
[`run_json_worker`] (its environment from [`worker_env`]); the worker loads what it needs, calls [`reset_peak`]
just before the measured phase (garbage collected, freed heap handed back with `malloc_trim`, the peak resident set
`VmHWM` reset through `/proc/self/clear_refs`), runs it, reads [`peak_kib`], and prints one JSON line last.
`peak_kib() - reset_peak()` is the phase's growth; `peak_kib()` alone the process' peak during it.

With `allocator="exact"` allocations of 128 KiB and more are mmap'ed (`GLIBC_TUNABLES=glibc.malloc.mmap_threshold=
131072`), so a freed tensor leaves the resident set at once and the peak tracks live tensor memory (what a GPU caching
allocator would hold); the extra page faults slow every variant down alike. `allocator="default"` keeps glibc's own
settings: what a CPU user sees, freed memory that glibc keeps in its heap included.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import re
import subprocess

__all__ = ["ALLOCATORS", "WorkerError", "peak_kib", "reset_peak", "run_json_worker", "status_kib", "worker_env"]

ALLOCATORS = ("exact", "default")


class WorkerError(RuntimeError):
    """A worker subprocess failed; `stderr` holds the end of what it wrote there."""

    def __init__(self, returncode: int, stderr: str) -> None:
        self.returncode = returncode
        self.stderr = stderr
        lines = [line for line in stderr.strip().splitlines() if line.strip()]
        super().__init__(f"worker exited with {returncode}: {lines[-1] if lines else '(no stderr)'}")


def status_kib(field: str) -> int:
    """A `kB` field of `/proc/self/status` (`VmRSS`, `VmHWM`, ...)."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def reset_peak() -> int:
    """Collect garbage, hand freed heap back, reset the peak resident set; return the resident set (KiB) now."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set size (VmHWM)
    return status_kib("VmRSS")


def peak_kib() -> int:
    """The peak resident set (KiB) since the last [`reset_peak`]."""
    return status_kib("VmHWM")


def worker_env(threads: int, allocator: str) -> dict[str, str]:
    """This process' environment for a worker: `OMP_NUM_THREADS`, the allocator's tunables, offline Hub."""
    if allocator not in ALLOCATORS:
        raise ValueError(f"`allocator` must be one of {ALLOCATORS}, got {allocator!r}.")
    env = dict(os.environ)
    if allocator == "exact":
        env["GLIBC_TUNABLES"] = "glibc.malloc.mmap_threshold=131072"
    else:
        env.pop("GLIBC_TUNABLES", None)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_json_worker(cmd: list[str], *, threads: int, allocator: str, timeout: float | None = None) -> dict:
    """Run `cmd` with [`worker_env`] and return the JSON object on the last line of its stdout; raise
    [`WorkerError`] (with the end of its stderr) if it fails."""
    proc = subprocess.run(
        cmd, env=worker_env(threads, allocator), capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise WorkerError(proc.returncode, proc.stderr[-4000:])
    lines = proc.stdout.strip().splitlines()
    if not lines:
        raise WorkerError(proc.returncode, proc.stderr[-4000:] + "\n(the worker printed nothing on stdout)")
    return json.loads(lines[-1])
