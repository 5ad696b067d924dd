"""``static``: static shapes and no host read of any routing decision, so ``torch.compile(moe,
fullgraph=True)`` traces a converted model as one graph (eval and training) and CUDA graphs can
capture it.

Up to ``gather_max_batch`` samples (per device type), each sample's selected weight slices are
gathered by its route on the device and the batch runs as one grouped conv, one group per sample
(timm CondConv's trick), or one batched matmul for a linear layer; a packed layer's interior runs
on per-sample channel indices. Larger batches run the masked math (every channel, then the
gates), which a compiler fuses with its neighbours: per-sample weight copies would cost more
memory traffic than the MACs they save.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from ..packing import gather_channels, memory_format, scatter_channels, times_gates
from ..route import Route
from ..rowgroups import as_tensor
from .base import Executor, Kernel

GATHER_MAX_BATCH = {"cpu": 1, "cuda": 0}
"""Per device type, the largest batch whose layers gather per-sample weights (any other type:
the CUDA value). CPU: 1. The grouped conv itself is cheap there, but each sample's copy of its
weight slices (batch x K/N of a layer's weight) and the layout copies around the grouped conv
cost more than the MACs it saves wherever weights outweigh activations (docs/benchmarks.md,
"Per-sample weights on the CPU"). CUDA: 0, the masked math at every batch: on an H200 gathering
lost to it at every batch measured, eager, and under CUDA graphs cost more than the twin with
routers (docs/benchmarks.md, "CUDA (H200), sixteenth session")."""


def take_experts(v: torch.Tensor, dim: int, idx: torch.Tensor, experts: int, batched: bool) -> torch.Tensor:
    """``v`` with dim ``dim`` (C channels, ``experts`` contiguous blocks) cut, per sample b, to the
    blocks ``idx[b]`` ([B, K], slot order): whole blocks move, so the copy runs over contiguous
    runs of C/N values instead of one index per value. ``batched``: ``v`` already has a leading
    sample dim (of size B); otherwise one is added in front."""
    u = v.unflatten(dim, (experts, v.shape[dim] // experts))
    if batched:
        shape = [1] * u.ndim
        shape[0], shape[dim] = idx.shape
        size = list(u.shape)
        size[dim] = idx.shape[1]
        return u.gather(dim, idx.reshape(shape).expand(size)).flatten(dim, dim + 1)
    u = u.index_select(dim, idx.reshape(-1)).unflatten(dim, tuple(idx.shape)).movedim(dim, 0)
    return u.flatten(dim + 1, dim + 2)


def per_sample_weight(w: torch.Tensor, in_route: Route | None, out_route: Route | None) -> torch.Tensor:
    """[B, O', I', *kernel]: weight [O, I, *kernel] restricted, per sample b, to the output
    channels of ``out_route``'s selected experts and the input channels of ``in_route``'s (None:
    all of them), in slot order. A channels-last weight is gathered in its own layout (input
    channels innermost), so the result is channels-last too."""
    last = memory_format(w) is not torch.contiguous_format
    v = w.movedim(1, -1) if last else w  # [O, *kernel, I] (contiguous when channels-last) or [O, I, *kernel]
    idim = v.ndim - 1 if last else 1
    if out_route is not None:
        v = take_experts(v, 0, out_route.idx, out_route.experts, batched=False)
    if in_route is not None:
        batched = out_route is not None
        v = take_experts(v, idim + batched, in_route.idx, in_route.experts, batched=batched)
    return v.movedim(-1, 2) if last else v


def gathered_contract(x: torch.Tensor, kernel: Kernel, cdim: int, in_route: Route | None,
                      out_route: Route | None) -> torch.Tensor:
    """The layer on each sample's selected channels only, with per-sample gathered weights."""
    w, bias = kernel.weight, kernel.bias
    bsz, c_out = x.shape[0], w.shape[0]
    if in_route is not None:
        per_in = w.shape[1] // in_route.experts
        if not in_route.packed:
            x = gather_channels(x, in_route, cdim)
        x = times_gates(x, in_route, None, per_in, cdim)
    if out_route is not None:
        per_out = c_out // out_route.experts
    ws = per_sample_weight(w, in_route, out_route)
    bs = None
    if bias is not None:
        bs = bias.expand(bsz, -1) if out_route is None else \
            take_experts(bias, 0, out_route.idx, out_route.experts, batched=False)
    if kernel.linear:
        flat = x.reshape(bsz, -1, x.shape[-1])
        wt = ws.transpose(1, 2)
        y = torch.bmm(flat, wt) if bs is None else torch.baddbmm(bs[:, None, :], flat, wt)
        y = y.reshape(*x.shape[:-1], ws.shape[1])
    elif bsz == 1:
        y = kernel.run(x, ws[0], None if bs is None else bs[0])
    else:  # the samples as conv groups. Contiguous first: a reshape of another layout can be a view whose
        # size-1 batch dim has an odd stride, and the CPU's native grouped conv (float64) then computes
        # a wrong weight gradient from it (torch 2.14; the output is right)
        y = kernel.run(x.contiguous().reshape(1, bsz * x.shape[1], *x.shape[2:]), ws.reshape(-1, *ws.shape[2:]),
                       None if bs is None else bs.reshape(-1), groups=bsz)
        y = y.reshape(bsz, -1, *y.shape[2:])
    if out_route is not None:
        y = times_gates(y, out_route, None, per_out, cdim)
        if not out_route.packed:
            y = scatter_channels(y, out_route, c_out, cdim)
    return y


class Static(Executor):
    name = "static"

    def __init__(self, gather_max_batch: dict[str, int] | None = None) -> None:
        self.gather_max_batch = dict(GATHER_MAX_BATCH if gather_max_batch is None else gather_max_batch)

    def packs(self, batch: int, device: torch.device) -> bool:
        """Gathered weights and packed layers up to ``gather_max_batch`` samples, else masked math."""
        return batch <= self.gather_max_batch.get(device.type, self.gather_max_batch.get("cuda", 0))

    def contract(self, x, kernel: Kernel | None, full: Callable[[torch.Tensor], torch.Tensor], cdim: int,
                 c_in: int, in_route: Route | None, out_route: Route | None) -> torch.Tensor:
        route = out_route or in_route
        if kernel is None or not self.packs(route.idx.shape[0], route.idx.device):
            return self.masked_contract(x, full, cdim, c_in, in_route, out_route)
        return gathered_contract(as_tensor(x), kernel, cdim, in_route, out_route)
