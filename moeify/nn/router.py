"""Routers and MoE layer handles: per-layer (the paper's GAP + linear) or one global image router."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .executors import current_executor
from .cache import cached, forget, kept, store
from .packing import expert_channels, take
from .pool import pool_mean
from .route import Route, select_top_k


def scores_product(h: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(h, w, bias)``: a router's scores [B, N] from its pooled input [B, C]. Under
    ``torch.compile``, as a broadcast product summed over the channels, which inductor generates
    as one reduction fused with the pooling before it; a [B, C] x [C, N] matmul with a handful of
    experts N is otherwise an extern GEMM call of its own per router. Eager, one ``F.linear``."""
    if not torch.compiler.is_compiling():
        return F.linear(h, w, bias)
    y = (h.unsqueeze(-1) * w.t()).sum(-2)
    return y if bias is None else y + bias


NORM_MOMENTUM = 0.1  # running-statistics update of a standardising router, as BatchNorm's default
NORM_EPS = 1e-5


class LayerRouter(nn.Module):
    """The paper's router: global average pool of the layer's input, a linear layer to N scores.

    With ``norm``, the pooled input is standardised per channel, as BatchNorm does (the batch's
    statistics in training, which also update running ones; the running ones in eval), and the
    linear layer has no bias: every expert's score then has mean zero over the inputs, so no
    expert can be preferred by all of them at once (the way unnormalised routers collapse,
    docs/results.md), and the scores follow how an image differs from the others. The
    statistics are those of the full-width pooled vector the layer sees (zeros where an earlier
    MoE layer dropped channels), so every execution strategy computes the same scores.
    """

    def __init__(self, in_features: int, experts: int, top_k: int, cdim: int = 1, norm: bool = False) -> None:
        super().__init__()
        self.experts, self.top_k, self.cdim, self.norm = experts, top_k, cdim, norm
        self.proj = nn.Linear(in_features, experts, bias=not norm)
        if norm:
            self.register_buffer("in_mean", torch.zeros(in_features))
            self.register_buffer("in_var", torch.ones(in_features))
            self.register_buffer("in_batches", torch.zeros((), dtype=torch.long))

    def scores(self, x: torch.Tensor, experts: list[int] | None = None) -> torch.Tensor:
        """Scores [B, N] from the layer's input ``x`` (channels on ``cdim``), or from its selected
        channels only: ``experts``, the experts every sample of a packed ``x`` selected (then only
        their columns of the linear layer are used; the others would multiply zeros)."""
        cdim = self.cdim % x.ndim
        dims = [d for d in range(1, x.ndim) if d != cdim]
        h = pool_mean(x, dims)
        if self.norm:
            return self._standardised(h, experts)
        # read directly: at batch 1 a module call or attribute lookups cost more than the product
        params = self._modules["proj"]._parameters
        w = params["weight"]
        if experts is not None:
            w = self._columns(w, experts, h.shape[1] // len(experts), (w,))
        return scores_product(h, w, params.get("bias"))

    def __getstate__(self) -> dict:
        """What a pickle or a copy carries: the state less the column copies kept (remade on use)."""
        return forget(super().__getstate__())

    def _columns(self, w: torch.Tensor, experts: list[int], per: int, owners: tuple) -> torch.Tensor:
        """W's columns for ``experts``: a view where autograd records or a compiler traces;
        otherwise a contiguous copy kept with the router while ``owners`` (what W is made from)
        are unchanged (a product with a strided weight costs more, measured in the model at
        batch 1, than the copy it needs once)."""
        if (torch.is_grad_enabled() and w.requires_grad) or torch.compiler.is_compiling():
            return take(w, 1, experts, per)
        return kept(store(self), tuple(experts), owners,
                    lambda: take(w, 1, experts, per).contiguous())

    def _standardised(self, h: torch.Tensor, experts: list[int] | None) -> torch.Tensor:
        """W (h - mean) / std, with h (and W's columns) restricted to ``experts`` when given. In
        training, as BatchNorm, the batch's own statistics (differentiated through) and the running
        ones updated: standardised inputs stay bounded while the features move (running statistics
        lag them early in training, and the scores ran away, docs/results.md); in eval, the
        running statistics folded into the linear layer."""
        if self.training:
            hf = h.float()
            var, mean = torch.var_mean(hf, 0, correction=0)  # one pass for both, used twice
            self._update_stats(mean.detach(), var.detach(), experts)
            if h.shape[0] > 1:
                w = self.proj.weight if experts is None else take(self.proj.weight, 1, experts, h.shape[1] // len(experts))
                z = (hf - mean) * torch.rsqrt(var + NORM_EPS)
                return scores_product(z.to(h.dtype), w)
        w, bias = self._folded()
        if experts is not None:
            w = self._columns(w, experts, h.shape[1] // len(experts), (self.proj.weight, self.in_mean, self.in_var))
        return scores_product(h, w, bias)

    def _folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W / std, -(W / std) mean): the statistics folded into the linear layer. Made once and
        kept while weight and statistics are unchanged when nothing is trained; otherwise from
        copies of the statistics (a later training pass, TRADES runs two, updates them in place)."""
        w, mean, var = self.proj.weight, self.in_mean, self.in_var

        def fold(m: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            ws = w * torch.rsqrt(v + NORM_EPS)
            return ws, -(ws @ m)

        if self.training or (torch.is_grad_enabled() and w.requires_grad) or torch.compiler.is_compiling():
            return fold(mean.clone(), var.clone())
        return cached((w, mean, var), ("folded", w._version, mean._version, var._version), lambda: fold(mean, var))

    def _update_stats(self, mean: torch.Tensor, var: torch.Tensor, experts: list[int] | None) -> None:
        """Fold the batch's per-channel mean and biased variance of the pooled vector into the
        running statistics: averaged over the first batches, then BatchNorm's moving average. With
        ``experts`` they are the selected channels' (the others are zeros in the full-width vector
        every sample shares, so their mean and variance are 0)."""
        with torch.no_grad():
            mean, var = mean.to(self.in_mean), var.to(self.in_var)
            if experts is not None:
                ch = expert_channels(experts, mean.numel() // len(experts), mean.device)
                mean = torch.zeros_like(self.in_mean).index_copy_(0, ch, mean)
                var = torch.zeros_like(self.in_var).index_copy_(0, ch, var)
            f = torch.clamp(1.0 / (self.in_batches.float() + 1.0), min=NORM_MOMENTUM)
            self.in_mean.lerp_(mean, f)
            self.in_var.lerp_(var, f)
            self.in_batches.add_(1)

    def revive(self, dead: int, source: int, generator: torch.Generator, scale: float = 0.1) -> None:
        """Give expert ``dead`` (chosen by almost no input) the busiest expert ``source``'s row of
        the linear layer, the two then split by a random direction d: rows w + d and w - d, |d|
        ``scale`` times a row's mean norm, so they share what ``source`` received (as k-means
        splits its largest cluster to refill an empty one)."""
        with torch.no_grad():
            w, b = self.proj.weight, self.proj.bias
            d = torch.randn(w.shape[1], generator=generator).to(w)
            d *= scale * w.norm(dim=1).mean().clamp_min(1e-3) / d.norm().clamp_min(1e-12)
            w[dead] = w[source] + d
            w[source] -= d
            if b is not None:
                b[dead] = b[source]

    def forward(self, x: torch.Tensor) -> Route:
        return select_top_k(self.scores(x), self.top_k)

    def extra_repr(self) -> str:
        return "standardised input" if self.norm else ""


class GlobalRouter(nn.Module):
    """One small CNN on the image whose route every MoE layer shares (the released code's variant)."""

    def __init__(self, in_channels: int, experts: int, top_k: int, width: int = 16) -> None:
        super().__init__()
        self.experts, self.top_k = experts, top_k
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, 2, 1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.proj = nn.Linear(2 * width, experts)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.features(x))

    def forward(self, x: torch.Tensor) -> Route:
        """The shared Route; its NaN/inf check runs with the layers' (``routes_checked``)."""
        return select_top_k(self.scores(x), self.top_k, defer_check=True)


class MoELayer(nn.Module):
    """Handle of one MoE layer: its router (layer routing) and what it gates.

    Called with the layer's input it returns that layer's Route, made by the current execution
    strategy, which every op of the layer then follows; with a shared global Route it adopts it
    (so every layer has a place to observe its routing). When the input belongs to another MoE
    layer (``in_route``), the router sees only that layer's selected channels. ``packed`` (from
    the plan) says whether this layer's tensors may hold only the selected channels;
    ``model_macs`` (the dense model's MACs per sample) lets ``auto`` choose alike in every layer.
    """

    def __init__(self, name: str, channels: int, experts: int, top_k: int, producers: list[str],
                 consumers: list[str], router: LayerRouter | None, packed: bool = False) -> None:
        super().__init__()
        self.name, self.channels, self.experts, self.top_k = name, channels, experts, top_k
        self.producers, self.consumers = list(producers), list(consumers)
        self.router = router
        self.packed = packed
        self.noise = 0.0  # std of the noise on the scores when choosing experts in training (exploration)
        self.expert_dropout = 0.0  # probability that an expert is out of a sample's choice in training
        self.model_macs = 0.0  # the whole dense model's MACs per sample (set by convert; auto reads it)

    def forward(self, x, in_route: Route | None = None, after: Route | None = None) -> Route:
        """This layer's route from its input ``x`` (or a shared global Route); ``in_route``: the
        route whose channels ``x`` holds; ``after``: otherwise, a route made earlier in the same
        call. Where that route settles the call's strategy (``Executor.follow``), it is not
        resolved again."""
        lead = in_route if in_route is not None else after
        if lead is not None and lead.one is not None:
            r = lead.executor.follow(self, x, in_route)
            if r is not None:
                return r
        return current_executor().resolve(x, self).route(self, x, in_route, lead)

    def extra_repr(self) -> str:
        return f"{self.name!r}, channels={self.channels}, experts={self.experts}, top_k={self.top_k}, packed={self.packed}"
