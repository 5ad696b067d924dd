"""One process per output folder: an advisory lock that the kernel drops when its holder dies.

``flock`` on DIR/.moeify.lock: a second process on the same folder is refused at once, and a
killed run (SIGKILL included) leaves no stale lock behind, because the lock lives with the open
file descriptor, not with the file.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from .errors import MoeifyError

LOCK_NAME = ".moeify.lock"


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str = "run") -> Iterator[None]:
    """Hold ``folder``'s lock for the block (the folder is created); refuse if another process holds it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise MoeifyError(f"cannot write to {folder} ({e.strerror}); choose another --out") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise MoeifyError(f"another moeify process (pid {holder}) is using {folder} for its {what}; wait for it "
                              "to end or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def is_lock_file(path: Path) -> bool:
    return path.name == LOCK_NAME
