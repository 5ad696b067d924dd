"""Reproduce the AdvMoE study from Python: the same as `moeify study fmnist --out OUT --results OUT/results.md`.

Rows: Dense, Dense-AT, S-Dense-AT, MoE-AT and MoE-AdvMoE (with the paper's router and with live
routing), and a standard MoE whose routers and experts are then fine-tuned adversarially one part at
a time; each row is trained once per seed, evaluated (PGD-20, AutoAttack, MoE-adaptive attacks) and
timed, then OUT/results.md is written with the paired comparisons. Rerun to resume.

Run: python examples/study.py [OUT] [--quick]
The full study takes about an hour per seed on 2 CPU cores; --quick trains each row for two steps on
a small subset, one seed, and evaluates with lighter attacks (PGD-3, no AutoAttack, Square with 50
queries) to show the pipeline in about a minute, not a finding.
"""
import json
import sys
from pathlib import Path

from moeify.study import run_study

quick = "--quick" in sys.argv
args = [a for a in sys.argv[1:] if a != "--quick"]
out = Path(args[0]) if args else Path("runs/study-fmnist")
overrides = ["data.train_subset=256", "data.val_size=64", "data.test_subset=48", "train.epochs=1",
             "train.max_steps_per_epoch=2", "eval.val_pgd_steps=1", "eval.pgd_steps=2"] if quick else []
light = {"pgd_steps": 3, "square_queries": 50, "attacks": ["pgd", "adaptive"]} if quick else None
results = run_study("fmnist", out, out / "results.md", overrides, n=48 if quick else None, evaluate=light,
                    seeds=[0] if quick else None)

print(f"{'row':<40} {'SA':>6} {'PGD':>6} {'AA':>6} {'MoE-adaptive':>13} {'ms @ b1':>8}")
for r in results["rows"]:
    aa, adaptive = ("-" if r[k] is None else f"{r[k]:.1%}" for k in ("autoattack_acc", "adaptive_acc"))
    print(f"{r['name']:<40} {r['clean_acc']:>6.1%} {r['pgd_acc']:>6.1%} {aa:>6} {adaptive:>13} {r['latency_ms']:>8.2f}")
for r in results["dissection"]:
    print(f"{r['name']:<40} {r['clean_acc']:>6.1%} {r['pgd_acc']:>6.1%}")
for d in results["comparisons"]:
    print(f"{d['a']} - {d['b']}, {d['metric']}: {d['mean']:+.1f} points [{d['low']:+.1f}, {d['high']:+.1f}] ({d['verdict']})")
print(f"results page: {out / 'results.md'}; raw numbers: {out / 'results.json'}")
