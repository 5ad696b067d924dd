"""Inputs in [0, 1], normalisation inside the model: attacks then measure epsilon in pixel units."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class InputNormalize(nn.Module):
    """``backbone((x - mean) / std)``; a 1-channel input is repeated to ``channels`` channels."""

    def __init__(self, backbone: nn.Module, mean: Sequence[float], std: Sequence[float], channels: int | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        c = channels or len(mean)
        self.repeat = c != len(mean)  # decided here, so the traced graph has no data-dependent branch
        if self.repeat and len(mean) != 1:
            raise ValueError(f"only 1-channel inputs can be repeated to {c} channels, not {len(mean)}-channel ones")
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).reshape(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).reshape(1, -1, 1, 1), persistent=False)
        self.channels = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        if self.repeat:
            x = x.expand(-1, self.channels, -1, -1)
        return self.backbone(x)
