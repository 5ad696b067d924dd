"""Routing policies for analysis: replace or observe what routers decide, without touching weights.

Inside ``with routing_policy(p):`` every router call goes through ``p``: a soft-routing twin (all
experts, softmax-weighted), routes frozen to given ones, every layer forced to chosen experts, or a
recorder of router scores. The evaluation's adaptive attacks and router/expert dissection use them.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

_state = threading.local()


class Policy:
    """Decides a layer's route from its scores [B, N]: (experts [B, K'], gate values [B, K']), or
    None to keep the normal top-K choice."""

    def route(self, scores: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None


class Soft(Policy):
    """Every expert, weighted by K * softmax(scores): a differentiable twin of hard routing (run it
    with ``execution("masked")``, which applies the gate values)."""

    def route(self, scores, top_k):
        n = scores.shape[-1]
        idx = torch.arange(n, device=scores.device).expand(scores.shape[0], n)
        return idx, top_k * torch.softmax(scores.float(), -1).to(scores.dtype)


class Fixed(Policy):
    """Routes frozen to the given [B, K] choices, one per MoE layer in call order (cycling)."""

    def __init__(self, choices: list[torch.Tensor]) -> None:
        self.choices, self.i = choices, 0

    def route(self, scores, top_k):
        idx = self.choices[self.i % len(self.choices)]
        self.i += 1
        return idx, torch.ones(idx.shape, dtype=scores.dtype, device=scores.device)


class Forced(Policy):
    """Every layer routed to experts ``first, first+1, ..., first+K-1`` (mod N) for every sample."""

    def __init__(self, first: int) -> None:
        self.first = first

    def route(self, scores, top_k):
        n = scores.shape[-1]
        experts = sorted((self.first + j) % n for j in range(top_k))
        idx = torch.tensor(experts, device=scores.device).expand(scores.shape[0], top_k)
        return idx, torch.ones(idx.shape, dtype=scores.dtype, device=scores.device)


class Recorder(Policy):
    """Keeps every layer's scores (call order) and the chosen experts; routing is unchanged."""

    def __init__(self) -> None:
        self.scores: list[torch.Tensor] = []
        self.choices: list[torch.Tensor] = []

    def route(self, scores, top_k):
        self.scores.append(scores)
        return None


def current_policy() -> Policy | None:
    return getattr(_state, "policy", None)


@contextlib.contextmanager
def routing_policy(policy: Policy) -> Iterator[Policy]:
    prev = current_policy()
    _state.policy = policy
    try:
        yield policy
    finally:
        _state.policy = prev
