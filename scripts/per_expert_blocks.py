"""Would grouping samples per expert (at most N groups) beat grouping per routing pattern (up to
C(N, K) groups) for many experts? Times torchvision resnet18's hidden regions (conv1, BatchNorm,
ReLU, conv2 of each basic block, at the inputs the blocks see) four ways, interleaved: dense, the
static twin (K/N width), masked, and per expert (each expert's conv1 rows and conv2 columns on the
samples that chose it, conv2's parts summed into their rows), routes drawn at random per sample.

Usage: python scripts/per_expert_blocks.py [--experts 8] [--top-k 4] [--batch 16] [--repeats 5]
Prints each block's median ms per variant and, summed over blocks, per expert's share of the
twin's gain. A prototype to decide whether to build the strategy, not a strategy itself.
"""
from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
import torchvision

from moeify.bench import interleaved_rounds


def per_expert(block, x: torch.Tensor, rows: list[torch.Tensor], w1: list, w2: list, bn: list) -> torch.Tensor:
    """The block's hidden region with each expert run on the samples that chose it."""
    out = None
    for r, a, b, stats in zip(rows, w1, w2, bn):
        if len(r) == 0:
            continue
        xe = x.index_select(0, r)
        h = F.relu(F.batch_norm(F.conv2d(xe, a, None, block.conv1.stride, 1), *stats, False, 0.0, 1e-5))
        y = F.conv2d(h, b, None, 1, 1)
        if out is None:
            out = torch.empty((x.shape[0],) + y.shape[1:], memory_format=torch.channels_last).zero_()
        out.index_add_(0, r, y)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    n, k, last = args.experts, args.top_k, torch.channels_last
    model = torchvision.models.resnet18().eval().to(memory_format=last)
    blocks = [b for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for b in layer]
    seen: dict = {}
    hooks = [b.register_forward_hook(lambda m, i, o: seen.__setitem__(m, i[0])) for b in blocks]
    with torch.inference_mode():
        model(torch.rand(args.batch, 3, 224, 224).contiguous(memory_format=last))
    for h in hooks:
        h.remove()
    totals = {v: 0.0 for v in ("dense", "twin", "masked", "per expert")}
    with torch.inference_mode():
        for b in blocks:
            x, c = seen[b], b.conv1.out_channels
            per, keep = c // n, c * k // n
            idx = torch.randn(args.batch, n).topk(k, 1).indices
            rows = [torch.nonzero((idx == e).any(1)).flatten() for e in range(n)]
            mask = torch.zeros(args.batch, c)
            for e in range(n):
                mask[rows[e], e * per:(e + 1) * per] = 1
            mask = mask[:, :, None, None]
            w1 = [b.conv1.weight[e * per:(e + 1) * per].contiguous(memory_format=last) for e in range(n)]
            w2 = [b.conv2.weight[:, e * per:(e + 1) * per].contiguous(memory_format=last) for e in range(n)]
            bn = [tuple(t[e * per:(e + 1) * per] for t in (b.bn1.running_mean, b.bn1.running_var, b.bn1.weight,
                                                           b.bn1.bias)) for e in range(n)]
            t1 = b.conv1.weight[:keep].contiguous(memory_format=last)
            t2 = b.conv2.weight[:, :keep].contiguous(memory_format=last)
            tbn = tuple(t[:keep] for t in (b.bn1.running_mean, b.bn1.running_var, b.bn1.weight, b.bn1.bias))
            fns = {
                "dense": lambda: b.conv2(F.relu(b.bn1(b.conv1(x)))),
                "twin": lambda: F.conv2d(F.relu(F.batch_norm(F.conv2d(x, t1, None, b.conv1.stride, 1), *tbn, False,
                                                             0.0, 1e-5)), t2, None, 1, 1),
                "masked": lambda: b.conv2(F.relu(b.bn1(b.conv1(x))) * mask),
                "per expert": lambda: per_expert(b, x, rows, w1, w2, bn),
            }
            ref = fns["masked"]()
            assert torch.allclose(fns["per expert"](), ref, rtol=1e-4, atol=1e-4 * ref.abs().max())
            ms = {v: statistics.median(t) for v, t in interleaved_rounds(fns, args.repeats).items()}
            for v in totals:
                totals[v] += ms[v]
            print(f"{c:4d} ch {x.shape[2]:3d}px " + "  ".join(f"{v} {t:7.2f}" for v, t in ms.items()))
    share = (totals["dense"] - totals["per expert"]) / (totals["dense"] - totals["twin"])
    print("sum   " + "  ".join(f"{v} {t:7.1f}" for v, t in totals.items()) + f"   per expert: {share:.0%} of the twin's gain")


if __name__ == "__main__":
    main()
