"""What keeping routed conv weights in oneDNN's blocked layout (``moeify/nn/onednn.py``) brings,
and what the same would bring the dense model and the static twin: each timed as built and with
blocked weights, interleaved in one process (routes spread, channels-last, inference).

The MoE's blocked weights are part of its engine (on by default); dense and twin get them here
only to show how much of the MoE's gain a dense model could also have: each of their plain convs
is given a blocked copy of its weight. Usage:
    python scripts/blocked_weights.py [MODEL] [--batch 16] [--repeats 20] [--strategy auto]
        [--scope hidden] [--experts 2] [--top-k 1] [--input-size 3,224,224] [--model-kwargs ...]
Prints each variant's median ms, its speed-up over plain dense and its share of the plain twin's
gain, with 95% paired-bootstrap intervals, and the same for the blocked variants against
blocked dense and the blocked twin.
"""
from __future__ import annotations

import argparse
import copy
import functools
import statistics

import torch
from torch import nn

import moeify
from bench_args import build, model_arguments
from moeify.bench import _intervals, interleaved_rounds
from moeify.nn import onednn


def with_blocked_convs(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose plain 2-D convs run with a blocked copy of their weight where
    the MoE's would (``onednn.pays``)."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if type(m) is nn.Conv2d and m.groups == 1 and m.padding_mode == "zeros" and not isinstance(m.padding, str):
            m.forward = functools.partial(_blocked_forward, m, onednn.blocked(m.weight.detach(), m.stride, m.padding,
                                                                               m.dilation))
    return model


def _blocked_forward(m: nn.Conv2d, packed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if onednn.pays(x, m.weight) and x.is_contiguous(memory_format=torch.channels_last):
        return onednn.blocked_conv(x, packed, m.bias, m.stride, m.padding, m.dilation)
    return m._conv_forward(x, m.weight, m.bias)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_arguments(ap, repeats=20)
    ap.add_argument("--batch", type=int, default=16)
    a = ap.parse_args()
    if not onednn.available():
        raise SystemExit("this PyTorch build has no oneDNN convolution: nothing to compare")
    dense, spec, moe = build(a)
    twin = moeify.static_twin(dense, spec=spec).eval()
    models = {"dense": dense, "dense, blocked": with_blocked_convs(dense),
              "static twin": twin, "twin, blocked": with_blocked_convs(twin), "moe, plain convs": moe, "moe": moe}
    for m in models.values():
        m.to(memory_format=torch.channels_last)
    x = torch.rand(a.batch, *dense.moeify_input_size).contiguous(memory_format=torch.channels_last)

    def call(name: str, m: nn.Module):
        blocked = name != "moe, plain convs"

        def f() -> None:
            with torch.inference_mode(), moeify.execution(a.strategy), onednn.blocked_weights(blocked):
                m(x)
        return f

    rounds = interleaved_rounds({k: call(k, m) for k, m in models.items()}, a.repeats, warmup=3)
    print(f"{a.model} {spec.experts} experts top-{spec.top_k}, scope {spec.scope}, batch {a.batch}, "
          f"strategy {a.strategy}, {a.repeats} rounds, {torch.get_num_threads()} threads")
    med = {k: statistics.median(v) for k, v in rounds.items()}

    def against(k: str, dense: str, twin: str) -> str:
        speedup, gain = med[dense] / med[k], med[dense] / med[twin] - 1
        slo, shi, glo, ghi = _intervals(rounds, k, dense, twin)
        return (f"{speedup:5.2f}x ({slo:.2f}-{shi:.2f}) {dense}, "
                f"{(speedup - 1) / gain:4.0%} ({glo:.0%}-{ghi:.0%}) of {twin}'s gain")

    for k, v in med.items():
        line = f"  {k:16s} {v:8.2f} ms"
        if k != "dense":
            line += "  " + against(k, "dense", "static twin")
        if k == "moe":
            line += "; " + against(k, "dense, blocked", "twin, blocked")
        print(line)


if __name__ == "__main__":
    main()
