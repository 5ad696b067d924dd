"""Robustness evaluation a sceptical reviewer can trust, for dense, S-Dense and MoE models.

Clean accuracy, PGD, AutoAttack (the authors' package, ``pyautoattack``), and for MoE models
adaptive attacks that account for hard routing — (a) PGD through the straight-through routing
estimator with restarts, (b) transfer from the soft-routing twin, (c) Square (gradient-free),
(d) a routing attack that first pushes the router scores away and then attacks the model — with
the worst case per sample. The router/expert dissection (flip rate, RA-R, RA-E, per-expert
accuracy), expert load, and built-in sanity checks (epsilon sweep, more steps never help, batch
independence, gradient-masking flags).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .attacks import AttackConfig, bn_mode, frozen, full_fp32, input_grad, pgd
from .convert import moe_layers
from .errors import MoeifyError
from .macs import count_macs
from .nn import execution
from .nn.policy import Fixed, Forced, Recorder, Soft, routing_policy

ATTACKS = ("pgd", "autoattack", "adaptive", "square", "sweep")
AA_ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square")  # AutoAttack's standard suite, in its order


@dataclass
class EvalConfig:
    eps: float
    norm: str = "linf"
    attacks: tuple[str, ...] = ("pgd", "autoattack", "adaptive", "sweep")
    pgd_steps: int = 20
    pgd_restarts: int = 1
    batch_size: int = 250
    square_queries: int = 1000
    autoattack: tuple[str, ...] = ()  # a subset of AutoAttack's attacks (standard settings); () = the standard suite
    sweep: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)  # multiples of eps
    seed: int = 0
    log: Callable[[str], None] = field(default=lambda s: None, repr=False)
    gather: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda t: t, repr=False)  # across processes

    def mean(self, per_sample: torch.Tensor) -> float:
        """The mean of a per-sample quantity over every process's examples."""
        return self.gather(per_sample.float()).mean().item()

    def pgd_cfg(self, eps: float | None = None, steps: int | None = None, restarts: int | None = None) -> AttackConfig:
        e = self.eps if eps is None else eps
        s = self.pgd_steps if steps is None else steps
        return AttackConfig(eps=e, steps=s, alpha=2.5 * e / max(s, 1), norm=self.norm,
                            restarts=self.pgd_restarts if restarts is None else restarts)


def _gen(cfg: "EvalConfig") -> torch.Generator:
    """A fresh generator per attack: every attack's random starts are reproducible on their own."""
    return torch.Generator().manual_seed(cfg.seed)


def _batches(x: torch.Tensor, y: torch.Tensor, bs: int):
    for i in range(0, len(x), bs):
        yield x[i:i + bs], y[i:i + bs]


def _predict(model: nn.Module, x: torch.Tensor, bs: int = 500) -> torch.Tensor:
    with torch.no_grad(), bn_mode(model, "eval"):
        return torch.cat([model(xb).argmax(1) for xb, _ in _batches(x, x, bs)])


def _attack_all(fn, x: torch.Tensor, y: torch.Tensor, bs: int) -> torch.Tensor:
    return torch.cat([fn(xb, yb) for xb, yb in _batches(x, y, bs)])


def _scores(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with routing_policy(Recorder()) as rec:
        model(x)
    return rec.scores


def _routes(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad(), bn_mode(model, "eval"), routing_policy(Recorder()) as rec:
        model(x)
    return rec.choices


def routing_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: AttackConfig,
                   gen: torch.Generator | None = None) -> torch.Tensor:
    """Maximise the change of every MoE layer's router scores (an attack on the routers only)."""
    with torch.no_grad(), bn_mode(model, "eval"):
        clean = [s.detach() for s in _scores(model, x)]

    def loss(_logits, _target):  # the scores of the forward that produced these logits
        current = rec.scores[-len(clean):]
        rec.scores.clear()  # keep no autograd graph alive across steps
        return sum(((s - c) ** 2).sum(1) for s, c in zip(current, clean))

    with routing_policy(Recorder()) as rec:
        return pgd(model, x, y, cfg, loss=loss, gen=gen)


def _pgd_from(model: nn.Module, start: torch.Tensor, x: torch.Tensor, y: torch.Tensor, cfg: AttackConfig) -> torch.Tensor:
    """PGD on the model's loss starting at ``start`` (inside the eps ball around ``x``)."""
    delta = (start - x).detach()
    with bn_mode(model, "eval"), frozen(model):
        for _ in range(cfg.steps):
            delta.requires_grad_(True)
            with torch.enable_grad():
                g = input_grad(nn.functional.cross_entropy(model(x + delta), y, reduction="sum"), delta)
            step = cfg.step_size * (g.sign() if cfg.norm == "linf" else g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (x.ndim - 1)))
            delta = delta.detach() + step
            if cfg.norm == "linf":
                delta = delta.clamp(-cfg.eps, cfg.eps)
            else:
                n = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
                delta = delta * (cfg.eps / n).clamp(max=1.0).view(-1, *[1] * (x.ndim - 1))
            delta = (x + delta).clamp(0, 1) - x
    return (x + delta).detach()


def _autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: EvalConfig, version: str = "standard",
                attacks: list[str] | None = None) -> torch.Tensor:
    import logging

    from pyautoattack import AutoAttack

    logging.getLogger("auto-attack").setLevel(logging.WARNING)
    norm = {"linf": "Linf", "l2": "L2"}[cfg.norm]
    kw = {"attacks": list(attacks)} if attacks else {}
    aa = AutoAttack(model, eps=cfg.eps, norm=norm, version=version, seed=cfg.seed, device=x.device, **kw)
    if attacks:  # the standard suite's settings for each attack run on its own
        aa.apgd.n_restarts = aa.apgd_targeted.n_restarts = aa.fab.n_restarts = 1
        aa.apgd_targeted.n_target_classes = aa.fab.n_target_classes = 9
        aa.square.n_queries = cfg.square_queries if list(attacks) == ["square"] else 5000
    aa.verbose = False
    with bn_mode(model, "eval"), frozen(model):
        out = aa.run_standard_evaluation(x, y, batch_size=cfg.batch_size)
    return out[0] if isinstance(out, tuple) else out


def _zero_input_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    xg = x.clone().requires_grad_(True)
    with bn_mode(model, "eval"), frozen(model), torch.enable_grad():
        g = input_grad(nn.functional.cross_entropy(model(xg), y, reduction="sum"), xg)
    return g.flatten(1).abs().sum(1) == 0


def load_stats(choices: list[torch.Tensor], experts: list[int]) -> list[dict]:
    """Per layer: expert-use fractions, normalised entropy, dead experts."""
    out = []
    for idx, n in zip(choices, experts):
        c = torch.bincount(idx.flatten(), minlength=n).float()
        p = c / c.sum().clamp_min(1)
        h = abs((p[p > 0] * p[p > 0].log()).sum().item()) / math.log(n) if n > 1 else 1.0
        out.append({"load": p.tolist(), "entropy": h, "dead": [i for i in range(n) if c[i] == 0]})
    return out


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: EvalConfig) -> dict:
    """The full report for ``model`` on (x, y): see the module docstring. Runs in true fp32."""
    with full_fp32():
        return _evaluate(model, x, y, cfg)


def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: EvalConfig) -> dict:
    unknown = set(cfg.attacks) - set(ATTACKS)
    if unknown:
        raise MoeifyError(f"unknown attack(s) {', '.join(sorted(unknown))}; choose from {', '.join(ATTACKS)}")
    model.eval()
    x, y = x.float(), y.long()
    bs = cfg.batch_size
    layers = moe_layers(model)
    is_moe = bool(layers)
    rep: dict = {"n_examples": int(cfg.gather(torch.ones(len(y))).sum()), "eps": cfg.eps, "norm": cfg.norm, "attacks_run": [], "flags": [],
                 "timings_s": {}}
    timer = time.time()

    def done(name: str) -> None:
        nonlocal timer
        rep["timings_s"][name] = round(time.time() - timer, 1)
        timer = time.time()
        cfg.log(f"{name} done ({rep['timings_s'][name]} s)")

    clean_pred = _predict(model, x, bs)
    correct = {"clean": clean_pred == y}
    rep["clean_acc"] = cfg.mean(correct["clean"])
    rep["macs_per_sample"] = count_macs(model, x[: min(len(x), 64)])
    done("clean")
    adv_for_dissection = None
    if "pgd" in cfg.attacks:
        x_pgd = _attack_all(lambda a, b: pgd(model, a, b, cfg.pgd_cfg(), gen=_gen(cfg)), x, y, bs)
        correct["pgd"] = _predict(model, x_pgd, bs) == y
        rep["pgd_acc"] = cfg.mean(correct["pgd"])
        rep["pgd"] = {"steps": cfg.pgd_steps, "restarts": cfg.pgd_restarts, "step_size": cfg.pgd_cfg().step_size}
        rep["attacks_run"].append(f"PGD-{cfg.pgd_steps}")
        adv_for_dissection = x_pgd
        more = _attack_all(lambda a, b: pgd(model, a, b, cfg.pgd_cfg(steps=2 * cfg.pgd_steps, restarts=2), gen=_gen(cfg)), x, y, bs)
        more_acc = cfg.mean(_predict(model, more, bs) == y)
        rep["sanity_more_steps_acc"] = min(more_acc, rep["pgd_acc"])
        if more_acc > rep["pgd_acc"] + 0.01:
            rep["flags"].append(f"PGD with 2x steps and 2 restarts scored higher ({more_acc:.3f} > {rep['pgd_acc']:.3f})")
        correct["pgd"] &= _predict(model, more, bs) == y
        rep["pgd_acc"] = cfg.mean(correct["pgd"])
        done("pgd")
    if "autoattack" in cfg.attacks:
        subset = list(cfg.autoattack)
        x_aa = _autoattack(model, x, y, cfg, *(("custom", subset) if subset else ()))
        correct["autoattack"] = _predict(model, x_aa, bs) == y
        rep["autoattack_acc"] = cfg.mean(correct["autoattack"])
        rep["autoattack_version"] = "+".join(subset) if subset else "standard"
        rep["attacks_run"].append(f"AutoAttack {rep['autoattack_version']} (pyautoattack)")
        done("autoattack")
    if "square" in cfg.attacks or (is_moe and "adaptive" in cfg.attacks):
        x_sq = _autoattack(model, x, y, cfg, version="custom", attacks=["square"])
        correct["square"] = _predict(model, x_sq, bs) == y
        rep["square_acc"] = cfg.mean(correct["square"])
        rep["attacks_run"].append(f"Square ({cfg.square_queries} queries)")
        white = [rep[k] for k in ("pgd_acc", "autoattack_acc") if k in rep]
        if white and rep["square_acc"] < min(white) - 0.01:
            rep["flags"].append("the gradient-free Square attack beats the white-box attacks: likely gradient masking")
        done("square")
    zero = cfg.mean(_zero_input_gradients(model, x[:bs], y[:bs]))
    rep["zero_input_gradient_fraction"] = zero
    if zero > 0.05:
        rep["flags"].append(f"{zero:.0%} of inputs have an all-zero input gradient: gradient masking")
    if is_moe:
        rep.update(_moe_part(model, x, y, cfg, correct, adv_for_dissection, done))
    robust_keys = [k for k in correct if k != "clean"]
    if robust_keys:
        worst = correct["clean"].clone()
        for k in robust_keys:
            worst &= correct[k]
        rep["worst_case_acc"] = cfg.mean(worst)
    if "sweep" in cfg.attacks:
        rep["eps_sweep"] = []
        for mult in cfg.sweep:
            e = mult * cfg.eps
            xa = _attack_all(lambda a, b: pgd(model, a, b, cfg.pgd_cfg(eps=e, steps=10, restarts=1), gen=_gen(cfg)), x, y, bs)
            rep["eps_sweep"].append({"eps": e, "acc": cfg.mean(_predict(model, xa, bs) == y)})
        last = rep["eps_sweep"][-1]["acc"]
        if last > 0.05:
            rep["flags"].append(f"accuracy stays at {last:.1%} at eps {rep['eps_sweep'][-1]['eps']:g}: attacks may be failing")
        done("sweep")
    b = min(len(x), 16)
    whole = _predict(model, x[:b], b)
    alone = torch.cat([_predict(model, x[i:i + 1], 1) for i in range(b)])
    rep["batch_independent"] = bool(torch.equal(whole, alone))
    if not rep["batch_independent"]:
        rep["flags"].append("predictions depend on the rest of the batch")
    return rep


def ra_e(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: EvalConfig) -> float:
    """Expert robustness: PGD accuracy with every layer's routes frozen to the clean input's."""
    gen = _gen(cfg)
    right = []
    for a, b in _batches(x, y, cfg.batch_size):
        routes = list(torch.stack(_routes(model, a)))
        with routing_policy(Fixed(routes)):
            xa = pgd(model, a, b, cfg.pgd_cfg(restarts=1), gen=gen)
        with routing_policy(Fixed(routes)):
            right.append(_predict(model, xa, len(a)) == b)
    return cfg.mean(torch.cat(right))


def pgd_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: EvalConfig) -> float:
    """Plain PGD accuracy with the config's steps (one restart), seeded like ``ra_e``."""
    gen = _gen(cfg)
    xa = _attack_all(lambda a, b: pgd(model, a, b, cfg.pgd_cfg(restarts=1), gen=gen), x, y, cfg.batch_size)
    return cfg.mean(_predict(model, xa, cfg.batch_size) == y)


def _moe_part(model, x, y, cfg: EvalConfig, correct: dict, x_adv, done) -> dict:
    """Adaptive attacks, dissection and expert load of an MoE model."""
    out: dict = {}
    bs = cfg.batch_size
    names = list(moe_layers(model))
    experts = [layer.experts for layer in moe_layers(model).values()]
    top_k = list(moe_layers(model).values())[0].top_k
    if "adaptive" in cfg.attacks:
        # (a) straight-through PGD: PGD's gradients already pass the straight-through gates; more restarts
        xa = _attack_all(lambda a, b: pgd(model, a, b, cfg.pgd_cfg(restarts=max(3, cfg.pgd_restarts)), gen=_gen(cfg)), x, y, bs)
        ste = _predict(model, xa, bs) == y
        # (b) transfer from the soft-routing twin (all experts, softmax-weighted), evaluated on the hard model

        def soft_attack(a, b):
            with routing_policy(Soft()), execution("masked"):
                return pgd(model, a, b, cfg.pgd_cfg(), gen=_gen(cfg))
        soft = _predict(model, _attack_all(soft_attack, x, y, bs), bs) == y
        # (d) routing attack, then PGD from there
        x_r = _attack_all(lambda a, b: routing_attack(model, a, b, cfg.pgd_cfg(), gen=_gen(cfg)), x, y, bs)
        out["ra_r"] = cfg.mean(_predict(model, x_r, bs) == y)
        x_rp = torch.cat([_pgd_from(model, s, a, b, cfg.pgd_cfg()) for (a, b), (s, _) in
                          zip(_batches(x, y, bs), _batches(x_r, y, bs))])
        routed = _predict(model, x_rp, bs) == y
        worst = ste & soft & routed & correct.get("square", torch.ones_like(ste))
        for k in ("pgd", "autoattack"):
            if k in correct:
                worst &= correct[k]
        correct["adaptive"] = worst
        out["adaptive"] = {"ste_pgd_acc": cfg.mean(ste), "soft_transfer_acc": cfg.mean(soft),
                           "routing_then_pgd_acc": cfg.mean(routed)}
        out["adaptive_acc"] = cfg.mean(worst)
        done("adaptive")
    # dissection
    clean_routes = torch.cat([torch.stack(_routes(model, a)) for a, _ in _batches(x, y, bs)], dim=1)  # [L, B, K]
    if x_adv is not None:
        adv_routes = torch.cat([torch.stack(_routes(model, a)) for a, _ in _batches(x_adv, y, bs)], dim=1)
        flips = (clean_routes != adv_routes).any(-1).float()  # [L, B]
        out["flip_rate"] = cfg.mean(flips.mean(0))
        out["flip_rate_per_layer"] = {n: cfg.mean(f) for n, f in zip(names, flips)}

        out["ra_e"] = ra_e(model, x, y, cfg)
        out["load_adversarial"] = load_stats([cfg.gather(r) for r in adv_routes], experts)
    out["load_clean"] = load_stats([cfg.gather(r) for r in clean_routes], experts)
    out["layers"] = names
    per_expert = {}
    for e in range(experts[0]):
        with routing_policy(Forced(e)):
            per_expert[str(e)] = cfg.mean(_predict(model, x, bs) == y)
    out["per_expert_acc"] = per_expert
    out["top_k"], out["experts"] = top_k, experts[0]
    done("dissection")
    return out
