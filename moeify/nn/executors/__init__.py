"""Execution strategies for converted models, by name: ``masked`` (the reference), ``grouped``
(per routing pattern; ``sparse`` is its old name), ``static`` (static shapes, compiles as one
graph) and ``auto`` (the default: the fastest measured strategy for the device and batch).

A strategy is an ``Executor`` object (``base.py``); adding one is a new module and a ``register``
call. ``selected.py`` is not one to choose but ``grouped``'s lane for a batch of one sample in
inference. ``with moeify.execution(name): ...`` selects one for the calls inside the block (per thread).
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from ...errors import MoeifyError
from .auto import Auto
from .base import Executor, Kernel
from .grouped import Grouped
from .masked import Masked
from .selected import Selected
from .static import Static

EXECUTORS: dict[str, Executor] = {}
ALIASES = {"sparse": "grouped"}
DEFAULT = "auto"
_state = threading.local()


def register(executor: Executor) -> Executor:
    """Make ``executor`` selectable by its ``name``."""
    EXECUTORS[executor.name] = executor
    return executor


for _ex in (Masked(), Grouped(one=Selected()), Static()):
    register(_ex)
register(Auto(EXECUTORS))


def get_executor(name: str) -> Executor:
    """The strategy called ``name`` (or an alias); a one-line error naming the choices otherwise."""
    key = ALIASES.get(name, name)
    if key not in EXECUTORS:
        raise MoeifyError(f"unknown execution mode {name!r}; choose one of {', '.join(names())}")
    return EXECUTORS[key]


def names() -> list[str]:
    return list(EXECUTORS) + list(ALIASES)


def current_executor() -> Executor:
    """The strategy selected for this thread (``auto`` unless inside ``execution(...)``)."""
    return getattr(_state, "executor", None) or EXECUTORS[DEFAULT]


def current_execution() -> str:
    """The name of the selected strategy."""
    return current_executor().name


@contextlib.contextmanager
def execution(mode: str) -> Iterator[None]:
    """Run MoE layers with strategy ``mode`` inside the block: ``with moeify.execution("masked"): ...``."""
    executor = get_executor(mode)
    prev = getattr(_state, "executor", None)
    _state.executor = executor
    try:
        yield
    finally:
        _state.executor = prev


__all__ = ["Executor", "Kernel", "EXECUTORS", "register", "get_executor", "current_executor", "current_execution",
           "execution", "names"]
