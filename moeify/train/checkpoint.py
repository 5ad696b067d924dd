"""Run folders: resumable state written atomically, and the run's progress record.

DIR/checkpoint holds Accelerate's state (model, optimisers, schedulers, RNG) plus progress.json. A
new state is written to DIR/checkpoint.tmp and swapped in by renames, so a kill mid-write leaves
the previous checkpoint (or, between the two renames, DIR/checkpoint.old) intact. A failed write
(full disk, folder made read-only) is a one-line error and leaves the previous checkpoint too.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from accelerate import Accelerator

from ..errors import MoeifyError


@dataclass
class Progress:
    epoch: int = 0  # epochs completed
    best_val_robust: float = -1.0
    best_epoch: int = 0
    history: list = field(default_factory=list)


def checkpoint_dir(out: Path) -> Path | None:
    """The checkpoint to resume from, or None."""
    for name in ("checkpoint", "checkpoint.old"):
        p = out / name
        if (p / "progress.json").is_file():
            return p
    return None


def saved_epoch(out: Path) -> int | None:
    """The epoch the resumable checkpoint in ``out`` holds, or None if there is none."""
    path = checkpoint_dir(out)
    try:
        with open(path / "progress.json") as f:
            return json.load(f)["epoch"]
    except (TypeError, OSError):  # none, or swapped out between the look and the read
        return None


@contextlib.contextmanager
def writing(out: Path) -> Iterator[None]:
    """Turn a failed write into the run folder (ENOSPC, EACCES, ...) into a one-line error naming
    the checkpoint that still loads."""
    try:
        yield
    except Exception as e:
        if not _write_failure(e):
            raise
        shutil.rmtree(out / "checkpoint.tmp", ignore_errors=True)
        epoch = saved_epoch(out)
        kept = ("no checkpoint was written yet" if epoch is None else
                f"the checkpoint of epoch {epoch} is intact; free space or fix the folder, then --resume")
        why = getattr(e, "strerror", None) or str(e).splitlines()[0]
        raise MoeifyError(f"could not write to {out} ({why}); the run stopped; {kept}") from None


def _write_failure(e: Exception) -> bool:
    """An OSError, or the I/O error safetensors and torch.save report as their own exception types."""
    if isinstance(e, OSError):
        return True
    text = str(e)
    return (type(e).__name__ == "SafetensorError" or isinstance(e, RuntimeError)) and any(
        s in text for s in ("I/O error", "write", "No space left", "File too large"))


def save(accelerator: Accelerator, out: Path, progress: Progress) -> None:
    """Write ``progress`` and Accelerate's state as the run's checkpoint, replacing the previous one."""
    tmp, final, old = out / "checkpoint.tmp", out / "checkpoint", out / "checkpoint.old"
    with writing(out):
        if accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            with open(tmp / "progress.json", "w") as f:
                json.dump(asdict(progress), f)
            if old.exists():
                shutil.rmtree(old)
            if final.exists():
                os.replace(final, old)
            os.replace(tmp, final)
            if old.exists():
                shutil.rmtree(old)
    accelerator.wait_for_everyone()


def load(accelerator: Accelerator, path: Path) -> Progress:
    accelerator.load_state(str(path))
    with open(path / "progress.json") as f:
        return Progress(**json.load(f))
