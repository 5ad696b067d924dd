"""``robustify``: train a recipe's model robustly in a run folder, through Accelerate.

The folder is locked for the run (a second process on it is refused), a new run never writes into
a folder that holds anything, and ``resume`` continues from the last checkpoint: a run stopped at
any moment, by ``stop_after``, Ctrl-C or SIGKILL, ends as the uninterrupted run would.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import DistributedDataParallelKwargs
from rich.console import Console

from ..errors import MoeifyError
from ..lock import folder_lock, is_lock_file
from ..recipes import Recipe
from . import checkpoint as ckpt
from .trainer import Trainer


def _trackers() -> list[str] | None:
    """TensorBoard through Accelerate's trackers when it is installed."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return None
    return ["tensorboard"]


def _check_out(out: Path, resume: bool) -> None:
    """A new run needs a new or empty folder; a resumed one a folder this tool started."""
    if resume:
        if ckpt.checkpoint_dir(out) is None and not (out / "recipe.yaml").is_file():
            raise MoeifyError(f"--resume: {out} holds no run to resume (start a new run without --resume)")
        return
    if out.exists() and (not out.is_dir() or any(not is_lock_file(p) for p in out.iterdir())):
        raise MoeifyError(f"{out} already exists and is not empty; pass --resume to continue that run, or choose "
                          "another --out (nothing was overwritten)")


def robustify(recipe: Recipe, out: str | Path, resume: bool = False, stop_after: int | None = None,
              console: Console | None = None) -> dict:
    """Train ``recipe`` into run folder ``out``; returns the final metrics (also in out/metrics.json).

    ``stop_after`` ends this session after that many epochs (resumable with ``resume=True``); the
    return value is then ``{"epochs_done": N}``.
    """
    out = Path(out)
    _check_out(out, resume)
    console = console or Console()
    trackers = _trackers()
    accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(split_batches=True),
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
                              log_with=trackers, project_dir=str(out), cpu=not torch.cuda.is_available())
    with folder_lock(out) if accelerator.is_main_process else contextlib.nullcontext():
        if accelerator.is_main_process:  # again under the lock: another run may have started here meanwhile
            _check_out(out, resume)  # (the main process only: the others would see what it has just written)
        if accelerator.is_main_process and not (out / "recipe.yaml").is_file():
            with ckpt.writing(out):
                (out / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        if trackers:
            accelerator.init_trackers("moeify", config={"recipe": recipe.name, "method": recipe.train.method})
        trainer = Trainer(recipe, out, accelerator, console)
        trainer.start(resume)
        try:
            trainer.fit(stop_after)
        except KeyboardInterrupt:
            if accelerator.is_main_process:
                console.print(f"interrupted: {out}/checkpoint holds epoch {trainer.progress.epoch}; continue with --resume")
            raise
        done = trainer.progress.epoch
        if done < recipe.train.epochs:
            if accelerator.is_main_process:
                console.print(f"stopped after epoch {done} of {recipe.train.epochs}; continue with --resume")
            return {"epochs_done": done}
        return trainer.finish()

