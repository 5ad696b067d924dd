"""Benchmarks: conversion time, and dense vs static twin vs the MoE under every execution strategy.

Timings are interleaved (every variant once per round, in a fresh seeded order each round) in one
process and reported as medians, so machine noise and what ran just before hit every variant
alike. ``mode="train"`` times a training step (forward + backward of a cross-entropy loss,
train-mode BatchNorm) instead of eval inference.
"""
from __future__ import annotations

import contextlib
import copy
import math
import platform
import random
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from .allocator import allocator_name
from .conversion import convert, moe_layers
from .errors import MoeifyError
from .fold import fold_batchnorm
from .macs import count_macs
from .nn import GlobalRouter, LayerRouter, execution, onednn, select_top_k
from .nn.executors import get_executor
from .nn.executors.auto import COMPILED
from .nn.gated import with_mixin
from .spec import MoESpec
from .stats import paired_bootstrap
from .twin import static_twin
from .zoo import create_model

STRATEGIES = ("masked", "grouped", "static", "auto")
VARIANTS = ("dense", "static twin", "twin + routers") + tuple(f"moe {s}" for s in STRATEGIES)
MIN_TWIN_GAIN = 0.05
"""Below this (the twin less than 1.05x dense, as on a GPU the network does not load) a share of
the twin's gain is noise over noise: it is reported as NaN (shown as "-")."""


@dataclass
class BenchRow:
    model: str
    experts: int
    top_k: int
    scope: str
    mode: str
    batch: int
    variant: str
    ms: float
    macs: float
    speedup: float  # over dense
    ideal: float  # the MAC-ideal speed-up: dense MACs / this variant's MACs
    of_twin: float  # this variant's speed-up as a fraction of the static twin's
    speedup_low: float = math.nan  # 95% intervals (paired bootstrap over the interleaved rounds)
    speedup_high: float = math.nan
    of_twin_low: float = math.nan
    of_twin_high: float = math.nan
    runs: str = ""  # for "moe auto": the strategy auto ran at this batch size


def machine(device: str = "cpu") -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return f"{_cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, allocator {allocator_name()}"


def _cpu_name() -> str:
    """The CPU's model name where the OS tells it (Linux), else the architecture."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def convert_seconds(name: str, spec: MoESpec, repeats: int = 3, input_size: tuple[int, ...] | None = None,
                    model_kwargs: dict | None = None) -> float:
    """Median wall time of ``convert`` for a named model (at its default input size if not given)."""
    model = create_model(name, input_size=input_size, **(model_kwargs or {}))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        convert(model, spec=spec)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def interleaved_rounds(fns: dict[str, Callable[[], None]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Milliseconds per function and round, timed in turn after warm-up calls, in a fresh order
    each round (seeded, so runs repeat): what runs just before a function (a large model evicting
    the caches, a slow one warming the CPU) then falls on every function alike, which a fixed or
    rotated order (same neighbour every round) does not give."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    order, shuffle = list(fns), random.Random(0).shuffle
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        shuffle(order)
        for k in order:
            t = time.perf_counter()
            fns[k]()
            times[k].append((time.perf_counter() - t) * 1e3)
    return times


def interleaved(fns: dict[str, Callable[[], None]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median milliseconds per function, timed in turn (``interleaved_rounds``)."""
    return {k: statistics.median(v) for k, v in interleaved_rounds(fns, repeats, warmup).items()}


def _medians(t: torch.Tensor) -> torch.Tensor:
    return torch.quantile(t, 0.5, dim=-1)


def _intervals(rounds: dict[str, list[float]], variant: str, dense: str = "dense",
               twin: str = "static twin") -> tuple[float, float, float, float]:
    """95% paired-bootstrap intervals of ``variant``'s speed-up over ``dense`` and of its share of
    ``twin``'s gain (NaN where the twin gains less than ``MIN_TWIN_GAIN``), from the
    interleaved rounds: a ratio of medians, as the point estimates are."""
    cols = {k: rounds[k] for k in (dense, twin, variant)}

    def speedup(c: dict[str, torch.Tensor]) -> torch.Tensor:
        return _medians(c[dense]) / _medians(c[variant])

    def share(c: dict[str, torch.Tensor]) -> torch.Tensor:
        gain = _medians(c[dense]) / _medians(c[twin]) - 1
        return torch.where(gain >= MIN_TWIN_GAIN, (speedup(c) - 1) / gain, torch.nan)

    return paired_bootstrap(cols, speedup) + paired_bootstrap(cols, share)


def _step(model: nn.Module, exec_mode: str, x: torch.Tensor, mode: str, sync: Callable[[], None]):
    if mode == "eval":
        def f():
            with torch.inference_mode(), execution(exec_mode):
                model(x)
            sync()
        return f
    target = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)

    def g():
        with execution(exec_mode):
            loss = nn.functional.cross_entropy(model(x), target)
        loss.backward()
        model.zero_grad(set_to_none=True)
        sync()
    return g


def with_routers(twin: nn.Module, moe: nn.Module) -> nn.Module:
    """A copy of the static twin that also runs one router per MoE layer before the layer's
    producer (global average pool, linear, top-K choice read back to the host) and ignores the
    choice: the least a dynamic MoE with per-layer routers can cost on this machine, so that
    sparse execution's own dispatch overhead is the gap between it and the MoE. The routers
    standardise their input where the MoE's do (in training: the batch's statistics, updated
    running ones) and, where autograd records, get a gradient through one gate (``_RoutedFirst``)."""
    twin = copy.deepcopy(twin)
    for i, layer in enumerate(moe_layers(moe).values()):
        try:
            producer = twin.get_submodule(layer.producers[0])
        except AttributeError:
            continue  # a functional producer: nothing to hook
        if layer.router is None or not isinstance(producer, (nn.Conv2d, nn.Linear)):
            continue
        width = producer.in_channels if isinstance(producer, nn.Conv2d) else producer.in_features
        router = LayerRouter(width, layer.experts, layer.top_k, cdim=1 if isinstance(producer, nn.Conv2d) else -1,
                             norm=isinstance(layer.router, LayerRouter) and layer.router.norm)
        producer.moeify_bench_router = router  # a submodule: moves with the twin
        with_mixin(producer, _RoutedFirst)
    return twin


class _RoutedFirst:
    """Mixed into a producer of ``with_routers``: runs its router (choice read back, ignored) first.
    A class, not a forward hook, so the baseline does not pay hooks' slower module call. Where
    autograd records, the output is multiplied by the first chosen expert's gate (value 1), so
    the router gets its gradient, as an MoE's must. Under ``torch.compile`` the choice stays on
    the device, as a compiled MoE's does (a host read would be a graph break); without a gate it
    scales the output by exactly 1 instead, so the compiler keeps the router."""

    def forward(self, x, *args, **kwargs):
        router = self.moeify_bench_router
        compiling = torch.compiler.is_compiling()
        route = select_top_k(router.scores(x), router.top_k, defer_check=compiling)
        if not compiling:
            route.groups()
        y = super().forward(x, *args, **kwargs)
        if route.needs_grad:
            factor = route.gate[:, :1]
        elif compiling:
            factor = route.idx[:, :1] >= 0
        else:
            return y
        return y * factor.to(y.dtype).view(-1, *[1] * (y.ndim - 1))


class _Noisy:
    """Mixed into a router by ``spread_routing``: its scores plus the router's noise. A class, not a
    forward hook, so the MoE does not pay hooks' slower module call."""

    def scores(self, *args, **kwargs):
        out = super().scores(*args, **kwargs)
        return out + self.__dict__["_moeify_noise"](out)


class _Unspread:
    """The handle ``spread_routing`` returns per router: ``remove()`` restores it."""

    def __init__(self, module: nn.Module, cls: type) -> None:
        self.module, self.cls = module, cls

    def remove(self) -> None:
        self.module.__class__ = self.cls
        self.module.__dict__.pop("_moeify_noise", None)


def spread_routing(moe: nn.Module, seed: int = 0) -> list:
    """Make every router of ``moe`` pick experts as if at random (its scores plus large noise), so
    samples in a batch take different routes, as trained routers do; untrained ones on synthetic
    images send every sample to the same experts. The noise depends on (seed, router, sample
    position, expert) only: made once per batch shape where the scores are (no host copy, one add
    per router call), so the model still compiles as one graph and every strategy and every call
    sees the same routes. Returns one handle per router; ``handle.remove()`` restores it."""
    routers = [m.router for m in moe_layers(moe).values() if m.router is not None]
    routers += [m for m in moe.modules() if isinstance(m, GlobalRouter)]
    handles = []
    for i, r in enumerate(routers):
        handles.append(_Unspread(r, type(r).__mro__[2] if isinstance(r, _Noisy) else type(r)))
        with_mixin(r, _Noisy)
        r.__dict__["_moeify_noise"] = _noise(seed * 7919 + i)
    return handles


@contextlib.contextmanager
def noise_in_biases(moe: nn.Module) -> Iterator[None]:
    """Inside the block, a router of ``spread_routing`` whose linear layer has a bias takes its
    noise for a single sample (one row: a constant) in that bias and is a plain router again, so a
    batch-1 call pays nothing a trained router would not (no add, no mixin call); the same routes
    for batch-1 calls (a larger batch would lose its per-sample noise). A router without a bias
    (standardised) keeps the add. Biases and classes are restored after."""
    saved = []
    for r in moe.modules():
        bias = getattr(getattr(r, "proj", None), "bias", None)
        if not isinstance(r, _Noisy) or bias is None:
            continue
        with torch.no_grad():
            saved.append((r, type(r), bias, bias.detach().clone()))
            bias.add_(r.__dict__["_moeify_noise"](bias.new_zeros(1, bias.numel()))[0])
        r.__class__ = type(r).__mro__[2]  # the class ``with_mixin`` mixed _Noisy into
    try:
        yield
    finally:
        for r, cls, bias, value in saved:
            with torch.no_grad():
                bias.copy_(value)
            r.__class__ = cls


def _noise(key: int):
    made: dict[tuple, torch.Tensor] = {}

    def noise(out: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # traced into the graph (no Python-side cache there)
            return _hashed_noise(out, key)
        k = (tuple(out.shape), out.device, out.dtype)
        if k not in made:
            made[k] = _hashed_noise(out, key)
        return made[k]
    return noise


def _hashed_noise(like: torch.Tensor, key: int) -> torch.Tensor:
    """Noise of scale 1e3 shaped like ``like``: a sine hash of (key, sample, expert), no generator."""
    b, n = like.shape
    cell = torch.arange(b * n, device=like.device, dtype=torch.float64).reshape(b, n)
    h = torch.sin(cell * 12.9898 + key * 78.233 + 0.5) * 43758.5453
    return (1e3 * (h - h.floor() - 0.5)).to(like.dtype)


def variants_for(strategies: tuple[str, ...]) -> tuple[str, ...]:
    """The variants ``compare`` times for these MoE strategies: dense and the twins, then the MoE's."""
    unknown = sorted(set(strategies) - set(STRATEGIES))
    if unknown or not strategies:
        raise MoeifyError(f"--strategies must be some of {','.join(STRATEGIES)}, not {','.join(unknown) or 'none'}")
    return tuple(k for k in VARIANTS if not k.startswith("moe ") or k[4:] in strategies)


def compare(name: str, spec: MoESpec, batches: list[int], repeats: int = 10, device: str = "cpu",
            mode: str = "eval", channels_last: bool = True, compile: bool = False,
            routing: str = "spread", input_size: tuple[int, ...] | None = None,
            model_kwargs: dict | None = None, fold_bn: bool = False,
            compile_mode: str = "default", strategies: tuple[str, ...] = STRATEGIES) -> list[BenchRow]:
    """Median latency per batch of dense, static twin (+ routers) and the MoE under each execution
    strategy, with executed MACs.

    ``routing="spread"`` routes samples independently at random (the case a trained model is
    in); ``"model"`` keeps the freshly initialised routers' choices. ``fold_bn``: every variant
    with its BatchNorms folded into the convs (``fold_batchnorm``; inference only). ``compile``:
    every variant through ``torch.compile`` in ``compile_mode`` (``"reduce-overhead"``: CUDA graphs).
    ``strategies``: the MoE strategies timed (dense and the twins always are); each compiled one
    costs a compilation per batch size.
    """
    variants = variants_for(strategies)
    if fold_bn and mode != "eval":
        raise MoeifyError("folded BatchNorm is for inference: benchmark it in eval mode")
    dense = create_model(name, input_size=input_size, **(model_kwargs or {}))
    size = dense.moeify_input_size
    models = {"dense": dense, "static twin": static_twin(dense, spec=spec), "moe": convert(dense, spec=spec)}
    if routing == "spread":
        spread_routing(models["moe"])
    if fold_bn:
        models = {k: fold_batchnorm(m.eval()) for k, m in models.items()}
    models["twin + routers"] = with_routers(models["static twin"], models["moe"])
    fmt = torch.channels_last if channels_last and len(size) == 3 else torch.contiguous_format
    for m in models.values():
        m.train(mode == "train").to(device, memory_format=fmt)
    # compiled, each strategy runs its own copy of the MoE: dynamo keeps one cache per code object,
    # so on a shared module every call would first check the guards of the other strategies' graphs
    runners = {k: (copy.deepcopy(models["moe"]) if compile else models["moe"]) if k.startswith("moe ") else models[k]
               for k in variants}
    moes = list({id(m): m for k, m in runners.items() if k.startswith("moe ")}.values())
    if compile:  # one compiled wrapper per variant: a strategy is fixed when its graph is traced
        runners = {k: torch.compile(m, mode=compile_mode) for k, m in runners.items()}
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    rows: list[BenchRow] = []
    for b in batches:
        x = torch.rand(b, *size, device=device).contiguous(memory_format=fmt)
        fns = {k: _step(runners[k], k[4:] if k.startswith("moe ") else "auto", x, mode, sync) for k in variants}
        with contextlib.ExitStack() as stack:
            for m in moes if routing == "spread" and b == 1 else []:
                stack.enter_context(noise_in_biases(m))
            # warm-up: the caches filled and the weight slices' blocked copies made (``nn/onednn.py``)
            rounds = interleaved_rounds(fns, repeats, warmup=1 + onednn.PLAIN_USES)
        ms = {k: statistics.median(v) for k, v in rounds.items()}
        macs = _macs(models, x[:min(b, 8)].float().cpu().contiguous(), mode, device)
        choice = COMPILED if compile else _auto_choice(models["moe"], x, mode)
        macs["moe auto"] = macs[f"moe {choice}"]
        twin_gain = ms["dense"] / ms["static twin"] - 1
        for k in variants:
            gain = ms["dense"] / ms[k]
            rows.append(BenchRow(name, spec.experts, spec.top_k, spec.scope, mode, b, k, ms[k], macs[k], gain,
                                 macs["dense"] / macs[k], (gain - 1) / twin_gain if twin_gain >= MIN_TWIN_GAIN else float("nan"),
                                 *_intervals(rounds, k), runs=choice if k == "moe auto" else ""))
    return rows


def _auto_choice(moe: nn.Module, x: torch.Tensor, mode: str) -> str:
    """The strategy ``auto`` runs ``moe`` with on batch ``x`` (the MACs are counted on fewer samples)."""
    layer = next(iter(moe_layers(moe).values()))
    with torch.set_grad_enabled(mode == "train"):
        return get_executor("auto").resolve(x, layer).name


def _macs(models: dict[str, nn.Module], x: torch.Tensor, mode: str, device: str) -> dict[str, float]:
    """Executed MACs per sample of every variant (on the CPU, eval mode)."""
    macs = {}
    for k, m in models.items():
        m.cpu().eval()
        if k == "moe":
            for s in STRATEGIES:
                with execution(s):
                    macs[f"moe {s}"] = count_macs(m, x)
        else:
            macs[k] = count_macs(m, x)
        m.train(mode == "train").to(device)
    return macs


def sweep(name: str, batches: list[int], experts: tuple[int, ...] = (2, 4, 8), scope: str = "hidden",
          cuts: str = "copies", **kw) -> list[BenchRow]:
    """``compare`` for each number of experts at K/N = 1/2."""
    rows: list[BenchRow] = []
    for n in experts:
        rows += compare(name, MoESpec(experts=n, top_k=n // 2, scope=scope, cuts=cuts), batches, **kw)
    return rows


CALIBRATION_MODELS = (  # name, spec, input size, constructor kwargs: small and large, paper and default scope
    ("cifar_resnet_small", MoESpec(experts=2, top_k=1, scope="hidden"), (1, 28, 28),
     {"width": 16, "stem_stride": 2, "in_chans": 1}),  # the quickstart's backbone
    ("cifar_resnet_small", MoESpec(experts=2, top_k=1, scope="hidden"), (1, 28, 28),
     {"width": 64, "stem_stride": 2, "in_chans": 1}),  # the same at width 64: a mid-size model
    ("cifar_resnet18", MoESpec(experts=2, top_k=1, scope="paper"), (3, 32, 32), {}),
    ("cifar_resnet18", MoESpec(experts=2, top_k=1, scope="paper"), (1, 28, 28), {"width": 16, "stem_stride": 2, "in_chans": 1}),
    ("resnet18", MoESpec(experts=2, top_k=1, scope="hidden"), (3, 224, 224), {}),
)


def calibrate(batches: list[int], repeats: int = 5, device: str = "cpu", mode: str = "eval",
              experts: tuple[int, ...] = (2,), measured: Callable[[dict], None] | None = None) -> dict:
    """The table ``auto`` reads: for each reference model (``CALIBRATION_MODELS``), number of
    ``experts`` (top-K = N/2) and batch size, each exact strategy's latency relative to dense
    (routing spread), for inference (``eval``) or a training step (``train``: forward and
    backward, what training and attacks run). ``measured``: called with the table so far after
    each reference model, so a run that is stopped keeps what it measured (a lent GPU's time)."""
    points: list[dict] = []

    def table() -> dict:
        return {"machine": machine(device), "devices": {torch.device(device).type: list(points)}}

    for name, base, size, kwargs in CALIBRATION_MODELS:
        if mode == "train" and name == "resnet18":
            size = (3, 112, 112)  # a training step at 224 x 224 takes too long to calibrate on a CPU
        for n in experts:
            spec = replace(base, experts=n, top_k=max(1, n // 2))
            for b in batches:  # small batches are quick and noisy: more repeats
                rows = compare(name, spec, [b], repeats=max(repeats, 32 // b), device=device, mode=mode,
                               input_size=size, model_kwargs=kwargs)
                by = {r.variant: r for r in rows}
                points.append({"model": f"{name} {kwargs or ''} {spec.experts}/{spec.top_k} {spec.scope} {size}".replace("  ", " "),
                               "mode": mode, "macs": by["dense"].macs, "batch": b, "experts": n,
                               "relative_ms": {s: 1.0 / by[f"moe {s}"].speedup for s in STRATEGIES if s != "auto"}})
        if measured is not None:
            measured(table())
    return table()


def rows_as_dicts(rows: list[BenchRow]) -> list[dict]:
    return [asdict(r) for r in rows]


def train_steps(recipe_name: str, batch: int | None = None, repeats: int = 5,
                overrides: list[str] | None = None, device: str = "cpu") -> list[dict]:
    """Median time of one training batch: dense TRADES, S-Dense (static twin) TRADES, S-Dense with
    the MoE's routers (``with_routers``: what routing costs at the least, so the floor under the
    MoE's share of S-Dense's gain), MoE TRADES and MoE AdvMoE (router step + expert step, each
    with its own attack unless the recipe shares one), same backbone, attack and batch, in one
    process, the MoE under the default strategy; each with 95% intervals (``_train_row``). AdvMoE's
    two steps use the recipe's ``advmoe.loss`` (TRADES, or cross-entropy on the attack), as training does. With
    the recipe's ``train.compile``, every model's forward and attack run ``torch.compile``d;
    models and inputs are laid out as training lays them out (``training_layout``)."""
    from .attacks import AttackConfig
    from .data import SIZES, CLASSES, DataBundle, synthetic
    from .recipes import load_recipe
    from .train.build import build_model, split_parameters, training_layout
    from .train.methods import advmoe_kind, robust_loss

    recipe = load_recipe(recipe_name, overrides or [])
    a = recipe.attack
    attack = AttackConfig(eps=a.eps, steps=a.steps, alpha=a.alpha, norm=a.norm)
    name = recipe.data.dataset
    size, classes = SIZES[name], CLASSES[name]
    ds = synthetic(8, size, classes)
    from .data import STATS

    bundle = DataBundle(name, ds, ds, ds, classes, size, *STATS[name])
    b = batch or recipe.data.batch_size
    fmt = training_layout(recipe, device)  # as training lays them out
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(b, *size, generator=gen).to(device).contiguous(memory_format=fmt)
    y = torch.randint(0, classes, (b,), generator=gen).to(device)
    recipe.model.kind = "dense"
    dense = build_model(recipe, bundle).train().to(device, memory_format=fmt)
    recipe.model.kind = "s-dense"
    twin = build_model(recipe, bundle).train().to(device, memory_format=fmt)
    recipe.model.kind = "moe"
    moe = build_model(recipe, bundle).train().to(device, memory_format=fmt)
    routed = with_routers(twin, moe).train().to(device, memory_format=fmt)
    spread_routing(moe)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    none = contextlib.nullcontext
    beta = recipe.train.beta
    compiled = recipe.train.compile
    run_dense, run_twin, run_routed, run_moe = (torch.compile(m) if compiled else m for m in (dense, twin, routed, moe))

    def trades(model, run):
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)

        def f():
            loss, _, _ = robust_loss(run, run, x, y, "trades", beta, attack, none)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
        return f

    routers, experts = split_parameters(moe)
    opt_r, opt_e = torch.optim.SGD(routers, lr=1e-3), torch.optim.SGD(experts, lr=1e-3)

    shared = recipe.advmoe.shared_attack
    kind = advmoe_kind(recipe.advmoe.loss)  # as the trainer's router and expert steps

    def advmoe():
        x_adv = None
        for params, opt in ((routers, opt_r), (experts, opt_e)):
            loss, _, made = robust_loss(run_moe, run_moe, x, y, kind, beta, attack, none, x_adv=x_adv)
            x_adv = made if shared else None
            loss.backward(inputs=params)
            opt.step()
            opt_r.zero_grad(set_to_none=True)
            opt_e.zero_grad(set_to_none=True)
        sync()

    rounds = interleaved_rounds({"dense TRADES": trades(dense, run_dense), "S-Dense TRADES": trades(twin, run_twin),
                                 "S-Dense + routers TRADES": trades(routed, run_routed),
                                 "MoE TRADES": trades(moe, run_moe), "MoE AdvMoE": advmoe}, repeats)
    rows = [_train_row(recipe.name, k, b, attack.steps, compiled, rounds) for k in rounds]
    return [dict(r, channels_last=fmt is torch.channels_last, advmoe_loss=recipe.advmoe.loss, shared_attack=shared)
            for r in rows]


def _train_row(recipe: str, variant: str, batch: int, steps: int, compiled: bool,
               rounds: dict[str, list[float]]) -> dict:
    """One ``train_steps`` row: the variant's median step, its time relative to dense TRADES and
    its share of S-Dense's gain over dense TRADES (speed-ups minus one, as ``moeify bench``'s
    share of the twin's gain), each with its 95% paired-bootstrap interval."""
    ms = {k: statistics.median(v) for k, v in rounds.items()}
    low, high, share_low, share_high = _intervals(rounds, variant, "dense TRADES", "S-Dense TRADES")
    gain = ms["dense TRADES"] / ms["S-Dense TRADES"] - 1
    share = (ms["dense TRADES"] / ms[variant] - 1) / gain if gain >= MIN_TWIN_GAIN else math.nan
    return {"recipe": recipe, "variant": variant, "batch": batch, "attack_steps": steps, "compiled": compiled,
            "ms": ms[variant], "vs_dense_trades": ms[variant] / ms["dense TRADES"],
            "vs_dense_trades_low": 1 / high, "vs_dense_trades_high": 1 / low,
            "of_sdense_gain": share, "of_sdense_gain_low": share_low, "of_sdense_gain_high": share_high}
