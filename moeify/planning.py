"""The conversion plan: which channel groups become MoE layers under a spec, and what they cost.

A plan is computed from a shape-annotated graph and its channel groups; it converts nothing. It is
printable (a rich table) and carries, per MoE layer, the graph nodes the rewrite will touch.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field, replace

import torch.fx as fx
from rich.console import Console
from rich.table import Table

from .errors import ConversionError
from .graph.groups import ChannelGroup, node_name
from .graph.interior import interior
from .graph.ops import Kind, classify
from .spec import MoESpec


@dataclass
class LayerPlan:
    """One MoE layer: the channel group of ``name`` (its first producer) split into experts."""

    name: str
    channels: int
    experts: int
    top_k: int
    producers: list[str]
    consumers: list[str]
    add_gates: list[str]
    dense_macs: int = 0
    moe_macs: int = 0
    packed: bool = False
    """Whether the layer's tensors may hold only the selected channels between producer and
    consumer (every interior op allows it); else they stay full width, unselected channels zero."""
    pack_blocker: str | None = None
    experts_by: str = "contiguous"
    """How channels were split into experts: contiguous ranges, or "cluster" (calibrated conversion,
    with the share of importance the top-K experts capture, clustered vs contiguous)."""
    reordered: list[str] = field(default_factory=list)
    """Consumers that read the layer's channels in another order: they run in full behind the gate."""
    group: ChannelGroup | None = field(default=None, repr=False)
    """The graph analysis behind this layer (its nodes, for ``convert``); a saved or copied plan
    is the record without it."""

    def __getstate__(self) -> dict:
        """Pickled and copied as the record, without ``group``."""
        return {**self.__dict__, "group": None}


@dataclass
class DenseEntry:
    """A channel group left dense, with the reason."""

    name: str
    channels: int
    reason: str


@dataclass
class ConversionPlan:
    """What ``convert`` will do: the MoE layers, the groups left dense, and MAC totals per sample."""

    spec: MoESpec
    layers: list[LayerPlan]
    dense: list[DenseEntry]
    dense_macs: int
    moe_macs: int
    model_name: str = "model"
    scope: str = ""
    """The scope the layers were chosen with (the spec's, or what ``auto`` resolved to)."""
    scope_reason: str = ""
    """Why ``auto`` chose that scope (empty for an explicit scope)."""

    def __post_init__(self) -> None:
        self.scope = self.scope or self.spec.scope

    def table(self) -> Table:
        scope = self.scope if self.scope == self.spec.scope else f"{self.spec.scope} -> {self.scope}"
        t = Table(title=f"moeify plan: {self.model_name} -> {len(self.layers)} MoE layers "
                        f"(experts={self.spec.experts}, top_k={self.spec.top_k}, scope={scope}, "
                        f"router={self.spec.router})")
        for col, just in (("layer", "left"), ("channels", "right"), ("experts", "right"),
                          ("gates", "left"), ("packed", "left"), ("dense MACs", "right"), ("MoE MACs", "right")):
            t.add_column(col, justify=just)
        for lp in self.layers:
            gates = ", ".join([f"{c} (reordered: in full)" if c in lp.reordered else c for c in lp.consumers]
                              + [f"{a} (add)" for a in lp.add_gates]) or "-"
            by = "" if lp.experts_by == "contiguous" else f" {lp.experts_by}"
            t.add_row(lp.name, str(lp.channels), f"{lp.top_k}/{lp.experts}{by}", "-> " + gates,
                      "yes" if lp.packed else f"no: {lp.pack_blocker}", _fmt(lp.dense_macs), _fmt(lp.moe_macs))
        t.add_section()
        t.add_row("total (all layers)", "", "", "", "", _fmt(self.dense_macs), _fmt(self.moe_macs))
        t.caption = ("packed: between producer and consumer only the selected channels are kept (grouped and "
                     "static execution); the execution strategy is chosen per call, see moeify.execution")
        if self.scope_reason:
            t.caption = f"scope {self.spec.scope}: {self.scope_reason}\n{t.caption}"
        return t

    def dense_table(self) -> Table:
        t = Table(title=f"left dense ({len(self.dense)} channel groups)")
        t.add_column("layer")
        t.add_column("channels", justify="right")
        t.add_column("reason")
        for d in self.dense:
            t.add_row(d.name, str(d.channels), d.reason)
        return t

    def __rich_console__(self, console, options):
        yield self.table()
        yield self.dense_table()

    def __str__(self) -> str:
        console = Console(width=160, record=True, file=_Null())
        console.print(self)
        return console.export_text()


class _Null:
    def write(self, *_):
        pass

    def flush(self):
        pass


def _fmt(macs: float) -> str:
    if macs >= 1e9:
        return f"{macs / 1e9:.3f} G"
    if macs >= 1e6:
        return f"{macs / 1e6:.2f} M"
    return f"{macs / 1e3:.1f} K"


def node_macs(node: fx.Node, gm: fx.GraphModule) -> int:
    """Multiply-accumulates per sample of a conv/linear node, from recorded shapes."""
    out = node.meta.get("tensor_meta")
    if out is None or not hasattr(out, "shape"):
        return 0
    shape = tuple(out.shape)
    per_sample = math.prod(shape[1:]) if len(shape) > 1 else 1
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        w = getattr(m, "weight", None)
    else:
        wn = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        w = wn.meta.get("tensor_meta") if isinstance(wn, fx.Node) else None
    if w is None:
        return 0
    # weight is [out, in/groups, *kernel]: each output element costs in/groups * kernel MACs
    return per_sample * math.prod(tuple(w.shape)[1:])


def _selected(name: str, spec: MoESpec) -> str | None:
    if any(fnmatch.fnmatchcase(name, p) for p in spec.exclude):
        return "excluded by the spec"
    if spec.layers is not None and not any(fnmatch.fnmatchcase(name, p) for p in spec.layers):
        return "not selected by the spec's layers"
    return None


def _group_reason(g: ChannelGroup, spec: MoESpec) -> str | None:
    blockers = g.blockers()
    if blockers:
        return blockers[0]
    if g.is_stream:
        return next(s for s in g.sources if s.startswith("residual stream")) + \
            "; residual streams stay dense"
    if g.add_sinks:
        if g.consumers or len(g.add_sinks) > 1:
            return "feeds a residual add and other layers (part of the stream)"
        if spec.scope == "hidden":
            return f"residual branch output (added at {g.add_sinks[0].node.name}); " \
                   "use scope 'branches' or 'paper' to gate it"
    if spec.scope == "paper" and g.reads_input:
        return "first conv (reads the image): the paper keeps it dense"
    n, c = spec.experts, g.channels
    if c % n:
        ok = [d for d in range(2, min(c, 64) + 1) if c % d == 0][:6]
        return f"{c} channels cannot be split into {n} equal experts (experts that divide {c}: " \
               f"{', '.join(map(str, ok)) or 'none'})"
    for u in g.producers + g.consumers:
        groups = u.info.groups if u.info is not None else 1
        if groups != 1 and (groups < 0 or (c // n) % (c // groups)):
            return f"{node_name(u.node)} is a grouped conv ({groups} groups): experts must cover whole " \
                   f"conv groups, use experts dividing {groups}"
    return None


AUTO_SAVING = 0.95
"""Scope ``auto`` keeps ``hidden`` when its MoE layers leave at most this share of the dense
model's MACs (a real saving); otherwise it takes ``branches`` if that saves more."""


def build_plan(gm: fx.GraphModule, groups: list[ChannelGroup], spec: MoESpec,
               model_name: str = "model") -> ConversionPlan:
    """Decide, per channel group, MoE layer or dense (with the reason), and count MACs. Scope
    ``auto`` plans ``hidden`` first (residual streams untouched) and falls back to ``branches``
    when the hidden scope finds no real saving; the plan records which and why."""
    plan = _plan_scope(gm, groups, spec, model_name) if spec.scope != "auto" else _plan_auto(gm, groups, spec, model_name)
    _check_named_layers(spec, plan.layers, plan.dense)
    return plan


def _plan_auto(gm: fx.GraphModule, groups: list[ChannelGroup], spec: MoESpec, model_name: str) -> ConversionPlan:
    """Scope ``auto``: the hidden plan where it saves, else the branches plan where that saves more."""
    hidden = _plan_scope(gm, groups, replace(spec, scope="hidden"), model_name)
    share = hidden.moe_macs / max(hidden.dense_macs, 1)
    if hidden.layers and share <= AUTO_SAVING:
        return _resolved(hidden, spec, f"hidden, whose {len(hidden.layers)} MoE layers run {share:.0%} of the "
                                       "dense MACs without touching a residual stream")
    branches = _plan_scope(gm, groups, replace(spec, scope="branches"), model_name)
    found = f"runs {share:.0%} of the dense MACs" if hidden.layers else "finds no MoE layer"
    if branches.layers and (not hidden.layers or branches.moe_macs < hidden.moe_macs):
        return _resolved(branches, spec, f"branches (residual-branch outputs gated too): the hidden scope "
                                         f"{found}, branches runs {branches.moe_macs / max(branches.dense_macs, 1):.0%}")
    return _resolved(hidden, spec, f"hidden: it {found} and branches saves no more")


def _resolved(p: ConversionPlan, spec: MoESpec, why: str) -> ConversionPlan:
    """Plan ``p`` (made with a concrete scope) presented as the ``auto`` spec's plan."""
    return replace(p, spec=spec, scope=p.spec.scope, scope_reason=f"chose {why}")


def _plan_scope(gm: fx.GraphModule, groups: list[ChannelGroup], spec: MoESpec, model_name: str) -> ConversionPlan:
    """The plan under one concrete scope."""
    layers: list[LayerPlan] = []
    dense: list[DenseEntry] = []
    for g in groups:
        name = node_name(g.primary.node)
        reason = _group_reason(g, spec) or _selected(name, spec)
        if reason:
            dense.append(DenseEntry(name, g.channels, reason))
            continue
        blocker = interior(g, gm).blocker
        layers.append(LayerPlan(name, g.channels, spec.experts, spec.top_k,
                                [node_name(u.node) for u in g.producers],
                                [node_name(u.node) for u in g.consumers],
                                [u.node.name for u in g.add_sinks], packed=blocker is None,
                                pack_blocker=blocker, reordered=[node_name(u.node) for u in g.reordered()],
                                group=g))
    # a residual add gets at most one gated branch: keep the costliest, the shortcut stays dense
    by_add: dict[str, list[LayerPlan]] = {}
    for lp in layers:
        for a in lp.add_gates:
            by_add.setdefault(a, []).append(lp)
    def cost(lp: LayerPlan) -> int:
        return sum(node_macs(u.node, gm) for u in lp.group.producers)

    drop: set[int] = set()
    for a, cands in by_add.items():
        if len(cands) > 1:
            keep = max(cands, key=cost)
            for lp in cands:
                if lp is not keep:
                    drop.add(id(lp))
                    dense.append(DenseEntry(lp.name, lp.channels,
                                            f"the other operand of {a} ({keep.name}) is gated; this one stays dense"))
    layers = [lp for lp in layers if id(lp) not in drop]
    _count(gm, layers, spec)
    dense_macs = sum(node_macs(n, gm) for n in gm.graph.nodes if _is_contraction(n, gm))
    moe_total = _moe_total(gm, layers, spec)
    return ConversionPlan(spec, layers, dense, dense_macs, moe_total, model_name)


def _check_named_layers(spec: MoESpec, layers: list[LayerPlan], dense: list[DenseEntry]) -> None:
    """A layer the spec names exactly (no wildcard) must convert; say why it cannot."""
    converted = {lp.name for lp in layers}
    reasons = {d.name: d for d in dense}
    for p in spec.layers or ():
        if any(ch in p for ch in "*?[") or p in converted:
            continue
        if p in reasons:
            d = reasons[p]
            raise ConversionError(f"layer {p} ({d.channels} channels) cannot be converted: {d.reason}")
        raise ConversionError(f"no convertible channel group starts at layer {p!r}; candidates: "
                              + ", ".join(sorted(converted | set(reasons))[:8]))


def _is_contraction(n: fx.Node, gm: fx.GraphModule) -> bool:
    return n.op in ("call_module", "call_function") and classify(n, gm).kind == Kind.CONTRACT


def _fractions(layers: list[LayerPlan], spec: MoESpec) -> dict[fx.Node, float]:
    r = spec.top_k / spec.experts
    frac: dict[fx.Node, float] = {}
    for lp in layers:
        reordered = {u.node for u in lp.group.reordered()}  # these run in full behind the gate
        for u in lp.group.producers + lp.group.consumers:
            if u.node not in reordered:
                frac[u.node] = frac.get(u.node, 1.0) * r
    return frac


def _count(gm: fx.GraphModule, layers: list[LayerPlan], spec: MoESpec) -> None:
    frac = _fractions(layers, spec)
    for lp in layers:
        nodes = {u.node for u in lp.group.producers + lp.group.consumers}
        lp.dense_macs = sum(node_macs(n, gm) for n in nodes)
        lp.moe_macs = int(sum(node_macs(n, gm) * frac.get(n, 1.0) for n in nodes))


def _moe_total(gm: fx.GraphModule, layers: list[LayerPlan], spec: MoESpec) -> int:
    frac = _fractions(layers, spec)
    total = 0.0
    for n in gm.graph.nodes:
        if _is_contraction(n, gm):
            total += node_macs(n, gm) * frac.get(n, 1.0)
    return int(total)
