"""What the benchmark scripts here share: the model arguments, and the dense model and its MoE
(routes spread) built from them, as ``moeify bench`` builds them."""
from __future__ import annotations

import argparse

import torch

import moeify
from moeify.bench import spread_routing
from moeify.cli import _kwargs


def model_arguments(ap: argparse.ArgumentParser, repeats: int) -> None:
    """The model, its MoE spec, the input size and the timing repeats."""
    ap.add_argument("model", nargs="?", default="cifar_resnet18")
    ap.add_argument("--repeats", type=int, default=repeats)
    ap.add_argument("--strategy", default="auto")
    ap.add_argument("--scope", default="paper")
    ap.add_argument("--experts", type=int, default=2)
    ap.add_argument("--top-k", type=int, default=1)
    ap.add_argument("--input-size", default=None)
    ap.add_argument("--model-kwargs", default=None)
    ap.add_argument("--allocator", choices=("kept", "system"), default="kept",
                    help="CPU memory, as the command line's --allocator: freed memory kept, or glibc's defaults")


def build(a: argparse.Namespace) -> tuple[torch.nn.Module, moeify.MoESpec, torch.nn.Module]:
    """(dense model in eval, the spec, its MoE in eval with routes spread), seeded; the process's
    allocator set first, as ``moeify`` sets it."""
    if a.allocator == "kept":
        moeify.keep_freed_memory()
    size = None if a.input_size is None else tuple(int(v) for v in a.input_size.split(","))
    torch.manual_seed(0)
    dense = moeify.create_model(a.model, input_size=size, **_kwargs(a.model_kwargs)).eval()
    spec = moeify.MoESpec(experts=a.experts, top_k=a.top_k, scope=a.scope)
    moe = moeify.convert(dense, spec=spec).eval()
    spread_routing(moe)
    return dense, spec, moe


def median(t: torch.Tensor) -> torch.Tensor:
    """Medians over the last dimension (the rounds of a bootstrap resample)."""
    return torch.quantile(t, 0.5, dim=-1)
