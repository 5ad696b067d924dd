"""``grouped``: samples grouped by routing pattern, each group run with sliced weights on its
selected channels only (also accepted under its old name, ``sparse``).

The batch's routing patterns are read back to the host once per layer, so shapes depend on the
data: under ``torch.compile`` each such read is a graph break (the compiler stops there by itself;
no decorator, which would cost every eager call a wrapper). A packed layer's tensor stays
split by pattern (``RowGroups``) from producer to consumer. With more patterns in a batch than
``MAX_GROUPS`` allows for the device, a layer runs masked.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..channelwise import (bn_selection, bn_state, per_sample_batch_norm, per_sample_depthwise, selection_depthwise,
                           sliced_bn)
from ..packing import PackedBranch, place, take, times_gates
from ..rows import add_rows, merge_rows, split_rows
from ..weights import kernel_slices, weight_slice, weight_slices
from ..pool import pool_mean
from ..route import Route, pattern_groups
from ..rowgroups import RowGroups, as_tensor, by_own_patterns, parts_for, routed_parts, subsplit
from .base import Executor, Kernel

MAX_GROUPS = {"cpu": 8}
"""Per device type, the most routing patterns one batch may have for a layer to run sparse; with
more, it runs masked (then packs its output). CPU: per-pattern convs stop paying off beyond about
8 groups (resnet18 with 8 experts, top-4). Accelerators (any other type): 1, since per-pattern
kernels whose batch sizes change with every batch cost more in launches, host reads and cuDNN plan
lookups than the MACs they save; a batch routed alike (batch 1 included) still runs sparse. The
measurements behind both: docs/benchmarks.md ("Sweep at K/N = ½", "CUDA")."""

Groups = list[tuple[list[int], torch.Tensor | None]]


def max_groups(device: torch.device) -> int:
    return MAX_GROUPS.get(device.type, 1)


def _groups(in_route: Route | None, out_route: Route | None) -> Groups:
    if in_route is None or out_route is None:
        return (in_route or out_route).groups()
    gi, go = in_route.groups(), out_route.groups()
    if len(gi) == 1 and len(go) == 1 and gi[0][1] is None and go[0][1] is None:
        return [(gi[0][0] + go[0][0], None)]
    return pattern_groups(torch.cat([in_route.idx, out_route.idx], dim=1), max(in_route.experts, out_route.experts))


def sparse_apply(x: torch.Tensor, kernel: Kernel, cdim: int, in_route: Route | None, out_route: Route | None,
                 groups: Groups) -> torch.Tensor:
    """Run the kernel computing only routed channels, one call per routing pattern in the batch.

    The kernel's weight is laid out [out, in, ...] (conv and linear); channels of x and of the output live on
    ``cdim``. A packed ``in_route`` means x holds only the selected channels; a packed ``out_route``
    means the result does too (else unselected output channels are zero-filled).
    """
    weight, bias = kernel.weight, kernel.bias
    cdim = cdim % x.ndim
    c_out = weight.shape[0]
    per_in = weight.shape[1] // in_route.experts if in_route is not None else 0
    per_out = c_out // out_route.experts if out_route is not None else 0
    k_in = in_route.top_k if in_route is not None else 0
    full = out_route is not None and not out_route.packed
    single = len(groups) == 1 and groups[0][1] is None
    if single:
        parts = [as_tensor(x)]
    else:
        parts = parts_for(x, groups)
        if parts is None and isinstance(x, RowGroups) and in_route is not None and x.groups is in_route.groups():
            parts = subsplit(x, groups, k_in)
        if parts is None:
            parts = split_rows(as_tensor(x), [rows for _, rows in groups])
    weights = weight_slices(weight, [(experts[:k_in] if in_route is not None else None, per_in,
                                      experts[k_in:] if out_route is not None else None, per_out)
                                     for experts, _ in groups])
    outs = []
    for (experts, rows), xs, w in zip(groups, parts, weights):
        bs = bias
        if in_route is not None:
            sel = experts[:k_in]
            if not in_route.packed:
                xs = take(xs, cdim, sel, per_in)
            xs = times_gates(xs, in_route, rows, per_in, cdim)
        if out_route is not None:
            sel_out = experts[k_in:]
            bs = None if bs is None else weight_slice(bs, None, 0, sel_out, per_out)
        ys = kernel.run(xs, w, bs)
        if out_route is not None:
            ys = times_gates(ys, out_route, rows, per_out, cdim)
        if full:
            ys = place(ys, c_out, cdim, sel_out, per_out)
        outs.append(ys)
    if single:
        return outs[0]
    if out_route is not None and out_route.packed:
        # kept split for the layer's interior and its consumer
        return RowGroups(outs, groups, out_route.idx, [sel[k_in:] for sel, _ in groups])
    return merge_rows(outs, [rows for _, rows in groups])


def _records(x: torch.Tensor, kernel: Kernel, in_route: Route | None, out_route: Route | None) -> bool:
    """Whether autograd records this call (then the general path, with differentiable slices and gates)."""
    if not torch.is_grad_enabled():
        return False
    return x.requires_grad or kernel.weight.requires_grad or any(r is not None and r.needs_grad
                                                                 for r in (in_route, out_route))


def one_selection(x: torch.Tensor, kernel: Kernel, cdim: int, in_route: Route | None, out_route: Route | None,
                  experts: list[int]) -> torch.Tensor:
    """``sparse_apply`` for a batch that shares one selection, when autograd does not record: the
    selection's weight and bias slices from one cache lookup, one kernel call."""
    weight = kernel.weight
    k_in = in_route.top_k if in_route is not None else 0
    per_in = weight.shape[1] // in_route.experts if in_route is not None else 0
    per_out = weight.shape[0] // out_route.experts if out_route is not None else 0
    sel_in = experts[:k_in] if in_route is not None else None
    sel_out = experts[k_in:] if out_route is not None else None
    if in_route is not None and not in_route.packed:
        x = take(x, cdim % x.ndim, sel_in, per_in)
    w, b = kernel_slices(kernel, sel_in, per_in, sel_out, per_out)
    y = kernel.run(x, w, b)
    if out_route is not None and not out_route.packed:
        y = place(y, weight.shape[0], cdim % y.ndim, sel_out, per_out)
    return y


def _separate(x: RowGroups) -> bool:
    """Can batch statistics be taken per part? Only when no two parts share an expert (then a
    channel's samples are exactly one part's) and every part has more than one value per channel."""
    experts = [e for sel in x.sels for e in sel]
    return len(set(experts)) == len(experts) and all(p.numel() > p.shape[1] for p in x.parts)


class Grouped(Executor):
    name = "grouped"
    reads_patterns = True

    def __init__(self, one: Executor | None = None) -> None:
        self.one = one  # the lane for a route whose batch shares one host-known selection (``selected.py``)

    def route(self, layer: nn.Module, x, in_route: Route | None, earlier: Route | None = None) -> Route:
        """The generic route; one sample chosen on the host in inference goes to the ``one`` lane."""
        if self.one is not None and not torch.is_grad_enabled() and isinstance(x, torch.Tensor) and x.shape[0] == 1 \
                and not layer.training and not self.defers_check(x.device):
            r = self.one.route_one(layer, x, in_route)
            if r is not None:
                return r
        r = super().route(layer, x, in_route, earlier)
        if r.one is not None and self.one is not None:
            r.executor = self.one
        return r

    def packs(self, batch: int, device: torch.device) -> bool:
        return True

    def defers_check(self, device: torch.device) -> bool:
        return device.type != "cpu"  # a host read per router costs nothing on the CPU

    def gate_branch(self, x, route: Route, cdim: int, lazy: bool):
        """A branch split by routing pattern reaches its add as parts (no merge): the add writes
        each part's rows into the stream."""
        if lazy and route.packed and routed_parts(x, route.idx) is not None:
            return PackedBranch(x, route, x.shape[cdim] * route.experts // route.top_k, cdim)
        return super().gate_branch(x, route, cdim, lazy)

    def add_packed(self, stream: torch.Tensor, branch: PackedBranch, into: bool = False) -> torch.Tensor:
        y, route = branch.y, branch.route
        if not isinstance(y, RowGroups):
            return super().add_packed(stream, branch, into)
        cdim = branch.cdim % stream.ndim
        per = branch.channels // route.experts
        rows = [r for _, r in y.groups]
        parts = [times_gates(p, route, r, per, cdim) for p, r in zip(y.parts, rows)]
        return add_rows(stream, parts, rows, y.sels, per, cdim, into)

    def pool(self, x, dims: list[int]) -> torch.Tensor:
        """Pooled per part for a RowGroups, then merged small."""
        if isinstance(x, RowGroups):
            return merge_rows([pool_mean(p, dims) for p in x.parts], [rows for _, rows in x.groups])
        return super().pool(x, dims)

    def contract(self, x, kernel: Kernel | None, full: Callable[[torch.Tensor], torch.Tensor], cdim: int,
                 c_in: int, in_route: Route | None, out_route: Route | None) -> torch.Tensor:
        groups = _groups(in_route, out_route) if kernel is not None else None
        if groups is not None and len(groups) == 1 and groups[0][1] is None and not isinstance(x, RowGroups) \
                and not _records(x, kernel, in_route, out_route):
            return one_selection(x, kernel, cdim, in_route, out_route, groups[0][0])
        if groups is not None and len(groups) <= max_groups(x.device):
            return sparse_apply(x, kernel, cdim, in_route, out_route, groups)
        return self.masked_contract(x, full, cdim, c_in, in_route, out_route)

    def batch_norm(self, bn: nn.modules.batchnorm._BatchNorm, x, route: Route) -> torch.Tensor:
        per = bn.num_features // route.experts
        groups = route.groups() if route.packed else None
        if groups is not None and len(groups) == 1 and groups[0][1] is None and not bn.training \
                and bn.running_mean is not None:  # inference on one selection: sliced statistics
            rm, rv, w, b = sliced_bn(bn, groups[0][0], per)
            return F.batch_norm(as_tensor(x), rm, rv, w, b, False, 0.0, bn.eps)
        state = bn_state(bn)
        if not route.packed:
            return per_sample_batch_norm(bn, as_tensor(x), route, state)
        if len(groups) == 1 and groups[0][1] is None:
            return bn_selection(bn, as_tensor(x), groups[0][0], per, *state)
        split = routed_parts(x, route.idx)
        if split is not None and state[0] and bn.training and not _separate(split):
            split = by_own_patterns(split, groups)  # batch statistics: every sample of a selection in one part
        if split is not None and (not (state[0] and bn.training) or _separate(split)):
            return split.like([bn_selection(bn, p, sel, per, *state) for p, sel in zip(split.parts, split.sels)])
        return per_sample_batch_norm(bn, as_tensor(x), route, state)

    def depthwise(self, conv: nn.modules.conv._ConvNd, x, route: Route) -> torch.Tensor:
        if not route.packed:
            return conv._conv_forward(as_tensor(x), conv.weight, conv.bias)
        per = conv.out_channels // route.experts
        split = routed_parts(x, route.idx)
        if split is not None:
            return split.like([selection_depthwise(conv, p, sel, per) for p, sel in zip(split.parts, split.sels)])
        groups = route.groups()
        if len(groups) == 1 and groups[0][1] is None:
            return selection_depthwise(conv, as_tensor(x), groups[0][0], per)
        return per_sample_depthwise(conv, as_tensor(x), route)

