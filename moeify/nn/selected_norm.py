"""Training BatchNorm of a full-width MoE tensor: each channel normalised with the statistics of
the samples that selected it, as one autograd op.

Masked execution computes every channel of every sample, so its training BatchNorm must take a
channel's statistics over the samples whose route selects the channel (what the sparse strategies
see). Written as plain tensor ops, autograd runs that through about a dozen full-size passes per
layer, forward and backward; here it takes eight, against five for ``F.batch_norm``:

- forward: the mean, then the variance from the deviations (two passes, as BatchNorm takes them),
  each summed per (sample, channel) and then over the selecting samples, and one fused
  multiply-add;
- backward: one fused pass for both per-channel sums (``native_batch_norm_backward`` given these
  statistics, asked for the weight's and bias's gradients only: the sums of g times the
  normalised input and of g) and two fused multiply-adds for the input's gradient, in closed form.
"""
from __future__ import annotations

import math

import torch

from .packing import broadcast


class SelectedBatchNorm(torch.autograd.Function):
    """``(out, mean, var, count)``: ``x`` [B, C, ...] normalised per channel with the biased mean and
    variance over the samples b with ``sel[b, c]`` (elements counted in ``count``), then scaled
    and shifted, at every position (the layer's masks zero the unselected ones; gradients that
    reach them still flow back through the statistics, as autograd would take them). ``mean``,
    ``var`` and ``count`` (for the running statistics) carry no gradient; a channel no sample
    selected has mean and variance 0."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sel: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                eps: float):
        dims = tuple(range(2, x.ndim))
        acc = torch.promote_types(x.dtype, torch.float32)  # statistics of half-precision maps in float32
        m = sel.to(acc)
        count = m.sum(0) * math.prod(x.shape[2:])
        coef = m / count.clamp_min(1)  # [B, C]: each element's weight in its channel's mean
        mean = ((x.sum(dims, dtype=acc) if dims else x) * coef).sum(0)
        dev = (x - broadcast(mean, x.ndim, 1)).square_()
        var = ((dev.sum(dims) if dims else dev) * coef).sum(0)
        invstd = torch.rsqrt(var + eps)
        scale = invstd if weight is None else invstd * weight
        shift = -mean * scale if bias is None else torch.addcmul(bias, mean, scale, value=-1)
        out = torch.addcmul(broadcast(shift, x.ndim, 1), x, broadcast(scale, x.ndim, 1))
        ctx.save_for_backward(x, coef, mean, invstd, scale)
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, var, count)
        ctx.set_materialize_grads(False)  # no zero tensors made for the statistics' (absent) gradients
        return out, mean, var, count

    @staticmethod
    def backward(ctx, g: torch.Tensor, *_):
        if g is None:  # the output is not part of what is differentiated
            return None, None, None, None, None
        x, coef, mean, invstd, scale = ctx.saved_tensors
        x = x.to(g.dtype)  # a half-precision map under autocast: its output (and g) are float32
        # the sums over every position of g (the bias's gradient) and of g times the normalised
        # input (the weight's), in one pass: BatchNorm's own backward, given these statistics
        _, g_xhat, g_sum = torch.ops.aten.native_batch_norm_backward(
            g, x, None, None, None, mean, invstd, True, ctx.eps, [False, True, True])
        # d out / d x: scale * g, less what flows through the mean and variance of the samples that
        # selected the channel: coef * scale * (sum g + xhat * sum g xhat), xhat = (x - mean) * invstd;
        # as scale * g - slope * x + (slope * mean - coef * scale * sum g)
        slope = coef * (scale * invstd * g_xhat)  # [B, C]
        offset = torch.addcmul(slope * mean, coef, scale * g_sum, value=-1)
        gx = torch.addcmul(broadcast(offset, x.ndim, 1), x, broadcast(slope, x.ndim, 1), value=-1)
        gx.addcmul_(g, broadcast(scale, x.ndim, 1))
        gx_needed, _, gw_needed, gb_needed, _ = ctx.needs_input_grad
        return (gx if gx_needed else None, None, g_xhat if gw_needed else None, g_sum if gb_needed else None, None)
