"""The interior of a channel group: the ops between its producers and its consumers / adds.

Sparse execution can keep a group's tensors *packed* (only the selected channels) when every
interior op is indifferent to which channels it sees (activations, pooling, dropout, products
within the group), or follows a route (BatchNorm, depthwise conv). Anything else (a shape query,
an op with per-channel parameters moeify does not route) keeps the group full width, and so does a
consumer reading the channels in another order (then no interior op follows the route either: it
runs in full on the gated channels, exact under every strategy).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx
import torch.nn.functional as F

from ..nn.channelwise import routable
from .groups import ChannelGroup, node_name
from .ops import Kind, classify


@dataclass
class Interior:
    """Interior nodes of one group in graph order, the modules among them that must follow the
    route, and why the group cannot be packed (None when it can)."""

    nodes: list[fx.Node] = field(default_factory=list)
    routed: list[fx.Node] = field(default_factory=list)
    blocker: str | None = None


def _tensor_meta(node: fx.Node):
    return node.meta.get("tensor_meta")


def _why_not(node: fx.Node, gm: fx.GraphModule, inside: set[fx.Node], channels: int) -> tuple[str | None, bool]:
    """(reason the node cannot see packed channels or None, whether it must follow the route)."""
    meta = _tensor_meta(node)
    info = classify(node, gm)
    if info.kind is Kind.SPLIT:
        return f"{node.name} splits the channels at fixed sizes", False
    if meta is None or not hasattr(meta, "shape"):
        return f"{node.name} reads the channel count", False
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if routable(m):
            if meta.shape[1] != channels:  # a depthwise conv on a piece or on copies of the channels
                return f"{node.target} sees {meta.shape[1]} channels, not the group's {channels}", False
            return None, True
        if info.kind is Kind.CHANNELWISE and next(m.parameters(recurse=True), None) is None:
            return None, False
        return f"{node.target} has per-channel state", False
    if info.kind is Kind.CHANNELWISE:
        return (f"{node.name} is a functional batch norm", False) if node.target is F.batch_norm else (None, False)
    if info.kind is Kind.ADD and node.meta.get("moeify_parts"):
        return None, False  # the parts of one cut layer summed: both operands are the group's
    if info.kind in (Kind.REDUCE,):
        return None, False
    if info.kind is Kind.RESHAPE and len(meta.shape) == 2:
        return None, False
    if info.kind is Kind.MUL:
        for a in list(node.args) + list(node.kwargs.values()):
            if isinstance(a, fx.Node) and a not in inside:
                m = _tensor_meta(a)
                if m is not None and hasattr(m, "shape") and len(m.shape) > 1 and m.shape[1] != 1:
                    return f"{node.name} multiplies by a tensor outside the group", False
        return None, False
    return f"{node.name} ({info.what}) needs every channel", False


def interior(group: ChannelGroup, gm: fx.GraphModule) -> Interior:
    """Walk forward from the producers, stopping at consumers and add sinks."""
    stops = {u.node for u in group.consumers} | {u.node for u in group.add_sinks}
    inside = {u.node for u in group.producers}
    found: set[fx.Node] = set()
    frontier = list(inside)
    while frontier:
        n = frontier.pop()
        for user in n.users:
            if user in stops or user in inside:
                continue
            inside.add(user)
            found.add(user)
            frontier.append(user)
    out = Interior()
    reordered = group.reordered()
    if reordered:  # between a reordering and its consumer a routed op would see the channels out of order
        out.blocker = f"{node_name(reordered[0].node)} reads the channels in another order"
    for node in gm.graph.nodes:
        if node in found:
            out.nodes.append(node)
            why, routed = _why_not(node, gm, inside, group.channels)
            if routed and not reordered:
                out.routed.append(node)
            if why and out.blocker is None:
                out.blocker = why
    return out
