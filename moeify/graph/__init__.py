"""Graph capture and channel analysis: model -> traced graph -> channel-coupling groups."""
from .trace import forward_defaults, infer_shapes, trace
from .groups import ChannelGroup, analyze

__all__ = ["trace", "forward_defaults", "infer_shapes", "analyze", "ChannelGroup"]
