"""A contraction's sparse kernel: what an execution strategy needs to run a conv or linear layer
on any slice of its weight; and the registry of conv subclasses whose forward computes the weight
it convolves with (weight standardisation), so that weight can be sliced like a plain one."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Kernel:
    """A contraction's sparse kernel: ``run(x, weight, bias, groups)`` computes the layer with any
    weight slice (conv: the layer's stride, padding and dilation; linear: ``F.linear``). ``kept``:
    the one-selection lane's slices of this weight and bias (``cache.kept``)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    run: Callable[..., torch.Tensor]
    linear: bool = False
    kept: dict = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class WeightRule:
    """How a conv subclass's forward makes its weight: ``weight(m)`` returns the tensor it convolves
    with (computed from ``params(m)``, whose versions say when it changes); ``pad(m, x)`` is the
    input padding it applies before the conv (identity for most)."""

    weight: Callable[[nn.Module], torch.Tensor]
    params: Callable[[nn.Module], tuple[torch.Tensor, ...]]
    pad: Callable[[nn.Module, torch.Tensor], torch.Tensor] = lambda m, x: x


PLAIN_CONV_FORWARDS = (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward)
"""nn's own conv forwards: a conv class with one of these convolves with its ``weight`` as stored."""

WEIGHT_RULES: dict[type, WeightRule] = {}
"""Conv subclass -> its WeightRule. Standardisation is per output channel over all of a row's
inputs, so the standardised full weight is sliced (rows or columns), never a slice standardised."""


def register_weight_rule(cls: type, rule: WeightRule) -> None:
    """Let sparse execution slice the weight that ``cls``'s own forward computes."""
    WEIGHT_RULES[cls] = rule


def _standardised(m: nn.Module, gain: torch.Tensor | None) -> torch.Tensor:
    """timm's weight standardisation (StdConv2d, ScaledStdConv2d), the same call as their forward."""
    return F.batch_norm(m.weight.reshape(1, m.out_channels, -1), None, None, weight=gain, training=True,
                        momentum=0., eps=m.eps).reshape_as(m.weight)


def _register_timm() -> None:
    try:
        from timm.layers.padding import pad_same
        from timm.layers.std_conv import ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame
    except ImportError:
        return

    def same(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return pad_same(x, m.kernel_size, m.stride, m.dilation) if getattr(m, "same_pad", False) else x

    plain = WeightRule(lambda m: _standardised(m, None), lambda m: (m.weight,))
    scaled = WeightRule(lambda m: _standardised(m, (m.gain * m.scale).view(-1)), lambda m: (m.weight, m.gain))
    register_weight_rule(StdConv2d, plain)
    register_weight_rule(ScaledStdConv2d, scaled)
    register_weight_rule(StdConv2dSame, WeightRule(plain.weight, plain.params, same))
    register_weight_rule(ScaledStdConv2dSame, WeightRule(scaled.weight, scaled.params, same))


_register_timm()
