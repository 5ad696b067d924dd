"""``auto`` (the default): per model call, the strategy the calibration table measured fastest on
this device type for the nearest batch size, model size (dense MACs per sample) and number of
experts (more experts, more routing patterns per batch: grouped execution stops paying); under
``torch.compile``, ``static`` (the one strategy that traces as one graph).

The table ships with moeify (``calibration.json``, written by ``moeify bench --calibrate``):
latencies per strategy, relative to dense, measured with spread routing on reference models of
several sizes. A shipped table rather than a micro-benchmark at first use, so that a model's speed
does not depend on what a noisy machine measured once, and results are reproducible;
a machine measures its own with ``moeify bench --calibrate PATH`` and points
``$MOEIFY_CALIBRATION`` at it: the device types and modes it measured replace the shipped ones
(the shipped GPU points are one H200's, in eval; another GPU is worth measuring). A device type
without measurements uses ``static``: it never reads routes back, which is what stalls an
accelerator.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from functools import lru_cache
from pathlib import Path

import torch

from ...errors import MoeifyError
from ..route import Route
from .base import Executor

CALIBRATION = Path(__file__).with_name("calibration.json")
UNMEASURED = "static"
COMPILED = "static"
"""What ``auto`` runs under ``torch.compile``: the one strategy that traces as one graph."""
MACHINE_TABLE = "MOEIFY_CALIBRATION"
"""The environment variable naming this machine's own tables (written by ``moeify bench
--calibrate PATH``; several joined by ``os.pathsep``). Set it before the first model call:
``auto`` keeps each choice it makes."""


Point = tuple[float, int, int, dict[str, float]]  # (dense MACs / sample, batch, experts, {strategy: relative latency})


@lru_cache(maxsize=None)
def calibration(path: str = str(CALIBRATION)) -> dict[tuple[str, str], list[Point]]:
    """{(device type, eval | train): [(model MACs per sample, batch, experts, {strategy: latency
    relative to dense})]}; a point without ``experts`` was measured with 2."""
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return {}
    table: dict[tuple[str, str], list[Point]] = {}
    for dev, points in raw["devices"].items():
        for p in points:
            table.setdefault((dev, p.get("mode", "eval")), []).append(
                (float(p["macs"]), int(p["batch"]), int(p.get("experts", 2)),
                 {name: float(ms) for name, ms in p["relative_ms"].items()}))
    return table


def table_source() -> str:
    """Which table ``auto`` reads: ``shipped``, or ``$MOEIFY_CALIBRATION``'s path over it."""
    machine = os.environ.get(MACHINE_TABLE)
    return f"{machine} over the shipped one" if machine else "shipped"


def active_table() -> dict[tuple[str, str], list[Point]]:
    """The shipped table, with every (device type, mode) that ``$MOEIFY_CALIBRATION``'s table
    measured replaced by its points (a machine's own measurements beat another machine's)."""
    return _overlaid(os.environ.get(MACHINE_TABLE) or "")


@lru_cache(maxsize=None)
def _overlaid(machine: str) -> dict[tuple[str, str], list[Point]]:
    """The shipped table overlaid by each file of ``machine`` (paths joined by ``os.pathsep``, as
    in ``PATH``: say one table per mode), later files over earlier ones."""
    table = calibration()
    for name in filter(None, machine.split(os.pathsep)):
        path = Path(name).expanduser()
        if not path.is_file():
            raise MoeifyError(f"{MACHINE_TABLE} names {name}: no such file; write it with `moeify bench "
                              f"--calibrate {name}` or unset {MACHINE_TABLE}")
        try:
            own = calibration(str(path))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise MoeifyError(f"{MACHINE_TABLE} names {name}, which is not a table `moeify bench --calibrate` "
                              f"wrote ({type(e).__name__}: {e}); write it again or unset {MACHINE_TABLE}") from None
        table = {**table, **own}
    return table


def points_for(device_type: str, mode: str = "eval", table: dict | None = None) -> list[Point]:
    """The points ``auto`` chooses from for a call of ``mode`` on ``device_type``: that mode's, else
    the eval ones (none: the device type was not measured). ``table``: ``active_table()`` unless given."""
    table = active_table() if table is None else table
    return table.get((device_type, mode)) or table.get((device_type, "eval")) or []


def fastest(device_type: str, batch: int, macs: float, mode: str = "eval", experts: int = 2,
            table: dict | None = None) -> str:
    """The measured-fastest strategy at the calibration point nearest (in log batch size, log
    model MACs per sample and log experts) to this call; ``mode`` train for calls that will be
    differentiated. ``table``: ``active_table()`` unless given."""
    points = points_for(device_type, mode, table)
    if not points:
        return UNMEASURED

    def distance(p: Point) -> tuple[float, int]:
        return abs(math.log(p[1]) - math.log(max(batch, 1))) + abs(math.log(p[0]) - math.log(max(macs, 1.0))) \
            + abs(math.log(p[2]) - math.log(max(experts, 1))), p[1]

    times = min(points, key=distance)[3]
    return min(times, key=times.get)


class Auto(Executor):
    name = "auto"

    def __init__(self, strategies: dict[str, Executor]) -> None:
        self.strategies = strategies
        self._chosen: dict[tuple[str, int, float, str, int], Executor] = {}  # a lookup per layer call, not a search
        self._told: set[str] = set()  # device types already warned about as unmeasured

    def resolve(self, x, layer=None) -> Executor:
        """Every layer of one call agrees: the choice depends on the batch, the device, whether
        autograd records (training steps and attacks: the ``train`` measurements), the whole
        model's dense MACs (``MoELayer.model_macs``) and the number of experts (one per model
        spec), never on the layer's shape."""
        if torch.compiler.is_compiling():
            return self.strategies[COMPILED]
        if isinstance(x, Route):  # a shared global Route
            batch, device = x.idx.shape[0], x.idx.device
        else:  # a tensor or a RowGroups (whose shape and device need no merge)
            batch, device = x.shape[0], x.device
        mode = "train" if torch.is_grad_enabled() else "eval"
        key = (device.type, batch, getattr(layer, "model_macs", 0.0), mode, getattr(layer, "experts", 2))
        chosen = self._chosen.get(key)
        if chosen is None:
            self._tell_if_unmeasured(device.type, mode)
            name = fastest(*key)
            if name == self.name or name not in self.strategies:
                raise MoeifyError(f"auto's calibration table ({table_source()}) names strategy {name!r}, which is "
                                  f"not one of {', '.join(n for n in self.strategies if n != self.name)}; write the table "
                                  "again with `moeify bench --calibrate PATH`")
            chosen = self._chosen[key] = self.strategies[name]
        return chosen

    def _tell_if_unmeasured(self, device_type: str, mode: str) -> None:
        """Warn once per device type that no table measured it, so auto runs ``static`` there."""
        if device_type in self._told or points_for(device_type, mode):
            return
        self._told.add(device_type)
        warnings.warn(f"auto has no measurements for {device_type} and runs static there; measure this machine "
                      f"with `moeify bench --calibrate PATH --device {device_type}` and set {MACHINE_TABLE}=PATH",
                      stacklevel=4)
