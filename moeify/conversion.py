"""Model -> MoE-CNN: trace, analyse channel groups, plan, and rewrite the graph.

The rewrite is one pass over the traced graph: for each planned MoE layer it inserts a router call
before the layer's first producer, routes every producer's output and every consumer's input
through it, and gates residual-branch outputs before the add they join. Original parameters keep
their state_dict keys; routers live under ``moeify_layers.*`` (and ``moeify_router`` for a global
router).
"""
from __future__ import annotations

import copy
import operator
from collections.abc import Sequence

import torch
import torch.fx as fx
from torch import nn

from .errors import ConversionError
from .experts import calibration_batches, choose_experts, permutable, permute, record
from .fit import fit_layer_routers, recalibrate_norms
from .graph import ChannelGroup, analyze, forward_defaults, infer_shapes, trace
from .graph.cuts import cut_layers
from .graph.interior import Interior, interior
from .graph.liveness import free_at, fresh_ops
from .nn import GlobalRouter, LayerRouter, MoELayer, Route, gate_channels, make_channelwise_module, make_moe_module
from .nn.gated import FUNCTIONAL, gate_reordered, moe_add
from .nn.route import routes_checked
from .planning import ConversionPlan, LayerPlan, build_plan
from .spec import MoESpec


def _spec(experts, top_k, spec: MoESpec | None, **kw) -> MoESpec:
    if spec is not None:
        if experts is not None or top_k is not None:
            raise ConversionError("pass either spec= or experts=/top_k=, not both")
        return spec
    if experts is None:
        raise ConversionError("experts is required (e.g. experts=4), or pass spec=MoESpec(...)")
    return MoESpec(experts=experts, top_k=top_k, **kw)


def _inputs(model: nn.Module, example_inputs) -> tuple[torch.Tensor, ...]:
    if example_inputs is None:
        size = getattr(model, "moeify_input_size", None)
        if size is None:
            raise ConversionError("example_inputs is required for this model (e.g. torch.randn(1, 3, 224, 224))")
        return (torch.zeros(1, *size),)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def _model_name(model: nn.Module) -> str:
    return getattr(model, "moeify_source", None) or type(model).__name__


def _analyse(model: nn.Module, inputs: tuple[torch.Tensor, ...], spec: MoESpec) -> tuple[fx.GraphModule, ConversionPlan]:
    gm, groups = _traced(model, inputs, spec.cuts)
    return gm, build_plan(gm, groups, spec, _model_name(model))


def _traced(model: nn.Module, inputs: tuple[torch.Tensor, ...],
            cuts: str = "copies") -> tuple[fx.GraphModule, list[ChannelGroup]]:
    """The shape-annotated inference graph of ``model`` and its channel groups (modules keep
    following ``.training`` at run time). Optional forward arguments stay arguments; where the default call cannot run on
    that graph (a branch such as ``if mask is not None`` traced as taken, as in Hiera), they are
    traced at their defaults instead, the call the example inputs make. Layers whose channels are
    shared out among groups or copies are cut into parts as ``cuts`` says (graph/cuts.py)."""
    was = model.training
    model.eval()
    try:
        gm = trace(model)
        try:
            infer_shapes(gm, inputs)
        except ConversionError as first:
            defaults = forward_defaults(model, len(inputs))
            if not defaults:
                raise
            gm = trace(model, defaults)
            try:
                infer_shapes(gm, inputs)
            except ConversionError:
                raise first from None
        groups = analyze(gm)
        for _ in range(3):  # a cut can make a neighbouring group's sharing visible
            if not cut_layers(gm, groups, cuts):
                break
            infer_shapes(gm, inputs)
            groups = analyze(gm)
        return gm, groups
    finally:
        model.train(was)


def plan(model: nn.Module, experts: int | None = None, top_k: int | None = None, example_inputs=None, *,
         spec: MoESpec | None = None, **spec_kw) -> ConversionPlan:
    """The printable conversion plan for ``model`` under a spec; converts nothing."""
    spec = _spec(experts, top_k, spec, **spec_kw)
    return _analyse(model, _inputs(model, example_inputs), spec)[1]


def convert(model: nn.Module, experts: int | None = None, top_k: int | None = None, example_inputs=None, *,
            spec: MoESpec | None = None, calibration=None, **spec_kw) -> fx.GraphModule:
    """A new MoE-CNN module built from ``model`` (left untouched) by graph rewriting.

    ``experts``/``top_k`` (or ``spec=MoESpec(...)``, plus ``scope=``, ``router=``, ``router_norm=``,
    ``layers=``, ``exclude=``) say how; ``example_inputs`` gives input shapes. ``calibration`` (a tensor of
    inputs, or an iterable of input batches; no labels) makes each expert a cluster of channels
    that matter together and fits the routers to the trained model (see experts.py, fit.py);
    without it, experts are contiguous channel ranges and routers are fresh. Raises
    ConversionError when no layer can be converted or the model cannot be traced.
    """
    spec = _spec(experts, top_k, spec, **spec_kw)
    if calibration is not None and spec.router_norm:
        raise ConversionError("calibration= fits plain routers to the trained model; convert with "
                              "router_norm=False (moe.router_norm: false) when calibrating")
    inputs = _inputs(model, example_inputs)
    work = copy.deepcopy(model)
    gm, p = _analyse(work, inputs, spec)
    if not p.layers:
        reasons = sorted({d.reason.split(" (")[0].split(";")[0] for d in p.dense})[:4]
        raise ConversionError(f"no layer of {p.model_name} can be converted"
                              + (f" ({'; '.join(reasons)})" if reasons else " (it has no conv or linear layer)")
                              + ("; scope auto tried hidden and branches: try" if spec.scope == "auto" else
                                 "; try another scope (--scope branches) or") + " a number of experts that divides the channels")
    batches = None if calibration is None else calibration_batches(calibration, inputs[0])
    if batches is not None:
        stats = _cluster(gm, p, batches)
        interiors = {n.target for lp in p.layers for n in interior(lp.group, gm).nodes if n.op == "call_module"}
    rewrite(gm, p, inputs)
    if batches is not None:
        _fit(gm, stats, batches, interiors)
    gm.train(model.training)
    gm.moeify_info = rebuild_info("moe", model, spec, inputs)
    gm.moeify_plan = p
    return gm


def _cluster(gm: fx.GraphModule, p: ConversionPlan, batches: list[torch.Tensor]) -> dict:
    """Permute each permutable layer's channels into clustered experts (in place, exact); returns
    the calibration statistics in the new channel order, for fitting the routers."""
    stats = record(gm, p, batches)
    for lp in p.layers:
        why = permutable(gm, lp)
        if why:
            lp.experts_by = f"contiguous ({why})"
            continue
        perm, share, base = choose_experts(stats[lp.name], lp)
        if perm != sorted(perm):
            permute(gm, lp, perm)
            stats[lp.name].importance = stats[lp.name].importance[:, perm]
        lp.experts_by = f"cluster ({share:.0%} vs {base:.0%})" if perm != sorted(perm) else f"contiguous ({base:.0%})"
    return stats


def _fit(gm: fx.GraphModule, stats: dict, batches: list[torch.Tensor], interiors: set[str]) -> None:
    """Fit the routers to the calibration targets, then re-estimate the BatchNorm statistics that
    routing changed (all but the groups' interiors, whose inputs it does not change)."""
    fit_layer_routers(gm, stats)
    if any(m.top_k < m.experts for m in moe_layers(gm).values()):  # with every expert on nothing changed
        recalibrate_norms(gm, batches, interiors)


def rebuild_info(kind: str, model: nn.Module, spec: MoESpec, inputs: Sequence[torch.Tensor]) -> dict:
    """What ``moeify.load`` needs to rebuild a model made from ``model`` (kind moe or s-dense)."""
    return {"kind": kind, "source": getattr(model, "moeify_source", None),
            "model_kwargs": getattr(model, "moeify_kwargs", {}), "spec": spec.to_dict(),
            "input_shape": list(inputs[0].shape[1:])}


def rewrite(gm: fx.GraphModule, p: ConversionPlan, inputs: Sequence[torch.Tensor]) -> None:
    """Insert routers and route producers, consumers and branch adds of every planned layer."""
    graph = gm.graph
    spec = p.spec
    shared = None
    if spec.router == "global":
        image = next(n for n in graph.nodes if n.op == "placeholder")
        if inputs[0].ndim != 4:
            raise ConversionError("router='global' needs an image input [B, C, H, W]; use router='layer'")
        gm.add_submodule("moeify_router", GlobalRouter(inputs[0].shape[1], spec.experts, spec.top_k))
        last_ph = [n for n in graph.nodes if n.op == "placeholder"][-1]
        with graph.inserting_after(last_ph):
            shared = graph.call_module("moeify_router", (image,))
    interiors = [interior(lp.group, gm) for lp in p.layers]
    owner: dict[fx.Node, int] = {}  # node -> index of the MoE layer whose channels it carries
    for i, (lp, inner) in enumerate(zip(p.layers, interiors)):
        owner.update({u.node: i for u in lp.group.producers})
        owner.update({n: i for n in inner.nodes})
    routes = [_insert_router(gm, lp, shared, p.dense_macs, p.spec.router_norm) for lp in p.layers]
    for lp, inner, route in zip(p.layers, interiors, routes):
        x = route.args[0]
        if shared is None and x in owner:
            route.kwargs = {"in_route": routes[owner[x]]}
        _route_layer(gm, lp, inner, route)
    if shared is None:
        _chain_routes(graph, set(routes))
    _free_operands(gm)
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    with graph.inserting_before(output):
        checked = graph.call_function(routes_checked, (output.args[0], *routes))
    output.args = (checked,)
    graph.lint()
    gm.recompile()


def _chain_routes(graph: fx.Graph, routes: set[fx.Node]) -> None:
    """Hand each router whose input carries no route the route made before it in the call
    (``after``), so a call that a strategy has settled (batch 1's one-selection lane) does not
    resolve it again at every layer."""
    before = None
    for n in graph.nodes:
        if n in routes:
            if before is not None and "in_route" not in n.kwargs:
                n.kwargs = {**n.kwargs, "after": before}
            before = n


def _insert_router(gm: fx.GraphModule, lp: LayerPlan, shared: fx.Node | None, dense_macs: int,
                   norm: bool = False) -> fx.Node:
    graph, prim = gm.graph, lp.group.primary
    x = prim.node.args[0]
    key = "moeify_layers." + lp.name.replace(".", "_")
    router = None
    if shared is None:
        cdim = prim.info.cdim_in
        in_features = x.meta["tensor_meta"].shape[cdim]
        router = LayerRouter(in_features, lp.experts, lp.top_k, cdim, norm=norm)
    layer = MoELayer(lp.name, lp.channels, lp.experts, lp.top_k, lp.producers, lp.consumers, router, packed=lp.packed)
    layer.model_macs = float(dense_macs)
    gm.add_submodule(key, layer)
    with graph.inserting_before(prim.node):
        return graph.call_module(key, (shared if shared is not None else x,))


def _route_layer(gm: fx.GraphModule, lp: LayerPlan, inner: Interior, route: fx.Node) -> None:
    graph, g = gm.graph, lp.group
    for u in g.producers:
        _route(gm, u.node, "out_route", route)
    for u in g.consumers:
        order = g.reorder(u)
        if order is None:
            _route(gm, u.node, "in_route", route)
            continue
        x = u.node.args[0]  # channels in another order: gated in that order, then the layer runs in full
        with graph.inserting_before(u.node):
            gated = graph.call_function(gate_reordered, (x, route, order, u.info.cdim_in))
        u.node.replace_input_with(x, gated)
    for n in inner.routed:
        make_channelwise_module(gm.get_submodule(n.target))
        n.kwargs = {**n.kwargs, "route": route}
    for u in g.add_sinks:
        n = u.node
        plain = n.target in (operator.add, operator.iadd, torch.add, moe_add) and len(n.args) == 2 and not n.kwargs
        with graph.inserting_before(n):
            gated = graph.call_function(gate_channels, (u.operand, route, u.cdim, plain))
        n.replace_input_with(u.operand, gated)
        if plain:
            n.target = moe_add


def _free_operands(gm: fx.GraphModule) -> None:
    """Tell each branch add which operands nothing reads after it (``moe_add``'s ``free``), so a
    packed branch is added into the stream's memory instead of into a copy of it."""
    ops = fresh_ops(dict(gm.named_modules()))

    def fresh(n: fx.Node) -> bool:  # an add that writes into neither operand returns new memory
        return ops(n) or n.target is moe_add and not any(n.kwargs["free"])

    for n in gm.graph.nodes:  # in order: an earlier add's choice is known to a later one
        if n.target is moe_add:
            n.kwargs = {**n.kwargs, "free": tuple(isinstance(a, fx.Node) and a.target is not gate_channels
                                                 and free_at(a, n, fresh) for a in n.args)}


def _route(gm: fx.GraphModule, node: fx.Node, kw: str, route: fx.Node) -> None:
    if node.op == "call_module":
        make_moe_module(gm.get_submodule(node.target))
    else:
        node.target = FUNCTIONAL.get(node.target, node.target)  # may already be routed (in and out)
    node.kwargs = {**node.kwargs, kw: route}


ROUTER_PREFIXES = ("moeify_layers.", "moeify_router.")


def is_router(name: str) -> bool:
    """Whether a parameter or module name of a converted model belongs to a router (else to the experts)."""
    return name.startswith(ROUTER_PREFIXES)


def router_parameters(moe: nn.Module) -> list[nn.Parameter]:
    """The routers' parameters: what to optimise when fine-tuning the routing of converted dense weights."""
    return [p for name, p in moe.named_parameters() if is_router(name)]


def moe_layers(moe: nn.Module) -> dict[str, MoELayer]:
    """{qualified name of the original producer layer: MoE layer} of a converted model."""
    return {m.name: m for m in moe.modules() if isinstance(m, MoELayer)}


def routing(moe: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """{layer name: LongTensor[B, top_k]} experts chosen per sample (eval mode, no grad)."""
    chosen: dict[str, torch.Tensor] = {}
    hooks = []
    for name, layer in moe_layers(moe).items():
        def hook(_m, _inp, out: Route, name=name):
            chosen[name] = out.idx.detach().clone()
        hooks.append(layer.register_forward_hook(hook))
    was = moe.training
    moe.eval()
    try:
        with torch.no_grad():
            moe(x)
    finally:
        moe.train(was)
        for h in hooks:
            h.remove()
    return chosen
