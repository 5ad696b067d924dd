"""Moving channels between full-width tensors and packed ones ([B, K * C/N, ...], see route.py).

Selections of adjacent experts are views (``narrow``); others are gathers. Writes keep the
memory format (channels_last stays channels_last). Also here: splitting a batch into routing
groups and merging it back (``split_rows`` / ``merge_rows``, one gradient tensor per call), and
the bounded cache of parameter slices used under inference.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TypeVar

import torch

from .route import Route

T = TypeVar("T")


def runs(experts: list[int]) -> bool:
    """True when the selected experts are adjacent, so their channels are one slice (a view)."""
    return experts == list(range(experts[0], experts[0] + len(experts)))


def _runs(experts: list[int]) -> list[tuple[int, int]]:
    """(first expert, count) of each run of adjacent experts, in order."""
    out: list[tuple[int, int]] = []
    for e in experts:
        if out and out[-1][0] + out[-1][1] == e:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((e, 1))
    return out


_CHANNELS: dict[tuple[tuple[int, ...], int, torch.device], torch.Tensor] = {}
"""Index tensors made by ``expert_channels``, per (experts, channels per expert, device): a
selection's index is a constant, made once instead of in five ops per use."""


def expert_channels(experts: list[int], per: int, device: torch.device) -> torch.Tensor:
    """Channel indices of ``experts``' contiguous blocks, in order."""
    if torch.compiler.is_compiling():  # a traced constant, never kept outside the graph
        return _channels(experts, per, device)
    key = (tuple(experts), per, torch.device(device))
    idx = _CHANNELS.get(key)
    if idx is None:
        with torch.inference_mode(False):  # usable outside inference mode too (autograd saves indices)
            idx = _CHANNELS[key] = _channels(experts, per, device)
    return idx


def _channels(experts: list[int], per: int, device: torch.device) -> torch.Tensor:
    idx = torch.tensor(experts, device=device)
    return (idx[:, None] * per + torch.arange(per, device=device)).reshape(-1)


def take(t: torch.Tensor, dim: int, experts: list[int], per: int) -> torch.Tensor:
    """The selected experts' channels of ``t`` along ``dim``: a view when they are adjacent."""
    if runs(experts):
        return t.narrow(dim, experts[0] * per, len(experts) * per)
    return t.index_select(dim, expert_channels(experts, per, t.device))


_SLICES: dict[int, tuple[list, dict]] = {}
"""id(first owner) -> (weak references to the owners' storages, {key: derived value}); dropped
when the owner is freed, emptied when any owner's storage changes (``module.to(device)``,
``param.data = ...``), so a value is never served for memory it was not made from."""
CACHE_BUDGET = 4.0
"""Copies kept per tensor, in multiples of its own size (at least 1 MiB): least recently used
out. Enough for every selection of 2 or 4 experts; with 8 experts (70 top-4 selections) a
layer whose routes keep changing re-slices its weights instead of holding 35 copies of them."""
CACHE_FLOOR = 2 ** 20  # bytes a small tensor (BatchNorm parameters) may always keep


def _nbytes(value) -> int:
    items = value if isinstance(value, tuple) else (value,)
    return sum(t.numel() * t.element_size() for t in items if isinstance(t, torch.Tensor) and t._base is None)


def _same_storages(refs: list, owners: tuple[torch.Tensor, ...]) -> bool:
    """Whether each owner still holds the storage its weak reference names (a plain loop: this
    runs for every cached lookup, several per layer and call)."""
    if len(refs) != len(owners):
        return False
    for ref, t in zip(refs, owners):
        if ref() is not t.untyped_storage():
            return False
    return True


_KEPT: dict[int, tuple[weakref.ref, list[int]]] = {}
"""id -> (weak reference, [uses]) of each tensor ``cached`` made: values the cache replaces rather
than writes to, so a form derived from one (``onednn``) may be kept with it (a view of a
parameter changes with it; its version counter says when)."""


def _mark_kept(value) -> None:
    for t in value if isinstance(value, tuple) else (value,):
        if isinstance(t, torch.Tensor) and _kept_entry(t) is None:
            _KEPT[id(t)] = (weakref.ref(t, lambda _, i=id(t): _KEPT.pop(i, None)), [0])


def _kept_entry(t: torch.Tensor) -> list[int] | None:
    hit = _KEPT.get(id(t))
    return hit[1] if hit is not None and hit[0]() is t else None


def is_kept(t: torch.Tensor) -> bool:
    """Whether ``t`` is a value ``cached`` made (a weight slice, a computed weight)."""
    return _kept_entry(t) is not None


def count_use(t: torch.Tensor) -> int:
    """One more use of the kept tensor ``t``: how many so far (0 for a tensor that is not kept)."""
    uses = _kept_entry(t)
    if uses is None:
        return 0
    uses[0] += 1
    return uses[0]


def cached(owners: torch.Tensor | tuple[torch.Tensor, ...], key: tuple, make: Callable[[], T]) -> T:
    """``make()``, kept with ``owners`` (a tensor or several) under ``key`` (which must name the
    versions it depends on), so an op under no_grad or inference does not slice or copy the same
    parameters on every call. Valid while every owner keeps its storage. Views of the owners cost
    no memory; copies count against ``CACHE_BUDGET``."""
    if not isinstance(owners, tuple):
        owners = (owners,)
    first = owners[0]
    entry = _SLICES.get(id(first))
    if entry is None:
        weakref.finalize(first, _SLICES.pop, id(first), None)
    if entry is None or not _same_storages(entry[0], owners):
        entry = _SLICES[id(first)] = ([weakref.ref(t.untyped_storage()) for t in owners], {})
    cache = entry[1]
    hit = cache.pop(key, None)
    if hit is None:
        with torch.no_grad():
            hit = make()
        _mark_kept(hit)
        _trim(cache, _budget(first) - _nbytes(hit), lambda v: v)
    cache[key] = hit
    return hit


def peek(owner: torch.Tensor, key: tuple):
    """What ``cached`` holds for the single ``owner`` under ``key``, or None; makes nothing."""
    entry = _SLICES.get(id(owner))
    if entry is None or not _same_storages(entry[0], (owner,)):
        return None
    return entry[1].get(key)


def _budget(t: torch.Tensor) -> float:
    """Bytes of copies kept for owner ``t``: ``CACHE_BUDGET`` times its size, at least ``CACHE_FLOOR``."""
    return max(CACHE_BUDGET * t.numel() * t.element_size(), CACHE_FLOOR)


def _trim(store: dict, budget: float, value: Callable) -> None:
    """Drop ``store``'s oldest entries until the copies in the rest fit in ``budget`` bytes."""
    total = sum(_nbytes(value(v)) for v in store.values())
    while store and total > budget:
        total -= _nbytes(value(store.pop(next(iter(store)))))


def remember(module: torch.nn.Module, key: str, value: T) -> T:
    """``value``, kept in ``module.__dict__[key]`` for the module's later calls; not while
    compiling, where dynamo would replay the store, remaking the value, after every call of the
    compiled graph (a compiled call reads what an eager call kept, or makes its own)."""
    if not torch.compiler.is_compiling():
        module.__dict__[key] = value
    return value


def kept(store: dict, key, owners: tuple[torch.Tensor, ...], make: Callable[[], T]) -> T:
    """``make()``, kept in ``store`` (a dict its caller owns: a layer's, a Kernel's) under ``key``
    while every owner keeps its version and storage: the one-selection lane's lookup (a dict read
    and a check per owner, where ``cached`` also finds the owner's table and keys versions). Copies
    count against ``CACHE_BUDGET``, as there."""
    hit = store.get(key)
    if hit is not None:
        value, stamp = hit
        for t, (version, storage) in zip(owners, stamp):
            if t._version != version or storage() is not t.untyped_storage():
                break
        else:
            return value
        del store[key]
    value = make()
    try:
        stamp = tuple((t._version, weakref.ref(t.untyped_storage())) for t in owners)
    except RuntimeError:  # an inference tensor has no version counter to check a kept value against
        return value
    _trim(store, _budget(owners[0]) - _nbytes(value), lambda v: v[0])
    store[key] = value, stamp
    return value


def weight_slice(w: torch.Tensor, in_sel: list[int] | None, per_in: int, out_sel: list[int] | None,
                 per_out: int) -> torch.Tensor:
    """Weight [out, in, ...] restricted to the selected experts' input and/or output channels.

    With autograd on, differentiable views/gathers. Under no_grad or inference the selection is
    made once, contiguous in the weight's memory format, and kept with the weight (until it
    changes), so a conv neither copies nor re-slices its weights on every call.
    """
    def slice_() -> torch.Tensor:
        t = w if in_sel is None else take(w, 1, in_sel, per_in)
        return t if out_sel is None else take(t, 0, out_sel, per_out)

    if (torch.is_grad_enabled() and w.requires_grad) or torch.compiler.is_compiling():
        return slice_()  # autograd needs the view; a compiled graph plans its own copies
    key = (w._version, None if in_sel is None else tuple(in_sel), None if out_sel is None else tuple(out_sel))
    return cached(w, key, lambda: _slice_copy(w, in_sel, per_in, out_sel, per_out))


class _WeightSlices(torch.autograd.Function):
    """One weight's selections for several routing patterns, each a contiguous copy. Backward adds
    every selection's gradient into one full-size gradient (autograd's slices would make a
    zero-filled full-size gradient per selection and sum them)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, sels: tuple) -> tuple[torch.Tensor, ...]:
        ctx.sels, ctx.like = sels, (w.shape, w.dtype, w.device, memory_format(w))
        return tuple(_slice_copy(w, *sel) for sel in sels)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads: torch.Tensor):
        shape, dtype, device, fmt = ctx.like
        out = torch.zeros(shape, dtype=dtype, device=device).contiguous(memory_format=fmt)
        for (in_sel, per_in, out_sel, per_out), g in zip(ctx.sels, grads):
            if g is None:
                continue
            o_pos = 0
            for o_start, o_len in _spans(out_sel, per_out, shape[0]):
                i_pos = 0
                for i_start, i_len in _spans(in_sel, per_in, shape[1]):
                    out[o_start:o_start + o_len, i_start:i_start + i_len] += \
                        g[o_pos:o_pos + o_len, i_pos:i_pos + i_len]
                    i_pos += i_len
                o_pos += o_len
        return out, None


def _spans(sel: list[int] | None, per: int, size: int) -> list[tuple[int, int]]:
    """(first channel, count) of each run of a selection's channels, in selection order."""
    return [(0, size)] if sel is None else [(e * per, n * per) for e, n in _runs(sel)]


def weight_slices(w: torch.Tensor, sels: list[tuple[list[int] | None, int, list[int] | None, int]]
                  ) -> list[torch.Tensor]:
    """``weight_slice(w, *sel)`` for each of several selections (one per routing pattern); under
    autograd, as one op whose backward writes one full-size gradient."""
    if torch.is_grad_enabled() and w.requires_grad and not torch.compiler.is_compiling() and len(sels) > 1:
        return list(_WeightSlices.apply(w, tuple(sels)))
    return [weight_slice(w, *sel) for sel in sels]


def kernel_slices(kernel, in_sel: list[int] | None, per_in: int, out_sel: list[int] | None,
                  per_out: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of a Kernel restricted to a selection, for calls autograd does not record:
    made once and kept with the weight (see ``weight_slice``)."""
    w, b = kernel.weight, kernel.bias
    if torch.compiler.is_compiling():
        return _slice_copy(w, in_sel, per_in, out_sel, per_out), \
            None if b is None or out_sel is None else take(b, 0, out_sel, per_out)
    key = ("kernel", w._version, None if b is None else b._version, None if in_sel is None else tuple(in_sel),
           None if out_sel is None else tuple(out_sel))

    def make() -> tuple[torch.Tensor, torch.Tensor | None]:
        bs = b if b is None or out_sel is None else take(b, 0, out_sel, per_out).contiguous()
        return _slice_copy(w, in_sel, per_in, out_sel, per_out), bs

    return cached((w,) if b is None else (w, b), key, make)


def _slice_copy(w: torch.Tensor, in_sel: list[int] | None, per_in: int, out_sel: list[int] | None,
                per_out: int) -> torch.Tensor:
    """The selection, contiguous in w's memory format, copied once: a channels-last weight is
    gathered in its channels-last layout (where the gather's result is born contiguous) instead
    of gathered and then copied again into channels-last."""
    fmt = memory_format(w)
    if fmt is torch.contiguous_format:
        t = w if in_sel is None else take(w, 1, in_sel, per_in)
        return (t if out_sel is None else take(t, 0, out_sel, per_out)).contiguous()
    last = w.ndim - 1
    t = w.permute(0, *range(2, w.ndim), 1)  # [out, ..., in], contiguous
    if in_sel is not None:  # innermost: concatenated slices (row copies), not an element gather
        t = torch.cat([t.narrow(last, start * per_in, n * per_in) for start, n in _runs(in_sel)], last)
    if out_sel is not None:
        t = take(t, 0, out_sel, per_out)
    return t.contiguous().permute(0, last, *range(1, last))


def gather_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``x[rows]`` in x's memory format: one ``index_select`` of whole samples (on a channels_last
    tensor, of its channels-innermost view: far cheaper than advanced indexing)."""
    if memory_format(x) is torch.contiguous_format:
        return x.index_select(0, rows)
    return x.movedim(1, -1).index_select(0, rows).movedim(-1, 1)


def put_rows_(out: torch.Tensor, rows: torch.Tensor, part: torch.Tensor) -> None:
    """``out[rows] = part`` in place, by whole samples (see ``gather_rows``)."""
    if memory_format(out) is torch.contiguous_format:
        out.index_copy_(0, rows, part)
    else:
        out.movedim(1, -1).index_copy_(0, rows, part.movedim(1, -1))


class _SplitRows(torch.autograd.Function):
    """``x`` split into row groups that partition its batch. Backward writes each group's
    gradient into its rows of one fresh tensor (no zero fill, no per-group full-size sums)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, *rows: torch.Tensor):
        ctx.rows, ctx.like = rows, (x.shape, x.dtype, x.device, memory_format(x))
        return tuple(gather_rows(x, r) for r in rows)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads: torch.Tensor):
        shape, dtype, device, fmt = ctx.like
        out = torch.empty(shape, dtype=dtype, device=device, memory_format=fmt)
        for r, g in zip(ctx.rows, grads):
            if g is None:
                out[r] = 0
            else:
                put_rows_(out, r, g)
        return (out,) + (None,) * len(ctx.rows)


class _MergeRows(torch.autograd.Function):
    """Row groups that partition a batch put back in batch order; backward splits the gradient."""

    @staticmethod
    def forward(ctx, rows: tuple[torch.Tensor, ...], *parts: torch.Tensor):
        ctx.rows = rows
        return _merge(parts, rows)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        return (None,) + tuple(gather_rows(grad, r) for r in ctx.rows)


def split_rows(x: torch.Tensor, rows: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """``(x[r] for r in rows)`` for row groups that partition x's batch (each sample in one group)."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return tuple(gather_rows(x, r) for r in rows)
    return _SplitRows.apply(x, *rows)


def merge_rows(parts: list[torch.Tensor], rows: list[torch.Tensor]) -> torch.Tensor:
    """The inverse of ``split_rows``: ``out[r] = part`` for each group, in one fresh tensor."""
    if not (torch.is_grad_enabled() and any(p.requires_grad for p in parts)):
        return _merge(parts, rows)
    return _MergeRows.apply(tuple(rows), *parts)


def _merge(parts, rows) -> torch.Tensor:
    out = empty(parts[0], [sum(len(r) for r in rows)] + list(parts[0].shape[1:]))
    for r, p in zip(rows, parts):
        put_rows_(out, r, p)
    return out


def broadcast(v: torch.Tensor, ndim: int, cdim: int) -> torch.Tensor:
    """[B, C] -> a shape that broadcasts over a [B, ..., C (at cdim), ...] tensor."""
    shape = [v.shape[0]] + [1] * (ndim - 1)
    shape[cdim] = v.shape[1]
    return v.reshape(shape)


def times_gates(y: torch.Tensor, route: Route, rows: torch.Tensor | None, per: int, cdim: int) -> torch.Tensor:
    """``y`` (packed) times its gates where the router needs a gradient; untouched otherwise."""
    if not route.needs_grad:
        return y
    return y * broadcast(route.slot_gates(rows, per), y.ndim, cdim).to(y.dtype)


def memory_format(t: torch.Tensor) -> torch.memory_format:
    if t.ndim == 4 and t.shape[1] > 1 and t.is_contiguous(memory_format=torch.channels_last) \
            and not t.is_contiguous():
        return torch.channels_last
    if t.ndim == 5 and t.shape[1] > 1 and t.is_contiguous(memory_format=torch.channels_last_3d) \
            and not t.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


def empty(like: torch.Tensor, shape: list[int] | tuple[int, ...]) -> torch.Tensor:
    """An uninitialised tensor of ``shape`` with ``like``'s dtype, device and memory format."""
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=memory_format(like))


def zeros(like: torch.Tensor, shape: list[int] | tuple[int, ...]) -> torch.Tensor:
    return empty(like, shape).zero_()


def place(ys: torch.Tensor, channels: int, cdim: int, experts: list[int], per: int) -> torch.Tensor:
    """Full width from a batch sharing one selection: ``ys`` at the experts' channels, zero elsewhere."""
    if runs(experts):
        start, width = experts[0] * per, len(experts) * per
        parts = []
        for n in (start, channels - start - width):
            if n:
                shape = list(ys.shape)
                shape[cdim] = n
                parts.append(zeros(ys, shape))
        parts.insert(1 if start else 0, ys)
        return torch.cat(parts, dim=cdim) if len(parts) > 1 else ys
    shape = list(ys.shape)
    shape[cdim] = channels
    return zeros(ys, shape).index_copy(cdim, expert_channels(experts, per, ys.device), ys)


def _slot_index(route: Route, per: int, moved_shape: torch.Size) -> torch.Tensor:
    """Each packed slot's full-width channel, expanded over a channels-last view's other dims."""
    ch = route.channel_index(per)
    ch = ch.reshape([ch.shape[0]] + [1] * (len(moved_shape) - 2) + [ch.shape[1]])
    return ch.expand(moved_shape[:-1] + (ch.shape[-1],))


def _channel_slots(route: Route, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of ``channel_index``: [B, C] the packed slot each full-width channel has in its
    sample, and [B, C] whether the sample selected that channel at all."""
    per = channels // route.experts
    c = torch.arange(channels, device=route.idx.device)
    hit = route.idx[:, :, None] == torch.div(c, per, rounding_mode="floor")  # [B, K, C]
    return hit.to(torch.uint8).argmax(1) * per + c % per, hit.any(1)


def _unpacked_by_gather(y: torch.Tensor, route: Route, channels: int, cdim: int) -> torch.Tensor:
    """``scatter_channels`` as a gather: each full-width channel reads its slot, or is zero. A
    compiler fuses this with its neighbours (a scatter becomes a kernel of its own, on the CPU an
    ATen fallback); eager keeps the scatter, which makes fewer passes."""
    slot, selected = _channel_slots(route, channels)
    moved = y.movedim(cdim, -1)
    shape = [slot.shape[0]] + [1] * (moved.ndim - 2) + [channels]
    index = slot.reshape(shape).expand(tuple(moved.shape[:-1]) + (channels,))
    return torch.where(selected.reshape(shape), moved.gather(-1, index), 0).movedim(-1, cdim)


def scatter_channels(y: torch.Tensor, route: Route, channels: int, cdim: int) -> torch.Tensor:
    """Full width from packed ``y``, per sample (each row its own selection): selected channels
    in place, zeros elsewhere. Static shapes, no host read."""
    cdim = cdim % y.ndim
    if torch.compiler.is_compiling():
        return _unpacked_by_gather(y, route, channels, cdim)
    shape = list(y.shape)
    shape[cdim] = channels
    out = zeros(y, shape).movedim(cdim, -1)
    ch = _slot_index(route, channels // route.experts, out.shape)
    return out.scatter(-1, ch, y.movedim(cdim, -1)).movedim(-1, cdim)


def gather_channels(y: torch.Tensor, route: Route, cdim: int) -> torch.Tensor:
    """Packed from full-width ``y``, per sample: each sample's selected channels in slot order."""
    cdim = cdim % y.ndim
    moved = y.movedim(cdim, -1)
    ch = _slot_index(route, y.shape[cdim] // route.experts, moved.shape)
    return moved.gather(-1, ch).movedim(-1, cdim)


def scatter_add_channels(stream: torch.Tensor, y: torch.Tensor, route: Route, cdim: int,
                         into: bool = False) -> torch.Tensor:
    """``stream`` plus packed ``y`` at each sample's selected channels (per sample); with ``into``,
    written into ``stream`` itself."""
    cdim = cdim % stream.ndim
    if torch.compiler.is_compiling():  # never into: a compiled graph plans its own buffers (``writable``)
        return stream + _unpacked_by_gather(y, route, stream.shape[cdim], cdim)
    moved = stream.movedim(cdim, -1)
    ch = _slot_index(route, stream.shape[cdim] // route.experts, moved.shape)
    add = moved.scatter_add_ if into else moved.scatter_add
    return add(-1, ch, y.movedim(cdim, -1)).movedim(-1, cdim)


def shared_selection(route: Route, by_pattern: bool) -> list[int] | None:
    """The experts every sample selected, when ``by_pattern`` allows reading the batch's routing
    patterns back (a host read) and there is one; else None (per-sample indexing)."""
    if not by_pattern:
        return None
    groups = route.groups()
    return groups[0][0] if len(groups) == 1 and groups[0][1] is None else None


def unpack(y: torch.Tensor, route: Route, channels: int, cdim: int, by_pattern: bool = True) -> torch.Tensor:
    """Full-width tensor from packed ``y``: selected channels in place (times gates), zeros elsewhere.
    With ``by_pattern``, a batch that shares one selection is placed by slices."""
    cdim = cdim % y.ndim
    per = channels // route.experts
    y = times_gates(y, route, None, per, cdim)
    shared = shared_selection(route, by_pattern)
    if shared is not None:
        return place(y, channels, cdim, shared, per)
    return scatter_channels(y, route, channels, cdim)


def pack(y: torch.Tensor, route: Route, cdim: int, by_pattern: bool = True) -> torch.Tensor:
    """Packed tensor from full-width ``y``: each sample's selected channels, in slot order."""
    cdim = cdim % y.ndim
    shared = shared_selection(route, by_pattern)
    if shared is not None:
        return take(y, cdim, shared, y.shape[cdim] // route.experts)
    return gather_channels(y, route, cdim)


class PackedBranch:
    """A packed residual branch on its way into an add: ``add_packed`` adds it in place of the
    full-width tensor, so the zeros of unselected channels are never written."""

    __slots__ = ("y", "route", "channels", "cdim")

    def __init__(self, y: torch.Tensor, route: Route, channels: int, cdim: int) -> None:
        self.y, self.route, self.channels, self.cdim = y, route, channels, cdim

    def full(self) -> torch.Tensor:
        return self.route.executor.unpack(self.y, self.route, self.channels, self.cdim)


def writable(stream: torch.Tensor, into: bool, *others: torch.Tensor) -> bool:
    """Whether an add may write into ``stream`` itself: the graph says nothing reads it afterwards
    (``into``), autograd does not record (it may have saved the stream), the stream is not a view
    of other memory, and no compiler is tracing (its graph plans its own buffers)."""
    return into and stream._base is None and not torch.compiler.is_compiling() \
        and not (torch.is_grad_enabled() and (stream.requires_grad or any(t.requires_grad for t in others)))


def add_packed(stream: torch.Tensor, branch: PackedBranch, by_pattern: bool = True, into: bool = False) -> torch.Tensor:
    """``stream + unpack(branch)`` without materialising the unpacked branch; with ``into`` (the
    stream is free after the add) written into the stream's memory where ``writable`` allows."""
    cdim = branch.cdim % stream.ndim
    route = branch.route
    per = branch.channels // route.experts
    y = times_gates(branch.y, route, None, per, cdim)
    if y.dtype != stream.dtype:
        y = y.to(stream.dtype)
    into = writable(stream, into, y)
    experts = shared_selection(route, by_pattern)
    if experts is not None:
        return add_selection(stream, y, experts, per, cdim, into)
    return scatter_add_channels(stream, y, route, cdim, into)


def add_selection(stream: torch.Tensor, y: torch.Tensor, experts: list[int], per: int, cdim: int,
                  into: bool) -> torch.Tensor:
    """``stream`` plus packed ``y`` whose samples all selected ``experts``, at their channels: the
    stream's slice added in place (of a copy, unless ``into``) when they are adjacent, else by index."""
    if runs(experts):
        out = stream if into else stream.clone()
        out.narrow(cdim, experts[0] * per, len(experts) * per).add_(y)
        return out
    index = expert_channels(experts, per, y.device)
    return stream.index_add_(cdim, index, y) if into else stream.index_add(cdim, index, y)


def take_rows(t: torch.Tensor, rows: torch.Tensor, experts: list[int], per: int, cdim: int) -> torch.Tensor:
    """``t[rows]`` at the experts' channels, in t's memory format (what ``add_rows`` adds to)."""
    if cdim != 1 or memory_format(t) is torch.contiguous_format:
        return take(t, cdim, experts, per).index_select(0, rows)
    return take(t.movedim(1, -1), t.ndim - 1, experts, per).index_select(0, rows).movedim(-1, 1)


class _AddRows(torch.autograd.Function):
    """A copy of ``stream`` with each packed part added at its rows and experts' channels.
    Backward: the stream's gradient is the output's; a part's, its rows and channels of it."""

    @staticmethod
    def forward(ctx, stream: torch.Tensor, rows: tuple, sels: tuple, per: int, cdim: int, *parts: torch.Tensor):
        ctx.rows, ctx.sels, ctx.per, ctx.cdim = rows, sels, per, cdim
        ctx.dtypes = [p.dtype for p in parts]
        return _add_parts_(stream.clone(), parts, rows, sels, per, cdim)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        parts = tuple(take_rows(grad, r, sel, ctx.per, ctx.cdim).to(dt) if need else None
                      for r, sel, dt, need in zip(ctx.rows, ctx.sels, ctx.dtypes, ctx.needs_input_grad[5:]))
        return (grad if ctx.needs_input_grad[0] else None, None, None, None, None) + parts


def add_rows(stream: torch.Tensor, parts: list[torch.Tensor], rows: list[torch.Tensor], sels: list[list[int]],
             per: int, cdim: int, into: bool = False) -> torch.Tensor:
    """``stream`` plus each packed part at its rows and experts' channels, for parts that
    partition the batch: into the stream itself where ``writable`` allows, else into a copy
    (recorded by autograd when it needs to be)."""
    if torch.is_grad_enabled() and (stream.requires_grad or any(p.requires_grad for p in parts)):
        return _AddRows.apply(stream, tuple(rows), tuple(sels), per, cdim, *parts)
    return _add_parts_(stream if writable(stream, into) else stream.clone(), parts, rows, sels, per, cdim)


def _add_parts_(out: torch.Tensor, parts, rows, sels, per: int, cdim: int) -> torch.Tensor:
    """``out[rows]`` += ``part`` at its experts' channels for each part, in place (no autograd).
    One add per sample and run of adjacent experts: a row of ``out`` is one strided slice, so
    nothing is gathered or scattered (indexed row copies cost three passes over the part)."""
    for part, r, experts in zip(parts, rows, sels):
        part = part.to(out.dtype)
        pos, targets = 0, r.tolist()
        for start, n in _runs(experts):
            dst = out.narrow(cdim, start * per, n * per)
            src = part.narrow(cdim, pos, n * per)
            pos += n * per
            for j, i in enumerate(targets):
                dst[i].add_(src[j])
    return out
