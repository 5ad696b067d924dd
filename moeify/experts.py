"""Experts by clustering: permute each MoE group's channels so that every expert is a balanced
cluster of channels that matter together (MoEfication's idea, for CNN channels).

With a calibration set (inputs only), one pass over the dense traced graph records, per planned
layer and sample, how much each group channel matters to the layer's consumers: its mean absolute
activation at the consumer input times the norm of the consumer weights that read it. Channels
are clustered by the correlation of these profiles over samples into ``experts`` clusters of equal
size (balanced k-means); a layer keeps the contiguous split when that captures more of the top-K
mass. Permuting a producer's output channels, the interior BatchNorm / depthwise parameters and
the consumers' input channels together is an exact reparametrisation: the dense function is
unchanged. The same pass records each router's input features, from which ``fit.py`` fits routers.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from .errors import ConversionError
from .graph.groups import node_name
from .graph.interior import interior
from .nn.channelwise import routable
from .planning import ConversionPlan, LayerPlan

Calibration = torch.Tensor | Iterable[torch.Tensor]


@dataclass
class LayerStats:
    """Per planned layer, over the calibration set: channel importance [S, C] and router inputs [S, F]."""
    importance: torch.Tensor
    router_inputs: torch.Tensor


def calibration_batches(calibration: Calibration, example: torch.Tensor, batch_size: int = 500) -> list[torch.Tensor]:
    """The calibration set as batches shaped like ``example`` (one-line errors for the wrong shape or none)."""
    if isinstance(calibration, torch.Tensor):
        batches = list(calibration.split(batch_size)) if calibration.ndim == example.ndim else [calibration]
    else:
        batches = [b[0] if isinstance(b, (tuple, list)) else b for b in calibration]
    if not batches or sum(len(b) for b in batches) == 0:
        raise ConversionError("the calibration set is empty; pass a tensor of inputs [N, ...] or an iterable of batches")
    for b in batches:
        if not isinstance(b, torch.Tensor) or tuple(b.shape[1:]) != tuple(example.shape[1:]):
            shape = tuple(b.shape[1:]) if isinstance(b, torch.Tensor) else type(b).__name__
            raise ConversionError(f"calibration inputs must be shaped like the model's input {tuple(example.shape[1:])} "
                                  f"per sample, got {shape}")
    return [b.float() for b in batches]


def permutable(gm: fx.GraphModule, lp: LayerPlan) -> str | None:
    """Why this layer's channels cannot be permuted exactly (None when they can)."""
    g = lp.group
    if g.add_sinks:
        return "its channels join a residual add"
    reordered = g.reordered()
    if reordered:
        return f"{node_name(reordered[0].node)} reads its channels in another order (a channel shuffle)"
    for role, uses in (("producer", g.producers), ("consumer", g.consumers)):
        for u in uses:
            if u.node.op != "call_module":
                return f"{role} {u.node.name} is not a module"
            m = gm.get_submodule(u.node.target)
            if not isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) or getattr(m, "groups", 1) != 1:
                return f"{role} {u.node.target} is not a plain conv or linear layer"
    for node in _interior_modules(gm, lp):
        m = gm.get_submodule(node.target)
        stateful = any(True for _ in m.parameters()) or any(True for _ in m.buffers())
        if stateful and not routable(m):  # what can follow a route holds one value per channel
            return f"{node.target} has parameters moeify cannot permute"
    return None


def _interior_modules(gm: fx.GraphModule, lp: LayerPlan) -> list[fx.Node]:
    return [n for n in interior(lp.group, gm).nodes if n.op == "call_module"]


def record(gm: fx.GraphModule, plan: ConversionPlan, batches: list[torch.Tensor]) -> dict[str, LayerStats]:
    """One pass of the dense graph over the calibration batches (eval mode, no grad)."""
    from rich.progress import track

    watch: dict[fx.Node, list] = {}
    routers: dict[fx.Node, list] = {}
    for lp in plan.layers:
        for u in lp.group.consumers:
            watch.setdefault(u.node, []).append((lp.name, _input_norms(gm, u.node, lp.channels), u.info.cdim_in))
        prim = lp.group.primary
        routers.setdefault(prim.node.args[0], []).append((lp.name, prim.info.cdim_in))
    rec = _Recorder(gm, watch, routers)
    imp: dict[str, list[torch.Tensor]] = {lp.name: [] for lp in plan.layers}
    feats: dict[str, list[torch.Tensor]] = {lp.name: [] for lp in plan.layers}
    was, dev = gm.training, next(gm.parameters()).device
    gm.eval()
    try:
        with torch.no_grad():
            for b in track(batches, description="calibrating experts", transient=True):
                i, f = rec.collect(b.to(dev))
                for name in imp:
                    imp[name].append(i[name].cpu())
                    feats[name].append(f[name].cpu())
    finally:
        gm.train(was)
    return {name: LayerStats(torch.cat(imp[name]), torch.cat(feats[name])) for name in imp}


def _input_norms(gm: fx.GraphModule, node: fx.Node, channels: int) -> torch.Tensor:
    """How strongly a consumer reads each input channel: the norm of its weights on it (ones when the
    consumer is not a conv or linear module with one group)."""
    m = gm.get_submodule(node.target) if node.op == "call_module" else None
    w = getattr(m, "weight", None)
    if not isinstance(w, torch.Tensor) or getattr(m, "groups", 1) != 1 or w.ndim < 2 or w.shape[1] != channels:
        return torch.ones(channels)
    return w.detach().float().transpose(0, 1).flatten(1).norm(dim=1).cpu()


def _channel_mean(x: torch.Tensor, cdim: int) -> torch.Tensor:
    """[B, C]: the mean over every dim but batch and channels."""
    x = x.movedim(cdim % x.ndim, 1)
    return x.flatten(2).mean(2) if x.ndim > 2 else x


class _Recorder(fx.Interpreter):
    """Runs the dense graph; keeps, at each watched consumer, |input| x weight norm per channel
    (summed over a layer's consumers), and at each router's input its pooled features."""

    def __init__(self, gm: fx.GraphModule, watch: dict, routers: dict) -> None:
        super().__init__(gm)
        self.watch, self.routers = watch, routers

    def collect(self, x: torch.Tensor) -> tuple[dict, dict]:
        self.imp, self.feats = {}, {}
        self.run(x)
        return self.imp, self.feats

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        for name, cdim in self.routers.get(n, ()):
            self.feats[name] = _channel_mean(out.float(), cdim)
        for user in n.users:
            if user.args and user.args[0] is n:
                for name, norms, cdim in self.watch.get(user, ()):
                    a = _channel_mean(out.float().abs(), cdim) * norms
                    self.imp[name] = a if name not in self.imp else self.imp[name] + a
        return out


def balanced_clusters(profiles: torch.Tensor, k: int, iters: int = 25, seed: int = 0) -> list[list[int]]:
    """Channels (rows of ``profiles`` [C, S]) in ``k`` clusters of C/k each, by balanced k-means on
    their standardised profiles (correlation distance, farthest-point start); deterministic for a seed."""
    c = profiles.shape[0]
    size = c // k
    z = profiles - profiles.mean(1, keepdim=True)
    z = z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)
    g = torch.Generator().manual_seed(seed)
    picks = [int(torch.randint(c, (1,), generator=g))]
    for _ in range(k - 1):  # farthest-point start: each new centre the channel least like the others
        picks.append(int((1 - z @ z[picks].T).min(1).values.argmax()))
    centres = z[picks].clone()
    assign = torch.zeros(c, dtype=torch.long)
    for _ in range(iters):
        dist = 1 - z @ centres.T  # [C, k]
        new = _balanced_assign(dist, size)
        if torch.equal(new, assign):
            break
        assign = new
        for j in range(k):
            m = z[assign == j].mean(0)
            centres[j] = m / m.norm().clamp_min(1e-12)
    return [sorted(torch.nonzero(assign == j).flatten().tolist()) for j in range(k)]


def _balanced_assign(dist: torch.Tensor, size: int) -> torch.Tensor:
    """Each channel to a cluster, every cluster exactly ``size`` channels: greedily by how much a
    channel would lose by not getting its nearest cluster (regret), closest pairs first."""
    c, k = dist.shape
    assign, room = [-1] * c, [size] * k
    for flat in torch.argsort(dist.flatten(), stable=True).tolist():
        i, j = divmod(flat, k)
        if assign[i] < 0 and room[j] > 0:
            assign[i] = j
            room[j] -= 1
    return torch.tensor(assign)


def captured(importance: torch.Tensor, clusters: list[list[int]], top_k: int) -> float:
    """The mean share of a sample's importance in its top-K experts (1 = nothing lost by routing)."""
    mass = torch.stack([importance[:, idx].sum(1) for idx in clusters], 1)  # [S, N]
    top = mass.topk(top_k, dim=1).values.sum(1)
    return float((top / mass.sum(1).clamp_min(1e-12)).mean())


def choose_experts(stats: LayerStats, lp: LayerPlan) -> tuple[list[int], float, float]:
    """(permutation, captured share with it, captured share of the contiguous split) for one layer."""
    n, c = lp.experts, lp.channels
    contiguous = [list(range(e * c // n, (e + 1) * c // n)) for e in range(n)]
    base = captured(stats.importance, contiguous, lp.top_k)
    clusters = balanced_clusters(stats.importance.T, n)
    share = captured(stats.importance, clusters, lp.top_k)
    if share <= base:
        return list(range(c)), base, base
    return [i for idx in clusters for i in idx], share, base


def permute(gm: fx.GraphModule, lp: LayerPlan, perm: list[int]) -> None:
    """Reorder the group's channels in place: new channel j is old channel ``perm[j]``."""
    p = torch.tensor(perm)
    with torch.no_grad():
        for u in lp.group.producers:
            m = gm.get_submodule(u.node.target)
            m.weight.copy_(m.weight[p])
            if m.bias is not None:
                m.bias.copy_(m.bias[p])
        for node in _interior_modules(gm, lp):
            m = gm.get_submodule(node.target)
            for t in list(m.parameters(recurse=False)) + [b for b in m.buffers(recurse=False) if b.ndim]:
                t.copy_(t[p])
        for u in lp.group.consumers:
            m = gm.get_submodule(u.node.target)
            m.weight.copy_(m.weight[:, p])
