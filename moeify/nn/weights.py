"""A weight restricted to the selected experts' input and/or output channels.

Under autograd the slices are differentiable (several selections of one weight as one op whose
backward writes one full-size gradient); under no_grad or inference each selection is copied
once, contiguous in the weight's memory format, and kept with the weight (``cache.py``).
"""
from __future__ import annotations

import torch

from .cache import cached
from .packing import adjacent_runs, memory_format, take


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
    """One weight's selections for several routing patterns, each a contiguous copy. Backward writes
    every selection's gradient into one full-size gradient (autograd's slices would make a
    zero-filled full-size gradient per selection and sum them): copied where the selections do not
    overlap (a top-1 route's patterns never do), added where they do, zero only where none is."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, sels: tuple) -> tuple[torch.Tensor, ...]:
        ctx.sels, ctx.like = sels, (w.shape, w.dtype, w.device, memory_format(w))
        return tuple(_slice_copy(w, *sel) for sel in sels)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads: torch.Tensor):
        shape, dtype, device, fmt = ctx.like
        given = [(sel, g) for sel, g in zip(ctx.sels, grads) if g is not None]
        disjoint, covered = _layout([sel for sel, _ in given], shape)
        make = torch.empty if disjoint and covered else torch.zeros
        out = make(shape, dtype=dtype, device=device).contiguous(memory_format=fmt)
        for (in_sel, per_in, out_sel, per_out), g in given:
            o_pos = 0
            for o_start, o_len in _spans(out_sel, per_out, shape[0]):
                i_pos = 0
                for i_start, i_len in _spans(in_sel, per_in, shape[1]):
                    block = out[o_start:o_start + o_len, i_start:i_start + i_len]
                    part = g[o_pos:o_pos + o_len, i_pos:i_pos + i_len]
                    if disjoint:
                        block.copy_(part)
                    else:
                        block.add_(part)
                    i_pos += i_len
                o_pos += o_len
        return out, None


def _layout(sels: list, shape: torch.Size) -> tuple[bool, bool]:
    """(no two selections share a weight entry, their areas add up to the whole weight's): when the
    first holds, the second says they cover it."""
    def sides(sel) -> tuple[set | None, set | None]:  # the experts on each side; None: all channels
        in_sel, _, out_sel, _ = sel
        return None if out_sel is None else set(out_sel), None if in_sel is None else set(in_sel)

    def meet(a: set | None, b: set | None) -> bool:
        return a is None or b is None or bool(a & b)

    sets = [sides(sel) for sel in sels]
    disjoint = not any(meet(a[0], b[0]) and meet(a[1], b[1]) for i, a in enumerate(sets) for b in sets[i + 1:])
    area = sum((shape[0] if out_sel is None else len(out_sel) * per_out) *
               (shape[1] if in_sel is None else len(in_sel) * per_in) for in_sel, per_in, out_sel, per_out in sels)
    return disjoint, area == shape[0] * shape[1]


def _spans(sel: list[int] | None, per: int, size: int) -> list[tuple[int, int]]:
    """(first channel, count) of each run of a selection's channels, in selection order."""
    return [(0, size)] if sel is None else [(e * per, n * per) for e, n in adjacent_runs(sel)]


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
        t = torch.cat([t.narrow(last, start * per_in, n * per_in) for start, n in adjacent_runs(in_sel)], last)
    if out_sel is not None:
        t = take(t, 0, out_sel, per_out)
    return t.contiguous().permute(0, last, *range(1, last))
