"""MoE building blocks: routes, routers, gated conv/linear execution (sparse or masked)."""
from .execution import current_execution, execution
from .gated import gate_channels, make_moe_module, moe_conv1d, moe_conv2d, moe_conv3d, moe_linear
from .router import GlobalRouter, LayerRouter, MoELayer, Route, select_top_k

__all__ = [
    "Route", "select_top_k", "LayerRouter", "GlobalRouter", "MoELayer", "execution", "current_execution",
    "make_moe_module", "gate_channels", "moe_conv1d", "moe_conv2d", "moe_conv3d", "moe_linear",
]
