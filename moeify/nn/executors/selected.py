"""``selected``: the lane of a layer whose whole batch shares one selection, known on the host, in
a call that autograd does not record (batch 1 in inference under ``grouped``, which ``auto``
picks there on the CPU).

Not a strategy to choose: ``grouped`` hands such a route to it (``Route.one``), and the next
layers of the call follow it without resolving the strategy again (``follow``). Each op is one
kernel call on the selection's parameter slices, kept with the layer (``cache.kept``: one dict
read and a version and storage check per parameter), without the per-pattern bookkeeping a mixed
batch needs: at batch 1 a small layer's convolution costs about as much as the Python around it,
so every call saved there shows in the latency.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..channelwise import sliced_bn
from ..cache import kept, store
from ..packing import PackedBranch, add_selection, place, take
from ..weights import kernel_slices
from ..policy import current_policy
from ..route import Route, select_one
from .base import Kernel
from .grouped import Grouped


class Selected(Grouped):
    name = "selected"

    def route_one(self, layer: nn.Module, x: torch.Tensor, in_route: Route | None) -> Route | None:
        """The route of one sample in inference, chosen on the host (None: not this lane's case: a
        routing policy, an input whose channels another route zeroes, a compiling trace)."""
        if current_policy() is not None or torch.compiler.is_compiling():
            return None
        return self.follow(layer, x, in_route)

    def follow(self, layer: nn.Module, x, in_route: Route | None) -> Route | None:
        """The next layer of a call already in this lane (the policy and compile checks done once,
        at the call's first layer): its route from its router on the selected channels."""
        router = layer._modules.get("router")  # a dict read: this runs once per layer and call
        if router is None or layer.training or (in_route is not None and not in_route.packed) \
                or not isinstance(x, torch.Tensor):
            return None
        r = select_one(router.scores(x, None if in_route is None else list(in_route.one)), layer.top_k)
        r.executor, r.packed = self, layer.packed
        return r

    def contract(self, x, kernel: Kernel | None, full: Callable[[torch.Tensor], torch.Tensor], cdim: int,
                 c_in: int, in_route: Route | None, out_route: Route | None) -> torch.Tensor:
        """The kernel on the selected channels with the selection's weight (and bias) slices."""
        if kernel is None or (in_route is not None and in_route.one is None) \
                or (out_route is not None and out_route.one is None):
            return super().contract(x, kernel, full, cdim, c_in, in_route, out_route)
        w = kernel.weight
        ins, outs = in_route and in_route.one, out_route and out_route.one
        per_in = w.shape[1] // in_route.experts if ins else 0
        per_out = w.shape[0] // out_route.experts if outs else 0

        def make() -> tuple[torch.Tensor, torch.Tensor | None]:
            return kernel_slices(kernel, ins and list(ins), per_in, outs and list(outs), per_out)

        owners = (w,) if kernel.bias is None else (w, kernel.bias)
        ws, bs = kept(kernel.kept, (ins, outs), owners, make)
        if ins and not in_route.packed:
            x = take(x, cdim % x.ndim, list(ins), per_in)
        y = kernel.run(x, ws, bs)
        if outs and not out_route.packed:
            y = place(y, w.shape[0], cdim % y.ndim, list(outs), per_out)
        return y

    def batch_norm(self, bn: nn.modules.batchnorm._BatchNorm, x, route: Route) -> torch.Tensor:
        """Inference BatchNorm of the selected channels, with their slices of its statistics and affine."""
        buffers, params = bn._buffers, bn._parameters  # read directly: this runs once per layer and call
        rm = buffers.get("running_mean")
        if not route.packed or bn.training or rm is None:
            return super().batch_norm(bn, x, route)
        ts = (rm, buffers.get("running_var"), params.get("weight"), params.get("bias"))
        per = bn.num_features // route.experts

        def make() -> tuple:
            return sliced_bn(bn, list(route.one), per)

        owners = ts if ts[2] is not None and ts[3] is not None else tuple(t for t in ts if t is not None)
        rm, rv, w, b = kept(store(bn), route.one, owners, make)
        return torch.batch_norm(x, w, b, rm, rv, False, 0.0, bn.eps, torch.backends.cudnn.enabled)  # F.batch_norm's call

    def add_packed(self, stream: torch.Tensor, branch: PackedBranch, into: bool = False) -> torch.Tensor:
        """The branch added at the selection's channels, without the gate product (no gradient in
        this lane) or the pattern lookup."""
        route = branch.route
        if route.one is None:
            return super().add_packed(stream, branch, into)
        y = branch.y if branch.y.dtype == stream.dtype else branch.y.to(stream.dtype)
        return add_selection(stream, y, list(route.one), branch.channels // route.experts, branch.cdim % stream.ndim,
                             into and stream._base is None)  # nothing records in this lane
