"""moeify's own backbones (the AdvMoE paper's CIFAR-style models) and the input wrapper.

Names here are found by ``moeify.create_model`` after torchvision's and timm's.
"""
from .cifar import REGISTRY
from .wrap import InputNormalize

__all__ = ["REGISTRY", "InputNormalize"]
