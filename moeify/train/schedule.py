"""Learning-rate schedules as LambdaLR factors of the step: linear warm-up, then cosine, step or constant."""
from __future__ import annotations

import math
from collections.abc import Callable


def lr_lambda(kind: str, total: int, warmup: int) -> Callable[[int], float]:
    """The factor of the base learning rate at each step of a ``total``-step run."""
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
        if kind == "step":
            return 0.1 ** sum(t >= m for m in (0.5, 0.75))
        return 1.0
    return f
