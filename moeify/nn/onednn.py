"""2-D convolutions whose weight is kept in oneDNN's blocked layout (inference on the CPU).

PyTorch's CPU convolution reorders a plain weight into oneDNN's blocked layout on every call. A
routed layer calls its convolution once per routing pattern, each time with another weight slice,
so it pays that reorder once per pattern where the dense layer pays it once, and at small batches
the reorder of a deep layer's weight costs as much as a good part of the convolution. A weight
slice the engine keeps anyway (``cache.is_kept``: replaced, never written, when its weight
changes) is reordered once here, after a few uses (``PLAIN_USES``), and the blocked copy is kept
with it, as inductor's freezing does for a compiled model.

Used only where nothing records (autograd off, or nothing requires a gradient), in eager mode, for
float32 convolutions of channels-last 4-D inputs on the CPU with numeric padding (the op returns
channels-last), and while ``blocked_weights`` allows it (the default). And only where it pays:
where PyTorch's own call would run oneDNN too (a batch above 1 or an input above ``NATIVE_INPUT``
values, its rule), or where the weight is large enough (``LARGE_WEIGHT``) that the reorder saved
outweighs oneDNN's call overhead over PyTorch's native kernel for a small single-sample input.
Everything else takes the plain call.
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import conv_flop_count, flop_registry, register_flop_formula

from .cache import cached, count_use, is_kept, peek
from .packing import memory_format

Pair = tuple[int, int]


def _pointwise_op():
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._convolution_pointwise
    except (AttributeError, RuntimeError):
        return None


_OP = _pointwise_op()
NATIVE_INPUT = 20480
"""PyTorch's CPU conv runs its native kernel, not oneDNN, for one sample of at most this many values."""
LARGE_WEIGHT = 2 ** 17
"""Weight values from which a blocked call beats the native kernel on such an input (measured on
a 2-core CPU: docs/benchmarks.md)."""
PLAIN_USES = 2
"""A slice's first uses run the plain conv; the next one makes its blocked copy. Where a layer's
selections outnumber its slice cache (8 experts, routes that keep changing) most slices are
dropped after a use or two, and a blocked copy made for them would cost more than it saves."""
_ENABLED = contextvars.ContextVar("moeify_blocked_weights", default=True)

if _OP is not None and _OP not in flop_registry:
    @register_flop_formula(_OP)
    def _blocked_conv_flop(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
        """What FlopCounterMode (``moeify.macs``) counts for a blocked conv: the conv it computes."""
        return conv_flop_count(x_shape, w_shape, out_shape, transposed=False)


def available() -> bool:
    """Whether this PyTorch build has oneDNN's convolution with a blocked weight."""
    return _OP is not None


@contextlib.contextmanager
def blocked_weights(enabled: bool) -> Iterator[None]:
    """Inside the block, routed convs use (True, the default) or do not use blocked weights
    (to measure what they bring; results are the same up to float rounding)."""
    token = _ENABLED.set(enabled)
    try:
        yield
    finally:
        _ENABLED.reset(token)


def _pair(v: int | tuple[int, ...] | list[int]) -> Pair:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def usable(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, padding) -> bool:
    """Whether ``conv2d`` runs this call with a kept blocked weight (else it is the plain call)."""
    if _OP is None or torch.compiler.is_compiling():  # first: a compiler never traces the registry of kept tensors
        return False
    if isinstance(padding, str) or x.ndim != 4 or x.dtype != torch.float32 or w.dtype != torch.float32 \
            or x.device.type != "cpu" or not is_kept(w):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad)):
        return False
    return pays(x, w) and _ENABLED.get() and torch.backends.mkldnn.enabled and memory_format(x) is torch.channels_last


def pays(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether a blocked weight is worth its call here: PyTorch would run oneDNN anyway, or the
    weight is ``LARGE_WEIGHT`` or more (see the module's docstring)."""
    return x.shape[0] > 1 or x.numel() > NATIVE_INPUT or w.numel() >= LARGE_WEIGHT


def conv2d(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, stride, padding, dilation) -> torch.Tensor:
    """``F.conv2d(x, w, b, stride, padding, dilation)``; with the weight's blocked copy where ``usable``."""
    if not usable(x, w, b, padding):
        return F.conv2d(x, w, b, stride, padding, dilation)
    version = None if w.is_inference() else w._version
    key = ("onednn", _pair(stride), _pair(padding), _pair(dilation), version)
    packed = peek(w, key)
    if packed is None:
        if count_use(w) <= PLAIN_USES:
            return F.conv2d(x, w, b, stride, padding, dilation)
        packed = cached(w, key, lambda: blocked(w, stride, padding, dilation))
    return blocked_conv(x, packed, b, stride, padding, dilation)


def blocked(w: torch.Tensor, stride, padding, dilation) -> torch.Tensor:
    """Conv weight ``w`` [out, in, kh, kw] reordered into the layout oneDNN's convolution reads
    (an mkldnn tensor, good for any batch size)."""
    return torch._C._nn.mkldnn_reorder_conv2d_weight(w.contiguous().to_mkldnn(), list(_pair(padding)),
                                                     list(_pair(stride)), list(_pair(dilation)), 1, [])


def blocked_conv(x: torch.Tensor, packed: torch.Tensor, b: torch.Tensor | None, stride, padding,
                 dilation) -> torch.Tensor:
    """The conv of float32 ``x`` with a ``blocked`` weight (no autograd; the result is channels-last)."""
    return _OP(x, packed, b, list(_pair(padding)), list(_pair(stride)), list(_pair(dilation)), 1, "none", [], "")
