"""What a finished run shows and writes: metrics.csv, the per-process weight checksums, the summary table."""
from __future__ import annotations

import csv
from pathlib import Path

from accelerate import Accelerator
from rich.console import Console
from rich.table import Table
from torch import nn

from ..recipes import Recipe


def write_csv(path: Path, rows: list[dict]) -> None:
    """The epoch history as CSV (its scalar columns; per-layer details are in metrics.json),
    replaced atomically."""
    tmp = path.with_suffix(".tmp")
    fields = [k for k, v in rows[0].items() if not isinstance(v, (dict, list))]
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


def checksums(model: nn.Module, accelerator: Accelerator) -> list[float]:
    """A float64 sum over every parameter and buffer, from each process: equal when the replicas agree."""
    total = sum(t.detach().double().sum() for t in model.state_dict().values() if t.is_floating_point())
    return [float(v) for v in accelerator.gather(total.reshape(1).to(accelerator.device))]


def print_summary(console: Console, recipe: Recipe, metrics: dict, out: Path) -> None:
    """The per-epoch table and the test line of a finished run."""
    t = Table(title=f"{recipe.name}: {recipe.model.kind} {recipe.model.name}, {recipe.train.method}, "
                    f"{recipe.data.dataset}, eps {metrics['eps']:g} ({metrics['norm']})")
    for col in ("epoch", "train loss", "val clean", "val robust", "load entropy (min)", "time"):
        t.add_column(col, justify="right")
    for r in metrics["history"]:
        t.add_row(str(r["epoch"]), f"{r['train_loss']:.3f}", f"{r['val_clean']:.1%}", f"{r['val_robust']:.1%}",
                  "-" if r["load_balance"] is None else f"{r['load_balance']:.2f} ({r.get('load_min', r['load_balance']):.2f})",
                  f"{r['train_s'] + r['val_s']:.0f}s")
    console.print(t)
    console.print(f"test ({metrics['n_test']} images, best epoch {metrics['best_epoch']}): clean "
                  f"{metrics['clean_accuracy']:.2%}, {metrics['robust_attack']} {metrics['robust_accuracy']:.2%}; "
                  f"{metrics['macs_per_sample'] / 1e6:.2f} M MACs/sample; model: {out}/model.moe")
