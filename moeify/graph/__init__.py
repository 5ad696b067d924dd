"""Graph capture and channel analysis: model -> traced graph -> channel-coupling groups."""
from .trace import infer_shapes, trace
from .groups import ChannelGroup, analyze

__all__ = ["trace", "infer_shapes", "analyze", "ChannelGroup"]
