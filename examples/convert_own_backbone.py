"""Convert your own backbone with the Python API: load its trained dense weights, convert it, check
that all experts on is the dense model, then fine-tune only the routers, so that each input picks the
experts that serve it best while every expert weight stays as trained.

Run: python examples/convert_own_backbone.py [--steps N]   (Fashion-MNIST; about a minute on 2 CPU cores)
"""
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import moeify
from moeify.data import load_data, to_float


class SmallNet(nn.Module):
    """A CIFAR-style CNN: two residual blocks with a bottleneck, then a classifier."""

    def __init__(self, width: int = 32, num_classes: int = 10, in_chans: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
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


def batches(x, y, size, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        i = torch.randint(len(x), (size,), generator=g)
        yield x[i], y[i]


def accuracy(model, x, y):
    with torch.no_grad():
        return (model.eval()(x).argmax(1) == y).float().mean().item()


def train(model, params, x, y, steps, lr, clip=None):
    """SGD; for MoE models clip the gradient norm: the top-k gates' straight-through gradients reach the
    routers summed over every position of the experts' outputs and can spike."""
    params = list(params)
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    for xb, yb in batches(x, y, 128, steps):
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
    return loss.item()


def main(steps: int = 300) -> None:
    torch.manual_seed(0)
    data = load_data("fashion-mnist", val_size=0, train_subset=20_000, test_subset=1000)
    x, y = to_float(data.train.tensors[0]), data.train.tensors[1]
    xt, yt = to_float(data.test.tensors[0]), data.test.tensors[1]

    # 1. Your trained dense model (here: a few hundred steps of ordinary training), saved as usual.
    weights = Path(tempfile.mkdtemp()) / "smallnet.pt"
    trained = SmallNet()
    train(trained.train(), trained.parameters(), x, y, steps, lr=0.1)
    torch.save(trained.state_dict(), weights)

    # 2. Load the weights into a fresh instance and convert it.
    dense = SmallNet()
    dense.load_state_dict(torch.load(weights))
    dense.eval()
    print(moeify.plan(dense, experts=4, top_k=2, example_inputs=xt[:8], scope="hidden"))
    full = moeify.convert(dense, experts=4, top_k=4, example_inputs=xt[:8], scope="hidden").eval()
    with torch.no_grad():
        print("all experts on, max |MoE - dense|:", (full(xt[:256]) - dense(xt[:256])).abs().max().item())

    moe = moeify.convert(dense, experts=4, top_k=2, example_inputs=xt[:8], scope="hidden")
    ratio = moeify.count_macs(moe.eval(), xt[:64]) / moeify.count_macs(dense, xt[:64])
    print(f"executed MACs with 2 of 4 experts: {ratio:.1%} of dense")

    # 3. Fine-tune the routers only: expert weights and BatchNorm statistics stay as trained (eval mode);
    #    the top-k gates pass their gradient straight through to the router scores.
    before = accuracy(moe, xt, yt)
    routers = moeify.router_parameters(moe)
    for p in moe.parameters():
        p.requires_grad_(False)
    for p in routers:
        p.requires_grad_(True)
    snapshot = [p.detach().clone() for p in moe.parameters() if not p.requires_grad]
    loss = train(moe.eval(), routers, x, y, steps, lr=0.05, clip=1.0)
    unchanged = all(torch.equal(a, p) for a, p in zip(snapshot, (p for p in moe.parameters() if not p.requires_grad)))
    after = accuracy(moe, xt, yt)
    print(f"test accuracy: dense {accuracy(dense, xt, yt):.1%}; MoE with untrained routers {before:.1%}; "
          f"after fine-tuning the routers ({len(routers)} tensors, {steps} steps, loss {loss:.3f}) {after:.1%}; "
          f"expert weights unchanged: {unchanged}")

    # 4. Dropping half the channels shifts what every later layer sees; if routing alone does not recover the
    #    accuracy, fine-tune the whole MoE (experts adapt to being used two at a time, BatchNorm re-estimates).
    for p in moe.parameters():
        p.requires_grad_(True)
    loss = train(moe.train(), moe.parameters(), x, y, steps, lr=0.02, clip=1.0)
    print(f"after fine-tuning routers and experts ({steps} steps, loss {loss:.3f}): {accuracy(moe, xt, yt):.1%}")
    for name, idx in moeify.routing(moe, xt[:8]).items():
        print(f"{name}: experts per sample {idx.tolist()}")


if __name__ == "__main__":
    main(int(sys.argv[sys.argv.index("--steps") + 1]) if "--steps" in sys.argv else 300)
