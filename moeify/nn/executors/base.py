"""The execution interface: how one MoE layer's ops (router, producers, interior BatchNorm and
depthwise convs, consumers, residual add) are run.

A converted graph calls the same ops whatever the strategy; each op hands the work to the
executor its route carries (``Route.executor``), set once per layer by the layer's router, so a
layer's producer, interior and consumer always agree on the tensor layout. This base class is the
shared vocabulary: masked math (compute everything, zero the unselected channels) for anything a
strategy does not run sparsely, and per-sample (pattern-free, static-shape) packing helpers.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..kernel import Kernel
from ..channelwise import per_sample_batch_norm, per_sample_depthwise
from ..packing import PackedBranch, add_packed, pack, shared_selection, unpack
from ..pool import pool_mean
from ..route import Route, select_top_k
from ..rowgroups import RowGroups, as_tensor


class Executor:
    """One execution strategy. Subclasses override what they run differently; the defaults are
    the masked reference (routes never packed)."""

    name = "executor"
    reads_patterns = False
    """Whether the strategy may read a batch's routing patterns back to the host (then a batch
    that shares one selection is moved by slices instead of per-sample indexing)."""

    def packs(self, batch: int, device: torch.device) -> bool:
        """Whether a packable layer's tensors hold only the selected channels for this batch."""
        return False

    def defers_check(self, device: torch.device) -> bool:
        """Whether routers leave the NaN/inf check to the end of the model call (no host read)."""
        return True

    def resolve(self, x, layer=None) -> "Executor":
        """The concrete strategy for MoE layer ``layer`` called on ``x`` (``auto`` chooses here)."""
        return self

    # -- routing ------------------------------------------------------------------------------
    def follow(self, layer: nn.Module, x, in_route: Route | None) -> Route | None:
        """The route of a layer later in a call where this strategy made a route (the one the
        layer's input carries, ``in_route``, or one made before it), without resolving the
        strategy again; None: resolve and route as usual."""
        return None

    def route(self, layer: nn.Module, x, in_route: Route | None, earlier: Route | None = None) -> Route:
        """The layer's Route from its input (or a shared global Route), adopted by this executor.
        ``earlier``: a route made before it in the same call; where a compiler traces the call,
        this route's NaN/inf check takes over that route's (``select_top_k``'s ``carried``)."""
        if isinstance(x, Route):
            return x.adopted(self, layer.packed and self.packs(x.idx.shape[0], x.idx.device))
        router = layer.router
        shared = shared_selection(in_route, self.reads_patterns) if in_route is not None and in_route.packed else None
        if in_route is None:
            scores = router.scores(as_tensor(x))
        elif shared is not None and not in_route.needs_grad and not isinstance(x, RowGroups):
            scores = router.scores(x, shared)
        else:  # pooled first (per part for a RowGroups, which is never merged for this), then full width:
            # a route's gates are constant over the pooled dims: masking the pooled [B, C] is the same function
            cdim = router.cdim % x.ndim
            h = self.pool(x, [d for d in range(1, x.ndim) if d != cdim])
            if in_route.packed:
                h = self.unpack(h, in_route, in_route.experts * h.shape[1] // in_route.top_k, 1)
            else:
                h = in_route.apply(h, 1)
            scores = router.scores(h)
        noise, drop = (layer.noise, layer.expert_dropout) if layer.training else (0.0, 0.0)
        defer = self.defers_check(scores.device)
        carried = None
        if defer and earlier is not None and earlier.chosen is not None and torch.compiler.is_compiling():
            carried, earlier.chosen = earlier.chosen, None  # checked with this route's scores
        r = select_top_k(scores, layer.top_k, defer, noise, drop, carried)
        r.executor, r.packed = self, layer.packed and self.packs(scores.shape[0], scores.device)
        return r

    def pool(self, x, dims: list[int]) -> torch.Tensor:
        """The mean of a layer's input over its non-channel dims (what a router reads)."""
        x = as_tensor(x)
        return pool_mean(x, dims)

    # -- packing --------------------------------------------------------------------------------
    def unpack(self, y, route: Route, channels: int, cdim: int) -> torch.Tensor:
        """Full width (times gates) from packed ``y``."""
        return unpack(as_tensor(y), route, channels, cdim, self.reads_patterns)

    def pack(self, y: torch.Tensor, route: Route, cdim: int) -> torch.Tensor:
        """Packed from full-width ``y``."""
        return pack(y, route, cdim, self.reads_patterns)

    def add_packed(self, stream: torch.Tensor, branch: PackedBranch, into: bool = False) -> torch.Tensor:
        """``stream`` + the branch's selected channels, without writing the unselected zeros;
        ``into``: nothing reads the stream after this add, so the sum may take its memory."""
        return add_packed(stream, branch, self.reads_patterns, into)

    # -- ops ------------------------------------------------------------------------------------
    def contract(self, x, kernel: Kernel | None, full: Callable[[torch.Tensor], torch.Tensor], cdim: int,
                 c_in: int, in_route: Route | None, out_route: Route | None) -> torch.Tensor:
        """A conv or linear layer with routed input and/or output channels."""
        return self.masked_contract(x, full, cdim, c_in, in_route, out_route)

    def masked_contract(self, x, full: Callable[[torch.Tensor], torch.Tensor], cdim: int, c_in: int,
                        in_route: Route | None, out_route: Route | None) -> torch.Tensor:
        """Every channel computed, unselected ones zeroed; packed tensors unpacked before and
        packed after."""
        x = as_tensor(x)
        if in_route is not None:
            x = self.unpack(x, in_route, c_in, cdim) if in_route.packed else in_route.apply(x, cdim)
        y = full(x)
        if out_route is not None:
            y = out_route.apply(y, cdim)
            if out_route.packed:
                y = self.pack(y, out_route, cdim)
        return y

    def batch_norm(self, bn: nn.modules.batchnorm._BatchNorm, x, route: Route) -> torch.Tensor:
        """BatchNorm of the layer's tensor; in training a channel's statistics come from the
        samples that selected it."""
        return per_sample_batch_norm(bn, as_tensor(x), route)

    def depthwise(self, conv: nn.modules.conv._ConvNd, x, route: Route) -> torch.Tensor:
        """Depthwise conv of the layer's tensor."""
        x = as_tensor(x)
        return per_sample_depthwise(conv, x, route) if route.packed else conv._conv_forward(x, conv.weight, conv.bias)

    def gate_branch(self, x, route: Route, cdim: int, lazy: bool):
        """A residual branch joining its add: full width with unselected channels zero, or (lazy,
        packed) a PackedBranch the add writes selectively."""
        x = as_tensor(x)
        if not route.packed:
            return route.apply(x, cdim)
        channels = x.shape[cdim] * route.experts // route.top_k
        return PackedBranch(x, route, channels, cdim) if lazy else self.unpack(x, route, channels, cdim)
