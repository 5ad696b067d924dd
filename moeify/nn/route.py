"""Routes: which experts each sample uses in one MoE layer, and how its channels are laid out.

A Route holds, per sample, the indices of its top-K experts (ascending) and their gate values. The
gate's forward value is exactly 1 (so ``top_k == experts`` is the dense model) and its gradient is
that of the expert's log-probability (a straight-through estimator), so routers learn from the
task loss. Ties break towards the lower expert index. A NaN or infinite score among the chosen ones
(a NaN is always chosen) raises RoutingError; -inf elsewhere just means "never this expert". On the
CPU that check runs in each router; on an accelerator, where reading a value back stalls the
device, it runs once per model call (``routes_checked``, the last node of a converted graph).

In sparse execution a *packed* layer's tensors hold only the selected channels: [B, K * C/N, ...],
sample b's slot j being channel ``channel_index(C/N)[b, j]``. The batch's routing patterns (the
distinct rows of ``idx``) are computed once per route and shared by every op of the layer.
"""
from __future__ import annotations

import math
import threading

import torch

from ..errors import RoutingError
from .policy import Recorder, current_policy


class Route:
    """Top-K expert choice per sample: ``idx`` LongTensor[B, K], ``gate`` Tensor[B, K] (value 1)."""

    __slots__ = ("idx", "_gate", "experts", "packed", "_groups", "_index")

    def __init__(self, idx: torch.Tensor, gate: torch.Tensor | None, experts: int, packed: bool = False) -> None:
        """``gate`` None means constant gates of value 1 without a gradient (made when asked for)."""
        self.idx, self._gate, self.experts, self.packed = idx, gate, experts, packed
        self._groups: list[tuple[list[int], torch.Tensor | None]] | None = None
        self._index: dict[int, torch.Tensor] = {}

    @property
    def gate(self) -> torch.Tensor:
        if self._gate is None:
            self._gate = torch.ones(self.idx.shape, device=self.idx.device)
        return self._gate

    def with_packing(self, packed: bool) -> "Route":
        """The same choice, seen by a layer whose tensors are (or are not) packed."""
        r = Route(self.idx, self._gate, self.experts, packed)
        r._groups = self._groups
        return r

    @property
    def top_k(self) -> int:
        return self.idx.shape[1]

    @property
    def needs_grad(self) -> bool:
        return self._gate is not None and self._gate.requires_grad

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
        return repeat_columns(self.expert_mask(), channels // self.experts)

    def apply(self, x: torch.Tensor, cdim: int) -> torch.Tensor:
        """Zero the unselected experts' channels of full-width ``x`` (channels on ``cdim``)."""
        cdim = cdim % x.ndim
        m = self.channel_mask(x.shape[cdim]).to(x.dtype)
        shape = [x.shape[0]] + [1] * (x.ndim - 1)
        shape[cdim] = x.shape[cdim]
        return x * m.reshape(shape)


def repeat_columns(m: torch.Tensor, n: int) -> torch.Tensor:
    """[B, C] -> [B, C * n], each column repeated n times: an expand, not ``repeat_interleave``
    (which reads its output size back, a host sync on CUDA)."""
    return m[:, :, None].expand(-1, -1, n).reshape(m.shape[0], -1)


def pattern_groups(key: torch.Tensor, base: int) -> list[tuple[list[int], torch.Tensor | None]]:
    """Rows of ``key`` [B, K] (entries < ``base``) grouped by value: [(row values, row indices or
    None for all rows)], patterns ascending, rows ascending within a pattern. Each row is encoded
    as one integer, so grouping is a unique and a stable sort on the device, no loop over samples."""
    if key.shape[0] == 1:
        return [(key[0].tolist(), None)]
    k = key.shape[1]
    codes = key[:, 0] if k == 1 else (key * base ** torch.arange(k - 1, -1, -1, device=key.device)).sum(1)
    uniq, counts = torch.unique(codes, return_counts=True)
    if uniq.numel() == 1:
        return [(key[0].tolist(), None)]
    rows = torch.split(torch.argsort(codes, stable=True), counts.tolist())
    return [([(c // base ** (k - 1 - j)) % base for j in range(k)], r) for c, r in zip(uniq.tolist(), rows)]


_pending = threading.local()  # accelerator routes' "all chosen scores finite" flags, not yet read
MAX_PENDING = 64


def _non_finite() -> RoutingError:
    return RoutingError("router produced non-finite scores (NaN/inf); refusing to route (it would silently "
                        "pick expert 0); check the learning rate and the inputs")


def _check_finite(chosen: torch.Tensor) -> None:
    """Raise on a NaN/inf chosen score now (CPU), or at the model call's end (accelerators)."""
    if chosen.device.type == "cpu":
        if not math.isfinite(float(chosen if chosen.numel() == 1 else chosen.sum())):
            raise _non_finite()
        return
    flags = _pending.__dict__.setdefault("flags", [])
    flags.append(torch.isfinite(chosen).all())
    if len(flags) >= MAX_PENDING:  # MoE layers called without their model: check now and then
        routes_checked(None)


@torch.compiler.disable
def routes_checked(out):
    """``out``, after checking every route chosen on an accelerator since the last check (one host
    read for all of them); raises RoutingError if any chose a NaN/inf score."""
    flags = getattr(_pending, "flags", None)
    if flags:
        _pending.flags = []
        for dev in {f.device for f in flags}:
            if not bool(torch.stack([f for f in flags if f.device == dev]).all()):
                raise _non_finite()
    return out


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
    detached = scores.detach()
    if top_k == 1:  # the choice and its score in one op (a NaN is always the maximum)
        chosen, idx = detached.max(dim=-1, keepdim=True)  # ties: the first maximum
    else:
        idx = top_k_indices(detached, top_k)  # NaN sorts first, so it is always chosen
        chosen = detached.gather(-1, idx)
    _check_finite(chosen)
    if isinstance(policy, Recorder):
        policy.choices.append(idx)
    if not scores.requires_grad:
        return Route(idx, None, scores.shape[-1])
    logp = torch.log_softmax(scores.float(), dim=-1)
    sel = logp.gather(1, idx)
    gate = torch.exp(sel - sel.detach()).to(scores.dtype)
    return Route(idx, gate, scores.shape[-1])
