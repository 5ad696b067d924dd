"""Robustness evaluation a sceptical reviewer can trust, for dense, S-Dense and MoE models.

Clean accuracy, PGD, AutoAttack (the authors' package, ``pyautoattack``), and for MoE models
adaptive attacks that account for hard routing — (a) PGD through the straight-through routing
estimator with restarts, (b) transfer from the soft-routing twin, (c) Square (gradient-free),
(d) a routing attack that first pushes the router scores away and then attacks the model — with
the worst case per sample. The router/expert dissection (flip rate, RA-R, RA-E, per-expert
accuracy), expert load, and built-in sanity checks (epsilon sweep, more steps never help, batch
independence, gradient-masking flags).

Each step of the evaluation is one function that returns a ``Part`` (its per-sample correctness
and report fields) and reads earlier parts without changing them; ``worst_case`` combines
correctness per sample; ``evaluate`` runs the steps in order, handing finished parts to a store
(if given) so that a killed evaluation continues where it stopped.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from .attacks import AttackConfig, bn_mode, frozen, full_fp32, input_grad, pgd
from .conversion import moe_layers
from .errors import MoeifyError
from .macs import count_macs
from .nn import execution
from .nn.policy import Fixed, Forced, Recorder, Soft, routing_policy

ATTACKS = ("pgd", "autoattack", "adaptive", "square", "sweep")
AA_ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square")  # AutoAttack's standard suite, in its order
AA_TARGETS = 9  # the standard suite's target classes for APGD-T and FAB-T


def targets_problem(targets: int, subset) -> str | None:
    """What is wrong with ``targets`` target classes for AutoAttack run as ``subset`` (empty: the
    standard suite, which keeps its own), or None."""
    if targets < 1:
        return f"must be >= 1, got {targets}"
    if targets != AA_TARGETS and not subset:
        return (f"applies to a subset of AutoAttack (such as apgd-ce,apgd-t); the standard suite keeps its "
                f"{AA_TARGETS} target classes")
    return None


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
    autoattack_targets: int = AA_TARGETS  # target classes of APGD-T and FAB-T in a subset (fewer cost less)
    sweep: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)  # multiples of eps
    routing: bool = True  # an MoE's routing dissection: flip rate, RA-R, RA-E, routing used, expert load
    seed: int = 0
    compile: bool = False  # torch.compile what the attacks and predictions call (see ``attacked``)
    log: Callable[[str], None] = field(default=lambda s: None, repr=False)
    gather: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda t: t, repr=False)  # across processes
    _compiled: dict = field(default_factory=dict, repr=False, compare=False)

    def attacked(self, model: nn.Module) -> nn.Module:
        """What the attacks and predictions call: ``model``, or with ``compile`` its ``torch.compile``
        wrapper, made once (MoE layers then run ``static``: no host reads, one graph per mode), for
        accelerators, where eager per-layer dispatch is the cost. Routing policies (the adaptive
        attacks' soft twin, the dissection's recorder and forced experts) always run eagerly."""
        if not self.compile:
            return model
        if self._compiled.get("model") is not model:
            self._compiled.update(model=model, run=torch.compile(model))
        return self._compiled["run"]

    def mean(self, per_sample: torch.Tensor) -> float:
        """The mean of a per-sample quantity over every process's examples."""
        return self.gather(per_sample.float()).mean().item()

    def pgd_cfg(self, eps: float | None = None, steps: int | None = None, restarts: int | None = None) -> AttackConfig:
        e = self.eps if eps is None else eps
        s = self.pgd_steps if steps is None else steps
        return AttackConfig(eps=e, steps=s, alpha=2.5 * e / max(s, 1), norm=self.norm,
                            restarts=self.pgd_restarts if restarts is None else restarts)


@dataclass
class Part:
    """What one step found: per-sample correctness under its attack (None for a check that is not
    one), its report fields, the attacks it ran, the flags it raised, and (PGD on an MoE model)
    the routes of its adversarial inputs, [layers, samples, top_k], for the dissection."""
    correct: torch.Tensor | None = None
    report: dict = field(default_factory=dict)
    runs: list = field(default_factory=list)
    flags: list = field(default_factory=list)
    routes: torch.Tensor | None = None
    seconds: float = 0.0


class PartStore(Protocol):
    """Where finished parts are kept between runs of one evaluation (see ``moeify.eval_file``)."""

    def load(self, name: str) -> Part | None: ...

    def save(self, name: str, part: Part) -> None: ...


def worst_case(parts: dict[str, Part], names: tuple[str, ...] | None = None) -> torch.Tensor:
    """Per sample: correct under every one of ``names``' attacks (default: all parts that attack)."""
    chosen = [p.correct for n, p in parts.items() if p.correct is not None and (names is None or n in names)]
    out = chosen[0].clone()
    for c in chosen[1:]:
        out &= c
    return out


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


def _pgd_all(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: EvalConfig, attack: AttackConfig) -> torch.Tensor:
    """PGD over every batch, each batch's random start from a fresh seeded generator."""
    return _attack_all(lambda a, b: pgd(model, a, b, attack, gen=_gen(cfg)), x, y, cfg.batch_size)


def _scores(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with routing_policy(Recorder()) as rec:
        model(x)
    return rec.scores


def _routes(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad(), bn_mode(model, "eval"), routing_policy(Recorder()) as rec:
        model(x)
    return rec.choices


def _all_routes(model: nn.Module, x: torch.Tensor, bs: int) -> torch.Tensor:
    """Every MoE layer's chosen experts for every input: [layers, samples, top_k]."""
    return torch.cat([torch.stack(_routes(model, a)) for a, _ in _batches(x, x, bs)], dim=1)


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
        aa.apgd_targeted.n_target_classes = aa.fab.n_target_classes = cfg.autoattack_targets
        aa.square.n_queries = cfg.square_queries if list(attacks) == ["square"] else 5000
    aa.verbose = False
    with bn_mode(model, "eval"), frozen(model):
        out = aa.run_standard_evaluation(x, y, batch_size=cfg.batch_size)
    return out[0] if isinstance(out, tuple) else out


def load_stats(choices: list[torch.Tensor], experts: list[int]) -> list[dict]:
    """Per layer: expert-use fractions, normalised entropy, dead experts."""
    out = []
    for idx, n in zip(choices, experts):
        c = torch.bincount(idx.flatten(), minlength=n).float()
        out.append({"load": (c / c.sum().clamp_min(1)).tolist(), "entropy": load_entropy(c),
                    "dead": [i for i in range(n) if c[i] == 0]})
    return out


def load_entropy(counts: torch.Tensor) -> float:
    """How evenly a layer uses its experts: the entropy of its expert-use counts divided by its
    maximum (1 = perfectly even, 0 = one expert only; 1 for a single expert)."""
    n = len(counts)
    if n < 2:
        return 1.0
    p = counts.float() / counts.sum().clamp_min(1)
    return abs((p[p > 0] * p[p > 0].log()).sum().item()) / math.log(n)


# ---- the steps: (model, x, y, cfg, earlier parts) -> Part ----

def _clean(model, x, y, cfg: EvalConfig, earlier: dict) -> Part:
    correct = _predict(cfg.attacked(model), x, cfg.batch_size) == y
    return Part(correct, {"clean_acc": cfg.mean(correct), "macs_per_sample": count_macs(model, x[: min(len(x), 64)])})


def _pgd(model, x, y, cfg: EvalConfig, earlier: dict) -> Part:
    """PGD-k, then PGD with 2x the steps and 2 restarts: the worst of both per sample (more steps
    scoring higher is flagged)."""
    bs, run = cfg.batch_size, cfg.attacked(model)
    x_pgd = _pgd_all(run, x, y, cfg, cfg.pgd_cfg())
    correct = _predict(run, x_pgd, bs) == y
    first = cfg.mean(correct)
    more = _predict(run, _pgd_all(run, x, y, cfg, cfg.pgd_cfg(steps=2 * cfg.pgd_steps, restarts=2)), bs) == y
    more_acc = cfg.mean(more)
    flags = [f"PGD with 2x steps and 2 restarts scored higher ({more_acc:.3f} > {first:.3f})"] if more_acc > first + 0.01 else []
    correct &= more
    report = {"pgd_acc": cfg.mean(correct), "sanity_more_steps_acc": min(more_acc, first),
              "pgd": {"steps": cfg.pgd_steps, "restarts": cfg.pgd_restarts, "step_size": cfg.pgd_cfg().step_size}}
    routes = _all_routes(model, x_pgd, bs) if moe_layers(model) else None
    return Part(correct, report, [f"PGD-{cfg.pgd_steps}"], flags, routes)


def _autoattack_part(model, x, y, cfg: EvalConfig, earlier: dict) -> Part:
    subset, run = list(cfg.autoattack), cfg.attacked(model)
    correct = _predict(run, _autoattack(run, x, y, cfg, *(("custom", subset) if subset else ())), cfg.batch_size) == y
    version = "+".join(subset) if subset else "standard"
    return Part(correct, {"autoattack_acc": cfg.mean(correct), "autoattack_version": version},
                [f"AutoAttack {version} (pyautoattack)"])


def _square(model, x, y, cfg: EvalConfig, earlier: dict) -> Part:
    run = cfg.attacked(model)
    correct = _predict(run, _autoattack(run, x, y, cfg, version="custom", attacks=["square"]), cfg.batch_size) == y
    acc = cfg.mean(correct)
    white = [p.report[k] for p in earlier.values() for k in ("pgd_acc", "autoattack_acc") if k in p.report]
    flags = (["the gradient-free Square attack beats the white-box attacks: likely gradient masking"]
             if white and acc < min(white) - 0.01 else [])
    return Part(correct, {"square_acc": acc}, [f"Square ({cfg.square_queries} queries)"], flags)


def _gradients(model, x, y, cfg: EvalConfig, earlier: dict) -> Part:
    """The share of inputs whose input gradient is exactly zero (gradient masking)."""
    xg, yg = x[:cfg.batch_size].clone().requires_grad_(True), y[:cfg.batch_size]
    with bn_mode(model, "eval"), frozen(model), torch.enable_grad():
        g = input_grad(nn.functional.cross_entropy(cfg.attacked(model)(xg), yg, reduction="sum"), xg)
    zero = cfg.mean(g.flatten(1).abs().sum(1) == 0)
    flags = [f"{zero:.0%} of inputs have an all-zero input gradient: gradient masking"] if zero > 0.05 else []
    return Part(None, {"zero_input_gradient_fraction": zero}, flags=flags)


def _adaptive(model, x, y, cfg: EvalConfig, earlier: dict) -> Part:
    """MoE-adaptive attacks: (a) straight-through PGD with more restarts, (b) transfer from the
    soft-routing twin, (d) the routing attack and PGD from there; correct = correct under all three."""
    bs, run = cfg.batch_size, cfg.attacked(model)
    ste = _predict(run, _pgd_all(run, x, y, cfg, cfg.pgd_cfg(restarts=max(3, cfg.pgd_restarts))), bs) == y

    def soft_attack(a, b):  # all experts, softmax-weighted; evaluated on the hard-routed model
        with routing_policy(Soft()), execution("masked"):
            return pgd(model, a, b, cfg.pgd_cfg(), gen=_gen(cfg))
    soft = _predict(run, _attack_all(soft_attack, x, y, bs), bs) == y
    x_r = _attack_all(lambda a, b: routing_attack(model, a, b, cfg.pgd_cfg(), gen=_gen(cfg)), x, y, bs)
    x_rp = torch.cat([pgd(run, a, b, cfg.pgd_cfg(restarts=1), start=s) for (a, b), (s, _) in
                      zip(_batches(x, y, bs), _batches(x_r, y, bs))])
    routed = _predict(run, x_rp, bs) == y
    report = {"ra_r": cfg.mean(_predict(run, x_r, bs) == y),
              "adaptive": {"ste_pgd_acc": cfg.mean(ste), "soft_transfer_acc": cfg.mean(soft),
                           "routing_then_pgd_acc": cfg.mean(routed)}}
    return Part(ste & soft & routed, report)


def _dissection(model, x, y, cfg: EvalConfig, earlier: dict) -> Part:
    """Routing flip rate under PGD, RA-E, expert load (clean and adversarial), routing used (the
    accuracy lost when images swap routes), per-expert accuracy."""
    layers = moe_layers(model)
    names, experts = list(layers), [layer.experts for layer in layers.values()]
    clean_routes = _all_routes(model, x, cfg.batch_size)
    out: dict = {}
    adv_routes = earlier["pgd"].routes if "pgd" in earlier else None
    if adv_routes is not None:
        flips = (clean_routes != adv_routes).any(-1).float()  # [L, B]
        out["flip_rate"] = cfg.mean(flips.mean(0))
        out["flip_rate_per_layer"] = {n: cfg.mean(f) for n, f in zip(names, flips)}
        out["ra_e"] = ra_e(model, x, y, cfg)
        out["load_adversarial"] = load_stats([cfg.gather(r) for r in adv_routes], experts)
    out["load_clean"] = load_stats([cfg.gather(r) for r in clean_routes], experts)
    out.update(routing_used(model, x, y, cfg, clean_routes, earlier["clean"].correct if "clean" in earlier else None))
    out["layers"] = names
    per_expert = {}
    for e in range(experts[0]):
        with routing_policy(Forced(e)):
            per_expert[str(e)] = cfg.mean(_predict(model, x, cfg.batch_size) == y)
    out.update(per_expert_acc=per_expert, top_k=list(layers.values())[0].top_k, experts=experts[0])
    return Part(None, out)


def _sweep(model, x, y, cfg: EvalConfig, earlier: dict) -> Part:
    """PGD-10 accuracy at multiples of eps: it must fall towards zero as eps grows."""
    points, run = [], cfg.attacked(model)
    for mult in cfg.sweep:
        e = mult * cfg.eps
        xa = _pgd_all(run, x, y, cfg, cfg.pgd_cfg(eps=e, steps=10, restarts=1))
        points.append({"eps": e, "acc": cfg.mean(_predict(run, xa, cfg.batch_size) == y)})
    last = points[-1]
    flags = [f"accuracy stays at {last['acc']:.1%} at eps {last['eps']:g}: attacks may be failing"] if last["acc"] > 0.05 else []
    return Part(None, {"eps_sweep": points}, flags=flags)


def _batch_independence(model, x, y, cfg: EvalConfig, earlier: dict) -> Part:
    b = min(len(x), 16)
    alone = torch.cat([_predict(model, x[i:i + 1], 1) for i in range(b)])
    same = bool(torch.equal(_predict(model, x[:b], b), alone))
    return Part(None, {"batch_independent": same}, flags=[] if same else ["predictions depend on the rest of the batch"])


def steps(cfg: EvalConfig, is_moe: bool) -> list[tuple[str, Callable[..., Part]]]:
    """The evaluation's steps for this config and model, in the order they run."""
    a = set(cfg.attacks)
    chosen = [("clean", _clean, True), ("pgd", _pgd, "pgd" in a), ("autoattack", _autoattack_part, "autoattack" in a),
              ("square", _square, "square" in a or (is_moe and "adaptive" in a)), ("gradients", _gradients, True),
              ("adaptive", _adaptive, is_moe and "adaptive" in a), ("dissection", _dissection, is_moe and cfg.routing),
              ("sweep", _sweep, "sweep" in a), ("batch", _batch_independence, True)]
    return [(name, fn) for name, fn, on in chosen if on]


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: EvalConfig, store: PartStore | None = None) -> dict:
    """The full report for ``model`` on (x, y): see the module docstring. Runs in true fp32 and
    leaves the model in the train/eval mode it had. Parts already in ``store`` are not rerun."""
    unknown = set(cfg.attacks) - set(ATTACKS)
    if unknown:
        raise MoeifyError(f"unknown attack(s) {', '.join(sorted(unknown))}; choose from {', '.join(ATTACKS)}")
    was = model.training
    model.eval()
    try:
        with full_fp32():
            parts = _run_steps(model, x.float(), y.long(), cfg, store)
    finally:
        model.train(was)
    return _report(parts, cfg, int(cfg.gather(torch.ones(len(y))).sum()))


def _run_steps(model, x, y, cfg: EvalConfig, store: PartStore | None) -> dict[str, Part]:
    parts: dict[str, Part] = {}
    for name, fn in steps(cfg, bool(moe_layers(model))):
        part = store.load(name) if store is not None else None
        if part is None:
            start = time.time()
            part = fn(model, x, y, cfg, dict(parts))
            part.seconds = round(time.time() - start, 1)
            if store is not None:
                store.save(name, part)
            cfg.log(f"{name} done ({part.seconds} s)")
        else:
            cfg.log(f"{name}: kept from the stopped run")
        parts[name] = part
    return parts


def _report(parts: dict[str, Part], cfg: EvalConfig, n: int) -> dict:
    """One report from the parts: their fields, attacks run, flags, timings and the worst cases."""
    rep: dict = {"n_examples": n, "eps": cfg.eps, "norm": cfg.norm, "attacks_run": [], "flags": [], "timings_s": {},
                 "compiled": cfg.compile}
    for name, part in parts.items():
        rep.update(part.report)
        rep["attacks_run"] += part.runs
        rep["flags"] += part.flags
        rep["timings_s"][name] = part.seconds
    per_sample = {name: p.correct for name, p in parts.items() if p.correct is not None}
    if "adaptive" in parts:
        per_sample["adaptive"] = worst_case(parts, ("adaptive", "square", "pgd", "autoattack"))
        rep["adaptive_acc"] = cfg.mean(per_sample["adaptive"])
    if sum(p.correct is not None for p in parts.values()) > 1:  # clean and at least one attack
        per_sample["worst_case"] = worst_case(parts)
        rep["worst_case_acc"] = cfg.mean(per_sample["worst_case"])
    rep["per_example"] = {k: _bits(cfg.gather(v)) for k, v in per_sample.items()}
    return rep


def _bits(correct: torch.Tensor) -> str:
    """Per-sample correctness as a string of 0s and 1s, in the order of the examples: what paired
    comparisons between models (``moeify.stats``) read back with ``correct_from_bits``."""
    return "".join("1" if c else "0" for c in correct.bool().tolist())


def correct_from_bits(bits: str) -> torch.Tensor:
    """The per-sample correctness a report's ``per_example`` entry holds."""
    return torch.tensor([c == "1" for c in bits], dtype=torch.bool)


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


def routing_used(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: EvalConfig,
                 routes: torch.Tensor | None = None, clean: torch.Tensor | None = None) -> dict:
    """How much the model's accuracy depends on each image's own routes: clean accuracy with every
    image given the clean routes of the next image in the set, in every layer (a model whose
    routing is dead, or that has one expert, loses nothing). ``routes`` ([layers, samples, K]) and
    ``clean`` (per-sample correctness): when already taken. {"swapped_acc", "routing_used": clean
    minus swapped}."""
    routes = _all_routes(model, x, cfg.batch_size) if routes is None else routes
    clean = _predict(model, x, cfg.batch_size) == y if clean is None else clean
    other = routes.roll(-1, dims=1)
    right = []
    for i, (a, b) in enumerate(_batches(x, y, cfg.batch_size)):
        sl = slice(i * cfg.batch_size, i * cfg.batch_size + len(a))
        with routing_policy(Fixed(list(other[:, sl]))):
            right.append(_predict(model, a, len(a)) == b)
    swapped = cfg.mean(torch.cat(right))
    return {"swapped_acc": swapped, "routing_used": cfg.mean(clean) - swapped}


def pgd_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: EvalConfig) -> float:
    """Plain PGD accuracy with the config's steps (one restart), seeded like ``ra_e``."""
    gen = _gen(cfg)
    xa = _attack_all(lambda a, b: pgd(model, a, b, cfg.pgd_cfg(restarts=1), gen=gen), x, y, cfg.batch_size)
    return cfg.mean(_predict(model, xa, cfg.batch_size) == y)
