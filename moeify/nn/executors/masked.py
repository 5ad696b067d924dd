"""``masked``: the reference strategy. Every expert is computed and the unselected channels are
zeroed (times the gates, so routers get their gradient); no tensor is ever packed. Static shapes,
no host read: it compiles as one graph."""
from __future__ import annotations

from .base import Executor


class Masked(Executor):
    name = "masked"
