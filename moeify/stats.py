"""Paired differences with confidence intervals: two models measured on the same images and seeds;
and paired bootstrap intervals for timings taken in interleaved rounds (``moeify bench``).

A research claim ("the MoE is more robust than its static twin") is a difference of accuracies
measured on the same test images, with models trained from the same seeds. Pairing removes the
images' shared difficulty; what is left has two sources of noise: which test images were drawn,
and which training run a seed produced. Both go into the interval.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Difference:
    """Mean of A minus B (points) and its 95% interval."""

    mean: float
    low: float
    high: float
    images: int
    seeds: int

    @property
    def verdict(self) -> str:
        """'above' / 'below' only where the interval excludes zero, else 'no difference shown'."""
        if self.low > 0:
            return "above"
        if self.high < 0:
            return "below"
        return "no difference shown"

    def __str__(self) -> str:
        return f"{self.mean:+.1f} [{self.low:+.1f}, {self.high:+.1f}]"


def paired_difference(a: torch.Tensor, b: torch.Tensor) -> Difference:
    """A minus B from per-sample scores (e.g. 0/1 correctness), each shaped [seeds, images]: the
    same images for both, seed k of A paired with seed k of B.

    The 95% half-width adds two parts in quadrature: image sampling (the per-image differences,
    averaged over seeds: a normal interval over the images) and training seeds (the per-seed mean
    differences: a Student-t interval with seeds - 1 degrees of freedom; absent with one seed, so
    one seed's interval says nothing about another training run).
    """
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"paired_difference needs two [seeds, images] tensors of one shape, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    d = 100 * (a.double() - b.double())
    seeds, images = d.shape
    per_image = d.mean(0)
    var = 1.96 ** 2 * per_image.var().item() / images if images > 1 else 0.0
    if seeds > 1:
        var += t_quantile(0.975, seeds - 1) ** 2 * d.mean(1).var().item() / seeds
    mean, half = d.mean().item(), math.sqrt(var)
    return Difference(mean, mean - half, mean + half, images, seeds)


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (p > 0.5) of Student's t with ``df`` degrees of freedom: bisection on its
    CDF, integrated numerically (Simpson's rule) from the density."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(t: float) -> float:
        x = torch.linspace(0.0, t, 4001, dtype=torch.float64)
        f = torch.exp(log_c - (df + 1) / 2 * torch.log1p(x * x / df))
        w = torch.ones_like(x)
        w[1:-1:2], w[2:-1:2] = 4.0, 2.0
        return 0.5 + (t / 4000 / 3) * (w * f).sum().item()

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def paired_bootstrap(columns: dict[str, list[float]], statistic: Callable[[dict[str, torch.Tensor]], torch.Tensor],
                     resamples: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile interval of ``statistic`` over rounds resampled with replacement, the columns
    kept paired (round i of every column drawn together: timings taken in one interleaved round
    share the machine's state). ``statistic`` maps {name: [resamples, rounds]} to [resamples];
    seeded, so the same timings give the same interval."""
    names = list(columns)
    data = torch.tensor([columns[k] for k in names], dtype=torch.float64)  # [columns, rounds]
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, data.shape[1], (resamples, data.shape[1]), generator=gen)
    values = statistic({k: data[i][idx] for i, k in enumerate(names)})
    values = values[~torch.isnan(values)]
    if not len(values):
        return math.nan, math.nan
    tail = (1 - level) / 2
    low, high = torch.quantile(values, torch.tensor([tail, 1 - tail], dtype=torch.float64))
    return low.item(), high.item()
