"""Why a trained MoE's routers do or do not route: per-layer expert load, the router's score margin
split into the part every image shares and the part that differs between images, and the clean
accuracy lost when images swap routes.

Usage: python scripts/routing_diagnosis.py MODEL.moe [--n 2000] [--against OTHER.moe ...]
MODEL.moe: a Fashion-MNIST MoE from `moeify robustify` (e.g. the quickstart). A seeded subset of N
test images is used for every measure. With --against, also the clean and PGD-20 (eps 0.1)
accuracy of MODEL minus OTHER's, per image on those images, with a paired 95% interval
(`--against OTHER MODEL2 OTHER2 ...` adds pairs, e.g. seeds: their variation widens the interval). For a two-expert layer the margin is
score(expert 1) - score(expert 0); "shared" is its mean over the images, "per image" its standard
deviation. A router whose shared margin dwarfs the per-image part sends every image the same way.
"""
from __future__ import annotations

import dataclasses
import sys

import torch

from moeify import load
from moeify.stats import paired_difference
from moeify.conversion import moe_layers
from moeify.data import as_tensors, load_data
from moeify.evaluate import EvalConfig, _pgd_all, _predict, load_entropy, routing_used
from moeify.nn.policy import Recorder, routing_policy


def margins(model: torch.nn.Module, x: torch.Tensor) -> list[tuple[str, list[float], float, float, float]]:
    """Per MoE layer: (name, load per expert, load entropy, shared margin, per-image margin std)."""
    with torch.no_grad(), routing_policy(Recorder()) as rec:
        model(x)
    out = []
    for name, s, idx in zip(moe_layers(model), rec.scores, rec.choices):
        n = s.shape[1]
        counts = torch.bincount(idx.flatten(), minlength=n).float()
        d = s[:, 1] - s[:, 0] if n == 2 else s - s.mean(1, keepdim=True)
        out.append((name, (counts / counts.sum()).tolist(), load_entropy(counts), d.mean().item(), d.std().item()))
    return out


def correct(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image correctness, clean and under PGD-20 (eps 0.1, step eps/4, seeded)."""
    cfg = EvalConfig(eps=0.1, pgd_steps=20, batch_size=500)
    attack = dataclasses.replace(cfg.pgd_cfg(restarts=1), alpha=0.025)  # as the quickstart's test
    return _predict(model, x, 500) == y, _predict(model, _pgd_all(model, x, y, cfg, attack), 500) == y


def paired(pairs: list[tuple[str, str]], x: torch.Tensor, y: torch.Tensor) -> None:
    """Mean difference (points) of A minus B over the images and pairs (seeds), with a 95% interval
    that counts image sampling and the variation between pairs (``moeify.stats.paired_difference``)."""
    scores: dict[str, tuple[list, list]] = {"clean": ([], []), "PGD-20": ([], [])}
    for a, b in pairs:
        ca, cb = correct(load(a).eval(), x, y), correct(load(b).eval(), x, y)
        for (sa, sb), u, v in zip(scores.values(), ca, cb):
            sa.append(u)
            sb.append(v)
    for key, (sa, sb) in scores.items():
        d = paired_difference(torch.stack(sa), torch.stack(sb))
        print(f"{key}: {d.mean:+.2f} [{d.low:+.2f}, {d.high:+.2f}] points ({len(pairs)} pair(s) x {len(x)} images): "
              f"{d.verdict}")


def main() -> None:
    args = sys.argv[1:]
    if not args or args[0].startswith("-"):
        sys.exit(next(line for line in __doc__.splitlines() if line.startswith("Usage:")))
    n = int(args[args.index("--n") + 1]) if "--n" in args else 2000
    others = args[args.index("--against") + 1:] if "--against" in args else []
    torch.manual_seed(0)
    model = load(args[0]).eval()
    x, y = as_tensors(load_data("fashion-mnist", test_subset=n).test)
    print(f"{'layer':34s} {'load':>14s} {'entropy':>8s} {'shared':>8s} {'per image':>10s}")
    for name, share, ent, shared, per in margins(model, x):
        print(f"{name:34s} {' '.join(f'{v:.2f}' for v in share):>14s} {ent:8.2f} {shared:+8.2f} {per:10.2f}")
    used = routing_used(model, x, y, EvalConfig(eps=0.0, batch_size=500))
    clean = used["swapped_acc"] + used["routing_used"]
    print(f"clean {clean:.2%}; with each image given the next image's routes {used['swapped_acc']:.2%} "
          f"(routing used: {100 * used['routing_used']:.2f} points), {n} test images")
    if others:
        paired([(args[0], others[0])] + list(zip(others[1::2], others[2::2])), x, y)


if __name__ == "__main__":
    main()
