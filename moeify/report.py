"""Evaluation output: the terminal table, report.json and the PNG plots."""
from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

ROWS = (("clean_acc", "clean (SA)"), ("pgd_acc", "PGD (worst of PGD-k and 2x steps, 2 restarts)"),
        ("autoattack_acc", "AutoAttack standard"), ("square_acc", "Square (gradient-free)"),
        ("adaptive_acc", "MoE-adaptive (worst case per sample)"), ("worst_case_acc", "worst case over all attacks"),
        ("ra_r", "RA-R: attack on the routers only"), ("ra_e", "RA-E: routes frozen to the clean routes"),
        ("flip_rate", "routing flip rate under PGD"),
        ("routing_used", "routing used: clean accuracy lost when images swap routes"))


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
        files.append(_load_plot(rep, out / "expert_load.png", plt))
    return files


def _load_plot(rep: dict, path: Path, plt) -> Path:
    """expert_load.png: one row per MoE layer (its full name), one column per expert, the share of
    inputs routed there written in each cell; clean and adversarial inputs side by side."""
    panels = [("clean", rep["load_clean"])] + ([("adversarial", rep["load_adversarial"])]
                                               if "load_adversarial" in rep else [])
    names = rep["layers"]
    experts = max(len(x["load"]) for x in rep["load_clean"])
    label_w = 0.07 * max(len(n) for n in names) + 0.3  # inches of layer names on the left
    panel_w = 0.55 * experts + 0.6
    height = 0.32 * len(names) + 1.4
    fig, axes = plt.subplots(1, len(panels), figsize=(label_w + 0.3 + panel_w * len(panels) + 1.0, height), squeeze=False,
                             sharey=True)
    for ax, (name, loads) in zip(axes[0], panels):
        grid = [x["load"] + [0.0] * (experts - len(x["load"])) for x in loads]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for r, row in enumerate(grid):
            for e, v in enumerate(row):
                ax.text(e, r, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.6 else "black")
        ax.set_title(f"{name} inputs", fontsize=9)
        ax.set_xticks(range(experts))
        ax.set_xlabel("expert")
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names, fontsize=7)
    axes[0][0].set_ylabel("MoE layer")
    width = fig.get_figwidth()
    left, right, bottom, top = (label_w + 0.3) / width, 1 - 1.0 / width, 0.6 / height, 1 - 0.55 / height
    fig.subplots_adjust(left=left, right=right, wspace=0.12, top=top, bottom=bottom)
    cax = fig.add_axes((right + 0.2 / width, bottom, 0.15 / width, top - bottom))
    fig.colorbar(im, cax=cax).set_label("share of inputs")
    fig.suptitle("expert load per MoE layer", fontsize=10)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
