"""Save and load converted models: safetensors weights plus the spec needed to rebuild them."""
from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from .errors import MoeifyError
from .spec import MoESpec

FORMAT = "moeify/1"


def model_info(model: nn.Module) -> dict:
    """What ``load`` needs to rebuild ``model``: an MoE model (``convert``), its static twin
    (``static_twin``), or a dense model made by ``create_model``."""
    if getattr(model, "moeify_folded", False):
        raise MoeifyError("a model from fold_batchnorm() has no BatchNorm left to rebuild; save the model before "
                          "folding it, and fold it again after load()")
    info = getattr(model, "moeify_info", None)
    if info is not None:
        return info
    if getattr(model, "moeify_source", None) is not None:
        return {"kind": "dense", "source": model.moeify_source, "model_kwargs": getattr(model, "moeify_kwargs", {}),
                "input_shape": list(model.moeify_input_size)}
    raise MoeifyError("save() expects a model from moeify.convert(), moeify.static_twin() or moeify.create_model()")


def save(moe: nn.Module, path: str | os.PathLike, extra: dict | None = None) -> None:
    """Write a model to ``path`` atomically (a crash leaves no half file); ``extra`` is stored as
    metadata beside the rebuild information (e.g. the training recipe)."""
    info = dict(model_info(moe))
    if extra:
        info["extra"] = extra
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    save_model(moe, tmp, metadata={"format": FORMAT, "moeify": json.dumps(info)})
    os.replace(tmp, path)


def load_weights(model: nn.Module, path: str | os.PathLike) -> str | None:
    """Load weights into ``model`` in place — a safetensors / .moe file, or a torch state_dict file
    (.pt, .pth, .bin; {"state_dict": ...} too); None when every tensor fits, else why not (the first
    size mismatch, or how many tensors are missing and unexpected)."""
    path = os.fspath(path)
    try:
        if path.endswith((".pt", ".pth", ".bin")):
            state = _state_dict(path)
            missing, unexpected = model.load_state_dict(state.get("state_dict", state), strict=False)
        else:
            missing, unexpected = load_model(model, path, strict=False)
    except RuntimeError as e:  # shape mismatches
        return next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e).splitlines()[0])
    if missing or unexpected:
        return (f"{len(missing)} missing, {len(unexpected)} unexpected tensors, e.g. "
                f"{(list(missing) + list(unexpected))[0]}")
    return None


def _state_dict(path: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as e:
        raise MoeifyError(f"{path}: cannot read it as a state_dict ({str(e).splitlines()[0]})") from None


def read_info(path: str | os.PathLike) -> dict:
    """The conversion metadata stored in a saved model."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MoeifyError(f"no such file {path!r}")
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise MoeifyError(f"{path} is not a moeify model file ({type(e).__name__})") from e
    if meta.get("format") != FORMAT:
        raise MoeifyError(f"{path} is not a moeify model file (format {meta.get('format')!r})")
    return json.loads(meta["moeify"])


def load(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Rebuild and load a saved MoE model (eval mode).

    ``model=None`` rebuilds named torchvision/timm backbones (and FILE.py:FUNCTION ones whose file
    still exists); for any other backbone pass a fresh dense instance.
    """
    from . import zoo
    from .conversion import convert
    from .twin import static_twin

    info = read_info(path)
    if model is None:
        if not info.get("source"):
            raise MoeifyError(f"{path} holds a user backbone; pass model=<a fresh instance of it> to load()")
        model = zoo.rebuild(info["source"], info.get("model_kwargs", {}))
        model.moeify_input_size = tuple(info["input_shape"])  # the size it was saved with, not the default
    kind = info.get("kind", "moe")
    example = torch.zeros(1, *info["input_shape"])
    if kind == "moe":
        moe = convert(model, spec=MoESpec.from_dict(info["spec"]), example_inputs=example)
    elif kind == "s-dense":
        moe = static_twin(model, spec=MoESpec.from_dict(info["spec"]), example_inputs=example)
    else:
        moe = model
    why = load_weights(moe, path)
    if why:
        raise MoeifyError(f"{path} does not match this model ({why}); pass the backbone it was made from")
    moe.moeify_info = info
    return moe.eval()
