"""Routes and routers: which experts each sample uses in an MoE layer.

A Route holds, per sample, the indices of its top-K experts (ascending) and their gate values. The
gate's forward value is exactly 1 (so ``top_k == experts`` is the dense model) and its gradient is
that of the expert's log-probability (a straight-through estimator), so routers learn from the
task loss. Ties break towards the lower expert index. Non-finite scores raise RoutingError.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import RoutingError


class Route:
    """Top-K expert choice per sample: ``idx`` LongTensor[B, K], ``gate`` Tensor[B, K] (value 1)."""

    __slots__ = ("idx", "gate", "experts")

    def __init__(self, idx: torch.Tensor, gate: torch.Tensor, experts: int) -> None:
        self.idx, self.gate, self.experts = idx, gate, experts

    @property
    def top_k(self) -> int:
        return self.idx.shape[1]

    def expert_mask(self) -> torch.Tensor:
        """[B, N] gate values at the selected experts, 0 elsewhere."""
        m = self.gate.new_zeros(self.idx.shape[0], self.experts)
        return m.scatter(1, self.idx, self.gate)

    def channel_mask(self, channels: int) -> torch.Tensor:
        """[B, channels]: each expert's gate repeated over its contiguous block of channels."""
        return self.expert_mask().repeat_interleave(channels // self.experts, dim=1)

    def apply(self, x: torch.Tensor, cdim: int) -> torch.Tensor:
        """Zero the unselected experts' channels of ``x`` (channels on ``cdim``)."""
        cdim = cdim % x.ndim
        m = self.channel_mask(x.shape[cdim]).to(x.dtype)
        shape = [x.shape[0]] + [1] * (x.ndim - 1)
        shape[cdim] = x.shape[cdim]
        return x * m.reshape(shape)


def select_top_k(scores: torch.Tensor, top_k: int) -> Route:
    """Route from router scores [B, N]: stable top-K, straight-through gates of value exactly 1."""
    if not torch.isfinite(scores).all():
        raise RoutingError(
            "router produced non-finite scores (NaN/inf); refusing to route (it would silently pick "
            "expert 0); check the learning rate and the inputs"
        )
    logp = torch.log_softmax(scores.float(), dim=-1)
    order = torch.sort(scores.detach(), dim=-1, descending=True, stable=True).indices[:, :top_k]
    idx = order.sort(dim=-1).values
    sel = logp.gather(1, idx)
    gate = torch.exp(sel - sel.detach()).to(scores.dtype)
    return Route(idx, gate, scores.shape[-1])


class LayerRouter(nn.Module):
    """The paper's router: global average pool of the layer's input, a linear layer to N scores."""

    def __init__(self, in_features: int, experts: int, top_k: int, cdim: int = 1) -> None:
        super().__init__()
        self.experts, self.top_k, self.cdim = experts, top_k, cdim
        self.proj = nn.Linear(in_features, experts)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        cdim = self.cdim % x.ndim
        dims = [d for d in range(1, x.ndim) if d != cdim]
        h = x.mean(dims) if dims else x
        return self.proj(h)

    def forward(self, x: torch.Tensor) -> Route:
        return select_top_k(self.scores(x), self.top_k)


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
        return select_top_k(self.scores(x), self.top_k)


class MoELayer(nn.Module):
    """Handle of one MoE layer: its router (layer routing) and what it gates.

    Called with the layer's input it returns that layer's Route; with a shared global Route it
    passes it through (so every layer has a place to observe its routing).
    """

    def __init__(self, name: str, channels: int, experts: int, top_k: int, producers: list[str],
                 consumers: list[str], router: LayerRouter | None) -> None:
        super().__init__()
        self.name, self.channels, self.experts, self.top_k = name, channels, experts, top_k
        self.producers, self.consumers = list(producers), list(consumers)
        self.router = router

    def forward(self, x):
        if isinstance(x, Route):
            return x
        return self.router(x)

    def extra_repr(self) -> str:
        return f"{self.name!r}, channels={self.channels}, experts={self.experts}, top_k={self.top_k}"
