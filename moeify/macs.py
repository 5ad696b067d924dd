"""Count multiply-accumulates at the dispatch level: what actually executes, routers included."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .nn.executors import current_execution, execution


def count_macs(model: nn.Module, x: torch.Tensor) -> float:
    """Mean multiply-accumulates per sample over the batch ``x`` (eval mode, no grad).

    Counted by torch's FlopCounterMode on the ops that run, so conditional compute counts as
    executed: unselected experts are not counted, routers are, functional convs are. Inside
    ``moeify.execution(name)`` it counts what that strategy runs (``masked``: every expert);
    under ``auto`` (the default, which may pick masked execution where that is faster) what the
    selected experts cost, as ``grouped`` runs them.
    """
    was = model.training
    model.eval()
    mode = "grouped" if current_execution() == "auto" else current_execution()
    # no parameter needs a gradient while counting: torch's module tracker (inside FlopCounterMode)
    # fails on a parameter passed straight into a submodule under no_grad (CaiT's, PiT's class tokens)
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in trainable:
            p.requires_grad_(False)
        with torch.no_grad(), execution(mode), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        for p in trainable:
            p.requires_grad_(True)
        model.train(was)
    return counter.get_total_flops() / 2 / x.shape[0]
