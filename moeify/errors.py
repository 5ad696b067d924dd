"""Exceptions moeify raises on purpose; the CLI turns them into one-line messages.

``route_checks`` is where a compiled model leaves its NaN/inf route check for its own call to
read once the compiled code has returned (``graph/trace.py``): a read of a device value inside a
compiled graph needs an opaque Python op there, which cost more than the routers themselves in a
small model on the CPU and splits a graph that CUDA graphs capture, and an in-graph assert cannot
raise RoutingError (on the CPU it ends the process when inductor places it inside a parallel
region; on a GPU a failed device assert leaves the process's CUDA context unusable).
"""
from __future__ import annotations

import threading


class MoeifyError(Exception):
    """Base class: a refusal with a message that says what is wrong and what to do."""


class ConversionError(MoeifyError):
    """A model, spec or layer that cannot be converted; the message names the layer or op and why."""


class RoutingError(MoeifyError):
    """A router produced scores that cannot be routed (NaN or inf)."""

    @classmethod
    def non_finite(cls) -> "RoutingError":
        """The refusal of a route whose chosen score is NaN or infinite."""
        return cls("router produced non-finite scores (NaN/inf); refusing to route (it would silently pick expert 0); "
                   "check the learning rate and the inputs")


route_checks = threading.local()
"""This thread's deferred route check: ``taken`` is true while a converted model's own call runs
and will read ``finite`` (a 0-d bool tensor that compiled code stores, or None) when it returns."""


def route_checks_taken() -> bool:
    """Whether the call running now reads the route check after its compiled code returns."""
    return getattr(route_checks, "taken", False)
