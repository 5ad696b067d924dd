"""What a share-of-the-twin's-gain target leaves the MoE above its floor at a large batch, against
what the MoE's row gathers alone take.

A strategy that computes only the chosen experts' channels for a batch that takes different
routes must bring each routing pattern's samples together (``grouped``: one ``index_select`` of
each gated conv's input rows per pattern). This script records the gathers one forward of the MoE
makes (``aten.index_select``, their sources and indices as the forward made them), replays them
alone, and times that interleaved with dense, the static twin, the twin + routers floor (as
``moeify bench`` builds it) and the MoE. The target's time is dense / (1 + share * (dense / twin
- 1)); the room is that time less the floor's. Where the gathers take the room, no strategy that
gathers rows reaches the target, whatever else it saves.

Usage: python scripts/row_gathers.py [MODEL] [--batch 128] [--share 0.9] [--repeats 25]
    [--scope paper] [--experts 2] [--top-k 1] [--input-size ...] [--model-kwargs ...]
Prints each variant's median ms, then the target's time, the room above the floor, the gathers'
time, the room less the gathers (below zero: the gathers alone take more than the room) and the
MoE's time above the floor, with 95% paired-bootstrap intervals.
"""
from __future__ import annotations

import argparse
import statistics

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import moeify
from bench_args import build, median, model_arguments
from moeify.bench import interleaved_rounds, with_routers
from moeify.stats import paired_bootstrap


class RecordGathers(TorchDispatchMode):
    """Keeps a copy of the source and index of every ``index_select`` run inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch.Tensor, int, torch.Tensor]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.index_select.default:
            src, dim, index = args
            self.calls.append((src.clone(), dim, index.clone()))
        return func(*args, **(kwargs or {}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_arguments(ap, repeats=25)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--share", type=float, default=0.9, help="the target's share of the twin's gain")
    a = ap.parse_args()
    dense, spec, moe = build(a)
    twin = moeify.static_twin(dense, spec=spec).eval()
    models = {"dense": dense, "static twin": twin, "twin + routers": with_routers(twin, moe).eval(), "moe": moe}
    for m in models.values():
        m.to(memory_format=torch.channels_last)
    x = torch.rand(a.batch, *dense.moeify_input_size).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), moeify.execution(a.strategy):
        moe(x)
        with RecordGathers() as rec:
            moe(x)

    def call(m: torch.nn.Module):
        def f() -> None:
            with torch.inference_mode(), moeify.execution(a.strategy):
                m(x)
        return f

    def gathers() -> None:
        with torch.inference_mode():
            for src, dim, index in rec.calls:
                torch.index_select(src, dim, index)

    fns = {k: call(m) for k, m in models.items()} | {"gathers": gathers}
    rounds = interleaved_rounds(fns, a.repeats, warmup=2)
    moved = sum(index.numel() * src.numel() // src.shape[dim] * src.element_size() for src, dim, index in rec.calls)
    print(f"{a.model} {spec.experts} experts top-{spec.top_k}, scope {spec.scope}, batch {a.batch}, MoE "
          f"strategy {a.strategy}, {torch.get_num_threads()} threads, {a.repeats} rounds; the MoE's forward "
          f"gathers {len(rec.calls)} times, {moved / 1e6:.0f} MB")
    for k, v in rounds.items():
        print(f"  {k:16s} {statistics.median(v):8.2f} ms")

    def target(c: dict[str, torch.Tensor]) -> torch.Tensor:
        d = median(c["dense"])
        return d / (1 + a.share * (d / median(c["static twin"]) - 1))

    stats = {
        f"target ({a.share:.0%} of the twin's gain)": target,
        "room above the floor": lambda c: target(c) - median(c["twin + routers"]),
        "the gathers alone": lambda c: median(c["gathers"]),
        "the room less the gathers": lambda c: target(c) - median(c["twin + routers"]) - median(c["gathers"]),
        "the MoE above the floor": lambda c: median(c["moe"]) - median(c["twin + routers"]),
    }
    point = {k: torch.tensor(v, dtype=torch.float64)[None] for k, v in rounds.items()}
    for name, fn in stats.items():
        low, high = paired_bootstrap(rounds, fn)
        print(f"  {name:36s} {fn(point).item():8.2f} ms ({low:.2f} to {high:.2f})")


if __name__ == "__main__":
    main()
