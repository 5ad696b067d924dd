"""moeify: turn any CNN into a sparsely-gated Mixture-of-Experts CNN by torch.fx graph rewriting."""
from .allocator import keep_freed_memory
from .conversion import convert, moe_layers, plan, router_parameters, routing
from .errors import ConversionError, MoeifyError, RoutingError
from .fit import distil, fit_routers
from .fold import fold_batchnorm
from .io import load, save
from .macs import count_macs
from .nn import execution
from .planning import ConversionPlan
from .spec import MoESpec
from .twin import static_twin
from .zoo import create_model

__version__ = "0.1.0"

__all__ = [
    "convert", "fit_routers", "keep_freed_memory", "distil", "fold_batchnorm", "static_twin", "plan", "moe_layers", "router_parameters", "routing", "count_macs", "execution", "save", "load", "create_model",
    "MoESpec", "ConversionPlan", "ConversionError", "MoeifyError", "RoutingError",
]
