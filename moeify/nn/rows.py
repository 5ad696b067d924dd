"""A batch split into routing groups (row groups that partition it) and put back.

Whole samples move with one ``index_select`` / ``index_copy_`` in the tensor's memory format.
Under autograd each move is one op whose backward writes one gradient tensor (no zero-filled
full-size gradient per group). ``add_rows`` adds packed parts into a residual stream at their
rows and experts' channels without unpacking them.
"""
from __future__ import annotations

import torch

from .packing import adjacent_runs, empty, memory_format, take, writable


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
        for start, n in adjacent_runs(experts):
            dst = out.narrow(cdim, start * per, n * per)
            src = part.narrow(cdim, pos, n * per)
            pos += n * per
            for j, i in enumerate(targets):
                dst[i].add_(src[j])
    return out
