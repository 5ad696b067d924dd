"""Gated contractions: a conv or linear layer whose input and/or output channels are routed.

``out_route`` gates the layer's output channels (it produces an MoE layer's experts); ``in_route``
gates its input channels (it consumes one). Masked execution computes everything and multiplies by
the channel mask. Sparse execution computes only the selected channels: samples are grouped by
routing pattern and each group runs the layer with sliced weights on its selected input channels;
the groups' outputs are merged back into batch order, except a packed output, which stays split
(``RowGroups``) for the layer's interior and its consumer. Both compute the same function,
gradients included.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .execution import current_execution
from .packing import (PackedBranch, add_packed, merge_rows, pack, place, split_rows, take, times_gates, unpack,
                      weight_slice)
from .route import Route, pattern_groups
from .rowgroups import RowGroups, as_tensor, parts_for, subsplit

MAX_GROUPS = {"cpu": 8}
"""Per device type, the most routing patterns one batch may have for a layer to run sparse; with
more, it runs masked (then packs its output). CPU (2 cores): per-pattern convs stop paying off
beyond about 8 groups (resnet18, 8 experts, top-4, batches 16 and 64: sparse 0.64x and 0.89x of
dense, masked 1.06x and 1.01x). Accelerators (any other type): 1, since per-pattern kernels whose
batch sizes change with every batch cost more in launches, host reads and cuDNN plan lookups than
the MACs they save (H200, resnet18, batches 16-256: sparse 2.2-3.7x slower than masked); a batch
routed alike (batch 1 included) still runs sparse."""


def max_groups(device: torch.device) -> int:
    return MAX_GROUPS.get(device.type, 1)


Fn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


@torch.compiler.disable  # data-dependent dispatch: eager under torch.compile
def gate_channels(x: torch.Tensor, route: Route, cdim: int = 1, lazy: bool = False):
    """A branch joining a residual add: full width, unselected experts' channels zero.

    Packed branches (sparse execution) are scattered back to full width here, or, with ``lazy``
    (the add is ``moe_add``), handed over packed so the add writes only the selected channels.
    """
    x = as_tensor(x)
    if route.packed and current_execution() == "sparse":
        channels = x.shape[cdim] * route.experts // route.top_k
        if lazy:
            return PackedBranch(x, route, channels, cdim)
        return unpack(x, route, channels, cdim)
    return route.apply(x, cdim)


@torch.compiler.disable  # data-dependent dispatch: eager under torch.compile
def moe_add(a, b):
    """``a + b`` where an operand may be a packed branch from ``gate_channels(..., lazy=True)``."""
    if isinstance(b, PackedBranch):
        a, b = b, a
    if isinstance(a, PackedBranch):
        if isinstance(b, PackedBranch):
            b = b.full()
        return add_packed(b, a)
    return a + b


def _groups(in_route: Route | None, out_route: Route | None) -> list[tuple[list[int], torch.Tensor | None]]:
    if in_route is None or out_route is None:
        return (in_route or out_route).groups()
    gi, go = in_route.groups(), out_route.groups()
    if len(gi) == 1 and len(go) == 1 and gi[0][1] is None and go[0][1] is None:
        return [(gi[0][0] + go[0][0], None)]
    return pattern_groups(torch.cat([in_route.idx, out_route.idx], dim=1), max(in_route.experts, out_route.experts))


def sparse_apply(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, fn: Fn, cdim: int,
                 in_route: Route | None, out_route: Route | None,
                 groups: list[tuple[list[int], torch.Tensor | None]] | None = None) -> torch.Tensor:
    """Run ``fn(x, weight, bias)`` computing only routed channels.

    ``weight`` is laid out [out, in, ...] (conv and linear); channels of x and of the output live on
    ``cdim``. A packed ``in_route`` means x holds only the selected channels; a packed ``out_route``
    means the result does too (else unselected output channels are zero-filled). One call of ``fn``
    per distinct routing pattern in the batch, never per sample.
    """
    cdim = cdim % x.ndim
    c_out = weight.shape[0]
    per_in = weight.shape[1] // in_route.experts if in_route is not None else 0
    per_out = c_out // out_route.experts if out_route is not None else 0
    k_in = in_route.top_k if in_route is not None else 0
    groups = groups or _groups(in_route, out_route)
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
    outs = []
    for (experts, rows), xs in zip(groups, parts):
        bs = bias
        if in_route is not None:
            sel = experts[:k_in]
            if not in_route.packed:
                xs = take(xs, cdim, sel, per_in)
            xs = times_gates(xs, in_route, rows, per_in, cdim)
        if out_route is not None:
            sel_out = experts[k_in:]
            bs = None if bs is None else weight_slice(bs, None, 0, sel_out, per_out)
        w = weight_slice(weight, experts[:k_in] if in_route is not None else None, per_in,
                         sel_out if out_route is not None else None, per_out)
        ys = fn(xs, w, bs)
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


@torch.compiler.disable  # data-dependent dispatch: eager under torch.compile
def gated_apply(x: torch.Tensor, full: Callable[[torch.Tensor], torch.Tensor], cdim: int, c_in: int,
                in_route: Route | None, out_route: Route | None,
                sparse: tuple[torch.Tensor, torch.Tensor | None, Fn] | None) -> torch.Tensor:
    """Dispatch to sparse (when ``sparse`` gives weight, bias and fn) or masked execution.

    A layer without a sparse kernel (grouped conv, custom forward) runs masked; in sparse mode its
    packed input is unpacked first (``c_in`` channels) and its output packed after.
    """
    if in_route is None and out_route is None:
        return full(x)
    mode = current_execution()
    groups = _groups(in_route, out_route) if sparse is not None and mode == "sparse" else None
    if groups is not None and len(groups) <= max_groups(x.device):
        weight, bias, fn = sparse
        return sparse_apply(x, weight, bias, fn, cdim, in_route, out_route, groups)
    x = as_tensor(x)
    if in_route is not None:
        if in_route.packed and mode == "sparse":
            x = unpack(x, in_route, c_in, cdim)
        else:
            x = in_route.apply(x, cdim)
    y = full(x)
    if out_route is not None:
        y = out_route.apply(y, cdim)
        if out_route.packed and mode == "sparse":
            y = pack(y, out_route, cdim)
    return y


class MoEGatedMixin:
    """Mixed into a conv/linear module's own class: same parameters and keys, routed forward."""

    def _moe_kind(self) -> str | None:
        base = type(self).__mro__[2]
        if isinstance(self, nn.Linear) and base.forward is nn.Linear.forward:
            return "linear"
        if isinstance(self, nn.modules.conv._ConvNd) and self.groups == 1 and not self.transposed and \
                base.forward in (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward):
            return "conv"
        return None  # custom forward (weight standardisation, dynamic padding...) or grouped: masked

    def _moe_sparse(self):
        kind = self.__dict__.get("_moe_sparse_kind", "")
        if kind == "":  # decided once per module
            kind = self.__dict__["_moe_sparse_kind"] = self._moe_kind()
        if kind == "linear":
            return self.weight, self.bias, F.linear
        return None if kind is None else (self.weight, self.bias, self._conv_forward)

    def forward(self, x: torch.Tensor, in_route: Route | None = None, out_route: Route | None = None):
        cdim = -1 if isinstance(self, nn.Linear) else 1
        full = super().forward  # type: ignore[misc]
        sparse = self._moe_sparse() if (in_route is not None or out_route is not None) else None
        c_in = self.in_features if isinstance(self, nn.Linear) else self.in_channels
        return gated_apply(x, full, cdim, c_in, in_route, out_route, sparse)


_CLASSES: dict[tuple[type, type], type] = {}


def with_mixin(m: nn.Module, mixin: type) -> nn.Module:
    """Give module ``m`` the routed forward of ``mixin`` in place: its class becomes a subclass
    ``MoE<Class>`` of (mixin, its class), so the object, its parameters and keys stay the same."""
    cls = type(m)
    if issubclass(cls, mixin):
        return m
    if (mixin, cls) not in _CLASSES:
        _CLASSES[mixin, cls] = type(f"MoE{cls.__name__}", (mixin, cls), {"__module__": mixin.__module__})
    m.__class__ = _CLASSES[mixin, cls]
    return m


def make_moe_module(m: nn.Module) -> nn.Module:
    """Turn conv/linear module ``m`` into its routed version in place (same object, same state_dict)."""
    return with_mixin(m, MoEGatedMixin)


def _functional(conv: Callable, name: str, cdim: int):
    def moe_fn(input, weight, bias=None, *args, in_route: Route | None = None,
               out_route: Route | None = None, **kwargs):
        def fn(x, w, b):
            return conv(x, w, b, *args, **kwargs)

        groups = kwargs.get("groups", args[3] if len(args) > 3 else 1)
        sparse = (weight, bias, fn) if groups == 1 else None
        c_in = weight.shape[-1] if cdim == -1 else weight.shape[1] * groups
        return gated_apply(input, lambda x: fn(x, weight, bias), cdim, c_in, in_route, out_route, sparse)

    moe_fn.__name__ = name
    moe_fn.__qualname__ = name
    return moe_fn


moe_conv1d = _functional(F.conv1d, "moe_conv1d", 1)
moe_conv2d = _functional(F.conv2d, "moe_conv2d", 1)
moe_conv3d = _functional(F.conv3d, "moe_conv3d", 1)
moe_linear = _functional(F.linear, "moe_linear", -1)
FUNCTIONAL = {F.conv1d: moe_conv1d, F.conv2d: moe_conv2d, F.conv3d: moe_conv3d, F.linear: moe_linear}
