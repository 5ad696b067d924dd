"""Small user-written backbones that exercise the graph rules (used by tests and the CLI test)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SE(nn.Module):
    def __init__(self, c: int, r: int = 4) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(c, c // r, 1)
        self.expand = nn.Conv2d(c // r, c, 1)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.expand(F.relu(self.reduce(s))))


class Zoo(nn.Module):
    """cat, SE, grouped and depthwise convs, channel shuffle, fan-out, a functional conv."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(16)
        # fan-out: a 32-channel hidden group read by two consumers, joined by cat
        self.expand = nn.Conv2d(16, 32, 1)
        self.bn1 = nn.BatchNorm2d(32)
        self.left = nn.Conv2d(32, 16, 3, padding=1)
        self.right = nn.Conv2d(32, 16, 1)
        # grouped conv producer + depthwise + SE inside one hidden group
        self.grouped = nn.Conv2d(32, 32, 3, padding=1, groups=4)
        self.bn2 = nn.BatchNorm2d(32)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.bn3 = nn.BatchNorm2d(32)
        self.se = SE(32)
        self.project = nn.Conv2d(32, 32, 1)
        # channel shuffle after this conv: its group must stay dense
        self.pre_shuffle = nn.Conv2d(32, 32, 1)
        # functional conv consuming a hidden group
        self.fw = nn.Parameter(torch.randn(24, 32, 3, 3) * 0.1)
        self.mid = nn.Conv2d(32, 32, 1)
        self.head = nn.Linear(24, num_classes)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        h = F.relu(self.bn1(self.expand(x)))
        x = torch.cat([self.left(h), self.right(h)], dim=1)
        y = F.relu(self.bn2(self.grouped(x)))
        y = F.silu(self.bn3(self.dw(y)))
        y = self.se(y)
        x = self.project(y)
        s = self.pre_shuffle(x)
        b, c, hh, ww = s.shape
        s = s.view(b, 4, c // 4, hh, ww).transpose(1, 2).reshape(b, c, hh, ww)
        m = F.relu(self.mid(s))
        z = F.conv2d(m, self.fw, padding=1)
        return self.head(F.adaptive_avg_pool2d(F.relu(z), 1).flatten(1))


class PreActDense(nn.Module):
    """Pre-activation blocks (BN-ReLU-conv) with dense connectivity (DenseNet style)."""

    def __init__(self, num_classes: int = 10, growth: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        c = 16
        self.layers = nn.ModuleList()
        for _ in range(3):
            self.layers.append(nn.ModuleDict({
                "bn1": nn.BatchNorm2d(c), "conv1": nn.Conv2d(c, 4 * growth, 1, bias=False),
                "bn2": nn.BatchNorm2d(4 * growth), "conv2": nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False),
            }))
            c += growth
        self.bn = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.stem(x)
        for layer in self.layers:
            h = layer["conv1"](F.relu(layer["bn1"](x)))
            h = layer["conv2"](F.relu(layer["bn2"](h)))
            x = torch.cat([x, h], 1)
        return self.fc(F.relu(self.bn(x)).mean((2, 3)))


class PreActResNet(nn.Module):
    """Pre-activation residual blocks: BN-ReLU-conv1-BN-ReLU-conv2, added to the stream."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "bn1": nn.BatchNorm2d(width), "conv1": nn.Conv2d(width, width, 3, padding=1, bias=False),
            "bn2": nn.BatchNorm2d(width), "conv2": nn.Conv2d(width, width, 3, padding=1, bias=False),
        }) for _ in range(2))
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            h = b["conv1"](F.relu(b["bn1"](x)))
            x = x + b["conv2"](F.relu(b["bn2"](h)))
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.bn(x)), 1).flatten(1))


class StreamReuse(nn.Module):
    """Residual blocks whose stream is read after the add: the first block's stream (behind an
    in-place ReLU, so two nodes share its memory) is added again at the end; the second block's
    stream is the first add's result and is read by nothing after its add."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.act = nn.ReLU(inplace=True)
        self.convs = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1, bias=False) for _ in range(4))
        self.bns = nn.ModuleList(nn.BatchNorm2d(width) for _ in range(2))
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.stem(x)
        a = self.act(x)
        y = a + self.bns[0](self.convs[1](F.relu(self.convs[0](a))))
        z = y + self.bns[1](self.convs[3](F.relu(self.convs[2](y))))
        return self.fc((z + x).mean((2, 3)))


class ResidualOnly(nn.Module):
    """RepVGG-style: every conv output is added into the residual stream, so there is no hidden
    channel group at all (scope auto must pick branches)."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.convs = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in range(2))
        self.bns = nn.ModuleList(nn.BatchNorm2d(width) for _ in range(2))
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        x = F.relu(self.stem(x))
        for conv, bn in zip(self.convs, self.bns):
            x = F.relu(x + bn(conv(x)))
        return self.fc(x.mean((2, 3)))


class TinyViT(nn.Module):
    """A vision transformer: patch-embedding conv, a class token concatenated along the token dim,
    pre-norm attention and MLP blocks (fc1 -> GELU -> fc2 on the last dim, tokens as an extra dim)
    added to the token stream, the class token's features to the head."""

    def __init__(self, num_classes: int = 10, dim: int = 32, depth: int = 2, patch: int = 4, image: int = 16) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.1)
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.1)
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "norm1": nn.LayerNorm(dim), "attn": nn.MultiheadAttention(dim, 2, batch_first=True),
            "norm2": nn.LayerNorm(dim), "fc1": nn.Linear(dim, 4 * dim), "fc2": nn.Linear(4 * dim, dim),
        }) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for b in self.blocks:
            h = b["norm1"](x)
            x = x + b["attn"](h, h, h, need_weights=False)[0]
            x = x + b["fc2"](F.gelu(b["fc1"](b["norm2"](x))))
        return self.head(self.norm(x)[:, 0])


class StdConvNet(nn.Module):
    """Weight-standardised convs (timm's StdConv2d / ScaledStdConv2d and their Same-padding forms, as
    in NF-Nets and BiT), whose own forward computes the weight they convolve with, as producers and
    consumers of hidden groups."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        from timm.layers import ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame

        self.stem = StdConv2d(3, 16, 3, padding=1)
        self.a = ScaledStdConv2d(16, 32, 3, padding=1)
        self.b = StdConv2dSame(32, 32, 3, stride=2)
        self.c = ScaledStdConv2dSame(32, 16, 3)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.a(x))
        x = F.gelu(self.b(x))
        return self.head(self.c(x).mean((2, 3)))


class GatedMLPs(nn.Module):
    """Gated MLPs whose first layer makes two copies of one group's channels: a GLU conv block
    (``chunk(2)``, one half through SiLU times the other, as timm's GluMlp) and a MambaOut-style
    token block on the last dim (``split`` into gate, identity part and a part through a
    depthwise conv, the last two concatenated again), each added to its stream."""

    def __init__(self, num_classes: int = 10, dim: int = 16, hidden: int = 32, conv: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 3, padding=1)
        self.glu_in = nn.Conv2d(dim, 2 * hidden, 1)
        self.glu_out = nn.Conv2d(hidden, dim, 1)
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * hidden)
        self.dw = nn.Conv2d(conv, conv, 3, padding=1, groups=conv)
        self.fc2 = nn.Linear(hidden, dim)
        self.split = (hidden, hidden - conv, conv)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = F.relu(self.stem(x))
        a, b = self.glu_in(x).chunk(2, dim=1)
        x = x + self.glu_out(F.silu(a) * b)
        x = x.permute(0, 2, 3, 1)
        g, i, c = torch.split(self.fc1(self.norm(x)), self.split, dim=-1)
        c = self.dw(c.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        x = x + self.fc2(F.gelu(g) * torch.cat((i, c), dim=-1))
        return self.head(x.mean((1, 2)))


class GhostBlock(nn.Module):
    """GhostNet's module: a conv's output concatenated with a depthwise "cheap" copy of it, read
    whole (both copies of every channel) by the next conv."""

    def __init__(self, num_classes: int = 10, dim: int = 16, hidden: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 3, padding=1)
        self.primary = nn.Conv2d(dim, hidden, 1, bias=False)
        self.bn = nn.BatchNorm2d(hidden)
        self.cheap = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False)
        self.cheap_bn = nn.BatchNorm2d(hidden)
        self.out = nn.Conv2d(2 * hidden, dim, 1)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = F.relu(self.stem(x))
        p = F.relu(self.bn(self.primary(x)))
        g = torch.cat([p, F.relu(self.cheap_bn(self.cheap(p)))], dim=1)
        return self.head((x + self.out(g)).mean((2, 3)))


class SplitConvs(nn.Module):
    """A conv's output split between two convs (after BatchNorm and ReLU), whose outputs are
    concatenated and read whole by a 1x1 conv (Res2Net / Inception style)."""

    def __init__(self, num_classes: int = 10, dim: int = 16) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, dim, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(dim)
        self.b = nn.Conv2d(dim // 2, dim, 3, padding=1)
        self.c = nn.Conv2d(dim // 2, dim, 3, padding=1)
        self.bn = nn.BatchNorm2d(2 * dim)
        self.d = nn.Conv2d(2 * dim, dim, 1)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x1, x2 = F.relu(self.bn_a(self.a(x))).chunk(2, dim=1)
        y = F.relu(self.bn(torch.cat([self.b(x1), self.c(x2)], dim=1)))
        return self.head(self.d(y).mean((2, 3)))


class SplitAttention(nn.Module):
    """ResNeSt's split attention (radix 2): a grouped conv makes ``radix`` branches of one set of
    channels at once (one conv group each), viewed as [B, radix, C, H, W] and summed over the radix dim; the attention
    (pool, two 1x1 convs, a softmax over the radix dim of [B, radix, C]) weights the branches,
    which are summed again and read by a 1x1 conv."""

    def __init__(self, num_classes: int = 10, dim: int = 16, hidden: int = 8, radix: int = 2) -> None:
        super().__init__()
        self.radix = radix
        self.stem = nn.Conv2d(3, dim, 3, padding=1)
        self.conv = nn.Conv2d(dim, radix * dim, 3, padding=1, groups=radix, bias=False)
        self.bn = nn.BatchNorm2d(radix * dim)
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, radix * dim, 1)
        self.out = nn.Conv2d(dim, dim, 1)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = F.relu(self.stem(x))
        b = F.relu(self.bn(self.conv(x)))
        n, rc, h, w = b.shape
        b = b.view(n, self.radix, rc // self.radix, h, w)
        gap = b.sum(dim=1).mean((2, 3), keepdim=True)
        attn = self.fc2(F.relu(self.fc1(gap))).view(n, self.radix, -1)
        attn = F.softmax(attn, dim=1).reshape(n, -1, 1, 1).view(n, self.radix, -1, 1, 1)
        y = (b * attn).sum(dim=1)
        return self.head((x + self.out(y)).mean((2, 3)))


class SelectiveKernel(nn.Module):
    """SKNet's selective kernel: two branches (3x3 and dilated 3x3) stacked on a new dim, summed
    for the attention, whose logits ([B, 2C] viewed as [B, 2, C, 1, 1]) are normalised by a
    softmax over the stack and weight the stacked branches before their sum."""

    def __init__(self, num_classes: int = 10, dim: int = 16, hidden: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 3, padding=1)
        self.paths = nn.ModuleList([nn.Conv2d(dim, dim, 3, padding=1), nn.Conv2d(dim, dim, 3, padding=2, dilation=2)])
        self.reduce = nn.Conv2d(dim, hidden, 1)
        self.select = nn.Conv2d(hidden, 2 * dim, 1)
        self.out = nn.Conv2d(dim, dim, 1)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = F.relu(self.stem(x))
        paths = torch.stack([F.relu(p(x)) for p in self.paths], dim=1)
        n, r, c, _, _ = paths.shape
        attn = self.select(F.relu(self.reduce(paths.sum(1).mean((2, 3), keepdim=True))))
        attn = torch.softmax(attn.view(n, r, c, 1, 1), dim=1)
        return self.head((x + self.out((paths * attn).sum(1))).mean((2, 3)))


class ChannelShuffle(nn.Module):
    """A ShuffleNet-style unit: a 1x1 conv, a channel shuffle (view as [B, g, C/g, H, W], swap the
    two, flatten back), a depthwise conv, then a grouped 1x1 conv."""

    def __init__(self, num_classes: int = 10, dim: int = 16, hidden: int = 16, groups: int = 2) -> None:
        super().__init__()
        self.groups = groups
        self.stem = nn.Conv2d(3, dim, 3, padding=1)
        self.a = nn.Conv2d(dim, hidden, 1)
        self.dw = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.b = nn.Conv2d(hidden, dim, 1, groups=groups)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = F.relu(self.a(x))
        n, c, h, w = y.shape
        y = y.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.head((x + self.b(self.dw(y))).mean((2, 3)))


class FoldedHeads(nn.Module):
    """SAM-style attention: qkv made by one linear layer, reshaped to [B, N, 3, heads, d] and
    permuted so that q/k/v and the heads come first ([3, B * heads, N, d]: channel factors on the
    batch dim), then a token MLP; on a [B, N, C] token input."""

    def __init__(self, num_classes: int = 10, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4).reshape(3, b * self.heads, n, -1).unbind(0)
        a = torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v
        x = x + self.proj(a.view(b, self.heads, n, -1).permute(0, 2, 1, 3).reshape(b, n, c))
        x = x + self.fc2(F.gelu(self.fc1(x)))
        return self.head(x.mean(1))


class OptionalMask(nn.Module):
    """A forward argument with a default the model branches on (``if mask is not None``), as in
    Hiera: traced at its default, the call the converted model gets."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x, mask: torch.Tensor | None = None, scale: float = 1.0):
        h = F.relu(self.a(x))
        if mask is not None:
            h = h * mask
        return self.head(self.b(h).mean((2, 3))) * scale


class DataDependent(nn.Module):
    """Not traceable: Python control flow on a tensor value."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        if x.sum() > 0:
            return self.conv(x)
        return self.conv(-x)


class NoConv(nn.Module):
    def forward(self, x):
        return x.mean((2, 3))


def build_zoo(num_classes: int = 10) -> nn.Module:
    return Zoo(num_classes)


def build_preact(num_classes: int = 10) -> nn.Module:
    return PreActResNet(num_classes)
