"""Routes: which experts each sample uses in one MoE layer, and how its channels are laid out.

A Route holds, per sample, the indices of its top-K experts (ascending) and their gate values. The
gate's forward value is exactly 1 (so ``top_k == experts`` is the dense model) and its gradient is
that of the expert's log-probability (a straight-through estimator), so routers learn from the
task loss. Ties break towards the lower expert index. Non-finite scores raise RoutingError.

In sparse execution a *packed* layer's tensors hold only the selected channels: [B, K * C/N, ...],
sample b's slot j being channel ``channel_index(C/N)[b, j]``. The batch's routing patterns (the
distinct rows of ``idx``) are computed once per route and shared by every op of the layer.
"""
from __future__ import annotations

import math

import torch

from ..errors import RoutingError
from .policy import Recorder, current_policy


class Route:
    """Top-K expert choice per sample: ``idx`` LongTensor[B, K], ``gate`` Tensor[B, K] (value 1)."""

    __slots__ = ("idx", "gate", "experts", "packed", "_groups", "_index")

    def __init__(self, idx: torch.Tensor, gate: torch.Tensor, experts: int, packed: bool = False) -> None:
        self.idx, self.gate, self.experts, self.packed = idx, gate, experts, packed
        self._groups: list[tuple[list[int], torch.Tensor | None]] | None = None
        self._index: dict[int, torch.Tensor] = {}

    def with_packing(self, packed: bool) -> "Route":
        """The same choice, seen by a layer whose tensors are (or are not) packed."""
        r = Route(self.idx, self.gate, self.experts, packed)
        r._groups = self._groups
        return r

    @property
    def top_k(self) -> int:
        return self.idx.shape[1]

    @property
    def needs_grad(self) -> bool:
        return self.gate.requires_grad

    def groups(self) -> list[tuple[list[int], torch.Tensor | None]]:
        """[(experts, rows)]: samples grouped by routing pattern; rows None = the whole batch."""
        if self._groups is None:
            self._groups = pattern_groups(self.idx, self.experts)
        return self._groups

    def channel_index(self, per_expert: int) -> torch.Tensor:
        """[B, K * per_expert]: the full-width channel held in each packed slot."""
        if per_expert not in self._index:
            ar = torch.arange(per_expert, device=self.idx.device)
            self._index[per_expert] = (self.idx[:, :, None] * per_expert + ar).flatten(1)
        return self._index[per_expert]

    def expert_mask(self) -> torch.Tensor:
        """[B, N] gate values at the selected experts, 0 elsewhere."""
        m = self.gate.new_zeros(self.idx.shape[0], self.experts)
        return m.scatter(1, self.idx, self.gate)

    def channel_mask(self, channels: int) -> torch.Tensor:
        """[B, channels]: each expert's gate repeated over its contiguous block of channels."""
        return self.expert_mask().repeat_interleave(channels // self.experts, dim=1)

    def apply(self, x: torch.Tensor, cdim: int) -> torch.Tensor:
        """Zero the unselected experts' channels of full-width ``x`` (channels on ``cdim``)."""
        cdim = cdim % x.ndim
        m = self.channel_mask(x.shape[cdim]).to(x.dtype)
        shape = [x.shape[0]] + [1] * (x.ndim - 1)
        shape[cdim] = x.shape[cdim]
        return x * m.reshape(shape)


def pattern_groups(key: torch.Tensor, base: int | None = None) -> list[tuple[list[int], torch.Tensor | None]]:
    """Rows of ``key`` [B, K] (entries < ``base``) grouped by value: [(row values, row indices or
    None for all rows)]. Rows are encoded as one integer each, so grouping is one 1-D sort."""
    if key.shape[0] == 1 or bool((key == key[:1]).all()):
        return [(key[0].tolist(), None)]
    base = base or int(key.max()) + 1
    weights = base ** torch.arange(key.shape[1] - 1, -1, -1, device=key.device)
    codes, inverse, counts = torch.unique((key * weights).sum(1), return_inverse=True, return_counts=True)
    order = torch.argsort(inverse, stable=True)
    rows = torch.split(order, counts.tolist())
    digits = [[(c // base ** (key.shape[1] - 1 - j)) % base for j in range(key.shape[1])] for c in codes.tolist()]
    return list(zip(digits, rows))


def top_k_indices(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """[B, K] indices of the K highest scores, ascending; ties go to the lower index."""
    if top_k == 1:
        return scores.argmax(dim=-1, keepdim=True)  # the first maximum
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :top_k]
    return order.sort(dim=-1).values


def select_top_k(scores: torch.Tensor, top_k: int) -> Route:
    """Route from router scores [B, N]: stable top-K, straight-through gates of value exactly 1
    (or what an active routing policy decides, see policy.py)."""
    policy = current_policy()
    if policy is not None:
        decided = policy.route(scores, top_k)
        if decided is not None:
            return decided
    if not math.isfinite(float(scores.detach().sum())):  # one reduction: NaN and inf propagate
        raise RoutingError(
            "router produced non-finite scores (NaN/inf); refusing to route (it would silently pick "
            "expert 0); check the learning rate and the inputs"
        )
    idx = top_k_indices(scores.detach(), top_k)
    if isinstance(policy, Recorder):
        policy.choices.append(idx)
    if not scores.requires_grad:
        return Route(idx, torch.ones(idx.shape, dtype=scores.dtype, device=scores.device), scores.shape[-1])
    logp = torch.log_softmax(scores.float(), dim=-1)
    sel = logp.gather(1, idx)
    gate = torch.exp(sel - sel.detach()).to(scores.dtype)
    return Route(idx, gate, scores.shape[-1])
