"""Routers fitted to the dense model, and distillation of a converted MoE from it.

``fit_layer_routers``: per sample, the target of a layer's router is the set of K experts that
hold the most of the channel importance ``experts.record`` measured (the experts whose loss would
change the consumers' input most); each router (pool + linear) is fitted to it by cross-entropy
on the calibration set's router inputs. ``distil``: a few hundred steps that match the MoE's
logits to the dense teacher's (KL), on clean inputs or, with an attack, on clean and adversarial
ones (the teacher's predictions as labels), so a robust teacher's robustness carries over.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attacks import AttackConfig, pgd
from .errors import MoeifyError
from .experts import Calibration, LayerStats, calibration_batches
from .nn import GlobalRouter, LayerRouter, MoELayer


def expert_targets(importance: torch.Tensor, experts: int, top_k: int) -> torch.Tensor:
    """[S, N] multi-hot / K: the K experts (contiguous channel ranges) with the most importance."""
    s, c = importance.shape
    mass = importance.reshape(s, experts, c // experts).sum(2)
    top = mass.topk(top_k, dim=1).indices
    return torch.zeros(s, experts).scatter_(1, top, 1.0 / top_k)


SPREAD = 0.03
"""Mean per-sample standard deviation of a fitted router's scores. Fitting leaves them large (a
confident softmax) and the choice only needs their order: scaled down to this spread (the order
kept), the straight-through gates stay trainable, and distillation from a fitted start ends as well
as from fresh routers instead of a point and a half below (docs/results.md)."""


def fit_router(proj: nn.Linear, features: torch.Tensor, targets: torch.Tensor, top_k: int, iters: int = 50) -> float:
    """Fit a router's linear layer to soft targets (softmax regression with a small L2 penalty, full
    batch, L-BFGS on standardised inputs), scaled to ``SPREAD``; returns the share of samples whose
    top-K choice equals the target set."""
    dev, dtype = proj.weight.device, proj.weight.dtype
    x, t = features.to(dev, torch.float32), targets.to(dev, torch.float32)
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mu) / sd
    w = (proj.weight.detach().float() * sd).clone().requires_grad_(True)
    b = (proj.bias.detach().float() + proj.weight.detach().float() @ mu).clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = -(t * F.log_softmax(z @ w.T + b, 1)).sum(1).mean() + 1e-3 * w.pow(2).mean()
        loss.backward()
        return loss
    with torch.enable_grad():  # also when converting under no_grad
        opt.step(closure)
    with torch.no_grad():
        scale = SPREAD / (z @ w.T + b).std(1).mean().clamp_min(1e-12)
        w, b = w * scale, b * scale
        proj.weight.copy_((w / sd).to(dtype))
        proj.bias.copy_((b - (w / sd) @ mu).to(dtype))
        chosen = (z @ w.T + b).topk(top_k, 1).indices.sort(1).values
        wanted = t.topk(top_k, 1).indices.sort(1).values
        return float((chosen == wanted).all(1).float().mean())


def fit_layer_routers(moe: nn.Module, stats: dict[str, LayerStats]) -> dict[str, float]:
    """Fit every layer router of ``moe`` to its calibration targets; {layer: top-K agreement}."""
    out = {}
    for layer in (m for m in moe.modules() if isinstance(m, MoELayer)):
        name = layer.name
        if layer.router is None or name not in stats:
            continue
        st = stats[name]
        targets = expert_targets(st.importance, layer.experts, layer.top_k)
        out[name] = fit_router(layer.router.proj, st.router_inputs, targets, layer.top_k)
    return out


def recalibrate_norms(moe: nn.Module, batches: list[torch.Tensor], keep: set[str]) -> None:
    """Re-estimate the running statistics of every BatchNorm but those in ``keep`` (a group's
    interior, whose inputs routing does not change) from the MoE's own activations on the
    calibration batches: what follows a routed layer sees fewer channels than the dense model's did."""
    norms = [m for name, m in moe.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats and name not in keep]
    saved = [(m, m.momentum, m.training) for m in norms]
    was = moe.training
    moe.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the calibration set
        m.train()
    dev = next(moe.parameters()).device
    try:
        with torch.no_grad():
            for b in batches:
                moe(b.to(dev))
    finally:
        for m, momentum, training in saved:
            m.momentum, m.training = momentum, training
        moe.train(was)


def distil(moe: nn.Module, teacher: nn.Module, calibration: Calibration, steps: int = 300, lr: float = 1e-3,
           update: str = "all", attack: AttackConfig | None = None, batch_size: int = 128, seed: int = 0) -> list[float]:
    """Fine-tune ``moe`` (``update`` all | routers) to the teacher's logits on the calibration inputs,
    in batches of ``batch_size`` reshuffled at every pass (``seed``); returns the loss per step. With
    ``attack``, each step also matches on PGD inputs against the MoE: a robust teacher's robustness
    needs more of them than its clean accuracy (batches of 512: docs/results.md)."""
    from rich.progress import track

    if update not in ("all", "routers"):
        raise MoeifyError(f"update must be all or routers, not {update!r}")
    if steps < 1:
        raise MoeifyError(f"steps must be >= 1, got {steps}")
    example = torch.zeros(1, *moe.moeify_info["input_shape"])
    data = torch.cat(calibration_batches(calibration, example))
    routers = [m for m in moe.modules() if isinstance(m, (LayerRouter, GlobalRouter))]
    params = [p for r in routers for p in r.parameters()] if update == "routers" else \
        [p for p in moe.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps)))
    g = torch.Generator().manual_seed(seed)
    dev = next(moe.parameters()).device
    teacher.eval()
    was = moe.training
    moe.train()
    losses = []
    try:
        for _, x in track(zip(range(steps), _shuffled(data, batch_size, g)), total=steps, description="distilling",
                          transient=True):
            losses.append(_distil_step(moe, teacher, x.to(dev), opt, attack, g))
            sched.step()
    finally:
        moe.train(was)
    return losses


def _shuffled(data: torch.Tensor, batch_size: int, gen: torch.Generator):
    """Batches of ``data``, reshuffled at every pass (the order follows the seed), endlessly."""
    while True:
        yield from data[torch.randperm(len(data), generator=gen)].split(batch_size)


def fit_routers(moe: nn.Module, calibration: Calibration, teacher: nn.Module, steps: int = 300,
                lr: float = 0.01) -> list[float]:
    """More router fitting after conversion: only the routers learn to match the teacher's logits."""
    return distil(moe, teacher, calibration, steps=steps, lr=lr, update="routers")


def _distil_step(moe, teacher, x, opt, attack, gen) -> float:
    with torch.no_grad():
        t = teacher(x)
    pairs = [(x, t)]
    if attack is not None:
        x_adv = pgd(moe, x, t.argmax(1), attack, gen=gen)
        with torch.no_grad():
            pairs.append((x_adv, teacher(x_adv)))
    loss = sum(F.kl_div(F.log_softmax(moe(a), 1), F.softmax(b, 1), reduction="batchmean") for a, b in pairs)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()
