"""Benchmarks: conversion time and side-by-side inference latency of dense, masked and sparse.

Timings are interleaved (dense, masked, sparse, dense, ...) in one process and reported as medians,
so machine noise hits every variant alike.
"""
from __future__ import annotations

import platform
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .convert import convert
from .macs import count_macs
from .nn import execution
from .spec import MoESpec
from .zoo import create_model


@dataclass
class BenchRow:
    model: str
    batch: int
    variant: str
    ms: float
    macs: float
    speedup: float


def _time_once(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}")


def convert_seconds(name: str, spec: MoESpec, repeats: int = 3) -> float:
    """Median wall time of ``convert`` for a named model at its default input size."""
    model = create_model(name)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        convert(model, spec=spec)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def latency(name: str, spec: MoESpec, batches: list[int], repeats: int = 10, device: str = "cpu",
            channels_last: bool = True) -> list[BenchRow]:
    """Median eval latency per batch of dense vs masked vs sparse MoE, with executed MACs."""
    dense = create_model(name).eval()
    moe = convert(dense, spec=spec).eval()
    size = dense.moeify_input_size
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    dense, moe = dense.to(device, memory_format=fmt), moe.to(device, memory_format=fmt)
    rows: list[BenchRow] = []
    for b in batches:
        x = torch.rand(b, *size, device=device).contiguous(memory_format=fmt)
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

        def run(model: nn.Module, mode: str):
            def f():
                with torch.inference_mode(), execution(mode):
                    model(x)
                sync()
            return f

        variants = {"dense": run(dense, "sparse"), "moe masked": run(moe, "masked"), "moe sparse": run(moe, "sparse")}
        for f in variants.values():  # warm-up
            f(), f()
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(repeats):
            for k, f in variants.items():
                times[k].append(_time_once(f))
        base = statistics.median(times["dense"])
        xc = x.float().cpu() if device != "cpu" else x
        macs = {"dense": count_macs(dense.cpu(), xc.contiguous()), "moe sparse": count_macs(moe.cpu(), xc.contiguous())}
        with execution("masked"):
            macs["moe masked"] = count_macs(moe, xc.contiguous())
        dense.to(device), moe.to(device)
        for k in variants:
            ms = statistics.median(times[k])
            rows.append(BenchRow(name, b, k, ms, macs[k], base / ms))
    return rows


def rows_as_dicts(rows: list[BenchRow]) -> list[dict]:
    return [asdict(r) for r in rows]
