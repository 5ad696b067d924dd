"""Evaluate a saved model file: the one entry point of ``moeify evaluate`` and ``moeify study``.

The settings not given come from the recipe stored in the model file (dataset, eps, norm); the
test images are a fixed, seeded subset, sharded over processes under ``accelerate launch`` or
torchrun. Every finished step of the evaluation is kept in OUT/<report>.parts, so an evaluation
killed at any moment continues with ``resume`` and writes the report an uninterrupted run would.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from . import io
from .errors import MoeifyError
from .evaluate import AA_ATTACKS, AA_TARGETS, ATTACKS, EvalConfig, Part, evaluate, targets_problem
from .layout import image_layout
from .lock import folder_lock


@dataclass
class EvalRequest:
    """What to evaluate and with which attacks; None = the model's recipe's value."""
    model_file: str
    dataset: str | None = None
    root: str | None = None
    n: int | None = None  # a fixed, seeded subset of the test set; None = all of it
    start: int = 0  # evaluate the subset's images from this one on (the study's second slice)
    eps: float | None = None
    norm: str | None = None
    attacks: tuple[str, ...] = ("pgd", "autoattack", "adaptive", "sweep")
    pgd_steps: int = 20
    restarts: int = 1
    square_queries: int = 1000
    autoattack: tuple[str, ...] = ()  # a subset of AutoAttack's suite; () = the standard suite
    autoattack_targets: int = AA_TARGETS  # target classes of its APGD-T and FAB-T when a subset is run
    batch_size: int = 500
    routing: bool = True  # an MoE's routing dissection (flip rate, RA-R, RA-E, routing used, expert load)
    compile: bool = False  # torch.compile the attacked model (EvalConfig.attacked); not in the fingerprint: same results

    def check(self) -> None:
        bad = set(self.autoattack) - set(AA_ATTACKS)
        if bad:
            raise MoeifyError(f"--autoattack: unknown attack(s) {', '.join(sorted(bad))}; use standard or some of "
                              f"{', '.join(AA_ATTACKS)}")
        problem = targets_problem(self.autoattack_targets, self.autoattack)
        if problem:
            raise MoeifyError(f"--autoattack-targets {problem}")
        bad = set(self.attacks) - set(ATTACKS)
        if bad:
            raise MoeifyError(f"unknown attack(s) {', '.join(sorted(bad))}; choose from {', '.join(ATTACKS)}")
        if self.start < 0:
            raise MoeifyError(f"start must be >= 0 (the first image to evaluate), got {self.start}")
        if not Path(self.model_file).is_file():
            raise MoeifyError(f"{self.model_file} is neither a run folder with model.moe nor a saved model file")


def model_file(target: str | os.PathLike) -> Path:
    """The model file of a run folder (its model.moe), or ``target`` itself."""
    path = Path(target)
    return path / "model.moe" if path.is_dir() else path


class FolderStore:
    """Finished evaluation parts as files (one per part and process), written atomically."""

    def __init__(self, folder: Path, rank: int) -> None:
        self.folder, self.rank = folder, rank

    def _file(self, name: str) -> Path:
        return self.folder / f"{name}.rank{self.rank}.pt"

    def load(self, name: str) -> Part | None:
        f = self._file(name)
        return Part(**torch.load(f, weights_only=True)) if f.is_file() else None

    def save(self, name: str, part: Part) -> None:
        tmp = self._file(name).with_suffix(".tmp")
        with _writing(self.folder):
            torch.save(dataclasses.asdict(part), tmp)
            tmp.replace(self._file(name))


@contextlib.contextmanager
def _writing(folder: Path):
    try:
        yield
    except OSError as e:
        raise MoeifyError(f"could not write to {folder} ({e.strerror}); the parts finished so far are kept: "
                          "free space or fix the folder, then rerun with --resume") from None


def _fingerprint(req: EvalRequest, cfg: EvalConfig, path: Path, n: int, world: int) -> dict:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    keep = ("eps", "norm", "attacks", "pgd_steps", "pgd_restarts", "batch_size", "square_queries", "autoattack",
            "sweep", "seed")
    fields = {k: getattr(cfg, k) for k in keep}
    # settings added later: recorded only when not at their default, so evaluations stopped before they existed
    # still resume
    if req.start:
        fields["start"] = req.start
    if not cfg.routing:
        fields["routing"] = False
    if cfg.autoattack_targets != AA_TARGETS:
        fields["autoattack_targets"] = cfg.autoattack_targets
    return {"model_sha256": digest, "dataset": req.dataset, "n": n, "processes": world,
            **{k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}}


def _open_parts(folder: Path, fingerprint: dict, resume: bool, main: bool, wait: Callable[[], None]) -> None:
    """Start or continue OUT/<report>.parts; refuse to mix parts of another evaluation."""
    config = folder / "config.json"
    found = json.loads(config.read_text()) if config.is_file() else None
    if found is not None and not resume:
        raise MoeifyError(f"{folder.parent} holds a stopped evaluation; rerun with --resume to continue it, or choose "
                          "another --out (nothing was overwritten)")
    if found is not None and found != fingerprint:
        diff = sorted(k for k in fingerprint if found.get(k) != fingerprint[k])
        raise MoeifyError(f"{folder} was made with other settings ({', '.join(diff)} differ); rerun those settings or "
                          "choose another --out")
    wait()
    if main and found is None:
        with _writing(folder):
            folder.mkdir(parents=True, exist_ok=True)
            config.write_text(json.dumps(fingerprint, indent=2))
    wait()


def _settings(req: EvalRequest, info: dict) -> tuple[str, float, str, dict]:
    """(dataset, eps, norm, recipe) with the model's recipe filling what the request leaves out."""
    recipe = (info.get("extra") or {}).get("recipe") or {}
    data_cfg, attack_cfg = recipe.get("data", {}), recipe.get("attack", {})
    dataset = req.dataset or data_cfg.get("dataset")
    if dataset is None:
        raise MoeifyError(f"{req.model_file} carries no recipe; pass --dataset (and --eps)")
    eps = req.eps if req.eps is not None else attack_cfg.get("eps")
    if eps is None:
        raise MoeifyError("pass --eps (the model carries no recipe to take it from)")
    return dataset, eps, req.norm or attack_cfg.get("norm", "linf"), recipe


def evaluate_file(req: EvalRequest, out: Path, resume: bool = False, report_name: str = "report.json",
                  log: Callable[[str], None] = lambda s: None, plots: bool = True) -> dict | None:
    """Evaluate ``req.model_file`` into OUT/``report_name`` (and the plots); returns the report on
    the main process, None on the others. With ``resume``, a finished report is returned as it is
    and a stopped evaluation continues from its parts."""
    from accelerate import Accelerator
    from accelerate.utils import gather_object

    from .data import as_tensors, load_data
    from .report import write

    req.check()
    out, path = Path(out), Path(req.model_file)
    report = out / report_name
    if report.exists():
        if resume:
            return json.loads(report.read_text())
        raise MoeifyError(f"{report} exists; pass another --out (nothing was overwritten)")
    info = io.read_info(path)
    dataset, eps, norm, recipe = _settings(req, info)
    data_cfg = recipe.get("data", {})
    data = load_data(dataset, req.root or data_cfg.get("root"), val_size=data_cfg.get("val_size", 1000),
                     download=bool(data_cfg.get("download", False)), test_subset=req.n)
    x, y = as_tensors(data.test)
    if req.start >= len(y):
        raise MoeifyError(f"start {req.start} leaves no image of the {len(y)} to evaluate; choose 0 <= start < {len(y)}")
    x, y = x[req.start:], y[req.start:]
    acc = Accelerator(cpu=not torch.cuda.is_available())  # `accelerate launch` / torchrun: shard the examples
    rank, world, main = acc.process_index, acc.num_processes, acc.is_main_process
    n = len(y)
    fmt = image_layout(acc.device) if x.ndim == 4 else torch.contiguous_format  # the layout training runs in
    x, y = x[rank::world].to(acc.device).contiguous(memory_format=fmt), y[rank::world].to(acc.device)
    model = io.load(path).to(acc.device, memory_format=fmt)

    def gather(t: torch.Tensor) -> torch.Tensor:
        """Every process's per-sample values, back in the examples' order (process r holds r::world)."""
        if world == 1:
            return t
        shards = gather_object([t.cpu()])
        out = torch.empty((n,) + tuple(t.shape[1:]), dtype=t.dtype)
        for r, shard in enumerate(shards):
            out[r::world] = shard
        return out

    cfg = EvalConfig(eps=eps, norm=norm, attacks=tuple(req.attacks), pgd_steps=req.pgd_steps,
                     pgd_restarts=req.restarts, batch_size=req.batch_size, square_queries=req.square_queries,
                     autoattack=tuple(req.autoattack), autoattack_targets=req.autoattack_targets, routing=req.routing,
                     compile=req.compile, log=log if main else (lambda s: None), gather=gather)
    parts = out / (Path(report_name).stem + ".parts")
    with folder_lock(out, "evaluation") if main else contextlib.nullcontext():
        _open_parts(parts, _fingerprint(req, cfg, path, n, world), resume, main, acc.wait_for_everyone)
        rep = evaluate(model, x, y, cfg, FolderStore(parts, rank))
        acc.wait_for_everyone()
        if not main:
            return None
        rep.update({"model": info.get("source"), "kind": info.get("kind", "moe"), "recipe": recipe.get("name"),
                    "dataset": dataset, "model_file": str(path), "processes": world})
        with _writing(out):
            write(rep, out, name=report_name, plots=plots)
        shutil.rmtree(parts, ignore_errors=True)
    return rep
