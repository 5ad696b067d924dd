"""Convert your own backbone with the Python API: plan, convert, check exactness, look at routing.

Run: python examples/convert_own_backbone.py
"""
import torch
import torch.nn.functional as F
from torch import nn

import moeify


class SmallNet(nn.Module):
    """A CIFAR-style CNN: two residual blocks with a bottleneck, then a classifier."""

    def __init__(self, width: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.ModuleList(nn.Sequential(
            nn.Conv2d(width, 2 * width, 1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.Conv2d(2 * width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
        ) for _ in range(2))
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = F.relu(x + block(x))
        return self.fc(x.mean((2, 3)))


def main() -> None:
    torch.manual_seed(0)
    model = SmallNet().eval()
    x = torch.rand(8, 3, 32, 32)
    print(moeify.plan(model, experts=4, top_k=2, example_inputs=x, scope="paper"))

    full = moeify.convert(model, experts=4, top_k=4, example_inputs=x, scope="paper").eval()
    with torch.no_grad():
        print("all experts on, max |MoE - dense|:", (full(x) - model(x)).abs().max().item())

    moe = moeify.convert(model, experts=4, top_k=2, example_inputs=x, scope="paper").eval()
    ratio = moeify.count_macs(moe, x) / moeify.count_macs(model, x)
    print(f"executed MACs with 2 of 4 experts: {ratio:.1%} of dense")
    for name, idx in moeify.routing(moe, x).items():
        print(f"{name}: experts per sample {idx.tolist()}")


if __name__ == "__main__":
    main()
