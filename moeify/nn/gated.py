"""Gated contractions: a conv or linear layer whose input and/or output channels are routed.

``out_route`` gates the layer's output channels (it produces an MoE layer's experts); ``in_route``
gates its input channels (it consumes one). The layer hands the work, with its sparse ``Kernel``
(None for a grouped conv or a custom forward, which run masked), to the executor its route
carries (``executors/``). Also here: the residual-branch gate and add the rewrite inserts.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..graph.trace import inserted
from . import onednn
from .kernel import PLAIN_CONV_FORWARDS, WEIGHT_RULES, Kernel
from .cache import cached, forget, remember
from .packing import PackedBranch
from .route import Route
from .rowgroups import as_tensor


@inserted
def gate_channels(x: torch.Tensor, route: Route, cdim: int = 1, lazy: bool = False):
    """A branch joining a residual add: full width, unselected experts' channels zero.

    A packed branch is scattered back to full width here, or, with ``lazy`` (the add is
    ``moe_add``), handed over packed so the add writes only the selected channels.
    """
    return route.executor.gate_branch(x, route, cdim, lazy)


@inserted
def gate_reordered(x: torch.Tensor, route: Route, order: tuple[int, ...], cdim: int = 1) -> torch.Tensor:
    """The layer's gate on a consumer that reads its channels in another order (after a channel
    shuffle; ``order[i]``: the layer's channel at position i). Masked math, so the consumer runs in
    full: exact under every strategy."""
    x = as_tensor(x)
    return route.apply(x, cdim, torch.as_tensor(order, device=x.device))


@inserted
def moe_add(a, b, free: tuple[bool, bool] = (False, False)):
    """``a + b`` where an operand may be a packed branch from ``gate_channels(..., lazy=True)``.
    ``free[i]``: nothing reads operand i after this add (the rewrite's liveness pass), so the sum
    may be written into it."""
    if isinstance(b, PackedBranch):
        a, b, free = b, a, free[::-1]
    if isinstance(a, PackedBranch):
        if isinstance(b, PackedBranch):
            b, free = b.full(), (free[0], True)  # a fresh tensor
        return a.route.executor.add_packed(b, a, free[1])
    return a + b


class MoEGatedMixin:
    """Mixed into a conv/linear module's own class: same parameters and keys, routed forward."""

    def _moe_kind(self) -> str | None:
        base = type(self).__mro__[2]
        if isinstance(self, nn.Linear) and base.forward is nn.Linear.forward:
            return "linear"
        if isinstance(self, nn.modules.conv._ConvNd) and self.groups == 1 and not self.transposed:
            if base.forward in PLAIN_CONV_FORWARDS:
                return "conv"
            if base in WEIGHT_RULES:
                return "computed"  # its forward computes the weight (standardisation): slice that
        return None  # another custom forward (dynamic padding...) or grouped: masked

    def _moe_kernel(self) -> Kernel | None:
        """The layer's Kernel, made once and remade only when its weight or bias is replaced."""
        d = self.__dict__
        kind = d.get("_moe_sparse_kind", "")
        if kind == "":  # decided once per module
            kind = remember(self, "_moe_sparse_kind", self._moe_kind())
        if kind is None:
            return None
        params = self._parameters
        w, b = params["weight"], params.get("bias")
        if kind == "computed":
            w = self._computed_weight()
        k = d.get("_moe_kernel_obj")
        if k is None or k.weight is not w or k.bias is not b:
            run = {"linear": _linear, "conv": self._moe_conv, "computed": self._moe_computed_conv}[kind]
            k = Kernel(w, b, run, linear=kind == "linear")
            if w.is_leaf:  # a weight computed under autograd is made anew each call: not kept
                remember(self, "_moe_kernel_obj", k)
        return k

    def _computed_weight(self) -> torch.Tensor:
        """The weight a conv's own forward computes (``kernel.WEIGHT_RULES``: standardisation),
        made as its forward makes it; kept while its parameters are unchanged when nothing is trained."""
        rule = WEIGHT_RULES[type(self).__mro__[2]]
        params = rule.params(self)
        if (torch.is_grad_enabled() and any(p.requires_grad for p in params)) or torch.compiler.is_compiling():
            return rule.weight(self)
        return cached(params, ("computed weight",) + tuple(p._version for p in params), lambda: rule.weight(self))

    def _moe_computed_conv(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                           groups: int = 1) -> torch.Tensor:
        """``_moe_conv`` after the input padding the conv's own forward applies (Same padding)."""
        return self._moe_conv(WEIGHT_RULES[type(self).__mro__[2]].pad(self, x), w, b, groups)

    def _moe_conv(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, groups: int = 1) -> torch.Tensor:
        if groups == 1:
            if w.ndim == 4 and self.padding_mode == "zeros":
                return onednn.conv2d(x, w, b, self.stride, self.padding, self.dilation)
            return self._conv_forward(x, w, b)
        conv = (F.conv1d, F.conv2d, F.conv3d)[w.ndim - 3]
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return conv(x, w, b, self.stride, 0, self.dilation, groups)
        return conv(x, w, b, self.stride, self.padding, self.dilation, groups)

    def forward(self, x: torch.Tensor, in_route: Route | None = None, out_route: Route | None = None):
        full = super().forward  # type: ignore[misc]
        if in_route is None and out_route is None:
            return full(x)
        cdim = -1 if isinstance(self, nn.Linear) else 1
        c_in = self.in_features if isinstance(self, nn.Linear) else self.in_channels
        executor = (out_route or in_route).executor
        return executor.contract(x, self._moe_kernel(), full, cdim, c_in, in_route, out_route)


_CLASSES: dict[tuple[type, type], type] = {}


def with_mixin(m: nn.Module, mixin: type) -> nn.Module:
    """Give module ``m`` the routed forward of ``mixin`` in place: its class becomes a subclass
    ``MoE<Class>`` of (mixin, its class), so the object, its parameters and keys stay the same."""
    if not isinstance(m, mixin):
        m.__class__ = _mixed_class(mixin, type(m))
    return m


def _mixed_class(mixin: type, cls: type) -> type:
    """The class (mixin, cls), made once per pair. It is made at run time, so pickle cannot find
    it by name: its objects pickle as (mixin, cls) and their state (``_mixed_module``)."""
    if (mixin, cls) not in _CLASSES:
        body = {"__module__": mixin.__module__, "__reduce_ex__": _reduce_mixed}
        _CLASSES[mixin, cls] = type(f"MoE{cls.__name__}", (mixin, cls), body)
    return _CLASSES[mixin, cls]


def _reduce_mixed(self: nn.Module, protocol: int):
    """How pickle and ``copy.deepcopy`` rebuild a mixed module: by its two classes, with its state
    less the values kept in it (``cache.forget``: remade on its next call)."""
    mixin, cls = type(self).__bases__
    return _mixed_module, (mixin, cls), forget(self.__dict__)


def _mixed_module(mixin: type, cls: type) -> nn.Module:
    mixed = _mixed_class(mixin, cls)
    return mixed.__new__(mixed)


def make_moe_module(m: nn.Module) -> nn.Module:
    """Turn conv/linear module ``m`` into its routed version in place (same object, same state_dict)."""
    return with_mixin(m, MoEGatedMixin)


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, groups: int = 1) -> torch.Tensor:
    return F.linear(x, w, b)


_CONV_ARGS = ("stride", "padding", "dilation", "groups")


def _functional(conv: Callable, name: str, cdim: int):
    def moe_fn(input, weight, bias=None, *args, in_route: Route | None = None,
               out_route: Route | None = None, **kwargs):
        if in_route is None and out_route is None:
            return conv(input, weight, bias, *args, **kwargs)
        if cdim == -1:
            kernel = Kernel(weight, bias, _linear, linear=True)
            c_in = weight.shape[-1]
        else:
            opts = {**dict(zip(_CONV_ARGS, args)), **kwargs}
            groups = opts.pop("groups", 1)

            def run(x, w, b, groups: int = 1):
                if conv is F.conv2d and groups == 1:
                    return onednn.conv2d(x, w, b, opts.get("stride", 1), opts.get("padding", 0),
                                         opts.get("dilation", 1))
                return conv(x, w, b, groups=groups, **opts)

            kernel = Kernel(weight, bias, run) if groups == 1 else None
            c_in = weight.shape[1] * groups
        executor = (out_route or in_route).executor
        return executor.contract(input, kernel, lambda x: conv(x, weight, bias, *args, **kwargs), cdim, c_in,
                                 in_route, out_route)

    moe_fn.__name__ = name
    moe_fn.__qualname__ = name
    return moe_fn


moe_conv1d = inserted(_functional(F.conv1d, "moe_conv1d", 1))
moe_conv2d = inserted(_functional(F.conv2d, "moe_conv2d", 1))
moe_conv3d = inserted(_functional(F.conv3d, "moe_conv3d", 1))
moe_linear = inserted(_functional(F.linear, "moe_linear", -1))
FUNCTIONAL = {F.conv1d: moe_conv1d, F.conv2d: moe_conv2d, F.conv3d: moe_conv3d, F.linear: moe_linear}
