"""Gated contractions: a conv or linear layer whose input and/or output channels are routed.

``out_route`` gates the layer's output channels (it produces an MoE layer's experts); ``in_route``
gates its input channels (it consumes one). Masked execution computes everything and multiplies by
the channel mask. Sparse execution computes only the selected channels: samples are grouped by
routing pattern and each group runs the layer with sliced weights on its selected input channels;
outputs land in a zero tensor. Both compute the same function, gradients included.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .execution import current_execution
from .router import Route

Fn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def gate_channels(x: torch.Tensor, route: Route, cdim: int = 1) -> torch.Tensor:
    """Zero the unselected experts' channels of ``x`` (used where a branch joins a residual add)."""
    return route.apply(x, cdim)


def _channel_index(idx: torch.Tensor, per_expert: int) -> torch.Tensor:
    """Channel indices of the experts in ``idx`` [K]: their contiguous blocks, in order."""
    return (idx[:, None] * per_expert + torch.arange(per_expert, device=idx.device)).reshape(-1)


def _run_of(experts: list[int]) -> bool:
    """True when the selected experts are adjacent, so their channels are one slice (a view)."""
    return experts == list(range(experts[0], experts[0] + len(experts)))


def _take(t: torch.Tensor, dim: int, experts: list[int], per: int, index: torch.Tensor) -> torch.Tensor:
    """The selected experts' channels of ``t`` along ``dim``: a view when they are adjacent."""
    if _run_of(experts):
        return t.narrow(dim, experts[0] * per, len(experts) * per)
    return t.index_select(dim, index)


def _place(ys: torch.Tensor, b: int, c_out: int, cdim: int, experts: list[int], per: int,
           index: torch.Tensor) -> torch.Tensor:
    """A [B, c_out, ...] tensor holding ``ys`` at the selected experts' channels, zero elsewhere."""
    if _run_of(experts):
        start, width = experts[0] * per, len(experts) * per
        parts = []
        for n in (start, c_out - start - width):
            if n:
                shape = list(ys.shape)
                shape[cdim] = n
                parts.append(ys.new_zeros(shape))
        parts.insert(1 if start else 0, ys)
        return torch.cat(parts, dim=cdim) if len(parts) > 1 else ys
    shape = list(ys.shape)
    shape[0], shape[cdim] = b, c_out
    return ys.new_zeros(shape).index_copy(cdim, index, ys)


def _row_gates(route: Route, rows: torch.Tensor | None, per_expert: int) -> torch.Tensor:
    g = route.gate if rows is None else route.gate.index_select(0, rows)
    return g.repeat_interleave(per_expert, dim=1)


def _bshape(t: torch.Tensor, ndim: int, cdim: int) -> torch.Tensor:
    shape = [t.shape[0]] + [1] * (ndim - 1)
    shape[cdim] = t.shape[1]
    return t.reshape(shape)


def sparse_apply(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, fn: Fn, cdim: int,
                 in_route: Route | None, out_route: Route | None) -> torch.Tensor:
    """Run ``fn(x, weight, bias)`` computing only routed channels; unselected outputs are zero.

    ``weight`` is laid out [out, in, ...] (conv and linear); channels of x and of the output live on
    ``cdim``. One call of ``fn`` per distinct routing pattern in the batch, never per sample.
    """
    cdim = cdim % x.ndim
    b = x.shape[0]
    keys = [r.idx for r in (in_route, out_route) if r is not None]
    key = torch.cat(keys, dim=1) if len(keys) > 1 else keys[0]
    if b == 1 or bool((key == key[:1]).all()):
        patterns, members = key[:1], [None]
    else:
        patterns, inverse = torch.unique(key, dim=0, return_inverse=True)
        members = [torch.nonzero(inverse == p).squeeze(1) for p in range(patterns.shape[0])]
    out = None
    c_out = weight.shape[0]
    for pat, rows in zip(patterns, members):
        xs = x if rows is None else x.index_select(0, rows)
        w, bs = weight, bias
        k_in = 0
        experts = pat.tolist()
        if in_route is not None:
            per = x.shape[cdim] // in_route.experts
            k_in = in_route.top_k
            sel, ch = experts[:k_in], _channel_index(pat[:k_in], per)
            xs = _take(xs, cdim, sel, per, ch) * _bshape(_row_gates(in_route, rows, per), xs.ndim, cdim).to(xs.dtype)
            w = _take(w, 1, sel, per, ch)
        if out_route is not None:
            per_out = c_out // out_route.experts
            sel_out, ch_out = experts[k_in:], _channel_index(pat[k_in:], per_out)
            w = _take(w, 0, sel_out, per_out, ch_out)
            bs = None if bs is None else _take(bs, 0, sel_out, per_out, ch_out)
        ys = fn(xs, w, bs)
        if out_route is None:
            if rows is None:
                return ys
            if out is None:
                out = ys.new_zeros((b,) + tuple(ys.shape[1:]))
            out = out.index_copy(0, rows, ys)
            continue
        ys = ys * _bshape(_row_gates(out_route, rows, per_out), ys.ndim, cdim).to(ys.dtype)
        if rows is None:
            return _place(ys, b, c_out, cdim, sel_out, per_out, ch_out)
        if out is None:
            shape = list(ys.shape)
            shape[0], shape[cdim] = b, c_out
            out = ys.new_zeros(shape)
        out = _put_rows_channels(out, rows, ch_out, ys, cdim)
    return out


def _put_rows_channels(out: torch.Tensor, rows: torch.Tensor, ch: torch.Tensor, ys: torch.Tensor,
                       cdim: int) -> torch.Tensor:
    """``out`` with ``ys`` written at (rows, channels ch); channels on ``cdim``."""
    moved = out.movedim(cdim, 1)
    moved = moved.index_put((rows.view(-1, 1), ch.view(1, -1)), ys.movedim(cdim, 1))
    return moved.movedim(1, cdim)


def gated_apply(x: torch.Tensor, full: Callable[[torch.Tensor], torch.Tensor], cdim: int,
                in_route: Route | None, out_route: Route | None,
                sparse: tuple[torch.Tensor, torch.Tensor | None, Fn] | None) -> torch.Tensor:
    """Dispatch to sparse (when ``sparse`` gives weight, bias and fn) or masked execution."""
    if in_route is None and out_route is None:
        return full(x)
    if sparse is not None and current_execution() == "sparse":
        weight, bias, fn = sparse
        return sparse_apply(x, weight, bias, fn, cdim, in_route, out_route)
    if in_route is not None:
        x = in_route.apply(x, cdim)
    y = full(x)
    if out_route is not None:
        y = out_route.apply(y, cdim)
    return y


class MoEGatedMixin:
    """Mixed into a conv/linear module's own class: same parameters and keys, routed forward."""

    def _moe_sparse(self):
        base = type(self).__mro__[2]
        if isinstance(self, nn.Linear) and base.forward is nn.Linear.forward:
            return self.weight, self.bias, F.linear
        if isinstance(self, nn.modules.conv._ConvNd) and self.groups == 1 and not self.transposed and \
                base.forward in (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward):
            return self.weight, self.bias, self._conv_forward
        return None  # custom forward (weight standardisation, dynamic padding...) or grouped: masked

    def forward(self, x: torch.Tensor, in_route: Route | None = None, out_route: Route | None = None):
        cdim = -1 if isinstance(self, nn.Linear) else 1
        full = super().forward  # type: ignore[misc]
        sparse = self._moe_sparse() if (in_route is not None or out_route is not None) else None
        return gated_apply(x, full, cdim, in_route, out_route, sparse)


_CLASSES: dict[type, type] = {}


def make_moe_module(m: nn.Module) -> nn.Module:
    """Turn conv/linear module ``m`` into its routed version in place (same object, same state_dict)."""
    cls = type(m)
    if issubclass(cls, MoEGatedMixin):
        return m
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"MoE{cls.__name__}", (MoEGatedMixin, cls), {"__module__": __name__})
    m.__class__ = _CLASSES[cls]
    return m


def _functional(conv: Callable, name: str, cdim: int):
    def moe_fn(input, weight, bias=None, *args, in_route: Route | None = None,
               out_route: Route | None = None, **kwargs):
        def fn(x, w, b):
            return conv(x, w, b, *args, **kwargs)

        groups = kwargs.get("groups", args[3] if len(args) > 3 else 1)
        sparse = (weight, bias, fn) if groups == 1 else None
        return gated_apply(input, lambda x: fn(x, weight, bias), cdim, in_route, out_route, sparse)

    moe_fn.__name__ = name
    moe_fn.__qualname__ = name
    return moe_fn


moe_conv1d = _functional(F.conv1d, "moe_conv1d", 1)
moe_conv2d = _functional(F.conv2d, "moe_conv2d", 1)
moe_conv3d = _functional(F.conv3d, "moe_conv3d", 1)
moe_linear = _functional(F.linear, "moe_linear", -1)
FUNCTIONAL = {F.conv1d: moe_conv1d, F.conv2d: moe_conv2d, F.conv3d: moe_conv3d, F.linear: moe_linear}
