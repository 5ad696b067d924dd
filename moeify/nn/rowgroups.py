"""A packed tensor kept split by routing pattern between an MoE layer's producer and consumer.

When the samples of a batch take different routes, sparse execution runs a layer's producer once
per routing pattern on that pattern's rows. Instead of merging the parts into one batch and
splitting them again at the consumer (two copies of the layer's tensor), the producer returns a
``RowGroups``: per-sample ops in between (activations, pooling, dropout, routed BatchNorm and
depthwise conv) run on each part, and a consumer routed the same way takes the parts as they are.
Anything else sees the merged tensor (``full()``), so every op still computes what it would on a
plain tensor.
"""
from __future__ import annotations

import torch
from torch.utils._pytree import tree_map

from ..graph.ops import ELEMENTWISE, PER_SAMPLE

from .rows import merge_rows, split_rows

Groups = list[tuple[list[int], torch.Tensor | None]]

class RowGroups:
    """The parts of a packed tensor, one per routing pattern of ``groups`` (``[(experts, rows)]``,
    the routes' own list: a consumer recognises its split by identity). ``owner`` is the idx of
    the route whose channels the parts hold and ``sels`` each part's experts in that route, so
    BatchNorm and depthwise convs of that route can run on the parts."""

    __slots__ = ("parts", "groups", "owner", "sels")

    def __init__(self, parts: list[torch.Tensor], groups: Groups, owner: torch.Tensor,
                 sels: list[list[int]]) -> None:
        self.parts, self.groups, self.owner, self.sels = parts, groups, owner, sels

    def like(self, parts: list[torch.Tensor]) -> "RowGroups":
        """New parts, split and routed as these."""
        return RowGroups(parts, self.groups, self.owner, self.sels)

    @property
    def shape(self) -> torch.Size:
        return torch.Size([sum(p.shape[0] for p in self.parts)]) + self.parts[0].shape[1:]

    @property
    def ndim(self) -> int:
        return self.parts[0].ndim

    @property
    def dtype(self) -> torch.dtype:
        return self.parts[0].dtype

    @property
    def device(self) -> torch.device:
        return self.parts[0].device

    def full(self) -> torch.Tensor:
        """The tensor in batch order."""
        return merge_rows(self.parts, [rows for _, rows in self.groups])

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        split = [a for a in args if isinstance(a, RowGroups)]
        same = all(a.groups is split[0].groups for a in split)
        if same and (func in PER_SAMPLE and isinstance(args[0], RowGroups) and _plain((args[1:], kwargs))
                     or func in ELEMENTWISE and all(isinstance(a, (RowGroups, int, float, bool)) for a in args)
                     and not kwargs):
            return split[0].like([func(*(a.parts[i] if isinstance(a, RowGroups) else a for a in args), **kwargs)
                                  for i in range(len(split[0].parts))])
        args, kwargs = tree_map(as_tensor, (args, kwargs))  # also inside lists (torch.cat)
        return func(*args, **kwargs)

    def __getattr__(self, name: str):
        if name.startswith("__"):  # protocol probes (copy, pickle, inspection) are not tensor ops
            raise AttributeError(name)
        method = getattr(torch.Tensor, name, None)
        if callable(method) and (method in PER_SAMPLE or method in ELEMENTWISE):
            return lambda *a, **k: RowGroups.__torch_function__(method, (RowGroups,), (self,) + a, k)
        return getattr(self.full(), name)

    def __add__(self, o): return RowGroups.__torch_function__(torch.Tensor.__add__, (RowGroups,), (self, o))
    def __radd__(self, o): return RowGroups.__torch_function__(torch.Tensor.__radd__, (RowGroups,), (self, o))
    def __sub__(self, o): return RowGroups.__torch_function__(torch.Tensor.__sub__, (RowGroups,), (self, o))
    def __rsub__(self, o): return RowGroups.__torch_function__(torch.Tensor.__rsub__, (RowGroups,), (self, o))
    def __mul__(self, o): return RowGroups.__torch_function__(torch.Tensor.__mul__, (RowGroups,), (self, o))
    def __rmul__(self, o): return RowGroups.__torch_function__(torch.Tensor.__rmul__, (RowGroups,), (self, o))
    def __truediv__(self, o): return RowGroups.__torch_function__(torch.Tensor.__truediv__, (RowGroups,), (self, o))
    def __neg__(self): return RowGroups.__torch_function__(torch.Tensor.__neg__, (RowGroups,), (self,))
    def __getitem__(self, i): return self.full()[i]
    def __iadd__(self, o): return self.full().__iadd__(o.full() if isinstance(o, RowGroups) else o)
    def __imul__(self, o): return self.full().__imul__(o.full() if isinstance(o, RowGroups) else o)


def _plain(tree) -> bool:
    """No tensors in ``tree`` (a per-sample op's other arguments must not carry a batch)."""
    found = []
    tree_map(lambda v: found.append(v) if isinstance(v, (torch.Tensor, RowGroups)) else None, tree)
    return not found


def as_tensor(x):
    """``x`` in batch order (a RowGroups merged; anything else unchanged)."""
    return x.full() if isinstance(x, RowGroups) else x


def parts_for(x, groups: Groups) -> list[torch.Tensor] | None:
    """x's parts when it is split exactly as ``groups``, else None."""
    return x.parts if isinstance(x, RowGroups) and x.groups is groups else None


def routed_parts(x, idx: torch.Tensor) -> RowGroups | None:
    """x when it is a RowGroups holding channels of the route with this ``idx``, else None."""
    return x if isinstance(x, RowGroups) and x.owner is idx else None


def by_own_patterns(x: RowGroups, groups: Groups) -> RowGroups | None:
    """x's parts regrouped by the patterns of the route whose channels they hold (``groups``, that
    route's own list): the parts of each selection merged into one, rows ascending. Parts split
    finer (by the patterns of two routes) share experts; regrouped, each part is every sample that
    selected its experts, so BatchNorm can take a channel's batch statistics from one part. None
    when some selection is not a union of x's parts, or a pattern covers the whole batch."""
    if any(rows is None for _, rows in groups):
        return None
    members: dict[tuple[int, ...], list[int]] = {}
    for i, sel in enumerate(x.sels):
        members.setdefault(tuple(sel), []).append(i)
    if len(members) != len(groups) or any(tuple(sel) not in members for sel, _ in groups):
        return None
    parts = []
    for sel, rows in groups:
        idx = members[tuple(sel)]
        if len(idx) == 1:
            parts.append(x.parts[idx[0]])
            continue
        local = [torch.searchsorted(rows, x.groups[i][1]) for i in idx]
        parts.append(merge_rows([x.parts[i] for i in idx], local))
    return RowGroups(parts, groups, x.owner, [sel for sel, _ in groups])


def subsplit(x: RowGroups, groups: Groups, k: int) -> list[torch.Tensor] | None:
    """x's parts split further into ``groups``, whose patterns begin with x's own (their first
    ``k`` experts); a layer routed on both sides takes its input this way. None when the
    patterns do not nest."""
    parent = {tuple(sel): i for i, (sel, _) in enumerate(x.groups)}
    children: dict[int, list[int]] = {}
    for j, (sel, rows) in enumerate(groups):
        i = parent.get(tuple(sel[:k]))
        if i is None or rows is None:
            return None
        children.setdefault(i, []).append(j)
    out: list[torch.Tensor] = [x.parts[0]] * len(groups)
    for i, js in children.items():
        if len(js) == 1:
            out[js[0]] = x.parts[i]
            continue
        rows = x.groups[i][1]
        local = [torch.searchsorted(rows, groups[j][1]) for j in js]
        for j, part in zip(js, split_rows(x.parts[i], local)):
            out[j] = part
    return out
