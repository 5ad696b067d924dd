"""Run folders: resumable state written atomically, and the run's progress record.

DIR/checkpoint holds Accelerate's state (model, optimisers, schedulers, RNG) plus progress.json. A
new state is written to DIR/checkpoint.tmp and swapped in by renames, so a kill mid-write leaves
the previous checkpoint (or, between the two renames, DIR/checkpoint.old) intact.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from accelerate import Accelerator


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


def save(accelerator: Accelerator, out: Path, progress: Progress) -> None:
    tmp, final, old = out / "checkpoint.tmp", out / "checkpoint", out / "checkpoint.old"
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
