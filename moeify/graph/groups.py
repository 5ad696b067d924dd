"""Channel-coupling groups over a traced graph (in the spirit of Torch-Pruning's dependency graph).

Every channel of every tensor gets an id; channel-wise ops pass ids through, element-wise products
unite them, cat/split/slice/permute/reshape map them by index (a reshape may also factor the channel
dim into several dims, and a stack of branches adds one: ``Factored`` ids, until a reduction or a
reshape merges them again; a softmax or reduction over such a dim unites the ids along it),
contractions (conv, linear) consume them and create new ones, and barriers swallow them. A
residual add starts a new "stream" id space and records each operand as an add sink, so a residual
branch and the stream it joins stay apart.
A group is a connected set of ids; it records its producers, consumers, add sinks, and anything that
would make gating its channels inexact (barriers, the model output, mixing through cat or split).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch.fx as fx
from torch.fx.passes.shape_prop import TensorMetadata

from .ops import OpInfo, classify

INPUT = "model input"


@dataclass
class Chan:
    """The channel ids of one tensor and the dim they live on."""

    ids: np.ndarray
    cdim: int


@dataclass
class Factored:
    """Channel ids spread over several dims of one tensor: ``ids`` has one axis per entry of
    ``dims`` (``ids[i, j]`` is the channel at index i on dims[0] and j on dims[1]). Made by a
    reshape that factors the channel dim (``view(B, radix, C, H, W)``, a channel shuffle's first
    step) or a stack of branches; any op without a rule for it is a barrier."""

    ids: np.ndarray
    dims: tuple[int, ...]


@dataclass
class Use:
    """One op touching a group: a producer, a consumer or an add sink."""

    node: fx.Node
    roots: np.ndarray
    info: OpInfo | None = None
    operand: fx.Node | None = None  # add sinks: the operand node carrying the group into the add
    cdim: int = 1  # add sinks: the operand's channel dim


@dataclass
class ChannelGroup:
    """A set of coupled channels and every op that produces, consumes or blocks them."""

    producers: list[Use] = field(default_factory=list)
    consumers: list[Use] = field(default_factory=list)
    add_sinks: list[Use] = field(default_factory=list)
    barriers: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)  # opaque origins: model input, barrier outputs, adds
    reads_input: bool = False  # the primary producer reads the model input directly (a stem conv)

    @property
    def primary(self) -> Use:
        return self.producers[0]

    @property
    def channels(self) -> int:
        return len(self.primary.roots)

    @property
    def is_stream(self) -> bool:
        return any(s.startswith("residual stream") for s in self.sources)

    def only_order_blocks(self) -> bool:
        """Whether nothing but the order of its channels at some use (repeated, or mixed with other
        groups' channels) keeps this group from being gated: no barrier, no opaque source."""
        return not self.barriers and all(s.startswith("residual stream") for s in self.sources)

    def blockers(self) -> list[str]:
        """Reasons this group's channels cannot be gated exactly, whatever the scope."""
        out = [s for s in self.sources if not s.startswith("residual stream")]
        out += self.barriers
        canon = self.primary.roots
        if len(np.unique(canon)) != len(canon):
            out.append(f"{node_name(self.primary.node)} repeats channels of one group")
            return out
        for role, uses in (("producer", self.producers), ("consumer", self.consumers), ("add", self.add_sinks)):
            for u in uses:
                reordered = self.reorder(u) is not None
                if np.array_equal(u.roots, canon) or (reordered and role == "consumer"):
                    continue  # a consumer reading them in another order runs in full behind the gate
                if reordered:
                    out.append(f"{role} {node_name(u.node)} reads the channels in another order (a channel shuffle "
                               "or permutation): experts would not be contiguous on both sides")
                else:
                    out.append(f"channels are mixed with others (cat/split/slice) at {role} {node_name(u.node)}")
        return out

    def reorder(self, u: Use) -> tuple[int, ...] | None:
        """For a use that reads every channel once in another order (after a channel shuffle):
        the primary producer's position of each channel it reads; None otherwise (also when the
        order is the same)."""
        canon = self.primary.roots
        if len(u.roots) != len(canon) or np.array_equal(u.roots, canon) or \
                not np.array_equal(np.sort(u.roots), np.sort(canon)):
            return None
        sorter = np.argsort(canon)
        return tuple(sorter[np.searchsorted(canon, u.roots, sorter=sorter)].tolist())

    def reordered(self) -> list[Use]:
        """Consumers reading the channels in another order: they run in full behind the layer's
        gate, reordered like their input (contiguous experts cannot exist on both sides)."""
        return [u for u in self.consumers if self.reorder(u) is not None]


def node_name(node: fx.Node) -> str:
    """Qualified name of the original layer behind a node: the module path, the name a pass gave a
    part of a layer (``node.meta["moeify_name"]``, cuts.py), else the node's own name."""
    if "moeify_name" in node.meta:
        return node.meta["moeify_name"]
    return str(node.target) if node.op == "call_module" else node.name


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def new(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, i: int) -> int:
        p = self.parent
        root = i
        while p[root] != root:
            root = p[root]
        while p[i] != root:
            p[i], i = root, p[i]
        return root

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist()):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[max(rx, ry)] = min(rx, ry)

    def flat(self) -> np.ndarray:
        """Every id's root, as an array (pointer jumping until each points at its root)."""
        p = np.asarray(self.parent, dtype=np.int64)
        while True:
            q = p[p]
            if np.array_equal(q, p):
                return p
            p = q


def _shape(meta) -> tuple[int, ...] | None:
    return tuple(meta.shape) if hasattr(meta, "shape") else None


def _out_shapes(node: fx.Node):
    meta = node.meta.get("tensor_meta")
    if meta is None:
        return None
    if isinstance(meta, TensorMetadata):
        return _shape(meta)
    if isinstance(meta, (tuple, list)):
        return [_shape(m) for m in meta]
    return _shape(meta)


class _Analysis:
    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.uf = _UnionFind()
        self.state: dict[fx.Node, object] = {}
        self.producers: list[tuple[fx.Node, np.ndarray, OpInfo]] = []
        self.consumers: list[tuple[fx.Node, np.ndarray, OpInfo]] = []
        self.add_sinks: list[tuple[fx.Node, Chan, fx.Node]] = []
        self.barriers: list[tuple[np.ndarray, str]] = []
        self.sources: list[tuple[np.ndarray, str]] = []

    # --- helpers -------------------------------------------------------------------------------
    def opaque(self, shape, why: str, like: "Chan | None" = None):
        """Fresh ids nobody can gate; channels stay on ``like``'s dim when the shape allows."""
        if shape is None:
            return None
        if isinstance(shape, list):
            return [self.opaque(s, why) for s in shape]
        cdim = 1 if len(shape) >= 2 else 0
        if like is not None and like.cdim < len(shape) and shape[like.cdim] == len(like.ids):
            cdim = like.cdim
        ids = self.uf.new(shape[cdim] if shape else 1)
        self.sources.append((ids, why))
        return Chan(ids, cdim)

    def sink(self, value, why: str) -> None:
        if isinstance(value, (Chan, Factored)):
            self.barriers.append((value.ids.ravel(), why))
        elif isinstance(value, list):
            for v in value:
                self.sink(v, why)

    def unite_along(self, f: Factored, axis: int) -> np.ndarray:
        """Unite ``f``'s ids along ``axis`` (an op mixes them: softmax, sum); returns the ids with
        that axis dropped."""
        first = np.take(f.ids, 0, axis=axis)
        for k in range(1, f.ids.shape[axis]):
            self.uf.union(first.ravel(), np.take(f.ids, k, axis=axis).ravel())
        return first

    def arg_state(self, a):
        if isinstance(a, fx.Node):
            return self.state.get(a)
        if isinstance(a, (list, tuple)):
            return [self.arg_state(x) for x in a]
        return None

    def barrier(self, node: fx.Node, what: str, shape):
        why = f"channels reach {what} ({node.name})"
        for a in list(node.args) + list(node.kwargs.values()):
            self.sink(self.arg_state(a), why)
        first = self._first(node)
        return self.opaque(shape, f"output of {what} ({node.name})", first if isinstance(first, Chan) else None)

    # --- the pass ------------------------------------------------------------------------------
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            shape = _out_shapes(node)
            if node.op == "placeholder":
                self.state[node] = self.opaque(shape, INPUT) if isinstance(shape, tuple) else None
            elif node.op == "get_attr":
                self.state[node] = None
            elif node.op == "output":
                self.sink(self.arg_state(node.args[0]), "channels reach the model output")
            else:
                self.state[node] = self.call(node, shape)

    def call(self, node: fx.Node, shape):
        info = classify(node, self.gm)
        if shape is None:  # a non-tensor result (x.size(), x.dim()): nothing flows through it
            return None
        return getattr(self, f"_{info.kind.value}")(node, info, shape)

    def _first(self, node: fx.Node):
        a = node.args[0] if node.args else None
        return self.state.get(a) if isinstance(a, fx.Node) else None

    def _sink_rest(self, node: fx.Node, what: str, skip: int = 1) -> None:
        for a in list(node.args[skip:]) + list(node.kwargs.values()):
            self.sink(self.arg_state(a), f"channels reach {what} ({node.name}) as a non-data operand")

    def _contract(self, node, info: OpInfo, shape):
        x = self._first(node)
        if not isinstance(shape, tuple):
            return self.barrier(node, info.what, shape)
        nd = len(shape)
        cdim = info.cdim_in % nd
        if x is not None and (not isinstance(x, Chan) or x.cdim != cdim):
            # the tracked channels are on another dim (tokens of a transformer, after a barrier):
            # they end here, but the layer still makes new channels on its own dim
            self.sink(x, f"channels reach {info.what} over a non-channel dim ({node.name})")
            x = None
        self._sink_rest(node, info.what)
        if x is not None:
            self.consumers.append((node, x.ids, info))
        ids = self.uf.new(shape[cdim])
        self.producers.append((node, ids, info))
        return Chan(ids, cdim)

    def _channelwise(self, node, info: OpInfo, shape):
        x = self._first(node)
        if isinstance(x, Factored) and info.cdim_in is None and isinstance(shape, tuple) \
                and all(shape[d] == n for d, n in zip(x.dims, x.ids.shape)):
            self._sink_rest(node, info.what)
            return x
        if x is None:
            return self.barrier(node, info.what, shape) if any(
                self.arg_state(a) is not None for a in node.args) else None
        if not isinstance(x, Chan) or not isinstance(shape, tuple):
            return self.barrier(node, info.what, shape)
        if info.cdim_in is not None and x.cdim != info.cdim_in % len(shape):
            return self.barrier(node, f"{info.what} with channels on dim {x.cdim}", shape)
        self._sink_rest(node, info.what)
        if len(shape) > x.cdim and shape[x.cdim] == len(x.ids):
            return Chan(x.ids, x.cdim)
        return self.barrier(node, f"{info.what} that changes the channel count", shape)

    def _binary(self, node, info: OpInfo, shape, is_add: bool):
        args = list(node.args[:2]) + [v for k, v in node.kwargs.items() if k == "other"]
        states = [self.arg_state(a) for a in args]
        self._sink_rest(node, info.what, skip=2)
        factored = [s for s in states if isinstance(s, Factored)]
        if factored and not is_add and len(factored) == 2 and all(isinstance(s, Factored) or s is None for s in states) \
                and factored[0].dims == factored[1].dims and factored[0].ids.shape == factored[1].ids.shape:
            self.uf.union(factored[0].ids.ravel(), factored[1].ids.ravel())  # a product within the channels
            return Factored(factored[0].ids, factored[0].dims)
        if len(factored) == 1 and all(s is None or s is factored[0] for s in states):
            return factored[0]  # with a constant or an untracked tensor
        live = [(a, s) for a, s in zip(args, states) if isinstance(s, Chan)]
        if any(s is not None and not isinstance(s, Chan) for s in states) or not isinstance(shape, tuple):
            return self.barrier(node, info.what, shape)
        if len(live) == 0:
            return None
        if len(live) == 1:
            return Chan(live[0][1].ids, live[0][1].cdim)
        (a, sa), (b, sb) = live
        if sa.cdim != sb.cdim or shape[sa.cdim] != max(len(sa.ids), len(sb.ids)):
            return self.barrier(node, info.what, shape)
        if len(sa.ids) != len(sb.ids):  # one operand broadcasts over channels (e.g. a spatial map)
            wide, narrow = (sa, sb) if len(sa.ids) > len(sb.ids) else (sb, sa)
            self.sink(narrow, f"channels broadcast across all channels by {info.what} ({node.name})")
            return Chan(wide.ids, wide.cdim)
        if is_add:
            for arg, s in ((a, sa), (b, sb)):
                self.add_sinks.append((node, s, arg))
            ids = self.uf.new(shape[sa.cdim])
            self.sources.append((ids, f"residual stream (joined at {node.name})"))
            return Chan(ids, sa.cdim)
        self.uf.union(sa.ids, sb.ids)
        return Chan(sa.ids, sa.cdim)

    def _add(self, node, info, shape):
        # partial contractions summed into one layer's output (cuts.py) share their channels
        return self._binary(node, info, shape, is_add=not node.meta.get("moeify_parts"))

    def _mul(self, node, info, shape):
        return self._binary(node, info, shape, is_add=False)

    def _cat(self, node, info, shape):
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        states = [self.arg_state(t) for t in tensors]
        if not isinstance(shape, tuple) or not states or not all(isinstance(s, Chan) for s in states):
            return self.barrier(node, info.what, shape)
        cdim = states[0].cdim
        if any(s.cdim != cdim for s in states):
            return self.barrier(node, info.what, shape)
        if dim % len(shape) == cdim:
            return Chan(np.concatenate([s.ids for s in states]), cdim)
        for s in states[1:]:
            if len(s.ids) != len(states[0].ids):
                return self.barrier(node, info.what, shape)
            self.uf.union(states[0].ids, s.ids)
        return Chan(states[0].ids, cdim)

    def _split(self, node, info, shape):
        x = self._first(node)
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        if not isinstance(x, Chan) or not isinstance(shape, list) or not isinstance(dim, int):
            return self.barrier(node, info.what, shape)
        if dim % (len(shape[0])) != x.cdim:
            return [Chan(x.ids, x.cdim) for _ in shape]
        out, start = [], 0
        for s in shape:
            n = s[x.cdim]
            out.append(Chan(x.ids[start:start + n], x.cdim))
            start += n
        return out

    def _getitem(self, node, info, shape):
        base = self.arg_state(node.args[0])
        idx = node.args[1]
        if isinstance(base, list):
            return base[idx] if isinstance(idx, int) else self.barrier(node, info.what, shape)
        if not isinstance(base, Chan) or not isinstance(shape, tuple):
            return self.barrier(node, "indexing", shape)
        idx = idx if isinstance(idx, tuple) else (idx,)
        in_nd = len(self.state_shape(node.args[0]))
        if any(not (isinstance(i, slice) or i is Ellipsis) for i in idx) or list(idx).count(Ellipsis) > 1:
            return self.barrier(node, "indexing", shape)
        if Ellipsis in idx:
            k = idx.index(Ellipsis)
            idx = idx[:k] + (slice(None),) * (in_nd - len(idx) + 1) + idx[k + 1:]
        if len(idx) > base.cdim:
            s = idx[base.cdim]
            if any(not isinstance(v, (int, type(None))) for v in (s.start, s.stop, s.step)):
                return self.barrier(node, "indexing", shape)
            return Chan(base.ids[s], base.cdim)
        return Chan(base.ids, base.cdim)

    @staticmethod
    def state_shape(n: fx.Node):
        return _out_shapes(n)

    def _permute(self, node, info, shape):
        x = self._first(node)
        dims = node.args[1:] if len(node.args) > 1 else (node.kwargs.get("dims"),)
        if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = dims[0]
        if not isinstance(x, (Chan, Factored)) or not isinstance(shape, tuple) or not all(isinstance(d, int) for d in dims):
            return self.barrier(node, info.what, shape)
        dims = [d % len(shape) for d in dims]
        return self._moved(x, dims)

    def _transpose(self, node, info, shape):
        x = self._first(node)
        a, b = (node.args[1:3] if len(node.args) >= 3 else (node.kwargs.get("dim0"), node.kwargs.get("dim1")))
        if not isinstance(x, (Chan, Factored)) or not isinstance(shape, tuple) or not isinstance(a, int) \
                or not isinstance(b, int):
            return self.barrier(node, info.what, shape)
        order = list(range(len(shape)))
        a, b = a % len(shape), b % len(shape)
        order[a], order[b] = order[b], order[a]
        return self._moved(x, order)

    @staticmethod
    def _moved(x, order: list[int]):
        """``x``'s channels after the dims are reordered: output dim i is input dim order[i]."""
        if isinstance(x, Chan):
            return Chan(x.ids, order.index(x.cdim))
        return Factored(x.ids, tuple(order.index(d) for d in x.dims))

    def _reshape(self, node, info, shape):
        x = self._first(node)
        src = self.state_shape(node.args[0]) if isinstance(node.args[0], fx.Node) else None
        if not isinstance(x, (Chan, Factored)) or not isinstance(shape, tuple) or not isinstance(src, tuple):
            return self.barrier(node, info.what, shape)
        if isinstance(x, Chan):
            c = x.cdim
            if shape[0] == src[0] and len(shape) > c and shape[:c + 1] == src[:c + 1]:
                return Chan(x.ids, c)  # everything up to and including channels is unchanged
            tail = len(src) - c
            if shape[0] == src[0] and len(shape) >= tail and shape[len(shape) - tail:] == src[c:] and c > 0:
                return Chan(x.ids, len(shape) - tail)  # channels and everything after them unchanged
        out = _reindexed(x, src, shape)
        if out is not None:
            return out
        self.sink(x, f"channels reach a reshape that mixes them with other dims ({node.name}: "
                     f"{list(src)} -> {list(shape)})")
        return self.opaque(shape, f"output of reshape ({node.name})")

    def _reduce(self, node, info, shape):
        x = self._first(node)
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        src = self.state_shape(node.args[0])
        if not isinstance(x, (Chan, Factored)) or dims is None or not isinstance(shape, tuple):
            return self.barrier(node, f"{info.what} over all dims", shape)
        dims = [dims] if isinstance(dims, int) else list(dims)
        dims = [d % len(src) for d in dims]

        def moved(d: int) -> int:
            return d if keep else d - sum(r < d for r in dims)
        if isinstance(x, Chan):
            if x.cdim in dims:
                return self.barrier(node, f"{info.what} over channels", shape)
            return Chan(x.ids, moved(x.cdim))
        if all(d in dims for d in x.dims):
            return self.barrier(node, f"{info.what} over every channel dim", shape)
        ids, left = x.ids, list(x.dims)
        for d in [d for d in x.dims if d in dims]:  # a sum over branches: their channels go together
            ids = self.unite_along(Factored(ids, tuple(left)), left.index(d))
            left.remove(d)
        return _channels(ids, tuple(moved(d) for d in left))

    def _softmax(self, node, info, shape):
        x = self._first(node)
        dim = info.module.dim if info.module is not None else (
            node.args[1] if len(node.args) > 1 else node.kwargs.get("dim"))
        if not isinstance(x, (Chan, Factored)) or not isinstance(dim, int) or not isinstance(shape, tuple):
            return self.barrier(node, info.what, shape)
        dim %= len(shape)
        if isinstance(x, Chan):
            return self.barrier(node, f"{info.what} over channels", shape) if dim == x.cdim else Chan(x.ids, x.cdim)
        if dim in x.dims:  # normalised over one factor: the ids along it go together
            self.unite_along(x, x.dims.index(dim))
        return Factored(x.ids, x.dims)

    def _stack(self, node, info, shape):
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        states = [self.arg_state(t) for t in tensors]
        if not isinstance(shape, tuple) or not states or not all(isinstance(s, Chan) for s in states) \
                or len({(s.cdim, len(s.ids)) for s in states}) != 1:
            return self.barrier(node, info.what, shape)
        dim %= len(shape)
        cdim = states[0].cdim + (dim <= states[0].cdim)
        return Factored(np.stack([s.ids for s in states]), (dim, cdim))

    def _barrier(self, node, info, shape):
        return self.barrier(node, info.what, shape)

    # --- groups --------------------------------------------------------------------------------
    def groups(self) -> list[ChannelGroup]:
        root = self.uf.flat()
        find = root.__getitem__  # ids -> their roots, vectorised
        # channels that any single op touches together form one group (a second union over roots)
        events = ([ids for _, ids, _ in self.producers] + [ids for _, ids, _ in self.consumers]
                  + [c.ids for _, c, _ in self.add_sinks] + [ids for ids, _ in self.barriers]
                  + [ids for ids, _ in self.sources])
        touched = [np.unique(find(ids)) for ids in events]
        none = [np.zeros(0, np.int64)]
        block = _components(len(root), np.concatenate(none + [r[:-1] for r in touched]),
                            np.concatenate(none + [r[1:] for r in touched]))
        by_root: dict[int, ChannelGroup] = {}

        def group_of(roots: np.ndarray) -> list[ChannelGroup]:
            keys = np.unique(block[roots]).tolist()
            return [by_root.setdefault(k, ChannelGroup()) for k in keys]

        for node, ids, info in self.producers:
            r = find(ids)
            for g in group_of(r):
                g.producers.append(Use(node, r, info))
        for node, ids, info in self.consumers:
            r = find(ids)
            for g in group_of(r):
                g.consumers.append(Use(node, r, info))
        for node, chan, operand in self.add_sinks:
            r = find(chan.ids)
            for g in group_of(r):
                g.add_sinks.append(Use(node, r, operand=operand, cdim=chan.cdim))
        for ids, why in self.barriers:
            for g in group_of(find(ids)):
                if why not in g.barriers:
                    g.barriers.append(why)
        input_roots: set[int] = set()
        for ids, why in self.sources:
            r = find(ids)
            if why == INPUT:
                input_roots.update(r.tolist())
            for g in group_of(r):
                if why not in g.sources:
                    g.sources.append(why)
        out = [g for g in by_root.values() if g.producers]
        for g in out:
            x = self.state.get(g.primary.node.args[0]) if g.primary.node.args else None
            g.reads_input = isinstance(x, Chan) and bool(set(find(x.ids).tolist()) & input_roots)
        order = {n: i for i, n in enumerate(self.gm.graph.nodes)}
        out.sort(key=lambda g: order[g.primary.node])
        return out


def _channels(ids: np.ndarray, dims: tuple[int, ...]) -> Chan | Factored:
    """Channels on one dim (``Chan``) or factored over several (``Factored``)."""
    return Chan(ids, dims[0]) if len(dims) == 1 else Factored(ids, dims)


def _element_ids(x: Chan | Factored, shape: tuple[int, ...]) -> np.ndarray:
    """The channel id of every element of one sample of a tensor of ``shape`` (batch first)."""
    dims, ids = ((x.cdim,), x.ids) if isinstance(x, Chan) else (x.dims, x.ids)
    view = [1] * (len(shape) - 1)
    for d, n in zip(dims, ids.shape):
        view[d - 1] = n
    return np.broadcast_to(ids.transpose(np.argsort(dims)).reshape(view), shape[1:])


def _reindexed(x: Chan | Factored, src: tuple[int, ...], shape: tuple[int, ...]) -> Chan | Factored | None:
    """Channel ids after a reshape that only re-indexes channels (factors the channel dim into
    several dims, or merges such factors back): followed element by element, so any such reshape
    is mapped exactly. None when the reshape mixes channels with other dims or the batch (an
    output channel position would hold several channels, or one channel several positions)."""
    dims = (x.cdim,) if isinstance(x, Chan) else x.dims
    if 0 in dims or shape[0] != src[0] or int(np.prod(src[1:])) > 1 << 22:
        return None  # channels moved onto the batch dim (attention's qkv), or too large to follow
    e = _element_ids(x, src).reshape(shape[1:])
    varying = [a for a in range(e.ndim) if e.shape[a] > 1 and np.ptp(e, axis=a).any()]
    if not varying:
        return None
    ids = np.ascontiguousarray(e[tuple(slice(None) if a in varying else 0 for a in range(e.ndim))])
    if ids.size != x.ids.size or len(np.unique(ids)) != ids.size:
        return None
    return _channels(ids, tuple(a + 1 for a in varying))


def _components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected components of ids 0..n-1 joined by the edges (a[i], b[i]): each id's smallest
    member, vectorised (hook every edge's larger root onto its smaller one, compress, repeat)."""
    lab = np.arange(n, dtype=np.int64)
    while True:
        la, lb = lab[a], lab[b]
        differ = la != lb
        if not differ.any():
            return lab
        np.minimum.at(lab, np.maximum(la, lb)[differ], np.minimum(la, lb)[differ])
        while True:
            nxt = lab[lab]
            if np.array_equal(nxt, lab):
                break
            lab = nxt


def analyze(gm: fx.GraphModule) -> list[ChannelGroup]:
    """Channel-coupling groups of a shape-annotated graph, in the order of their first producer."""
    a = _Analysis(gm)
    a.run()
    return a.groups()
