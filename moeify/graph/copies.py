"""Layers whose output or input holds a group's channels more than once, cut into one contraction per copy.

A gated MLP's first layer (timm's GluMlp, MambaOut's gated block) makes ``2 H`` channels, splits
them, and multiplies one half (through an activation) by the other: both halves are the same
``H`` channels of one group. Gating such an output needs one selection applied to every copy.
This pass rewrites the producer as one contraction per copy, each on its slice of the weight rows
(``F.linear(x, fc1.weight[a:b], fc1.bias[a:b])``: the parameters and their keys are unchanged),
and the split as a split of each copy's pieces. The copies are then ordinary producers of one
group, and the function is unchanged.
"""
from __future__ import annotations

import operator

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .groups import ChannelGroup
from .ops import Kind, classify

_CONVS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def split_copies(gm: fx.GraphModule, groups: list[ChannelGroup]) -> bool:
    """Rewrite every producer that repeats a group's channels and feeds a channel split, and every
    consumer that reads them repeated, into one contraction per copy (only in groups that nothing
    else keeps dense); returns whether the graph changed (then shapes must be inferred again)."""
    changed = False
    for g in groups:
        if any("repeats channels" not in b and "mixed with others" not in b for b in g.blockers()):
            continue  # something else keeps this group dense: leave its layers whole
        for u in g.producers:
            if len(np.unique(u.roots)) < len(u.roots) and _rewrite(gm, u.node, u.roots):
                changed = True
        for u in g.consumers:
            if len(np.unique(u.roots)) < len(u.roots) and _cut_consumer(gm, u.node, u.roots):
                changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    return changed


def _runs(roots: np.ndarray, sizes: list[int]) -> list[list[int]]:
    """Consecutive split pieces (indices) grouped into runs in which no channel repeats."""
    runs: list[list[int]] = [[]]
    seen: set[int] = set()
    start = 0
    for i, n in enumerate(sizes):
        piece = set(roots[start:start + n].tolist())
        if seen & piece:
            runs.append([])
            seen = set()
        runs[-1].append(i)
        seen |= piece
        start += n
    return runs


def _split_dim(split: fx.Node):
    return split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)


def _split_of(node: fx.Node, gm: fx.GraphModule, cdim: int) -> tuple[fx.Node, list[int]] | None:
    """The channel split that is ``node``'s only user, with its piece sizes; None otherwise."""
    users = list(node.users)
    if len(users) != 1 or classify(users[0], gm).kind is not Kind.SPLIT:
        return None
    split = users[0]
    shapes = split.meta.get("tensor_meta")
    if not isinstance(shapes, (list, tuple)) or not shapes:
        return None
    nd = len(shapes[0].shape)
    dim = _split_dim(split)
    if not isinstance(dim, int) or dim % nd != cdim % nd:
        return None
    if any(u.target is not operator.getitem or not isinstance(u.args[1], int) for u in split.users):
        return None
    return split, [s.shape[cdim] for s in shapes]


def _plain(gm: fx.GraphModule, node: fx.Node) -> tuple | None:
    """(function, input, weight, bias, other positional args) of a plain contraction, the weight
    and bias as module attribute names or graph values; None for anything else."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        bias = f"{node.target}.bias" if getattr(m, "bias", None) is not None else None
        if type(m) is nn.Linear:
            return F.linear, node.args[0], f"{node.target}.weight", bias, ()
        if type(m) in (nn.Conv1d, nn.Conv2d, nn.Conv3d) and m.padding_mode == "zeros" and m.groups == 1:
            rest = (m.stride, m.padding, m.dilation)
            return _CONVS[m.weight.ndim - 2], node.args[0], f"{node.target}.weight", bias, rest
        return None
    if node.op == "call_function" and node.target in (F.linear, *_CONVS.values()) and not node.kwargs:
        rest = tuple(node.args[3:])
        if node.target is not F.linear and len(rest) > 3 and rest[3] != 1:
            return None  # a grouped conv: its rows are tied to input groups
        return node.target, node.args[0], node.args[1], node.args[2] if len(node.args) > 2 else None, rest
    return None


def _rewrite(gm: fx.GraphModule, node: fx.Node, roots: np.ndarray) -> bool:
    info = classify(node, gm)
    found = _split_of(node, gm, info.cdim_in if info.cdim_in is not None else 1)
    if found is None:
        return False
    split, sizes = found
    runs = _runs(roots, sizes)
    if len(runs) < 2:
        return False
    parts = _plain(gm, node)
    if parts is None:
        return False
    fn, x, weight, bias, rest = parts
    name = str(node.target) if node.op == "call_module" else node.name
    graph = gm.graph
    dim = _split_dim(split)
    with graph.inserting_before(node):
        weight = graph.get_attr(weight) if isinstance(weight, str) else weight
        bias = graph.get_attr(bias) if isinstance(bias, str) else bias
        pieces: dict[int, fx.Node] = {}
        start = 0
        for run in runs:
            width = sum(sizes[i] for i in run)
            rows = slice(start, start + width)
            w = graph.call_function(operator.getitem, (weight, rows))
            b = graph.call_function(operator.getitem, (bias, rows)) if bias is not None else None
            y = graph.call_function(fn, (x, w, b, *rest))
            y.meta["moeify_name"] = name if start == 0 else f"{name}[{start}:{start + width}]"
            if len(run) == 1:
                pieces[run[0]] = y
            else:
                sub = graph.call_function(torch.split, (y, [sizes[i] for i in run]), {"dim": dim})
                for k, i in enumerate(run):
                    pieces[i] = graph.call_function(operator.getitem, (sub, k))
            start += width
    for item in list(split.users):
        item.replace_all_uses_with(pieces[item.args[1]])
        graph.erase_node(item)
    graph.erase_node(split)
    graph.erase_node(node)
    return True


def _cut_consumer(gm: fx.GraphModule, node: fx.Node, roots: np.ndarray) -> bool:
    parts = _plain(gm, node)
    if parts is None:
        return False
    runs = _runs(roots, [1] * len(roots))
    if len(runs) < 2:
        return False
    fn, x, weight, bias, rest = parts
    name = str(node.target) if node.op == "call_module" else node.name
    lead = (Ellipsis,) if fn is F.linear else (slice(None),)
    graph = gm.graph
    with graph.inserting_before(node):
        weight = graph.get_attr(weight) if isinstance(weight, str) else weight
        bias = graph.get_attr(bias) if isinstance(bias, str) else bias
        total = None
        for k, run in enumerate(runs):
            cols = slice(run[0], run[-1] + 1)
            xs = graph.call_function(operator.getitem, (x, lead + (cols,)))
            ws = graph.call_function(operator.getitem, (weight, (slice(None), cols)))
            y = graph.call_function(fn, (xs, ws, bias if k == 0 else None, *rest))
            y.meta["moeify_name"] = name if k == 0 else f"{name}[:, {cols.start}:{cols.stop}]"
            if total is not None:
                y = graph.call_function(operator.add, (total, y))
                y.meta["moeify_parts"] = True
            total = y
    node.replace_all_uses_with(total)
    graph.erase_node(node)
    return True
