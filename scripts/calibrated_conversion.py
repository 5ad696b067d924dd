"""Trained dense model -> MoE without retraining: naive vs clustered + fitted vs + distillation.

Usage: python scripts/calibrated_conversion.py DENSE.moe [--adversarial] [--steps 300] [--batch-size 128]
                                                [--seeds 0,1,2] [--json OUT.json]
DENSE.moe: a dense Fashion-MNIST model from `moeify robustify --set model.kind=dense` (its recipe
gives eps). Calibration: 5,000 training images (a seeded subset, labels unused). Test: clean on the
whole test set, PGD-20 on its first 1,000 images (the same images for every row). Rows with
distillation are run once per seed (the seed sets the conversion's and the distillation's random
state: fresh routers, batch order, attack noise); each difference to the dense model is a paired 95% interval
over those images and seeds (image sampling and seed-to-seed variation, moeify.stats). Rows at 2/4 and 1/2 experts.
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
from moeify.stats import paired_difference


def paired_ci(a: torch.Tensor, b: list[torch.Tensor]) -> tuple[float, float]:
    """Mean of b - a (points) over the images and b's seeds, and the half-width of its 95% interval
    (``moeify.stats.paired_difference``: image sampling and seed-to-seed variation; the dense model
    ``a`` is one model, the same for every seed)."""
    seeds = torch.stack(b)
    d = paired_difference(seeds, a.expand_as(seeds))
    return d.mean, d.high - d.mean


def main() -> None:
    args = sys.argv[1:]
    path, adversarial = args[0], "--adversarial" in args
    steps = int(args[args.index("--steps") + 1]) if "--steps" in args else 300
    batch_size = int(args[args.index("--batch-size") + 1]) if "--batch-size" in args else 128
    seeds = [int(v) for v in args[args.index("--seeds") + 1].split(",")] if "--seeds" in args else [0]
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
    attack = AttackConfig(eps=eps, steps=2) if adversarial else None  # step 2.5 eps / steps
    for experts, top_k in ((4, 2), (2, 1)):
        variants = [("naive (contiguous, fresh routers)", None, 0)]
        if not adversarial:
            variants.append(("naive + distillation", None, steps))
        variants += [("clustered + fitted", calib, 0),
                     (f"clustered + fitted + distillation ({steps} steps of {batch_size})", calib, steps)]
        for name, cal, n in variants:
            cs, rs, secs = [], [], []
            for seed in seeds if n else seeds[:1]:
                torch.manual_seed(seed)
                start = time.time()
                moe = moeify.convert(dense, experts=experts, top_k=top_k, example_inputs=x2, calibration=cal)
                if n:
                    distil(moe, dense, calib, steps=n, attack=attack, seed=seed, batch_size=batch_size)
                secs.append(time.time() - start)
                c, r = correct(moe)
                cs.append(c)
                rs.append(r)
            row = {"config": f"{top_k}/{experts}", "row": name, "seeds": len(cs),
                   "clean": torch.stack(cs).float().mean().item(), "pgd20": torch.stack(rs).float().mean().item(),
                   "clean_per_seed": [x.float().mean().item() for x in cs],
                   "pgd20_per_seed": [x.float().mean().item() for x in rs],
                   "macs": moeify.count_macs(moe, x2) / dense_macs, "seconds": sum(secs) / len(secs),
                   "clean_diff": paired_ci(base[0], cs), "pgd20_diff": paired_ci(base[1], rs)}
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
