"""MoE building blocks: routes, routers, gated conv/linear and channel-wise layers (sparse or masked)."""
from .channelwise import make_channelwise_module, routable
from .executors import current_execution, current_executor, execution
from .gated import gate_channels, make_moe_module, moe_conv1d, moe_conv2d, moe_conv3d, moe_linear
from .route import Route, select_top_k
from .router import GlobalRouter, LayerRouter, MoELayer

__all__ = [
    "Route", "select_top_k", "LayerRouter", "GlobalRouter", "MoELayer", "execution", "current_execution", "current_executor",
    "make_moe_module", "make_channelwise_module", "routable", "gate_channels", "moe_conv1d", "moe_conv2d",
    "moe_conv3d", "moe_linear",
]
