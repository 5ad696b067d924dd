"""The static twin of an MoE-CNN: the dense backbone with every MoE layer narrowed to K/N width.

It is what a statically pruned network with the MoE's active width costs, so it is the speed limit
a dynamic MoE can reach on a given machine (``moeify bench`` times it side by side), and the
S-Dense baseline of the AdvMoE paper. Each converted group keeps its first K experts' channels:
producers lose output channels, consumers input channels, BatchNorm and depthwise convs in between
are sliced, and a narrowed residual branch is added into the first channels of the stream.
"""
from __future__ import annotations

import copy
import operator

import torch
import torch.fx as fx
from torch import nn

from .conversion import _analyse, _inputs, _spec, rebuild_info
from .errors import ConversionError
from .graph.interior import interior
from .graph.trace import inserted
from .spec import MoESpec


@inserted
def narrow_add(a: torch.Tensor, b: torch.Tensor, cdim: int = 1) -> torch.Tensor:
    """``a + b`` where the narrower operand covers the first channels of the wider one."""
    if a.shape[cdim] == b.shape[cdim]:
        return a + b
    wide, narrow = (a, b) if a.shape[cdim] > b.shape[cdim] else (b, a)
    # one copy, the narrow part added to its slice; the dtype from the operands' dtypes (result_type's
    # non-tensor result would break a compiled graph)
    out = wide.to(torch.promote_types(wide.dtype, narrow.dtype), copy=True)
    out.narrow(cdim, 0, narrow.shape[cdim]).add_(narrow)
    return out


def _slice_param(m: nn.Module, name: str, dim: int, keep: int) -> None:
    p = getattr(m, name, None)
    if p is None:
        return
    v = p.detach().narrow(dim, 0, keep).clone()
    if isinstance(p, nn.Parameter):
        setattr(m, name, nn.Parameter(v, requires_grad=p.requires_grad))
    else:
        setattr(m, name, v)


def _narrow_out(m: nn.Module, keep: int) -> None:
    _slice_param(m, "weight", 0, keep)
    _slice_param(m, "bias", 0, keep)
    if isinstance(m, nn.Linear):
        m.out_features = keep
    elif isinstance(m, nn.modules.conv._ConvNd):
        m.out_channels = keep
        if m.groups > 1:  # depthwise
            m.in_channels = m.groups = keep
    elif isinstance(m, nn.modules.batchnorm._BatchNorm):
        m.num_features = keep
        _slice_param(m, "running_mean", 0, keep)
        _slice_param(m, "running_var", 0, keep)


def _narrow_in(m: nn.Module, keep: int, cdim: int) -> None:
    _slice_param(m, "weight", 1, keep)
    if isinstance(m, nn.Linear):
        m.in_features = keep
    else:
        m.in_channels = keep


def static_twin(model: nn.Module, experts: int | None = None, top_k: int | None = None, example_inputs=None, *,
                spec: MoESpec | None = None, **spec_kw) -> fx.GraphModule:
    """A dense module with the layers ``convert`` would make MoE narrowed to top_k/experts width.

    Layers built from functional convs, or whose channels pass through per-channel state moeify
    cannot slice, stay full width (listed in ``twin.moeify_twin_skipped``).
    """
    spec = _spec(experts, top_k, spec, **spec_kw)
    inputs = _inputs(model, example_inputs)
    work = copy.deepcopy(model)
    gm, p = _analyse(work, inputs, spec)
    if not p.layers:
        raise ConversionError(f"no layer of {p.model_name} can be converted, so it has no static twin")
    skipped = []
    for lp in p.layers:
        g = lp.group
        inner = interior(g, gm)
        uses = g.producers + g.consumers
        if inner.blocker or any(u.node.op != "call_module" for u in uses):
            skipped.append(lp.name)
            continue
        keep = lp.channels * lp.top_k // lp.experts
        for u in g.producers:
            _narrow_out(gm.get_submodule(u.node.target), keep)
        for u in g.consumers:
            _narrow_in(gm.get_submodule(u.node.target), keep, u.info.cdim_in)
        for n in inner.routed:
            _narrow_out(gm.get_submodule(n.target), keep)
        for u in g.add_sinks:
            n = u.node
            if n.target in (operator.add, operator.iadd, torch.add) and len(n.args) == 2 and not n.kwargs:
                n.target, n.op = narrow_add, "call_function"
                n.args = (n.args[0], n.args[1], u.cdim)
            else:
                skipped.append(lp.name)
    gm.graph.lint()
    gm.recompile()
    gm.train(model.training)
    gm.moeify_twin_skipped = skipped
    gm.moeify_info = rebuild_info("s-dense", model, spec, inputs)
    return gm
