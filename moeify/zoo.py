"""Model names -> dense models: torchvision, timm, or a user's FILE.py:FUNCTION.

A plain name is looked up in torchvision, then timm; ``torchvision:NAME``, ``timm:NAME`` and
``FILE.py:FUNCTION`` are explicit. Built models carry ``moeify_source`` (so a saved MoE model can be
rebuilt), ``moeify_kwargs`` and ``moeify_input_size`` (the input size they expect).
"""
from __future__ import annotations

import difflib
import functools
import importlib.util
import inspect
import os
import warnings

from torch import nn

from .errors import MoeifyError

DEFAULT_INPUT_SIZE = (3, 224, 224)


@functools.lru_cache(maxsize=1)
def _torchvision_names() -> tuple[str, ...]:
    import torchvision

    return tuple(torchvision.models.list_models(module=torchvision.models))


@functools.lru_cache(maxsize=1)
def _timm_names() -> tuple[str, ...]:
    import timm

    return tuple(timm.list_models())


def resolve(name: str) -> tuple[str, str]:
    """('torchvision'|'timm'|'moeify'|'file', target) for a model name; one-line error if unknown."""
    from .models import REGISTRY

    if ".py:" in name:
        return "file", name
    if name.startswith("moeify:"):
        target = name.split(":", 1)[1]
        if target not in REGISTRY:
            _unknown(name, tuple(REGISTRY))
        return "moeify", target
    if name.startswith("torchvision:"):
        kind, target = "torchvision", name.split(":", 1)[1]
        if target not in _torchvision_names():
            _unknown(name, _torchvision_names())
        return kind, target
    if name.startswith("timm:"):
        kind, target = "timm", name.split(":", 1)[1]
        if target not in _timm_names():
            _unknown(name, _timm_names())
        return kind, target
    if name in _torchvision_names():
        return "torchvision", name
    if name in _timm_names():
        return "timm", name
    if name in REGISTRY:
        return "moeify", name
    _unknown(name, _torchvision_names() + _timm_names() + tuple(REGISTRY))
    raise AssertionError("unreachable")


def _unknown(name: str, candidates: tuple[str, ...]) -> None:
    close = difflib.get_close_matches(name.split(":")[-1], candidates, n=4, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise MoeifyError(f"unknown model {name!r}; {hint}(names come from torchvision, then timm; "
                      "then moeify's CIFAR models; or use timm:NAME, torchvision:NAME, moeify:NAME, FILE.py:FUNCTION)")


def create_model(name: str, num_classes: int | None = None, input_size: tuple[int, ...] | None = None,
                 normalize: dict | None = None, **model_kwargs) -> nn.Module:
    """Build a dense model with random weights (nothing is downloaded).

    ``model_kwargs`` go to the constructor (e.g. ``width=16`` for moeify's CIFAR models);
    ``normalize={"mean": [...], "std": [...], "channels": 3}`` wraps the model so it takes inputs
    in [0, 1] (1-channel inputs repeated to ``channels``).
    """
    kind, target = resolve(name)
    kwargs = dict(model_kwargs) if num_classes is None else {"num_classes": num_classes, **model_kwargs}
    if kind == "torchvision":
        import torchvision

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            extra = {"init_weights": True} if target in ("inception_v3", "googlenet") else {}
            model = torchvision.models.get_model(target, weights=None, **kwargs, **extra)
        size = _torchvision_input_size(target)
        source = f"torchvision:{target}"
    elif kind == "timm":
        import timm

        model = timm.create_model(target, pretrained=False, **kwargs)
        size = tuple(model.pretrained_cfg.get("input_size", DEFAULT_INPUT_SIZE))
        source = f"timm:{target}"
    elif kind == "moeify":
        from .models import REGISTRY

        try:
            model = REGISTRY[target](**kwargs)
        except TypeError as e:
            raise MoeifyError(f"bad arguments for model {target}: {e}") from None
        size = (kwargs.get("in_chans", 3), 32, 32)
        source = f"moeify:{target}"
    else:
        model, source = _from_file(target, kwargs)
        size = DEFAULT_INPUT_SIZE
    if normalize:
        from .models import InputNormalize

        model = InputNormalize(model, normalize["mean"], normalize["std"], normalize.get("channels"))
        kwargs = {**kwargs, "normalize": dict(normalize)}
    model.moeify_source = source
    model.moeify_kwargs = kwargs
    model.moeify_input_size = tuple(input_size) if input_size else size
    return model


def _torchvision_input_size(name: str) -> tuple[int, ...]:
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(name)
        crop = next(iter(weights)).transforms().crop_size
        return (3, crop[0], crop[0])
    except Exception:  # models without registered weights
        return DEFAULT_INPUT_SIZE


def _from_file(spec: str, kwargs: dict) -> tuple[nn.Module, str]:
    path, func = spec.rsplit(":", 1)
    if not os.path.isfile(path):
        raise MoeifyError(f"model file {path!r} not found; give FILE.py:FUNCTION with an existing file")
    mod_spec = importlib.util.spec_from_file_location(f"moeify_user_{abs(hash(os.path.abspath(path)))}", path)
    module = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(module)
    except Exception as e:
        raise MoeifyError(f"cannot import {path}: {type(e).__name__}: {e}") from e
    fn = getattr(module, func, None)
    if not callable(fn):
        names = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        raise MoeifyError(f"{path} has no function {func!r}; callables there: {', '.join(names[:8]) or 'none'}")
    params = inspect.signature(fn).parameters
    use = {k: v for k, v in kwargs.items() if k in params or any(p.kind == p.VAR_KEYWORD for p in params.values())}
    model = fn(**use)
    if not isinstance(model, nn.Module):
        raise MoeifyError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model, f"file:{os.path.abspath(path)}:{func}"


def rebuild(source: str, kwargs: dict) -> nn.Module:
    """The dense model a saved MoE model came from (named torchvision/timm models and files)."""
    if source.startswith("file:"):
        path_func = source[len("file:"):]
        return create_model(path_func, **kwargs)
    return create_model(source, **kwargs)
