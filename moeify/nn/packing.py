"""Moving channels between full-width tensors and packed ones ([B, K * C/N, ...], see route.py).

Selections of adjacent experts are views (``narrow``); others are gathers. Writes keep the
memory format (channels_last stays channels_last). Next to it: ``rows.py`` (a batch split into
routing groups and put back), ``weights.py`` (a weight's slices for a selection) and
``cache.py`` (what is kept between calls).
"""
from __future__ import annotations

import torch

from .route import Route

def runs(experts: list[int]) -> bool:
    """True when the selected experts are adjacent, so their channels are one slice (a view)."""
    return experts == list(range(experts[0], experts[0] + len(experts)))


def adjacent_runs(experts: list[int]) -> list[tuple[int, int]]:
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


def broadcast(v: torch.Tensor, ndim: int, cdim: int) -> torch.Tensor:
    """[B, C] (or [C], the same for every sample) -> a shape that broadcasts over a
    [B, ..., C (at cdim), ...] tensor, in one reshape."""
    shape = [v.shape[0] if v.ndim == 2 else 1] + [1] * (ndim - 1)
    shape[cdim] = v.shape[-1]
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
