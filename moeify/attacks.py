"""White-box attacks on models that take inputs in [0, 1]: PGD (L-inf, L2; random start, restarts;
one step with a random start is FGSM-RS). They run in fp32 (autocast off), leave parameter gradients alone, and
put the model in a chosen BatchNorm mode for the attack (eval by default), restoring it after.
``full_fp32()`` also turns off TF32 on CUDA (on by default for convolutions), for evaluations.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import MoeifyError

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, target) -> per-sample loss


@dataclass
class AttackConfig:
    """One attack: ``norm`` linf|l2, radius ``eps`` (pixel units), ``steps`` of size ``alpha``
    (``steps=1`` with ``alpha>=eps`` and a random start is FGSM-RS), ``restarts`` (worst case kept)."""

    eps: float
    steps: int = 10
    alpha: float | None = None  # default 2.5 * eps / steps
    norm: str = "linf"
    random_start: bool = True
    restarts: int = 1
    bn_mode: str = "eval"  # eval | train: BatchNorm behaviour while attacking

    def __post_init__(self) -> None:
        if self.norm not in ("linf", "l2"):
            raise MoeifyError(f"attack norm must be linf or l2, not {self.norm!r}")
        if self.eps < 0 or self.steps < 0 or self.restarts < 1:
            raise MoeifyError("attack eps and steps must be >= 0 and restarts >= 1")
        if self.bn_mode not in ("eval", "train"):
            raise MoeifyError(f"attack bn_mode must be eval or train, not {self.bn_mode!r}")

    @property
    def step_size(self) -> float:
        return self.alpha if self.alpha is not None else 2.5 * self.eps / max(self.steps, 1)


@contextlib.contextmanager
def full_fp32() -> Iterator[None]:
    """CUDA convolutions and matrix products in true fp32 inside the block (no TF32, whose 10-bit
    mantissa would make gradients and margins of an evaluation differ from fp32's)."""
    flags = (torch.backends.cudnn, "allow_tf32"), (torch.backends.cuda.matmul, "allow_tf32")
    before = [getattr(m, a) for m, a in flags]
    for m, a in flags:
        setattr(m, a, False)
    try:
        yield
    finally:
        for (m, a), v in zip(flags, before):
            setattr(m, a, v)


@contextlib.contextmanager
def bn_mode(model: nn.Module, mode: str) -> Iterator[None]:
    """Run the block with the model in eval or train mode, then restore each module's mode."""
    modes = {m: m.training for m in model.modules()}
    model.train(mode == "train")
    try:
        yield
    finally:
        for m, t in modes.items():
            m.training = t


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Parameters stop requiring gradients inside the block: an attack needs only the input's
    gradient, and skipping weight gradients (and straight-through gate terms) makes it cheaper."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def input_grad(loss: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """d loss / d x; zeros when the loss does not depend on x at all (a gradient-masking model)."""
    if not loss.requires_grad:
        return torch.zeros_like(x)
    g, = torch.autograd.grad(loss, x, allow_unused=True)
    return torch.zeros_like(x) if g is None else g


def _ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def _project(delta: torch.Tensor, x: torch.Tensor, cfg: AttackConfig) -> torch.Tensor:
    if cfg.norm == "linf":
        delta = delta.clamp(-cfg.eps, cfg.eps)
    else:
        n = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
        delta = delta * (cfg.eps / n).clamp(max=1.0).view(-1, *[1] * (x.ndim - 1))
    return (x + delta).clamp(0, 1) - x


def _start(x: torch.Tensor, cfg: AttackConfig, gen: torch.Generator | None) -> torch.Tensor:
    if not cfg.random_start or cfg.eps == 0:
        return torch.zeros_like(x)
    if cfg.norm == "linf":
        u = torch.rand(x.shape, generator=gen, device="cpu").to(x.device, x.dtype)
        return _project((2 * u - 1) * cfg.eps, x, cfg)
    g = torch.randn(x.shape, generator=gen, device="cpu").to(x.device, x.dtype)
    r = torch.rand(x.shape[0], generator=gen, device="cpu").to(x.device, x.dtype).view(-1, *[1] * (x.ndim - 1))
    g = g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view_as(r)
    return _project(g * r * cfg.eps, x, cfg)


def _step(grad: torch.Tensor, cfg: AttackConfig) -> torch.Tensor:
    if cfg.norm == "linf":
        return cfg.step_size * grad.sign()
    n = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (grad.ndim - 1))
    return cfg.step_size * grad / n


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: AttackConfig, loss: Loss | None = None,
        target: torch.Tensor | None = None, gen: torch.Generator | None = None,
        start: torch.Tensor | None = None) -> torch.Tensor:
    """Adversarial examples maximising ``loss(model(x_adv), target)`` (per sample; default cross-
    entropy against ``y``) within the ``cfg`` ball around ``x``; over restarts each sample keeps the
    example with the highest loss (a misclassified one first); one restart ends at its last step,
    without a forward to rank it. ``start``: begin every restart at these inputs (inside the
    ball) instead of a random or zero start."""
    loss = loss or _ce
    target = y if target is None else target
    x = x.detach().float()
    if cfg.eps == 0 or cfg.steps == 0 and not cfg.random_start:
        return x.clone()
    best, best_key = x.clone(), None
    with bn_mode(model, cfg.bn_mode), frozen(model), torch.autocast(x.device.type, enabled=False):
        for _ in range(cfg.restarts):
            delta = _start(x, cfg, gen) if start is None else (start.detach().float() - x)
            for _ in range(cfg.steps):
                delta.requires_grad_(True)
                with torch.enable_grad():
                    l = loss(model(x + delta), target).sum()
                    grad = input_grad(l, delta)
                delta = _project(delta.detach() + _step(grad, cfg), x, cfg)
            if cfg.restarts == 1:  # nothing to choose between: no forward for the key
                return (x + delta).detach()
            with torch.no_grad():
                logits = model(x + delta)
                key = loss(logits, target) + 1e6 * (logits.argmax(1) != y).float()
            if best_key is None:
                best, best_key = (x + delta).detach(), key
            else:
                better = key > best_key
                best[better], best_key = (x + delta)[better].detach(), torch.where(better, key, best_key)
    return best


def trades_kl(model: nn.Module, x: torch.Tensor) -> Loss:
    """The TRADES inner loss: KL(p(x) || p(x_adv)) per sample, p(x) fixed from the clean input."""
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        p = F.softmax(model(x.float()), dim=1)

    def loss(logits: torch.Tensor, _target: torch.Tensor) -> torch.Tensor:
        return F.kl_div(F.log_softmax(logits, dim=1), p, reduction="none").sum(1)
    return loss


def accuracy_under(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: AttackConfig | None,
                   gen: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample correctness (bool) on clean inputs (``cfg=None``) or under the attack."""
    xa = x if cfg is None else pgd(model, x, y, cfg, gen=gen)
    with torch.no_grad(), bn_mode(model, "eval"):
        return model(xa.float()).argmax(1) == y
