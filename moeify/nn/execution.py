"""Which execution strategy MoE layers use: ``sparse`` (compute only selected experts, the default)
or ``masked`` (compute every expert, then zero the unselected ones: the reference path)."""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

MODES = ("sparse", "masked")
_state = threading.local()


def current_execution() -> str:
    return getattr(_state, "mode", "sparse")


@contextlib.contextmanager
def execution(mode: str) -> Iterator[None]:
    """Run MoE layers with ``mode`` inside the block: ``with moeify.execution("masked"): ...``."""
    if mode not in MODES:
        from ..errors import MoeifyError

        raise MoeifyError(f"unknown execution mode {mode!r}; choose one of {', '.join(MODES)}")
    prev = current_execution()
    _state.mode = mode
    try:
        yield
    finally:
        _state.mode = prev
