"""Recipe -> model: the backbone (inputs in [0, 1], normalisation inside), then dense, MoE or S-Dense."""
from __future__ import annotations

import torch
from torch import nn

from .. import io
from ..conversion import convert, is_router
from ..nn import LayerRouter
from ..data import DataBundle, calibration_images
from ..errors import MoeifyError
from ..layout import image_layout
from ..recipes import Recipe
from ..spec import MoESpec
from ..twin import static_twin
from ..zoo import create_model, resolve


def training_layout(recipe: Recipe, device: torch.device | str) -> torch.memory_format:
    """The layout a recipe's model and images train in: ``model.channels_last``, or when unset,
    the device's (``layout.image_layout``: channels-last on a CPU)."""
    return image_layout(device, recipe.model.channels_last)


def build_model(recipe: Recipe, data: DataBundle) -> nn.Module:
    """The model a recipe trains, with random weights (``train.init`` is loaded by the trainer), or
    with ``moe.experts_by: cluster`` converted from ``train.init``'s trained dense weights."""
    channels = recipe.data.channels or data.size[0]
    normalize = {"mean": list(data.mean), "std": list(data.std), "channels": channels}
    kwargs = dict(recipe.model.kwargs)
    if resolve(recipe.model.name)[0] == "moeify":  # moeify's models take the data's channel count
        kwargs.setdefault("in_chans", channels)
    size = (data.size[0], data.size[1], data.size[2])
    try:
        dense = create_model(recipe.model.name, num_classes=data.num_classes, input_size=size, normalize=normalize,
                             **kwargs)
    except TypeError as e:
        raise MoeifyError(f"model.kwargs do not fit {recipe.model.name}: {e}") from None
    if recipe.model.kind == "dense":
        return dense
    m = recipe.moe
    norm = m.router_norm if m.router_norm is not None else m.experts_by != "cluster"
    spec = MoESpec(experts=m.experts, top_k=m.top_k, scope=m.scope, cuts=m.cuts, router=m.router, router_norm=norm,
                   layers=tuple(m.layers) if m.layers else None, exclude=tuple(m.exclude))
    example = torch.zeros(2, *size)
    if recipe.model.kind == "s-dense":
        return static_twin(dense, spec=spec, example_inputs=example)
    if m.experts_by == "cluster":  # trained dense weights in, experts clustered and routers fitted to them
        load_init(dense, recipe.train.init)
        return convert(dense.eval(), spec=spec, example_inputs=example, calibration=calibration_images(data, m.calibration_size))
    return convert(dense, spec=spec, example_inputs=example)


def load_init(model: nn.Module, path: str) -> None:
    """Load ``train.init``'s weights (a saved model file) into the freshly built model."""
    info = io.read_info(path)
    why = io.load_weights(model, path)
    if why:
        raise MoeifyError(f"train.init {path} does not fit this recipe's model ({why}; it is a "
                          f"{info.get('kind', 'moe')} model of {info.get('source')})")


def hold_frozen_norms(model: nn.Module, update: str) -> None:
    """Put the BatchNorm layers (and standardising routers) of the part not being trained in eval
    mode, so their running statistics stay as they were: with ``update`` routers (or experts) the
    other part is then unchanged as a function."""
    if update == "all":
        return
    for name, m in model.named_modules():
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, LayerRouter)) and is_router(name + ".") == (update == "experts"):
            m.eval()


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(router parameters, expert parameters = every other parameter)."""
    routers, experts = [], []
    for name, p in model.named_parameters():
        (routers if is_router(name) else experts).append(p)
    return routers, experts
