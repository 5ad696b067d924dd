"""The least per-layer routing can cost at batch 1 in eager PyTorch on this machine: the static
twin with a bare router before each MoE layer's producer (mean over the map, one linear layer, the
scores read to the host, an argmax in Python, nothing else), timed interleaved with dense, the
twin, the bench's twin + routers baseline (moeify's router, its choice read back) and the MoE.

The bare router is a floor, not a variant anyone could ship: it skips the NaN/inf check, the
route object and every strategy decision. If the twin plus bare routers is already below a speed
target, no execution strategy with one router per layer reaches that target here. For the same
reason the MoE is also timed without its NaN/inf route check (the graph's ``routes_checked`` call
removed): what the check costs, timing only.

With ``--compile`` every variant is compiled (``torch.compile``, default options) and the bare
router keeps its choice on the device, where it scales the producer's output by a factor of 1 (so
the compiler keeps it); the bench's router, which reads its choice back, is left out.

Usage: python scripts/router_floor.py [MODEL] [--repeats 300] [--scope paper] [--experts 2]
    [--top-k 1] [--input-size 1,28,28] [--model-kwargs width=16,...] [--strategy auto] [--compile]
Prints each variant's median ms and speed-up over dense (95% paired-bootstrap interval), and the
routers' cost per router (its median over the twin's, divided by the number of routers).
"""
from __future__ import annotations

import argparse
import copy
import statistics

import torch
import torch.nn.functional as F

import moeify
from bench_args import build, median, model_arguments
from moeify.bench import interleaved_rounds, noise_in_biases, with_routers
from moeify.nn.route import routes_checked
from moeify.stats import paired_bootstrap


class BareRouted:
    """Mixed into a producer in place of the bench's router call: pool, linear, host read, argmax."""

    def forward(self, x, *args, **kwargs):
        params = self.moeify_bench_router.proj._parameters
        s = F.linear(x.mean((2, 3)), params["weight"], params["bias"]).tolist()[0]
        max(range(len(s)), key=s.__getitem__)
        return super().forward(x, *args, **kwargs)


class DeviceRouted:
    """The bare router for ``--compile``: the choice stays on the device (a compiled graph reads
    nothing back) and scales the producer's output by ``choice >= 0`` (always 1), so the compiler
    cannot drop the router as dead code."""

    def forward(self, x, *args, **kwargs):
        params = self.moeify_bench_router.proj._parameters
        choice = F.linear(x.mean((2, 3)), params["weight"], params["bias"]).argmax(-1)
        y = super().forward(x, *args, **kwargs)
        return y * (choice >= 0).to(y.dtype).view(-1, *[1] * (y.ndim - 1))


def bare(twin_with_routers: torch.nn.Module, mixin: type = BareRouted) -> torch.nn.Module:
    """A copy of the bench's twin + routers whose producers run the bare router (``mixin``) instead."""
    out = copy.deepcopy(twin_with_routers)
    for m in out.modules():
        if "moeify_bench_router" in m._modules:
            base = type(m).__mro__[2]  # the class the bench's mixin was mixed into
            m.__class__ = type(f"Bare{base.__name__}", (mixin, base), {})
    return out


def unchecked(moe: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of ``moe`` without its NaN/inf route check (timing only: a NaN route goes unnoticed)."""
    out = copy.deepcopy(moe)
    for node in list(out.graph.nodes):
        if node.target is routes_checked:
            node.replace_all_uses_with(node.args[0])
            out.graph.erase_node(node)
    out.recompile()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_arguments(ap, repeats=300)
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile every variant (the bare router keeps its choice on the device)")
    a = ap.parse_args()
    dense, spec, moe = build(a)
    size = dense.moeify_input_size
    twin = moeify.static_twin(dense, spec=spec).eval()
    routed = with_routers(twin, moe)
    n = sum("moeify_bench_router" in m._modules for m in routed.modules())
    models = {"dense": dense, "static twin": twin, "twin + routers": routed,
              "twin + bare routers": bare(routed, DeviceRouted if a.compile else BareRouted), "moe": moe,
              "moe, no route check": unchecked(moe)}
    if a.compile:  # the bench's router reads its choice back: a graph break, not a floor
        del models["twin + routers"]
    x = torch.rand(1, *size).contiguous(memory_format=torch.channels_last)
    for m in models.values():
        m.to(memory_format=torch.channels_last)

    def call(m: torch.nn.Module):
        run = torch.compile(m) if a.compile else m

        def f() -> None:
            with torch.inference_mode(), moeify.execution(a.strategy):
                run(x)
        return f

    # batch 1: the spread routes' noise in the routers' biases
    with noise_in_biases(moe), noise_in_biases(models["moe, no route check"]):
        rounds = interleaved_rounds({k: call(m) for k, m in models.items()}, a.repeats, warmup=3)
    ms = {k: statistics.median(v) for k, v in rounds.items()}
    print(f"{a.model} {spec.experts} experts top-{spec.top_k}, scope {spec.scope}, batch 1, MoE strategy "
          f"{a.strategy}{', compiled' if a.compile else ''}, {torch.get_num_threads()} threads, {n} routers, "
          f"{a.repeats} rounds")
    for k, v in ms.items():
        low, high = paired_bootstrap({"dense": rounds["dense"], k: rounds[k]},
                                     lambda c, k=k: median(c["dense"]) / median(c[k]))
        extra = f"  {(v - ms['static twin']) / n * 1e3:6.1f} us per router" if "router" in k else ""
        print(f"  {k:20s} {v:8.3f} ms  {ms['dense'] / v:5.2f}x ({low:.2f}-{high:.2f}){extra}")


if __name__ == "__main__":
    main()
