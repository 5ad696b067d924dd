"""Which values an op may overwrite: a node's tensor is free at a user when nothing reads that
memory afterwards.

A residual add whose stream operand is free there can add a packed branch into the stream's own
memory instead of into a copy of it. Aliasing is judged from the op: only ops known to return new
memory end an alias chain. Any other op (views, in-place ops, and modules that may hand back their
input: ``Identity``, ``Dropout`` in eval, an in-place ``ReLU``) may share memory with its inputs,
so their readers count as readers of the value too.
"""
from __future__ import annotations

import operator
from collections.abc import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

FRESH_MODULES: tuple[type, ...] = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm)
"""Module types whose forward always returns new memory (their routed versions too)."""
FRESH_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul,
                   torch.cat, F.conv1d, F.conv2d, F.conv3d, F.linear, F.batch_norm}
"""Functions that always return new memory."""


def fresh_ops(modules: dict[str, nn.Module]) -> Callable[[fx.Node], bool]:
    """The default test of ``free_at``: does this node's op always return new memory?"""
    def fresh(node: fx.Node) -> bool:
        if node.op == "call_module":
            return isinstance(modules.get(node.target), FRESH_MODULES)
        return node.op == "call_function" and node.target in FRESH_FUNCTIONS
    return fresh


def _holds_tensors(node: fx.Node) -> bool:
    """Whether the traced value is a tensor (or holds some): routes and other inserted helpers are
    not, and never share a tensor's memory."""
    return "tensor_meta" in node.meta


def free_at(value: fx.Node, at: fx.Node, fresh: Callable[[fx.Node], bool]) -> bool:
    """True when ``at`` is the last reader of ``value``'s memory: every node that may share it
    (through ops that ``fresh`` does not vouch for) is read only at or before ``at``, and none of
    them is a model input, a parameter or buffer, or part of the output."""
    seen: set[fx.Node] = set()
    stack = [value]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op in ("placeholder", "get_attr", "output"):
            return False
        for u in n.users:
            if u is at:
                continue
            if u.op == "output" or u > at:  # fx keeps nodes ordered as the graph runs them
                return False
            if _holds_tensors(u) and not fresh(u):
                stack.append(u)  # a view or in-place result: its readers read this memory
        if not fresh(n):
            stack.extend(a for a in n.all_input_nodes if _holds_tensors(a))
    return True
