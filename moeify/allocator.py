"""The process's CPU memory allocator: freed memory kept for the next allocation.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc's ``malloc`` serves a request
above its mmap threshold (128 KiB at start, raised after frees up to 32 MiB) with fresh pages from
the kernel and unmaps them on free, and it hands the heap's free top back (trims) once it exceeds
a second threshold. A model call allocates and frees the same activations on every call, so with
those defaults every large activation is faulted in (and zeroed by the kernel) anew on each call.
That costs every model alike, but not equally: tensors above 32 MiB are always mapped afresh, so a
dense model pays more for it than an MoE whose per-pattern parts are smaller.

``keep_freed_memory`` sets both thresholds high (``mallopt``), so freed memory stays in the
process for the next allocation: what PyTorch's CPU performance guide gets from jemalloc or
tcmalloc, without a preloaded library. The cost: the process keeps its peak heap until it exits.
The ``moeify`` command line does this at start (``moeify --allocator system`` leaves glibc's
defaults); the Python API leaves the process's allocator alone unless asked.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
KEEP_BELOW = 1 << 30
"""Requests up to this many bytes (1 GiB) come from the heap and return to it when freed."""

_STATE = {"kept": False}


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (no fresh pages per large tensor, no heap trim), for
    the rest of the process. Returns whether it applies: False where the C library is not glibc
    (macOS, Windows, musl), which keep their own defaults."""
    if _STATE["kept"]:
        return True
    libc = _glibc()
    if libc is None:
        return False
    ok = libc.mallopt(M_MMAP_THRESHOLD, KEEP_BELOW) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
    _STATE["kept"] = ok
    return ok


def allocator_name() -> str:
    """How this process allocates CPU memory, for benchmark records: ``kept`` or ``system``."""
    return "kept" if _STATE["kept"] else "system"
