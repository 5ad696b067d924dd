"""Capture a model's graph with torch.fx and annotate every node with its output shape.

Conv, linear and BatchNorm subclasses stay leaves (their forward may be custom), and so do the
modules timm marks as not traceable, plus stochastic-depth modules whose behaviour depends on
``training`` (tracing through them would bake in eval behaviour).
"""
from __future__ import annotations

import inspect
import traceback
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import ConversionError, RoutingError, route_checks


def _extra_leaf_types() -> tuple[type, ...]:
    types: list[type] = [nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm]
    try:
        from torchvision.ops import StochasticDepth

        types.append(StochasticDepth)
    except ImportError:
        pass
    try:
        from timm.layers import DropPath

        types.append(DropPath)
    except ImportError:
        pass
    return tuple(types)


def _timm_notrace() -> tuple[tuple[type, ...], tuple]:
    try:
        from timm.layers import _fx as timm_fx
    except ImportError:
        return (), ()
    return tuple(timm_fx.get_notrace_modules()), tuple(timm_fx.get_notrace_functions())


Fn = TypeVar("Fn", bound=Callable)

_INSERTED: list[Callable] = []
"""Functions rewrites insert into graphs (``inserted``)."""


def inserted(fn: Fn) -> Fn:
    """Mark ``fn`` as a function a rewrite inserts into graphs: tracing a rewritten model's code
    again (fx does, to rebuild a pickled GraphModule) keeps each call of it one node instead of
    tracing into it (its checks of argument types would see proxies and take the wrong branch)."""
    _INSERTED.append(fn)
    return fn


class MoeifyTracer(fx.Tracer):
    """fx tracer with timm's leaf-module / autowrap settings and conv/BN subclasses as leaves;
    the functions rewrites insert stay calls."""

    def __init__(self) -> None:
        self._timm_leaves, timm_functions = _timm_notrace()
        self._leaves = _extra_leaf_types()
        super().__init__(autowrap_functions=(*timm_functions, *_INSERTED))

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self._leaves) or isinstance(m, self._timm_leaves):
            return True
        return super().is_leaf_module(m, module_qualified_name)


class TracedModule(fx.GraphModule):
    """A GraphModule whose errors reach its caller as raised, compiled or not (``_call``)."""

    def recompile(self):
        code = super().recompile()
        type(self).__call__ = _call  # fx sets its own wrapper on every recompile
        return code

    def __reduce__(self):
        """Pickled as fx pickles a GraphModule (its code, traced again on loading, by the tracer
        that made it), and rebuilt as a TracedModule."""
        return _traced_from_code, super().__reduce__()[1]


def _call(self: TracedModule, *args, **kwargs):
    """A TracedModule's call. fx runs every GraphModule call inside a handler that walks a raised
    exception's traceback with a generator; under ``torch.compile(..., fullgraph=True)`` that
    handler cannot be compiled, so an error the model raises on purpose (a refused NaN route) would
    reach the caller as dynamo's "Attempt to trace generator". This goes straight to
    ``nn.Module.__call__`` instead, and then raises the route check that compiled code left to it
    (``errors.route_checks``). Dynamo does not compile this frame when it is the first one
    (``torch.compile(model)``), only the model's call inside it, so the check is read here,
    eagerly, after the compiled code (everything the frame needs is inline: each function it
    called would be a frame of its own for dynamo to compile). Traced into a larger graph, the call
    takes no check, and the model's code sees that and checks its routes itself."""
    if torch.compiler.is_compiling():
        return nn.Module.__call__(self, *args, **kwargs)
    taken = getattr(route_checks, "taken", False)
    route_checks.taken, route_checks.finite = True, None
    try:
        out = nn.Module.__call__(self, *args, **kwargs)
        finite = route_checks.finite
    finally:
        route_checks.taken, route_checks.finite = taken, None
    if finite is not None and not bool(finite):
        raise RoutingError.non_finite()
    return out


_skip_top_frame = getattr(torch._dynamo.eval_frame, "skip_code", None)
if _skip_top_frame is not None:  # absent (an older torch): dynamo traces this frame too, and the model raises itself
    _skip_top_frame(_call.__code__)


def _traced_from_code(body: dict, import_block: str) -> TracedModule:
    """fx's own rebuild of a pickled GraphModule (``reduce_graph_module``), made a TracedModule."""
    forward = fx.graph_module._forward_from_src(import_block + body["_code"], {})
    return fx.graph_module._deserialize_graph_module(forward, body, graph_module_cls=TracedModule)


def _where(exc: BaseException) -> str:
    """The innermost frame of user/model code (not torch internals) where tracing failed."""
    frames = traceback.extract_tb(exc.__traceback__)
    for fr in reversed(frames):
        f = fr.filename.replace("\\", "/")
        if "/torch/" not in f and "/moeify/" not in f:
            return f"{fr.filename}:{fr.lineno}: {(fr.line or '').strip()}"
    return ""


def forward_defaults(model: nn.Module, n_inputs: int) -> dict:
    """The forward's arguments after the first ``n_inputs`` that have default values."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    named = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return {p.name: p.default for p in named[n_inputs:] if p.default is not p.empty}


def trace(model: nn.Module, concrete: dict | None = None) -> fx.GraphModule:
    """Symbolically trace ``model`` (in its current mode) into a GraphModule sharing its submodules;
    forward arguments in ``concrete`` are traced at those values (fx ``concrete_args``)."""
    tracer = MoeifyTracer()
    try:
        graph = tracer.trace(model, concrete_args=concrete or None)
    except Exception as e:  # fx raises many types; all mean "not traceable"
        where = _where(e)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConversionError(
            f"cannot trace {type(model).__name__} with torch.fx: {msg}"
            + (f" (at {where})" if where else "")
            + "; make that code independent of tensor values or move it into a leaf module"
        ) from e
    gm = TracedModule(tracer.root, graph, type(model).__name__)
    _keep_non_persistent(model, gm)
    return gm


def _keep_non_persistent(model: nn.Module, gm: fx.GraphModule) -> None:
    """Buffers the model keeps out of its state_dict stay out of the traced one (torch < 2.14
    copies every buffer as persistent), so files saved under one torch load under another."""
    for name, _ in gm.named_buffers():
        prefix, _, field = name.rpartition(".")
        try:
            src = model.get_submodule(prefix)
        except AttributeError:
            continue
        if field in src._non_persistent_buffers_set:
            gm.get_submodule(prefix)._non_persistent_buffers_set.add(field)


def infer_shapes(gm: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...]) -> None:
    """Record ``node.meta['tensor_meta']`` for every node, on fake tensors (no real compute)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    try:
        with torch.no_grad():
            ShapeProp(gm, fake_mode=FakeTensorMode(allow_non_fake_inputs=True)).propagate(*example_inputs)
        return
    except ConversionError:
        raise
    except Exception:
        pass  # some ops lack fake kernels: fall back to one real pass on the example input
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConversionError(
            f"the model fails on an input of shape {tuple(example_inputs[0].shape)}: {msg}; "
            "pass example inputs of the size the model expects (--input-size C,H,W)"
        ) from e
