"""Channel-wise layers inside an MoE layer: BatchNorm and depthwise conv that follow a route.

Each strategy (``executors/``) decides how they run; here are the kernels they share: on the
selected channels of a packed tensor, sliced parameters when the batch shares one selection and
per-sample gathered parameters otherwise. In training, BatchNorm's statistics of a channel are
taken over the samples that selected it, packed or at full width (``selected_norm.py``), so
sparse and masked compute the same function; channels nobody selected keep their running
statistics.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .gated import with_mixin
from .kernel import PLAIN_CONV_FORWARDS
from .cache import cached, remember
from .packing import broadcast, expert_channels, take
from .route import Route, selected_channels
from .selected_norm import SelectedBatchNorm

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def bn_state(bn: nn.modules.batchnorm._BatchNorm) -> tuple[bool, float]:
    """(use batch statistics, running-average factor), advancing the batch counter like nn does."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    use_batch = bn.training or (bn.running_mean is None and bn.running_var is None)
    return use_batch, factor


def on_slots(v: torch.Tensor, ch: torch.Tensor, ndim: int) -> torch.Tensor:
    """Per-channel values [C] laid out to broadcast over a packed [B, S, ...] tensor whose slot s
    of sample b is channel ``ch[b, s]``."""
    return broadcast(v[ch], ndim, 1)


def _selected_stats(x: torch.Tensor, ch: torch.Tensor, channels: int):
    """Per-channel mean, biased variance and element count of packed ``x`` [B, S, ...] over the
    samples that hold each channel (slot s of sample b is channel ``ch[b, s]``), and ``x`` minus
    its channel's mean. Two passes of sums, as BatchNorm takes them."""
    dims = tuple(range(2, x.ndim))
    hw = x[0, 0].numel()

    def per_channel(per_slot: torch.Tensor) -> torch.Tensor:  # [B, S] -> [C], the sum over samples
        return x.new_zeros(channels).index_add(0, ch.reshape(-1), per_slot.reshape(-1))

    count = per_channel(x.new_ones(x.shape[:2])) * hw
    denom = count.clamp_min(1)
    mean = per_channel(x.sum(dims) if dims else x) / denom
    d = x - on_slots(mean, ch, x.ndim)
    var = per_channel((d * d).sum(dims) if dims else d * d) / denom
    return mean, var, count, d


def _update_running(bn, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor, factor: float) -> None:
    """BatchNorm's running averages moved towards this batch's statistics (the variance unbiased
    by each channel's ``count``); a channel no sample selected (count 0) keeps its own."""
    if not bn.track_running_stats or bn.running_mean is None or not bn.training:
        return
    with torch.no_grad():
        step = (count > 0).to(bn.running_mean.dtype) * factor
        unbiased = var * count / (count - 1).clamp_min(1)
        bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), step)
        bn.running_var.lerp_(unbiased.to(bn.running_var.dtype), step)


def sliced_bn(bn: nn.modules.batchnorm._BatchNorm, experts: list[int], per: int) -> tuple:
    """(running mean, running var, weight, bias) of the selected experts' channels: views, kept
    with the layer under no_grad or inference so a forward does not re-slice them."""
    buffers, params = bn._buffers, bn._parameters  # read directly: this runs once per layer and call
    ts = (buffers.get("running_mean"), buffers.get("running_var"), params.get("weight"), params.get("bias"))

    def make() -> tuple:
        return tuple(None if t is None else take(t, 0, experts, per) for t in ts)

    w = ts[2]
    if (torch.is_grad_enabled() and w is not None and w.requires_grad) or torch.compiler.is_compiling():
        return make()
    owners, key = [], [tuple(experts)]
    for t in ts:
        key.append(None if t is None else t._version)
        if t is not None:
            owners.append(t)
    return cached(tuple(owners), tuple(key), make)


def bn_selection(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, experts: list[int], per: int,
                  use_batch: bool, factor: float) -> torch.Tensor:
    """BatchNorm of packed ``x`` whose samples all selected ``experts``: sliced parameters."""
    if bn.running_mean is None or not (use_batch and bn.training):
        rm, rv, w, b = sliced_bn(bn, experts, per)
        return F.batch_norm(x, rm, rv, w, b, use_batch, factor, bn.eps)
    w, b = (None if t is None else take(t, 0, experts, per) for t in (bn.weight, bn.bias))
    # update copies, then write them back: autograd never saves a tensor a later pass modifies
    rm, rv = (take(t, 0, experts, per).clone() for t in (bn.running_mean, bn.running_var))
    y = F.batch_norm(x, rm, rv, w, b, True, factor, bn.eps)
    with torch.no_grad():
        ch = expert_channels(experts, per, x.device)
        bn.running_mean.index_copy_(0, ch, rm)
        bn.running_var.index_copy_(0, ch, rv)
    return y


def per_sample_batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, route: Route,
                          state: tuple[bool, float] | None = None) -> torch.Tensor:
    """BatchNorm of an MoE layer's tensor by per-sample channel indices (no routing-pattern read):
    packed, slot s of sample b is channel ``channel_index[b, s]``; full width, a channel counts
    for the samples whose gate selects it. ``state``: ``bn_state(bn)`` when already taken."""
    channels = bn.num_features
    per = channels // route.experts
    use_batch, factor = state or bn_state(bn)
    if not route.packed:
        if not use_batch:
            return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        y, mean, var, count = SelectedBatchNorm.apply(x, selected_channels(route.idx, per, route.experts), bn.weight,
                                                      bn.bias, bn.eps)
        _update_running(bn, mean, var, count, factor)
        return y
    ch = route.channel_index(per)
    if use_batch:
        mean, var, count, d = _selected_stats(x, ch, channels)
        _update_running(bn, mean, var, count, factor)
        scale, shift = torch.rsqrt(var + bn.eps), bn.bias
        if bn.weight is not None:
            scale = scale * bn.weight
    else:  # running statistics
        d, scale = x, torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight
        shift = -bn.running_mean * scale
        if bn.bias is not None:
            shift = shift + bn.bias
    scale = on_slots(scale, ch, x.ndim)
    return d * scale if shift is None else torch.addcmul(on_slots(shift, ch, x.ndim), d, scale)  # one pass


def selection_depthwise(conv: nn.modules.conv._ConvNd, x: torch.Tensor, experts: list[int], per: int):
    """Depthwise conv of packed ``x`` whose samples all selected ``experts``: sliced weights."""
    w = take(conv.weight, 0, experts, per)
    b = None if conv.bias is None else take(conv.bias, 0, experts, per)
    return _CONV[x.ndim - 2](x, w, b, conv.stride, conv.padding, conv.dilation, w.shape[0])


def per_sample_depthwise(conv: nn.modules.conv._ConvNd, x: torch.Tensor, route: Route) -> torch.Tensor:
    """Depthwise conv of packed ``x``, one conv group per (sample, slot): timm CondConv's trick."""
    per = conv.out_channels // route.experts
    ch = route.channel_index(per).reshape(-1)
    bsz, width = x.shape[0], x.shape[1]
    w = conv.weight.index_select(0, ch)
    b = None if conv.bias is None else conv.bias.index_select(0, ch)
    fn = _CONV[conv.weight.ndim - 2]
    y = fn(x.reshape(1, bsz * width, *x.shape[2:]), w, b, conv.stride, conv.padding, conv.dilation, bsz * width)
    return y.reshape(bsz, width, *y.shape[2:])


class MoEChannelwiseMixin:
    """Mixed into a BatchNorm or depthwise conv module's class: same parameters, routed forward."""

    def forward(self, x: torch.Tensor, route: Route | None = None) -> torch.Tensor:
        if route is None:
            return super().forward(x)  # type: ignore[misc]
        kind = self.__dict__.get("_moe_channelwise")
        if kind is None:  # decided once per module
            kind = ("depthwise" if not isinstance(self, nn.modules.batchnorm._BatchNorm)
                    else "norm act" if is_norm_act(type(self).__mro__[2]) else "norm")
            remember(self, "_moe_channelwise", kind)
        if kind == "depthwise":
            return route.executor.depthwise(self, x, route)
        y = route.executor.batch_norm(self, x, route)
        return self.act(self.drop(y)) if kind == "norm act" else y


def make_channelwise_module(m: nn.Module) -> nn.Module:
    """Turn BatchNorm / depthwise conv ``m`` into its routed version in place (same state_dict)."""
    return with_mixin(m, MoEChannelwiseMixin)


def is_norm_act(cls: type) -> bool:
    """timm's BatchNormAct: batch norm, then its ``drop`` and ``act`` modules (both channel-blind)."""
    return cls.__name__.startswith("BatchNormAct") and cls.__module__.startswith("timm.")


def routable(m: nn.Module) -> bool:
    """Can ``m`` follow a route? nn's BatchNorm (and timm's BatchNormAct with parameter-free act
    and drop), depthwise convs with zero padding and nn's forward."""
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        cls = type(m)
        if cls.forward is nn.modules.batchnorm._BatchNorm.forward:
            return True
        return is_norm_act(cls) and not any(True for _ in m.act.parameters()) and \
            not any(True for _ in m.drop.parameters())
    if isinstance(m, nn.modules.conv._ConvNd):
        base = type(m).forward
        plain = base in PLAIN_CONV_FORWARDS
        return plain and m.padding_mode == "zeros" and m.groups == m.in_channels == m.out_channels
    return False
