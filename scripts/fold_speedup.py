"""Dense, static twin and MoE, each as built and with its BatchNorm folded (``moeify.fold_batchnorm``),
timed interleaved in one process (six variants, routes spread), so folding's effect on the MoE's
speed-up over dense is measured in one loop rather than across two ``moeify bench`` runs.

Usage: python scripts/fold_speedup.py [MODEL] [--batch 1] [--repeats 40] [--strategy auto]
    [--scope paper] [--experts 2] [--top-k 1] [--input-size 3,32,32] [--model-kwargs width=16,...]
Prints each variant's median ms and its speed-up over the dense model of its kind.
"""
from __future__ import annotations

import argparse

import torch

import moeify
from bench_args import build, model_arguments
from moeify.bench import interleaved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_arguments(ap, repeats=40)
    ap.add_argument("--batch", type=int, default=1)
    a = ap.parse_args()
    dense, spec, moe = build(a)
    size = dense.moeify_input_size
    built = {"dense": dense, "static twin": moeify.static_twin(dense, spec=spec).eval(), "moe": moe}
    models = {}  # each folded variant timed right after its unfolded one
    for k, m in built.items():
        models[k], models[f"{k}, folded"] = m, moeify.fold_batchnorm(m)
    x = torch.rand(a.batch, *size).contiguous(memory_format=torch.channels_last)
    for m in models.values():
        m.to(memory_format=torch.channels_last)

    def call(m: torch.nn.Module):
        def f() -> None:
            with torch.inference_mode(), moeify.execution(a.strategy):
                m(x)
        return f

    ms = interleaved({k: call(m) for k, m in models.items()}, a.repeats, warmup=3)
    print(f"{a.model} {spec.experts} experts top-{spec.top_k}, scope {spec.scope}, batch {a.batch}, "
          f"strategy {a.strategy}, {torch.get_num_threads()} threads")
    for k, v in ms.items():
        base = ms["dense, folded" if k.endswith("folded") else "dense"]
        print(f"  {k:22s} {v:9.2f} ms  {base / v:5.2f}x its dense")


if __name__ == "__main__":
    main()
