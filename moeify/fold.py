"""Inference BatchNorm folding: a BatchNorm that only normalises a conv's output becomes part of
that conv's weight and bias, as deployment tools do for dense CNNs.

One pass over the traced graph, for a dense model, a static twin and an MoE model alike, so all
can be compared on equal terms. A routed conv keeps its routes: every execution strategy runs
the selected slices of the folded weight, whose bias puts the BatchNorm's shift on the selected
channels only (the unselected ones stay zero, and every later op gates them anyway). torch's own
``fuse`` pass matches exact module types, so it skips the routed convs; the arithmetic is torch's
``fuse_conv_bn_weights``.
"""
from __future__ import annotations

import copy
from collections import Counter

from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from .errors import MoeifyError
from .graph.trace import trace
from .nn.channelwise import MoEChannelwiseMixin, is_norm_act
from .nn.gated import MoEGatedMixin
from .nn.kernel import PLAIN_CONV_FORWARDS


def fold_batchnorm(model: nn.Module) -> fx.GraphModule:
    """A copy of ``model`` (in eval mode) in which every BatchNorm whose input is a conv's output,
    used by nothing else, is folded into that conv. Inference only: the copy has no BatchNorm
    left to train; ``model`` itself is unchanged."""
    if model.training:
        raise MoeifyError("fold_batchnorm folds the running statistics of inference: call model.eval() first "
                          "(a folded model has no BatchNorm left to train)")
    gm = _copy(model)
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    for node in list(gm.graph.nodes):
        conv = _folds_into(gm, node, calls)
        if conv is not None:
            _fold(gm, node, conv)
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    gm.moeify_folded = True  # save() refuses it: load() could not rebuild a model without its BatchNorms
    return gm


def _copy(model: nn.Module) -> fx.GraphModule:
    """A traced copy sharing nothing with ``model`` (a conversion plan is copied as its record,
    without the graph analysis behind it)."""
    work = copy.deepcopy(model)
    return work if isinstance(work, fx.GraphModule) else trace(work)


def _folds_into(gm: fx.GraphModule, node: fx.Node, calls: Counter) -> fx.Node | None:
    """The conv node BatchNorm ``node`` can be folded into, or None: both modules called once, the
    conv's output used by the BatchNorm alone, statistics tracked, weights plain (not computed)."""
    if node.op != "call_module" or calls[node.target] != 1 or not _plain_bn(gm.get_submodule(node.target)):
        return None
    src = node.args[0] if node.args else None
    if not isinstance(src, fx.Node) or src.op != "call_module" or calls[src.target] != 1 or len(src.users) != 1:
        return None
    return src if _plain_conv(gm.get_submodule(src.target)) else None


def _base(m: nn.Module) -> type:
    """The module's own class, under the routed mixin conversion may have given it."""
    return type(m).__mro__[2] if isinstance(m, MoEChannelwiseMixin) else type(m)


def _plain_bn(m: nn.Module) -> bool:
    if not isinstance(m, nn.modules.batchnorm._BatchNorm) or m.running_mean is None:
        return False
    return _base(m).forward is nn.modules.batchnorm._BatchNorm.forward or is_norm_act(_base(m))


def _plain_conv(m: nn.Module) -> bool:
    """nn's conv forward on the module's own weight (routed or not; depthwise included)."""
    if not isinstance(m, nn.modules.conv._ConvNd) or m.transposed:
        return False
    if isinstance(m, MoEGatedMixin):
        return m._moe_kind() == "conv"
    return _base(m).forward in PLAIN_CONV_FORWARDS


def _fold(gm: fx.GraphModule, bn_node: fx.Node, conv_node: fx.Node) -> None:
    """Fold the BatchNorm into the conv; a timm BatchNormAct leaves its dropout and activation."""
    bn, conv = gm.get_submodule(bn_node.target), gm.get_submodule(conv_node.target)
    conv.weight, conv.bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                                  bn.weight, bn.bias)
    if is_norm_act(_base(bn)):
        gm.add_submodule(bn_node.target, nn.Sequential(bn.drop, bn.act))
        bn_node.kwargs = {}
        return
    bn_node.replace_all_uses_with(conv_node)
    gm.graph.erase_node(bn_node)
