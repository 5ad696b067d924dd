"""Trained dense model -> MoE without retraining: naive vs clustered + fitted vs + distillation.

Usage: python scripts/calibrated_conversion.py DENSE.moe [--adversarial] [--steps 300] [--json OUT.json]
DENSE.moe: a dense Fashion-MNIST model from `moeify robustify --set model.kind=dense` (its recipe
gives eps). Calibration: 5,000 training images (a seeded subset, labels unused). Test: clean on the
whole test set, PGD-20 on its first 1,000 images (the same images for every row). Each difference
to the dense model is given with a paired 95% interval over those images. Rows at 2/4 and 1/2 experts.
"""
from __future__ import annotations

import json
import sys
import time

import torch

import moeify
from moeify.attacks import AttackConfig
from moeify.data import as_tensors, calibration_images, load_data
from moeify.evaluate import EvalConfig, _pgd_all, _predict
from moeify.fit import distil


def paired_ci(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Mean of b - a (per-sample correctness, points) and the half-width of its 95% interval."""
    d = b.float() - a.float()
    return 100 * d.mean().item(), 100 * 1.96 * d.std().item() / len(d) ** 0.5


def main() -> None:
    args = sys.argv[1:]
    path, adversarial = args[0], "--adversarial" in args
    steps = int(args[args.index("--steps") + 1]) if "--steps" in args else 300
    torch.manual_seed(0)
    dense = moeify.load(path)
    eps = moeify.io.read_info(path)["extra"]["recipe"]["attack"]["eps"]
    data = load_data("fashion-mnist", val_size=1000, seed=0)
    calib = calibration_images(data, 5000)
    xt, yt = as_tensors(data.test)
    cfg = EvalConfig(eps=eps, pgd_steps=20, batch_size=500)

    def correct(m):
        m.eval()
        clean = _predict(m, xt, 500) == yt
        robust = _predict(m, _pgd_all(m, xt[:1000], yt[:1000], cfg, cfg.pgd_cfg()), 500) == yt[:1000]
        return clean, robust

    x2 = calib[:2]
    base = correct(dense)
    dense_macs = moeify.count_macs(dense, x2)
    rows = [{"config": "-", "row": "dense", "clean": base[0].float().mean().item(), "pgd20": base[1].float().mean().item(),
             "macs": 1.0, "seconds": 0.0}]
    attack = AttackConfig(eps=eps, steps=2, alpha=0.0625) if adversarial else None
    for experts, top_k in ((4, 2), (2, 1)):
        variants = [("naive (contiguous, fresh routers)", None, 0)]
        if not adversarial:
            variants.append(("naive + distillation", None, steps))
        variants += [("clustered + fitted", calib, 0), (f"clustered + fitted + distillation ({steps} steps)", calib, steps)]
        for name, cal, n in variants:
            start = time.time()
            moe = moeify.convert(dense, experts=experts, top_k=top_k, example_inputs=x2, calibration=cal)
            if n:
                distil(moe, dense, calib, steps=n, attack=attack)
            secs = time.time() - start
            c, r = correct(moe)
            row = {"config": f"{top_k}/{experts}", "row": name, "clean": c.float().mean().item(),
                   "pgd20": r.float().mean().item(), "macs": moeify.count_macs(moe, x2) / dense_macs, "seconds": secs,
                   "clean_diff": paired_ci(base[0], c), "pgd20_diff": paired_ci(base[1], r)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if "--json" in args:
        with open(args[args.index("--json") + 1], "w") as f:
            json.dump({"model": path, "adversarial": adversarial, "rows": rows}, f, indent=2)
    print("| experts | row | clean | vs dense (95% CI) | PGD-20 | vs dense (95% CI) | MACs | time (s) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        cd = f"{r['clean_diff'][0]:+.1f} ± {r['clean_diff'][1]:.1f}" if "clean_diff" in r else ""
        rd = f"{r['pgd20_diff'][0]:+.1f} ± {r['pgd20_diff'][1]:.1f}" if "pgd20_diff" in r else ""
        print(f"| {r['config']} | {r['row']} | {100 * r['clean']:.1f} | {cd} | {100 * r['pgd20']:.1f} | {rd} | "
              f"{100 * r['macs']:.0f}% | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
