"""``auto`` (the default): per model call, the strategy the calibration table measured fastest on
this device type at the nearest batch size; under ``torch.compile``, ``static`` (the one strategy
that traces as one graph).

The table ships with moeify (``calibration.json``, written by ``moeify bench --calibrate``):
latencies per strategy, relative to dense, measured with spread routing on reference models. A
shipped table rather than a micro-benchmark at first use, so that a model's speed does not depend
on what a noisy machine measured once, and results are reproducible; re-calibrate a machine with
the bench command. A device type without measurements uses ``static``: it never reads routes back,
which is what stalls an accelerator.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch

from .base import Executor

CALIBRATION = Path(__file__).with_name("calibration.json")
UNMEASURED = "static"


@lru_cache(maxsize=None)
def calibration(path: str = str(CALIBRATION)) -> dict[str, dict[int, dict[str, float]]]:
    """{device type: {batch: {strategy: latency relative to dense}}} from the shipped table."""
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return {}
    return {dev: {int(b): dict(v) for b, v in rows.items()} for dev, rows in raw["relative_ms"].items()}


def fastest(device_type: str, batch: int, table: dict | None = None) -> str:
    """The measured-fastest strategy at the measured batch size nearest (in log scale) to ``batch``."""
    rows = (calibration() if table is None else table).get(device_type)
    if not rows:
        return UNMEASURED
    import math

    nearest = min(rows, key=lambda b: (abs(math.log(b) - math.log(max(batch, 1))), b))
    times = rows[nearest]
    return min(times, key=times.get)


class Auto(Executor):
    name = "auto"

    def __init__(self, strategies: dict[str, Executor]) -> None:
        self.strategies = strategies

    def resolve(self, x) -> Executor:
        if torch.compiler.is_compiling():
            return self.strategies["static"]
        idx = getattr(x, "idx", None)  # a shared global Route
        batch, device = (idx.shape[0], idx.device) if idx is not None else (x.shape[0], x.device)
        return self.strategies[fastest(device.type, batch)]
