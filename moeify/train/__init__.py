"""Robust training of dense, S-Dense and MoE models: standard, PGD-AT, TRADES and AdvMoE, run
through Hugging Face Accelerate (one CPU/GPU, or many with ``accelerate launch``)."""
from .loop import robustify

__all__ = ["robustify"]
