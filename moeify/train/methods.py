"""The training losses: standard, PGD-AT and TRADES (AdvMoE uses AT or TRADES in both of its steps).

Every attack is made against the current model in fp32 with the recipe's BatchNorm mode; losses are
computed in the training precision.
"""
from __future__ import annotations

from collections.abc import Callable
import torch
import torch.nn.functional as F
from torch import nn

from ..attacks import AttackConfig, pgd, trades_kl


def robust_loss(model: nn.Module, attacked: nn.Module, x: torch.Tensor, y: torch.Tensor, kind: str, beta: float,
                attack: AttackConfig, autocast: Callable, x_adv: torch.Tensor | None = None,
                gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, logits used for the accuracy, the adversarial batch): ``kind`` standard | at | trades.

    ``attacked`` is the unwrapped model the attack differentiates (no DDP hooks, fp32).
    """
    if kind == "standard":
        with autocast():
            logits = model(x)
            return F.cross_entropy(logits, y), logits, x
    if kind == "at":
        if x_adv is None:
            x_adv = pgd(attacked, x, y, attack, gen=gen)
        with autocast():
            logits = model(x_adv)
            return F.cross_entropy(logits, y), logits, x_adv
    if x_adv is None:
        x_adv = pgd(attacked, x, y, attack, loss=trades_kl(attacked, x), gen=gen)
    with autocast():
        clean, adv = model(x), model(x_adv)  # two passes, as TRADES does (BatchNorm statistics per pass)
        kl = F.kl_div(F.log_softmax(adv.float(), 1), F.softmax(clean.float(), 1), reduction="batchmean")
        return F.cross_entropy(clean, y) + beta * kl, clean, x_adv
