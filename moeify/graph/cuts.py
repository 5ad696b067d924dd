"""Contractions cut so that each part writes, or reads, the channels of one group once and in order.

A conv or linear layer's output rows or input columns can be shared out among parts, each its own
contraction on a slice of the weight (``F.linear(x, fc1.weight[a:b], fc1.bias[a:b])``: the
parameters and their keys are unchanged); output parts are concatenated again (or take the place
of the split that followed), input parts summed. Each part is then an ordinary producer or
consumer of one group, and the function is unchanged:

- a gated MLP's first layer makes two copies of one group's channels and splits them (timm's
  GluMlp, MambaOut), or a conv makes a channel's branches at once (ResNeSt's split attention, a
  grouped conv with a conv group per branch, and its attention's last conv): one part per copy,
  so one selection gates every copy (a grouped conv's part is its conv groups, on their inputs);
- a layer whose output is split among different consumers (a split feeding several convs): one
  part per piece, each piece its own group with its own router;
- a layer that reads a group twice (GhostNet's cat of a conv's output and its depthwise copy) or
  several groups at once (a cat feeding a 1×1 conv): one part per copy or group, summed. The sum
  is marked ``moeify_parts``, so the analysis unites its operands instead of starting a stream.

Only groups that nothing but this sharing keeps dense are cut, each layer into at most
``MAX_PARTS`` parts. Policy ``copies`` (the default) cuts only where every part is a whole copy of
one group (the first and third cases); ``all`` also shares out sub-ranges and several groups (the
second and fourth), which saves MACs but makes more, smaller contractions.
"""
from __future__ import annotations

import operator
from collections import defaultdict
from collections.abc import Callable

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .groups import ChannelGroup, node_name
from .ops import Kind, classify

MAX_PARTS = 4
_CONVS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def cut_layers(gm: fx.GraphModule, groups: list[ChannelGroup], policy: str = "copies") -> bool:
    """Cut the producers and consumers of every group kept dense only by shared channels, as
    ``policy`` (copies | all) allows (see the module doc); returns whether the graph changed (then
    shapes and groups must be found again)."""
    readers, writers = _uses(groups) if policy == "all" else ({}, {})  # copies: cut where channels repeat
    cut: set[fx.Node] = set()
    for g in groups:
        if not g.only_order_blocks():
            continue  # something else keeps this group dense: leave its layers whole
        plan = [(u.node, u.roots, _runs(u.roots, key.get), how)
                for uses, key, how in ((g.producers, readers, _cut_rows), (g.consumers, writers, _cut_columns))
                for u in uses if u.node not in cut and (key or len(np.unique(u.roots)) < len(u.roots))]
        plan = [p for p in plan if len(p[2]) > 1]
        whole = set(g.primary.roots.tolist())
        if not plan or any(len(runs) > MAX_PARTS or not _cuttable(gm, n, runs, how) for n, _, runs, how in plan) or \
                any(len(np.unique(u.roots)) < len(u.roots) or len(u.roots) != g.channels for u in g.add_sinks):
            continue  # cutting would not free this group: leave its layers whole
        if policy == "copies" and any(set(roots[r.start:r.stop].tolist()) != whole
                                      for _, roots, runs, _ in plan for r in runs):
            continue  # a part would not be a whole copy of the group
        for n, _, runs, how in plan:
            how(gm, n, runs)
            cut.add(n)
    if cut:
        gm.graph.lint()
        gm.recompile()
    return bool(cut)


def _uses(groups: list[ChannelGroup]) -> tuple[dict, dict]:
    """{channel root: the ops reading it}, {channel root: the ops writing it}."""
    readers: dict[int, set] = defaultdict(set)
    writers: dict[int, set] = defaultdict(set)
    for g in groups:
        for u in g.consumers + g.add_sinks:
            for r in u.roots.tolist():
                readers[r].add(u.node)
        for u in g.producers:
            for r in u.roots.tolist():
                writers[r].add(u.node)
    return ({r: frozenset(v) for r, v in readers.items()}, {r: frozenset(v) for r, v in writers.items()})


def _runs(roots: np.ndarray, key: Callable) -> list[range]:
    """Positions cut into runs where a channel would repeat or the ops on the other side change."""
    runs: list[range] = []
    start, seen = 0, set()
    for i, r in enumerate(roots.tolist()):
        if i > start and (r in seen or key(r) != key(roots[i - 1].item())):
            runs.append(range(start, i))
            start, seen = i, set()
        seen.add(r)
    runs.append(range(start, len(roots)))
    return runs


def _plain(gm: fx.GraphModule, node: fx.Node) -> tuple | None:
    """(function, input, weight, bias, other positional args, (conv groups, output and input
    channels per group) or None) of a plain contraction, the weight and bias as module attribute
    names or graph values; None for anything else."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        bias = f"{node.target}.bias" if getattr(m, "bias", None) is not None else None
        if type(m) is nn.Linear:
            return F.linear, node.args[0], f"{node.target}.weight", bias, (), None
        if type(m) in (nn.Conv1d, nn.Conv2d, nn.Conv3d) and m.padding_mode == "zeros":
            rest = (m.stride, m.padding, m.dilation)
            grouped = (m.groups, m.out_channels // m.groups, m.in_channels // m.groups) if m.groups > 1 else None
            return _CONVS[m.weight.ndim - 2], node.args[0], f"{node.target}.weight", bias, rest, grouped
        return None
    if node.op == "call_function" and node.target in (F.linear, *_CONVS.values()) and not node.kwargs:
        rest = tuple(node.args[3:])
        if node.target is not F.linear and len(rest) > 3 and rest[3] != 1:
            return None  # a grouped conv: its rows are tied to input groups
        return node.target, node.args[0], node.args[1], node.args[2] if len(node.args) > 2 else None, rest, None
    return None


def _cuttable(gm: fx.GraphModule, node: fx.Node, runs: list[range], how: Callable) -> bool:
    """A plain contraction; a grouped conv only into runs of output channels of whole conv groups
    (each part then reads its groups' input channels)."""
    plain = _plain(gm, node)
    if plain is None or plain[5] is None:
        return plain is not None
    per_out = plain[5][1]
    return how is _cut_rows and all(r.start % per_out == 0 and r.stop % per_out == 0 for r in runs)


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


def _weight_nodes(graph: fx.Graph, weight, bias) -> tuple:
    return (graph.get_attr(weight) if isinstance(weight, str) else weight,
            graph.get_attr(bias) if isinstance(bias, str) else bias)


def _cut_rows(gm: fx.GraphModule, node: fx.Node, runs: list[range]) -> None:
    """One contraction per run of output channels; they replace the channel split that follows
    (a piece per run, or a split of the run), or are concatenated again."""
    fn, x, weight, bias, rest, grouped = _plain(gm, node)
    cdim = -1 if fn is F.linear else 1
    found = _split_of(node, gm, cdim)
    if found is not None:
        bounds = set(np.cumsum(found[1]).tolist())
        if any(r.stop not in bounds for r in runs):
            found = None
    graph = gm.graph
    with graph.inserting_before(node):
        weight, bias = _weight_nodes(graph, weight, bias)
        outs = []
        for r in runs:
            rows = slice(r.start, r.stop)
            w = graph.call_function(operator.getitem, (weight, rows))
            b = graph.call_function(operator.getitem, (bias, rows)) if bias is not None else None
            if grouped is None:
                y = graph.call_function(fn, (x, w, b, *rest))
            else:  # this run's conv groups, on their input channels
                _, per_out, per_in = grouped
                first, count = r.start // per_out, len(r) // per_out
                xs = graph.call_function(operator.getitem, (x, (slice(None), slice(first * per_in, (first + count) * per_in))))
                y = graph.call_function(fn, (xs, w, b, *rest, count))
            y.meta["moeify_name"] = node_name(node) if r.start == 0 else f"{node_name(node)}[{r.start}:{r.stop}]"
            outs.append(y)
        if found is None:
            node.replace_all_uses_with(graph.call_function(torch.cat, (outs,), {"dim": cdim}))
        else:
            _replace_split(graph, found[0], found[1], runs, outs)
    graph.erase_node(node)


def _replace_split(graph: fx.Graph, split: fx.Node, sizes: list[int], runs: list[range], outs: list[fx.Node]) -> None:
    """The split's pieces taken from the runs' outputs (a piece per run, or a split of a run)."""
    pieces: dict[int, fx.Node] = {}
    ends = np.cumsum(sizes).tolist()
    i = 0
    for r, y in zip(runs, outs):
        mine = []
        while i < len(sizes) and ends[i] <= r.stop:
            mine.append(i)
            i += 1
        if len(mine) == 1:
            pieces[mine[0]] = y
            continue
        sub = graph.call_function(torch.split, (y, [sizes[k] for k in mine]), {"dim": _split_dim(split)})
        for j, k in enumerate(mine):
            pieces[k] = graph.call_function(operator.getitem, (sub, j))
    for item in list(split.users):
        item.replace_all_uses_with(pieces[item.args[1]])
        graph.erase_node(item)
    graph.erase_node(split)


def _cut_columns(gm: fx.GraphModule, node: fx.Node, runs: list[range]) -> None:
    """One contraction per run of input channels, on those columns of the input and weight (the
    bias in the first), summed."""
    fn, x, weight, bias, rest, _ = _plain(gm, node)
    lead = (Ellipsis,) if fn is F.linear else (slice(None),)
    graph = gm.graph
    with graph.inserting_before(node):
        weight, bias = _weight_nodes(graph, weight, bias)
        total = None
        for k, r in enumerate(runs):
            cols = slice(r.start, r.stop)
            xs = graph.call_function(operator.getitem, (x, lead + (cols,)))
            ws = graph.call_function(operator.getitem, (weight, (slice(None), cols)))
            y = graph.call_function(fn, (xs, ws, bias if k == 0 else None, *rest))
            y.meta["moeify_name"] = node_name(node) if k == 0 else f"{node_name(node)}[:, {r.start}:{r.stop}]"
            if total is not None:
                y = graph.call_function(operator.add, (total, y))
                y.meta["moeify_parts"] = True
            total = y
    node.replace_all_uses_with(total)
    graph.erase_node(node)
