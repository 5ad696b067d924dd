"""The memory layout images and models run in on a device.

On a CPU, oneDNN computes convolutions in its own blocked layout and reorders a contiguous (NCHW)
tensor into it and back around every convolution, forward and backward; a channels-last tensor
needs no reorder, so training and attacks run faster in it (docs/benchmarks.md). Other devices
keep the contiguous layout until it is measured there.
"""
from __future__ import annotations

import torch


def image_layout(device: torch.device | str, channels_last: bool | None = None) -> torch.memory_format:
    """``channels_last`` when given; otherwise channels-last on a CPU, contiguous elsewhere."""
    if channels_last is None:
        channels_last = torch.device(device).type == "cpu"
    return torch.channels_last if channels_last else torch.contiguous_format
