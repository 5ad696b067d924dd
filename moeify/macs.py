"""Count multiply-accumulates at the dispatch level: what actually executes, routers included."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_macs(model: nn.Module, x: torch.Tensor) -> float:
    """Mean multiply-accumulates per sample over the batch ``x`` (eval mode, no grad).

    Counted by torch's FlopCounterMode on the ops that run, so conditional compute counts as
    executed: unselected experts are not counted, routers are, functional convs are.
    """
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was)
    return counter.get_total_flops() / 2 / x.shape[0]
