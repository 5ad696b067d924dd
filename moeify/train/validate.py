"""Validation and test accuracy during training (clean and under attack) and expert load, sharded
across processes and gathered without duplicates. The full robustness report is moeify.evaluate."""
from __future__ import annotations

import time

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..attacks import AttackConfig, accuracy_under
from ..conversion import moe_layers, routing
from ..data import to_float
from ..evaluate import load_entropy


def _loader(ds: Dataset, batch_size: int, accelerator: Accelerator) -> DataLoader:
    return accelerator.prepare_data_loader(DataLoader(ds, batch_size=batch_size, shuffle=False))


def evaluate_robust(model: nn.Module, ds: Dataset, attack: AttackConfig, batch_size: int, accelerator: Accelerator,
                    fmt=torch.contiguous_format, seed: int = 0) -> dict:
    """{"clean", "robust", "n", "seconds"}: accuracies over ``ds`` (eval mode), attack in fp32."""
    start = time.time()
    was = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed + accelerator.process_index)
    clean, robust = [], []
    for x, y in _loader(ds, batch_size, accelerator):
        x = to_float(x).contiguous(memory_format=fmt)
        c = accuracy_under(model, x, y, None)
        r = accuracy_under(model, x, y, attack, gen=gen)
        clean.append(accelerator.gather_for_metrics(c))
        robust.append(accelerator.gather_for_metrics(r))
    model.train(was)
    c, r = torch.cat(clean).float(), torch.cat(robust).float()
    return {"clean": c.mean().item(), "robust": r.mean().item(), "n": len(c), "seconds": time.time() - start}


COLLAPSED = 0.5
"""Expert-load entropy below which a layer counts as collapsed (0 = every input to one expert)."""


def expert_load(model: nn.Module, ds: Dataset, batch_size: int, accelerator: Accelerator,
                fmt=torch.contiguous_format) -> dict | None:
    """How evenly clean inputs use the experts, per MoE layer: {"entropy": the mean over layers of
    ``load_entropy`` (1 = perfectly even, 0 = one expert only), "min_entropy", "layers": {name:
    {"load": share of routing slots per expert, "entropy"}}}; None if the model has no MoE layer."""
    layers = moe_layers(model)
    if not layers:
        return None
    counts = {name: torch.zeros(layer.experts) for name, layer in layers.items()}
    for x, _ in _loader(ds, batch_size, accelerator):
        for name, idx in routing(model, to_float(x).contiguous(memory_format=fmt)).items():
            idx = accelerator.gather_for_metrics(idx)
            counts[name] += torch.bincount(idx.flatten().cpu(), minlength=counts[name].numel()).float()
    per = {name: {"load": [round(v, 4) for v in (c / c.sum().clamp_min(1)).tolist()], "entropy": load_entropy(c)}
           for name, c in counts.items()}
    ents = [v["entropy"] for v in per.values()]
    return {"entropy": sum(ents) / len(ents), "min_entropy": min(ents), "layers": per}


def collapse_warning(load: dict | None) -> str | None:
    """One line naming the MoE layers whose expert-load entropy is below COLLAPSED, or None."""
    if load is None:
        return None
    low = {n: v for n, v in load["layers"].items() if v["entropy"] < COLLAPSED}
    if not low:
        return None
    names = ", ".join(f"{n} {v['entropy']:.2f}" for n, v in low.items())
    return (f"warning: routing collapsed in {len(low)} of {len(load['layers'])} MoE layers (expert-load entropy "
            f"< {COLLAPSED}: {names}): most inputs take the same experts, so the MoE acts as a static model; "
            f"moe.router_norm: true (standardised routers) or train.balance > 0 keep routing live")
