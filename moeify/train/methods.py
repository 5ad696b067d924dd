"""The training losses: standard, PGD-AT and TRADES (AdvMoE uses AT or TRADES in both of its steps).

Every attack is made against the current model in fp32 with the recipe's BatchNorm mode; losses are
computed in the training precision.
"""
from __future__ import annotations

from collections.abc import Callable
import torch
import torch.nn.functional as F
from torch import nn

from ..attacks import AttackConfig, bn_mode, pgd, trades_kl
from ..nn.policy import Recorder, routing_policy


def balance_loss(rec: Recorder) -> torch.Tensor | float:
    """Switch-Transformer load balancing, averaged over the recorded router calls: N * sum_e f_e * P_e,
    f_e the fraction of routing slots that chose expert e, P_e its mean router probability (1 when
    perfectly even; it grows as the routers collapse onto few experts)."""
    terms = []
    for scores, idx in zip(rec.scores, rec.choices):
        n = scores.shape[-1]
        p = torch.softmax(scores.float(), -1).mean(0)
        f = torch.bincount(idx.flatten(), minlength=n).float() / idx.numel()
        terms.append(n * (f * p).sum())
    return torch.stack(terms).mean() if terms else 0.0


def z_loss(rec: Recorder) -> torch.Tensor | float:
    """ST-MoE's router z-loss, averaged over the recorded router calls: the mean squared
    log-sum-exp of the scores, which keeps them small (a router cannot become arbitrarily sure)."""
    terms = [torch.logsumexp(s.float(), -1).pow(2).mean() for s in rec.scores]
    return torch.stack(terms).mean() if terms else 0.0


def advmoe_kind(loss: str) -> str:
    """The ``robust_loss`` kind of AdvMoE's router and expert steps for a recipe's ``advmoe.loss``:
    TRADES, or cross-entropy on the attack (``at``)."""
    return "trades" if loss == "trades" else "at"


def robust_loss(model: nn.Module, attacked: nn.Module, x: torch.Tensor, y: torch.Tensor, kind: str, beta: float,
                attack: AttackConfig, autocast: Callable, x_adv: torch.Tensor | None = None,
                gen: torch.Generator | None = None, balance: float = 0.0,
                zloss: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, logits used for the accuracy, the adversarial batch): ``kind`` standard | at | trades.

    ``attacked`` is the unwrapped model the attack differentiates (no DDP hooks, fp32). ``balance``
    and ``zloss`` add those weights of ``balance_loss`` and ``z_loss`` over the training forwards
    (not the attack's).
    """
    if balance or zloss:
        x_adv = _attack(attacked, x, y, kind, attack, x_adv, gen)
        with routing_policy(Recorder()) as rec:
            loss, logits, x_adv = robust_loss(model, attacked, x, y, kind, beta, attack, autocast, x_adv, gen)
        return loss + balance * balance_loss(rec) + zloss * z_loss(rec), logits, x_adv
    if kind == "standard":
        with autocast():
            logits = model(x)
            return F.cross_entropy(logits, y), logits, x
    x_adv = _attack(attacked, x, y, kind, attack, x_adv, gen)
    if kind == "at":
        with autocast():
            logits = model(x_adv)
            return F.cross_entropy(logits, y), logits, x_adv
    with autocast():
        clean, adv = model(x), model(x_adv)  # two passes, as TRADES does (BatchNorm statistics per pass)
        kl = F.kl_div(F.log_softmax(adv.float(), 1), F.softmax(clean.float(), 1), reduction="batchmean")
        return F.cross_entropy(clean, y) + beta * kl, clean, x_adv


def _attack(attacked: nn.Module, x: torch.Tensor, y: torch.Tensor, kind: str, attack: AttackConfig,
            x_adv: torch.Tensor | None, gen: torch.Generator | None) -> torch.Tensor | None:
    """The training attack of ``kind`` (none for standard training), unless one is given."""
    if x_adv is not None or kind == "standard":
        return x_adv
    if kind == "at":
        return pgd(attacked, x, y, attack, gen=gen)
    with bn_mode(attacked, attack.bn_mode):  # the clean distribution too, as TRADES computes it (eval by default)
        loss = trades_kl(attacked, x)
    return pgd(attacked, x, y, attack, loss=loss, gen=gen)
