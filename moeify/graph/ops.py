"""What each graph op does to channels: the rule table the coupling analysis reads.

Every op is one of: a contraction (conv/linear: consumes channels, produces new ones), channel-wise
(each output channel depends only on the same input channel), element-wise binary, a channel index
map (cat, split, slice, permute, reshape that keeps or factors channels, stack), a reduction, a
softmax, or a barrier. Anything not listed here is a barrier: channels that reach it are never
treated as element-wise.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from enum import Enum

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn


class Kind(Enum):
    CONTRACT = "contract"
    CHANNELWISE = "channelwise"
    ADD = "add"
    MUL = "mul"
    CAT = "cat"
    SPLIT = "split"
    GETITEM = "getitem"
    PERMUTE = "permute"
    TRANSPOSE = "transpose"
    RESHAPE = "reshape"
    REDUCE = "reduce"
    SOFTMAX = "softmax"
    STACK = "stack"
    BARRIER = "barrier"


@dataclass
class OpInfo:
    kind: Kind
    what: str  # a human name for the op, used in plan reasons
    module: nn.Module | None = None
    cdim_in: int | None = None  # the dim channels must be on: contracted (conv 1, linear -1), or
    # the dim a positional channel-wise op treats as channels (BatchNorm, pooling: 1); None = any
    groups: int = 1


def _channelwise_module_types() -> tuple[type, ...]:
    types: list[type] = [
        nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
        nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Hardtanh, nn.Identity,
        nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
        nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
        nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
        nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
        nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.ZeroPad2d,
    ]
    try:
        from torchvision.ops import StochasticDepth

        types.append(StochasticDepth)
    except ImportError:
        pass
    try:
        import timm.layers.activations as ta
        import timm.layers.activations_me as tame
        from timm.layers import DropPath, SelectAdaptivePool2d
        from timm.layers.pool2d_same import AvgPool2dSame, MaxPool2dSame

        for mod in (ta, tame):
            types += [v for v in vars(mod).values()
                      if isinstance(v, type) and issubclass(v, nn.Module) and v.__module__ == mod.__name__]
        types += [DropPath, SelectAdaptivePool2d, AvgPool2dSame, MaxPool2dSame]
    except ImportError:
        pass
    return tuple(types)


CHANNELWISE_MODULES = _channelwise_module_types()
# channel-wise only when channels are on dim 1 (they normalise, pool, pad or resize the dims after it)
POSITIONAL_MODULES = tuple(t for t in CHANNELWISE_MODULES if any(
    k in t.__name__ for k in ("Pool", "Upsampl", "Pad"))) + (nn.modules.batchnorm._BatchNorm,)

_CHANNELWISE_FUNCS = {
    F.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.sigmoid,
    F.tanh, F.elu, F.selu, F.softplus, F.hardtanh, F.dropout, F.dropout1d, F.dropout2d, F.max_pool1d,
    F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d, F.interpolate, F.batch_norm, F.pad,
    torch.relu, torch.relu_, torch.sigmoid, torch.tanh, torch.clamp, torch.clip, torch.abs, torch.exp,
    torch.nn.functional.relu_, operator.neg, torch.neg,
}
_POSITIONAL_FUNCS = {
    F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d, F.interpolate, F.batch_norm, F.pad,
}
_CHANNELWISE_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clip", "clamp_min",
    "clamp_max", "contiguous", "clone", "float", "half", "bfloat16", "to", "type_as", "abs", "exp",
    "neg", "hardtanh", "hardtanh_",
}
_ADD = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub}
_ADD_METHODS = {"add", "add_", "sub", "sub_"}
_MUL = {operator.mul, operator.imul, operator.truediv, operator.itruediv, torch.mul, torch.div}
_MUL_METHODS = {"mul", "mul_", "div", "div_"}
_RESHAPE_FUNCS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}
_RESHAPE_METHODS = {"flatten", "view", "reshape", "squeeze", "unsqueeze", "view_as", "reshape_as"}
_REDUCE_FUNCS = {torch.mean, torch.sum, torch.amax}
_REDUCE_METHODS = {"mean", "sum", "amax"}
_SPLIT_FUNCS = {torch.split, torch.chunk, torch.tensor_split}
_SPLIT_METHODS = {"split", "chunk", "tensor_split"}
_SOFTMAX_FUNCS = {F.softmax, F.log_softmax, torch.softmax, torch.log_softmax}
_SOFTMAX_METHODS = {"softmax", "log_softmax"}


# How execution treats these ops on a tensor split by routing pattern (nn/rowgroups.py): the same
# tables, read as "per sample" (each sample alone) and "element-wise binary".
_BATCH_COUPLED = {F.batch_norm}  # channel-wise, but its statistics span the batch
_TENSOR_DUNDERS = {operator.neg: ("__neg__",), operator.add: ("__add__", "__radd__"),
                   operator.sub: ("__sub__", "__rsub__"), operator.mul: ("__mul__", "__rmul__"),
                   operator.truediv: ("__truediv__",)}


def _tensor_methods(names) -> set:
    return {getattr(torch.Tensor, n) for n in names if hasattr(torch.Tensor, n)}


def _dunders(ops) -> set:
    return {getattr(torch.Tensor, n) for op in ops for n in _TENSOR_DUNDERS.get(op, ())}


PER_SAMPLE = frozenset((_CHANNELWISE_FUNCS - _BATCH_COUPLED - set(_TENSOR_DUNDERS))
                       | _tensor_methods(_CHANNELWISE_METHODS) | _dunders(_CHANNELWISE_FUNCS))
"""Ops (functions and Tensor methods, as ``__torch_function__`` sees them) that treat every sample
alone: the channel-wise ops above, minus those with batch statistics."""
ELEMENTWISE = frozenset({torch.add, torch.sub, torch.mul, torch.div}
                        | _tensor_methods(m for m in _ADD_METHODS | _MUL_METHODS if not m.endswith("_"))
                        | _dunders(_ADD | _MUL))
"""Binary element-wise ops (not in place), as ``__torch_function__`` sees them."""


def is_depthwise(m: nn.modules.conv._ConvNd) -> bool:
    return m.groups > 1 and m.groups == m.in_channels == m.out_channels and not m.transposed


def classify(node: fx.Node, gm: fx.GraphModule) -> OpInfo:
    """The channel behaviour of one call node."""
    t = node.target
    if node.op == "call_module":
        m = gm.get_submodule(t)
        name = type(m).__name__
        if isinstance(m, nn.modules.conv._ConvNd):
            if is_depthwise(m):
                return OpInfo(Kind.CHANNELWISE, f"depthwise {name}", m, cdim_in=1)
            if m.transposed:
                return OpInfo(Kind.BARRIER, f"transposed conv {name}", m)
            return OpInfo(Kind.CONTRACT, name, m, cdim_in=1, groups=m.groups)
        if isinstance(m, nn.Linear):
            return OpInfo(Kind.CONTRACT, name, m, cdim_in=-1)
        if isinstance(m, (nn.Softmax, nn.LogSoftmax)):
            return OpInfo(Kind.SOFTMAX, name, m)
        if isinstance(m, POSITIONAL_MODULES):
            return OpInfo(Kind.CHANNELWISE, name, m, cdim_in=1)
        if isinstance(m, CHANNELWISE_MODULES):
            return OpInfo(Kind.CHANNELWISE, name, m)
        return OpInfo(Kind.BARRIER, f"module {name}", m)
    if node.op == "call_function":
        name = getattr(t, "__name__", str(t))
        if t is F.conv1d or t is F.conv2d or t is F.conv3d:
            groups = node.kwargs.get("groups", node.args[6] if len(node.args) > 6 else 1)
            return OpInfo(Kind.CONTRACT, name, cdim_in=1, groups=groups if isinstance(groups, int) else -1)
        if t is F.linear:
            return OpInfo(Kind.CONTRACT, name, cdim_in=-1)
        if t in _POSITIONAL_FUNCS:
            return OpInfo(Kind.CHANNELWISE, name, cdim_in=1)
        table = [(_CHANNELWISE_FUNCS, Kind.CHANNELWISE), (_ADD, Kind.ADD), (_MUL, Kind.MUL),
                 (_RESHAPE_FUNCS, Kind.RESHAPE), (_REDUCE_FUNCS, Kind.REDUCE), (_SPLIT_FUNCS, Kind.SPLIT),
                 (_SOFTMAX_FUNCS, Kind.SOFTMAX), ({torch.stack}, Kind.STACK)]
        for funcs, kind in table:
            if t in funcs:
                return OpInfo(kind, name)
        if t is torch.cat or t is torch.concat:
            return OpInfo(Kind.CAT, name)
        if t is operator.getitem:
            return OpInfo(Kind.GETITEM, name)
        if t is torch.permute:
            return OpInfo(Kind.PERMUTE, name)
        if t is torch.transpose:
            return OpInfo(Kind.TRANSPOSE, name)
        return OpInfo(Kind.BARRIER, f"function {name}")
    if node.op == "call_method":
        table = [(_CHANNELWISE_METHODS, Kind.CHANNELWISE), (_ADD_METHODS, Kind.ADD), (_MUL_METHODS, Kind.MUL),
                 (_RESHAPE_METHODS, Kind.RESHAPE), (_REDUCE_METHODS, Kind.REDUCE), (_SPLIT_METHODS, Kind.SPLIT),
                 ({"permute"}, Kind.PERMUTE), ({"transpose"}, Kind.TRANSPOSE), (_SOFTMAX_METHODS, Kind.SOFTMAX)]
        for names, kind in table:
            if t in names:
                return OpInfo(kind, f".{t}()")
        return OpInfo(Kind.BARRIER, f"method .{t}()")
    return OpInfo(Kind.BARRIER, node.op)
