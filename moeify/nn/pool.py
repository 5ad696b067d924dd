"""The mean over a map that a router reads, with a backward that does not write a full map.

Autograd's own ``mean`` backward divides the expanded gradient into a new full-size tensor; here
the gradient stays an expanded view of the small one, and the engine adds it where the input's
other gradients accumulate (one pass over the map fewer per router and backward).
"""
from __future__ import annotations

import math

import torch


class _Mean(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        ctx.shape, ctx.dims = x.shape, dims
        return x.mean(dims)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        shape = list(ctx.shape)
        for d in ctx.dims:
            shape[d] = 1
        n = math.prod(ctx.shape[d] for d in ctx.dims)
        return (grad / n).reshape(shape).expand(ctx.shape), None


def pool_mean(x: torch.Tensor, dims: list[int]) -> torch.Tensor:
    """``x.mean(dims)`` (``x`` itself for no dims); under autograd, the backward above."""
    if not dims:
        return x
    if torch.is_grad_enabled() and x.requires_grad and not torch.compiler.is_compiling():
        return _Mean.apply(x, tuple(d % x.ndim for d in dims))
    return x.mean(dims)
