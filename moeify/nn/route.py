"""Routes: which experts each sample uses in one MoE layer, and how its channels are laid out.

A Route holds, per sample, the indices of its top-K experts (ascending) and their gate values. The
gate's forward value is exactly 1 (so ``top_k == experts`` is the dense model) and its gradient is
that of the expert's log-probability (a straight-through estimator), so routers learn from the
task loss. Ties break towards the lower expert index. A NaN or infinite score among the chosen ones
(a NaN is always chosen) raises RoutingError; -inf elsewhere just means "never this expert". Where
the execution strategy allows a host read per layer (grouped execution on the CPU) the router
checks at once; otherwise the route keeps its chosen scores and the check runs once per model call
(``routes_checked``, the last node of a converted graph, which every route of the call feeds),
on the device and compile-safe.

A route also carries the execution strategy (``executor``) its layer runs with, so every op of
the layer agrees on it. When ``packed``, the layer's tensors hold only the selected channels: [B, K * C/N, ...],
sample b's slot j being channel ``channel_index(C/N)[b, j]``. The batch's routing patterns (the
distinct rows of ``idx``) are computed once per route and shared by every op of the layer.
"""
from __future__ import annotations

import math

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..errors import RoutingError, route_checks, route_checks_taken
from ..graph.trace import inserted
from .policy import Recorder, current_policy


class Route:
    """Top-K expert choice per sample: ``idx`` LongTensor[B, K], ``gate`` Tensor[B, K] (value 1)."""

    __slots__ = ("idx", "_gate", "experts", "packed", "executor", "chosen", "one", "_groups", "_index", "_masks",
                 "_slots")

    def __init__(self, idx: torch.Tensor, gate: torch.Tensor | None, experts: int, packed: bool = False,
                 chosen: torch.Tensor | None = None) -> None:
        """``gate`` None means constant gates of value 1 without a gradient (made when asked for);
        ``chosen``: the chosen scores, when their finiteness is still to be checked."""
        self.idx, self._gate, self.experts, self.packed, self.chosen = idx, gate, experts, packed, chosen
        self.executor = None  # set by the MoE layer that made or adopted the route
        self.one: tuple[int, ...] | None = None
        """The experts every sample selected, when that is known on the host and the call records
        nothing (batch 1 in inference, chosen on the host): each op then needs only the selection."""
        self._groups: list[tuple[list[int], torch.Tensor | None]] | None = None
        self._index: dict[int, torch.Tensor] = {}
        self._masks: dict[int, torch.Tensor] = {}
        self._slots: dict[tuple[int, int], tuple[torch.Tensor | None, torch.Tensor]] = {}

    @property
    def gate(self) -> torch.Tensor:
        if self._gate is None:
            self._gate = torch.ones(self.idx.shape, device=self.idx.device)
        return self._gate

    def adopted(self, executor, packed: bool) -> "Route":
        """The same choice, run by ``executor`` in a layer whose tensors are (or are not) packed."""
        r = Route(self.idx, self._gate, self.experts, packed, self.chosen)
        r.executor, r.one, r._groups, r._index = executor, self.one, self._groups, self._index
        r._masks, r._slots = self._masks, self._slots
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
        """[B, channels]: each expert's gate repeated over its contiguous block of channels (made
        once per route and width: a layer's producer, consumer and add share it). With constant
        gates (nothing records through them), a bool mask of the selected channels, made by one
        comparison instead of a scatter and an expand; with one gate per sample, that mask times it."""
        if channels not in self._masks:
            per = channels // self.experts
            if self._gate is None:
                mask = selected_channels(self.idx, per, self.experts)
            elif self.top_k == 1:  # one gate per sample: the bool mask times it
                mask = selected_channels(self.idx, per, self.experts) * self._gate
            else:
                mask = repeat_columns(self.expert_mask(), per)
            self._masks[channels] = mask
        return self._masks[channels]

    def slot_gates(self, rows: torch.Tensor | None, per: int) -> torch.Tensor:
        """[B or len(rows), K * per]: each packed slot's gate, for the samples ``rows`` (None: all);
        for a top-1 route [B or len(rows), 1], the sample's one gate, which broadcasts over its
        slots. Made once per route, rows and width: a layer's producer and consumer share it (the
        rows are kept with it, so an id is never matched to other rows)."""
        key = (id(rows), per)
        made = self._slots.get(key)
        if made is None or made[0] is not rows:
            g = self.gate if rows is None else self.gate.index_select(0, rows)
            made = self._slots[key] = (rows, g if self.top_k == 1 else repeat_columns(g, per))
        return made[1]

    def apply(self, x: torch.Tensor, cdim: int, order: torch.Tensor | None = None) -> torch.Tensor:
        """Zero the unselected experts' channels of full-width ``x`` (channels on ``cdim``); with
        ``order``, x holds them reordered (x's channel i is the layer's channel ``order[i]``)."""
        cdim = cdim % x.ndim
        m = self.channel_mask(x.shape[cdim])
        if m.dtype != torch.bool:  # a bool mask keeps x's dtype in the product
            m = m.to(x.dtype)
        if order is not None:
            m = m.index_select(1, order)
        shape = [x.shape[0]] + [1] * (x.ndim - 1)
        shape[cdim] = x.shape[cdim]
        return x * m.reshape(shape)


def repeat_columns(m: torch.Tensor, n: int) -> torch.Tensor:
    """[B, C] -> [B, C * n], each column repeated n times: an expand, not ``repeat_interleave``
    (which reads its output size back, a host sync on CUDA)."""
    return m[:, :, None].expand(-1, -1, n).reshape(m.shape[0], -1)


_OWNERS: dict[tuple[int, int, torch.device], torch.Tensor] = {}
"""[C] the expert owning each channel, per (channels per expert, experts, device): made once."""


def selected_channels(idx: torch.Tensor, per: int, experts: int) -> torch.Tensor:
    """[B, experts * per] bool: whether sample b selected channel c's expert (``idx`` [B, K])."""
    key = (per, experts, idx.device)
    owner = None if torch.compiler.is_compiling() else _OWNERS.get(key)
    if owner is None:
        with torch.inference_mode(False):  # usable outside inference mode too
            owner = torch.arange(experts * per, device=idx.device) // per
        if not torch.compiler.is_compiling():
            _OWNERS[key] = owner
    if idx.shape[1] == 1:
        return owner == idx
    return (owner[:, None] == idx[:, None, :]).any(-1)


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


_HOST_READ = {"tags": (torch.Tag.cudagraph_unsafe,)} if hasattr(torch.Tag, "cudagraph_unsafe") else {}
"""How an op that reads a device value on the host is declared (torch >= 2.8 knows the tag)."""


@torch.library.custom_op("moeify::check_routes", mutates_args=(), **_HOST_READ)
def _check_routes(finite: torch.Tensor) -> torch.Tensor:
    """Raise RoutingError unless ``finite`` (0-d bool) is true; an opaque op, so a compiled graph
    keeps it whole (one read of one flag per model call). Marked unsafe for CUDA graphs (a host
    read cannot be captured): inductor's graph partition leaves it out and captures the rest of
    the model (``mode="reduce-overhead"``)."""
    if not bool(finite):
        raise RoutingError.non_finite()
    return finite.new_ones((), dtype=torch.float32)


@_check_routes.register_fake
def _(finite: torch.Tensor) -> torch.Tensor:
    return finite.new_empty((), dtype=torch.float32)


@inserted
def routes_checked(out, *routes):
    """``out``, after checking the chosen scores of ``routes`` (and of ``out`` when it is a Route)
    that are still unchecked: one host read for all of them; raises RoutingError on a NaN/inf.

    Compiled as the model's own call (not traced into a larger graph), the flag is left to that
    call, which reads it once the compiled code has returned (``errors.route_checks``): inside the
    graph a read needs the opaque ``check_routes`` op, a Python call after the kernels (and, under
    CUDA graphs, a split of the captured graph). Traced into a larger graph, it is that op."""
    pending = [r.chosen for r in (out, *routes) if isinstance(r, Route) and r.chosen is not None]
    if not pending:
        return out
    if not torch.compiler.is_compiling():
        if not bool(torch.isfinite(torch.cat([c.reshape(-1).to(pending[0]) for c in pending])).all()):
            raise RoutingError.non_finite()
        return out
    # 0 exactly where every score is finite (x * 0 is 0 or -0), NaN otherwise; a sum, not a cat,
    # which inductor lays out as one view per route, each made by a Python call per model call
    finite = sum((c.float() * 0).sum() for c in pending) == 0
    if route_checks_taken():
        route_checks.finite = finite
        return out
    return _keep(out, _check_routes(finite))


def _keep(out, ok: torch.Tensor):
    """``out`` made to depend on the check's result ``ok`` (1.0), so a compiler keeps the check (an
    op whose result nothing uses is removed): its first floating tensor, at any depth of the
    output, is multiplied by it (exact)."""
    leaves, spec = tree_flatten(out)
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
            leaves[i] = leaf * ok.to(leaf.dtype)
            return tree_unflatten(leaves, spec)
    raise RoutingError("a compiled MoE model must return a floating-point tensor (it carries the NaN/inf "
                       "route check); run this model without torch.compile")


def top_k_indices(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """[B, K] indices of the K highest scores, ascending; ties go to the lower index."""
    if top_k == 1:
        return scores.argmax(dim=-1, keepdim=True)  # the first maximum
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :top_k]
    return order.sort(dim=-1).values


def drop_experts(scores: torch.Tensor, top_k: int, p: float) -> torch.Tensor:
    """``scores`` with each finite score set to -inf (out of the choice) with probability ``p``,
    per sample and expert, except that the K experts with the largest draws always stay: every
    sample still has K to choose from, and a NaN or inf score is never hidden from the check."""
    draw = torch.rand_like(scores, dtype=torch.float32)
    kept = draw.topk(top_k, dim=-1).values[..., -1:]
    return scores.masked_fill((draw < p) & (draw < kept) & torch.isfinite(scores), float("-inf"))


def _all_finite(chosen: torch.Tensor) -> bool:
    """Whether every chosen score is finite, with one host read in the common case: a finite sum
    says so; an infinite or NaN one may be large finite scores overflowing it, so then each is tested."""
    if chosen.numel() == 1:
        return math.isfinite(float(chosen))
    return math.isfinite(float(chosen.sum())) or bool(torch.isfinite(chosen).all())


_ONE_SAMPLE: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}
"""[1, K] index tensors of one sample's selections, per device: made once, shared by routes."""


def select_one(scores: torch.Tensor, top_k: int) -> Route:
    """``select_top_k`` for one sample whose choice is checked now: its N scores read to the host
    in one go and chosen in Python (ties to the lower index, a NaN or a chosen inf refused, as on
    the device), the index tensor shared per selection and the route's one pattern known without
    another read. At batch 1 every tensor op costs more in dispatch than in arithmetic."""
    s = scores.tolist()[0]
    for v in s:  # plain loops: at batch 1 this runs once per layer and call
        if v != v:
            raise RoutingError.non_finite()
    if top_k == 1:  # the first maximum: ties go to the lower index
        sel = [max(range(len(s)), key=s.__getitem__)]
    else:
        sel = sorted(sorted(range(len(s)), key=s.__getitem__, reverse=True)[:top_k])  # stable: ties keep index order
    for i in sel:
        if not math.isfinite(s[i]):
            raise RoutingError.non_finite()
    key = (tuple(sel), scores.device)
    idx = _ONE_SAMPLE.get(key)
    if idx is None:
        with torch.inference_mode(False):  # usable outside inference mode too
            idx = _ONE_SAMPLE[key] = torch.tensor([sel], device=scores.device)
    r = Route(idx, None, scores.shape[-1])
    r._groups = [(sel, None)]
    if not torch.is_grad_enabled():  # nothing can record through this layer's ops
        r.one = key[0]
    return r


class _ChosenGates(torch.autograd.Function):
    """[B, K] gates of value exactly 1 whose gradient is the chosen experts' log-probabilities'
    (the straight-through estimator): d log softmax(s)_i / d s = onehot(i) - softmax(s), taken in
    float32; one op where a log-softmax, a gather, a subtraction and an exp would be four."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(torch.softmax(scores.float(), dim=-1), idx)
        ctx.dtype = scores.dtype
        return torch.ones(idx.shape, dtype=scores.dtype, device=scores.device)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        p, idx = ctx.saved_tensors
        grad = grad.float()
        return torch.scatter_add(p * grad.sum(-1, keepdim=True).neg(), 1, idx, grad).to(ctx.dtype), None


def select_top_k(scores: torch.Tensor, top_k: int, defer_check: bool = False, noise: float = 0.0,
                 drop: float = 0.0, carried: torch.Tensor | None = None) -> Route:
    """Route from router scores [B, N]: stable top-K, straight-through gates of value exactly 1
    (or what an active routing policy decides, see policy.py). A NaN/inf chosen score raises now,
    or, with ``defer_check``, in ``routes_checked`` at the end of the model call. ``noise``: the
    std of Gaussian noise added to the scores for the choice only (exploration in training; the
    gates' gradient is the clean scores'). ``drop``: expert dropout, the probability that an
    expert is out of a sample's choice (``drop_experts``); an expert a sample takes only because
    a better one was dropped trains on it, but its gate gives the router no gradient: the
    straight-through gradient of a choice the router gives probability ~0 does not fade, and it
    would push that expert's score down without bound (measured: an unnormalised router's scores
    reached 5e37 within an epoch). ``carried``: an earlier route's chosen scores, still unchecked,
    which this route's check then covers: their non-finiteness (0, or NaN per sample) is added to
    the scores the choice reads, so a NaN/inf there makes this route's chosen score NaN, and a
    finite one leaves the choice as it was (s + 0 == s)."""
    policy = current_policy()
    if policy is not None:
        decided = policy.route(scores, top_k)
        if decided is not None:
            return Route(decided[0], decided[1], scores.shape[-1], chosen=carried)
    elif scores.shape[0] == 1 and not (defer_check or noise or drop or scores.requires_grad
                                       or torch.compiler.is_compiling()):
        return select_one(scores, top_k)
    detached = scores.detach()
    if carried is not None:
        detached = detached + (carried * 0).sum(-1, keepdim=True).to(detached.dtype)
    if noise:
        detached = detached + noise * torch.randn_like(detached)
    preferred = detached
    if drop:
        detached = drop_experts(detached, top_k, drop)
    if top_k == 1:  # the choice and its score in one op (a NaN is always the maximum)
        chosen, idx = detached.max(dim=-1, keepdim=True)  # ties: the first maximum
    else:
        idx = top_k_indices(detached, top_k)  # NaN sorts first, so it is always chosen
        chosen = detached.gather(-1, idx)
    if not defer_check and not _all_finite(chosen):
        raise RoutingError.non_finite()
    if isinstance(policy, Recorder):
        policy.choices.append(idx)
    pending = chosen if defer_check else None
    if not scores.requires_grad:
        return Route(idx, None, scores.shape[-1], chosen=pending)
    gate = _ChosenGates.apply(scores, idx)
    if drop:  # choices forced by the dropout: value 1, no router gradient
        forced = preferred.gather(1, idx) < preferred.topk(top_k, dim=-1).values[..., -1:]
        gate = torch.where(forced, gate.detach(), gate)
    return Route(idx, gate, scores.shape[-1], chosen=pending)
