"""Values derived from parameters, kept between calls: weight slices, computed weights, a
layer's one-selection lookups.

Under no_grad or inference an op should not slice or copy the same parameters on every call.
What is kept is tied to the storages (and versions) it was made from, so it is never served for
memory it was not made from, and copies are bounded per tensor (``CACHE_BUDGET``).
"""
from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


_SLICES: dict[int, tuple[list, dict]] = {}
"""id(first owner) -> (weak references to the owners' storages, {key: derived value}); dropped
when the owner is freed, emptied when any owner's storage changes (``module.to(device)``,
``param.data = ...``), so a value is never served for memory it was not made from."""
CACHE_BUDGET = 4.0
"""Copies kept per tensor, in multiples of its own size (at least 1 MiB): least recently used
out. Enough for every selection of 2 or 4 experts; with 8 experts (70 top-4 selections) a
layer whose routes keep changing re-slices its weights instead of holding 35 copies of them."""
CACHE_FLOOR = 2 ** 20  # bytes a small tensor (BatchNorm parameters) may always keep


def _nbytes(value) -> int:
    items = value if isinstance(value, tuple) else (value,)
    return sum(t.numel() * t.element_size() for t in items if isinstance(t, torch.Tensor) and t._base is None)


def _same_storages(refs: list, owners: tuple[torch.Tensor, ...]) -> bool:
    """Whether each owner still holds the storage its weak reference names (a plain loop: this
    runs for every cached lookup, several per layer and call)."""
    if len(refs) != len(owners):
        return False
    for ref, t in zip(refs, owners):
        if ref() is not t.untyped_storage():
            return False
    return True


_KEPT: dict[int, tuple[weakref.ref, list[int]]] = {}
"""id -> (weak reference, [uses]) of each tensor ``cached`` made: values the cache replaces rather
than writes to, so a form derived from one (``onednn``) may be kept with it (a view of a
parameter changes with it; its version counter says when)."""


def _mark_kept(value) -> None:
    for t in value if isinstance(value, tuple) else (value,):
        if isinstance(t, torch.Tensor) and _kept_entry(t) is None:
            _KEPT[id(t)] = (weakref.ref(t, lambda _, i=id(t): _KEPT.pop(i, None)), [0])


def _kept_entry(t: torch.Tensor) -> list[int] | None:
    hit = _KEPT.get(id(t))
    return hit[1] if hit is not None and hit[0]() is t else None


def is_kept(t: torch.Tensor) -> bool:
    """Whether ``t`` is a value ``cached`` made (a weight slice, a computed weight)."""
    return _kept_entry(t) is not None


def count_use(t: torch.Tensor) -> int:
    """One more use of the kept tensor ``t``: how many so far (0 for a tensor that is not kept)."""
    uses = _kept_entry(t)
    if uses is None:
        return 0
    uses[0] += 1
    return uses[0]


def cached(owners: torch.Tensor | tuple[torch.Tensor, ...], key: tuple, make: Callable[[], T]) -> T:
    """``make()``, kept with ``owners`` (a tensor or several) under ``key`` (which must name the
    versions it depends on), so an op under no_grad or inference does not slice or copy the same
    parameters on every call. Valid while every owner keeps its storage. Views of the owners cost
    no memory; copies count against ``CACHE_BUDGET``."""
    if not isinstance(owners, tuple):
        owners = (owners,)
    first = owners[0]
    entry = _SLICES.get(id(first))
    if entry is None:
        weakref.finalize(first, _SLICES.pop, id(first), None)
    if entry is None or not _same_storages(entry[0], owners):
        entry = _SLICES[id(first)] = ([weakref.ref(t.untyped_storage()) for t in owners], {})
    cache = entry[1]
    hit = cache.pop(key, None)
    if hit is None:
        with torch.no_grad():
            hit = make()
        _mark_kept(hit)
        _trim(cache, _budget(first) - _nbytes(hit), lambda v: v)
    cache[key] = hit
    return hit


def peek(owner: torch.Tensor, key: tuple):
    """What ``cached`` holds for the single ``owner`` under ``key``, or None; makes nothing."""
    entry = _SLICES.get(id(owner))
    if entry is None or not _same_storages(entry[0], (owner,)):
        return None
    return entry[1].get(key)


def _budget(t: torch.Tensor) -> float:
    """Bytes of copies kept for owner ``t``: ``CACHE_BUDGET`` times its size, at least ``CACHE_FLOOR``."""
    return max(CACHE_BUDGET * t.numel() * t.element_size(), CACHE_FLOOR)


def _trim(store: dict, budget: float, value: Callable) -> None:
    """Drop ``store``'s oldest entries until the copies in the rest fit in ``budget`` bytes."""
    total = sum(_nbytes(value(v)) for v in store.values())
    while store and total > budget:
        total -= _nbytes(value(store.pop(next(iter(store)))))


_STORE = "_moe_kept"
_REMEMBERED: set[str] = {_STORE}
"""The keys ``remember`` and ``store`` have kept values under in a module's ``__dict__``."""


def remember(module: torch.nn.Module, key: str, value: T) -> T:
    """``value``, kept in ``module.__dict__[key]`` for the module's later calls; not while
    compiling, where dynamo would replay the store, remaking the value, after every call of the
    compiled graph (a compiled call reads what an eager call kept, or makes its own)."""
    if not torch.compiler.is_compiling():
        module.__dict__[key] = value
        _REMEMBERED.add(key)
    return value


def store(module: torch.nn.Module) -> dict:
    """The dict of ``module``'s ``kept`` values (``kept``'s first argument), made on first use."""
    return module.__dict__.setdefault(_STORE, {})


def forget(state: dict) -> dict:
    """A module's ``__dict__`` less the values kept in it: what a copy or a pickle of the module
    carries (kept values hold weak references, and are remade on the next call)."""
    return {k: v for k, v in state.items() if k not in _REMEMBERED}


def kept(values: dict, key, owners: tuple[torch.Tensor, ...], make: Callable[[], T]) -> T:
    """``make()``, kept in ``values`` (a dict its caller owns: a layer's, a Kernel's) under ``key``
    while every owner keeps its version and storage: the one-selection lane's lookup (a dict read
    and a check per owner, where ``cached`` also finds the owner's table and keys versions). Copies
    count against ``CACHE_BUDGET``, as there."""
    hit = values.get(key)
    if hit is not None:
        value, stamp = hit
        for t, (version, storage) in zip(owners, stamp):
            if t._version != version or storage() is not t.untyped_storage():
                break
        else:
            return value
        del values[key]
    value = make()
    try:
        stamp = tuple((t._version, weakref.ref(t.untyped_storage())) for t in owners)
    except RuntimeError:  # an inference tensor has no version counter to check a kept value against
        return value
    _trim(values, _budget(owners[0]) - _nbytes(value), lambda v: v[0])
    values[key] = value, stamp
    return value
