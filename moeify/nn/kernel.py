"""A contraction's sparse kernel: what an execution strategy needs to run a conv or linear layer
on any slice of its weight."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Kernel:
    """A contraction's sparse kernel: ``run(x, weight, bias, groups)`` computes the layer with any
    weight slice (conv: the layer's stride, padding and dilation; linear: ``F.linear``)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    run: Callable[..., torch.Tensor]
    linear: bool = False
