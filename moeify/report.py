"""Evaluation output: the terminal table, report.json and the PNG plots."""
from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

ROWS = (("clean_acc", "clean (SA)"), ("pgd_acc", "PGD (worst of PGD-k and 2x steps, 2 restarts)"),
        ("autoattack_acc", "AutoAttack standard"), ("square_acc", "Square (gradient-free)"),
        ("adaptive_acc", "MoE-adaptive (worst case per sample)"), ("worst_case_acc", "worst case over all attacks"),
        ("ra_r", "RA-R: attack on the routers only"), ("ra_e", "RA-E: routes frozen to the clean routes"),
        ("flip_rate", "routing flip rate under PGD"))


def table(rep: dict, title: str) -> Table:
    t = Table(title=title)
    t.add_column("metric")
    t.add_column("value", justify="right")
    for key, label in ROWS:
        if key in rep:
            if key == "autoattack_acc":
                label = f"AutoAttack {rep.get('autoattack_version', 'standard')}"
            t.add_row(label, f"{rep[key]:.2%}")
    if "adaptive" in rep:
        for k, v in rep["adaptive"].items():
            t.add_row(f"  adaptive: {k.replace('_', ' ')}", f"{v:.2%}")
    if "per_expert_acc" in rep:
        t.add_row("clean acc, every layer forced to expert e",
                  ", ".join(f"{e}: {v:.1%}" for e, v in rep["per_expert_acc"].items()))
    for name in ("load_clean", "load_adversarial"):
        if name in rep:
            ent = sum(x["entropy"] for x in rep[name]) / len(rep[name])
            dead = sum(len(x["dead"]) for x in rep[name])
            t.add_row(f"expert load ({name.split('_')[1]}): mean entropy, dead experts", f"{ent:.2f}, {dead}")
    t.add_row("MACs / sample", f"{rep['macs_per_sample'] / 1e6:,.2f} M")
    t.add_row("examples, eps", f"{rep['n_examples']}, {rep['eps']:g} ({rep['norm']})")
    t.add_row("flags", "; ".join(rep["flags"]) or "none")
    return t


def write(rep: dict, out: Path, name: str = "report.json", plots: bool = True) -> list[Path]:
    """OUT/``name`` (written atomically: last) and the plots; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    files = _plots(rep, out) if plots else []
    tmp = out / f"{name}.tmp"
    tmp.write_text(json.dumps(rep, indent=2))
    tmp.replace(out / name)
    return [out / name] + files


def _plots(rep: dict, out: Path) -> list[Path]:
    """robust_vs_eps.png and expert_load.png, for the parts of the report that have them."""
    files = []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "eps_sweep" in rep:
        fig, ax = plt.subplots(figsize=(4.5, 3.2))
        ax.plot([p["eps"] for p in rep["eps_sweep"]], [p["acc"] for p in rep["eps_sweep"]], "o-")
        ax.set_xlabel(f"eps ({rep['norm']})")
        ax.set_ylabel("accuracy under PGD-10")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        files.append(out / "robust_vs_eps.png")
        fig.savefig(files[-1], dpi=120)
        plt.close(fig)
    if "load_clean" in rep:
        panels = [("clean", rep["load_clean"])] + ([("adversarial", rep["load_adversarial"])] if "load_adversarial" in rep else [])
        fig, axes = plt.subplots(1, len(panels), figsize=(3 + 2.5 * len(panels), 0.4 * len(rep["layers"]) + 1.5), squeeze=False)
        for ax, (name, loads) in zip(axes[0], panels):
            im = ax.imshow([x["load"] for x in loads], vmin=0, vmax=1, cmap="viridis", aspect="auto")
            ax.set_title(f"expert load, {name}")
            ax.set_xlabel("expert")
            ax.set_yticks(range(len(rep["layers"])))
            ax.set_yticklabels(rep["layers"], fontsize=6)
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
        files.append(out / "expert_load.png")
        fig.savefig(files[-1], dpi=120)
        plt.close(fig)
    return files
