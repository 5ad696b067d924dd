"""Training recipes: YAML files validated into dataclasses, with ``--set a.b=value`` overrides.

A recipe names the backbone and what to build from it (dense, MoE or S-Dense), the MoE spec, the
data, the training method (standard, PGD-AT, TRADES, AdvMoE) and its attack, and the evaluation.
Unknown keys and wrong types are one-line errors naming the key and the file.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import MoeifyError
from .spec import CUTS, ROUTERS, SCOPES

RECIPE_DIRS = (Path(__file__).resolve().parent.parent / "recipes",)


@dataclass
class ModelCfg:
    name: str = "cifar_resnet18"
    kind: str = "moe"  # dense | moe | s-dense
    kwargs: dict = field(default_factory=dict)  # constructor arguments (e.g. width)
    channels_last: bool | None = None  # train in channels-last layout; default (null): on a CPU (oneDNN's own
    # layout: no reorder around every conv), off elsewhere (not measured on GPUs)


@dataclass
class MoECfg:
    experts: int = 2
    top_k: int | None = None
    scope: str = "paper"
    cuts: str = "copies"  # all: also cut layers that share sub-ranges or several groups (fewer MACs, more small convs)
    router: str = "layer"
    router_norm: bool | None = None  # layer routers standardise their pooled input, no bias (keeps routing live);
    # false = the paper's router; default (null): on, except for routers fitted to a dense model (experts_by: cluster)
    layers: list | None = None
    exclude: list = field(default_factory=list)
    experts_by: str = "contiguous"  # cluster: from train.init's dense weights, clustered experts + fitted routers
    calibration_size: int = 5000  # training images (labels unused) that cluster the experts


@dataclass
class DataCfg:
    dataset: str = "fashion-mnist"
    root: str | None = None
    download: bool = False
    val_size: int = 1000
    batch_size: int = 128
    augment: bool = False  # random crop (pad 4) + horizontal flip
    channels: int | None = None  # repeat 1-channel images to this many channels (3-channel backbones)
    train_subset: int | None = None
    test_subset: int | None = None
    workers: int = 0


@dataclass
class AttackCfg:
    norm: str = "linf"
    eps: float = 8 / 255
    steps: int = 2
    alpha: float | None = None
    random_start: bool = True
    restarts: int = 1
    bn_mode: str = "eval"


@dataclass
class TrainCfg:
    method: str = "advmoe"  # standard | at | trades | advmoe
    epochs: int = 100
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # cosine | step | constant
    warmup_epochs: float = 0  # linear learning-rate warm-up over this many epochs (a fraction: a share of the first)
    beta: float = 6.0  # TRADES
    balance: float = 0.0  # weight of a load-balancing loss on the routers (0 = off, as in the paper)
    z_loss: float = 0.0  # weight of the router z-loss (mean squared log-sum-exp of router scores; 0 = off)
    router_noise: float = 0.0  # std of noise added to router scores when choosing experts in training, annealed to 0
    soft_warmup: float = 0.0  # share of the training steps run with soft routing (every expert, softmax-weighted)
    expert_dropout: float = 0.0  # probability that an expert is out of a sample's choice in training (0 = off)
    revive_dead: float = 0.0  # at each epoch's start, an expert below this share of an even load (validation)
    # gets the busiest expert's router row, perturbed, so they split its inputs (0 = off)
    update: str = "all"  # all | routers | experts
    init: str | None = None  # a .moe file to start from (same model)
    seed: int = 0
    mixed_precision: str = "no"  # no | bf16 | fp16
    compile: bool = False  # torch.compile the training forward and the training attack (MoE layers run static inside)
    grad_accum: int = 1
    grad_clip: float | None = None  # clip each optimiser's gradient norm to this (off by default, as in the paper)
    max_steps_per_epoch: int | None = None


@dataclass
class AdvMoECfg:
    loss: str = "trades"  # trades | ce: the robust loss of both steps
    router_lr: float = 0.1
    router_momentum: float = 0.9
    router_weight_decay: float = 0.0
    router_schedule: str = "cosine"
    router_steps: int = 1  # router steps per expert step
    order: str = "routers-first"  # routers-first | experts-first
    shared_attack: bool = False  # one attack per batch for both steps (cheaper, not the paper's)


@dataclass
class EvalCfg:
    pgd_steps: int = 20
    pgd_alpha: float | None = None  # default eps / 4
    val_pgd_steps: int = 10
    batch_size: int = 500


@dataclass
class Recipe:
    name: str = "recipe"
    model: ModelCfg = field(default_factory=ModelCfg)
    moe: MoECfg = field(default_factory=MoECfg)
    data: DataCfg = field(default_factory=DataCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    attack: AttackCfg = field(default_factory=AttackCfg)
    advmoe: AdvMoECfg = field(default_factory=AdvMoECfg)
    eval: EvalCfg = field(default_factory=EvalCfg)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


CHOICES = {
    "model.kind": ("dense", "moe", "s-dense"),
    "train.method": ("standard", "at", "trades", "advmoe"),
    "train.schedule": ("cosine", "step", "constant"),
    "train.update": ("all", "routers", "experts"),
    "train.mixed_precision": ("no", "bf16", "fp16"),
    "attack.norm": ("linf", "l2"),
    "attack.bn_mode": ("eval", "train"),
    "advmoe.loss": ("trades", "ce"),
    "advmoe.router_schedule": ("cosine", "step", "constant"),
    "advmoe.order": ("routers-first", "experts-first"),
    "moe.scope": SCOPES,
    "moe.cuts": CUTS,
    "moe.router": ROUTERS,
    "moe.experts_by": ("contiguous", "cluster"),
}


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp in (list, dict, str, bool):
        return isinstance(value, tp)
    return True


def _type_name(tp: Any) -> str:
    args = typing.get_args(tp)
    if args:
        return " or ".join(_type_name(a) for a in args)
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def build_config(cls: type, data: Any, where: str, source: str):
    """``data`` validated into dataclass ``cls``: unknown keys and wrong types are one-line errors naming key and file."""
    if not isinstance(data, dict):
        raise MoeifyError(f"{source}: {where or 'the recipe'} must be a mapping of keys, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise MoeifyError(f"{source}: unknown key {path!r}; known keys{' in ' + where if where else ''}: "
                              f"{', '.join(sorted(names))}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kw[key] = build_config(tp, value, path, source)
            continue
        if isinstance(value, int) and not isinstance(value, bool) and _type_ok(1.0, tp) and not _type_ok(1, tp):
            value = float(value)
        if not _type_ok(value, tp):
            raise MoeifyError(f"{source}: {path} must be {_type_name(tp)}, got {value!r}")
        if path in CHOICES and value not in CHOICES[path]:
            raise MoeifyError(f"{source}: {path} must be one of {', '.join(CHOICES[path])}, got {value!r}")
        kw[key] = value
    return cls(**kw)


def find_recipe(name_or_path: str) -> Path:
    """A recipe file from a path or a built-in name (``quickstart`` -> recipes/quickstart.yaml)."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or os.sep in name_or_path:
        if not p.is_file():
            raise MoeifyError(f"recipe file {name_or_path} not found")
        return p
    for d in RECIPE_DIRS + (Path.cwd() / "recipes",):
        f = d / f"{name_or_path}.yaml"
        if f.is_file():
            return f
    names = sorted({f.stem for d in RECIPE_DIRS if d.is_dir() for f in d.glob("*.yaml")})
    raise MoeifyError(f"unknown recipe {name_or_path!r}; built-in recipes: {', '.join(names) or 'none'}; or give a .yaml path")


def _parse_value(text: str) -> Any:
    """A --set value as YAML, with numbers like 1e-4 (a string to YAML 1.1) read as numbers."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``["train.epochs=5", "moe.experts=4"]`` applied to a raw recipe mapping (values are YAML)."""
    for item in overrides:
        if "=" not in item:
            raise MoeifyError(f"--set expects KEY=VALUE like train.epochs=5, got {item!r}")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise MoeifyError(f"--set {key}: {p} is not a section")
        node[parts[-1]] = _parse_value(text)
    return data


def load_recipe(name_or_path: str, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe."""
    path = find_recipe(name_or_path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise MoeifyError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise MoeifyError(f"{path}: a recipe is a mapping of sections (model, moe, data, train, attack, ...)")
    data.setdefault("name", path.stem)
    data = apply_overrides(data, overrides or [])
    recipe = build_config(Recipe, data, "", str(path))
    check(recipe, str(path))
    return recipe


def recipe_from_dict(data: dict, source: str = "recipe") -> Recipe:
    recipe = build_config(Recipe, data, "", source)
    check(recipe, source)
    return recipe


def check(r: Recipe, source: str) -> None:
    """Cross-field rules a type check cannot see."""
    t = r.train
    if t.method == "advmoe" and r.model.kind != "moe":
        raise MoeifyError(f"{source}: train.method advmoe needs model.kind moe (routers to train), got {r.model.kind}")
    if t.update != "all" and r.model.kind != "moe":
        raise MoeifyError(f"{source}: train.update {t.update} needs model.kind moe")
    if t.method == "advmoe" and t.update != "all":
        raise MoeifyError(f"{source}: advmoe alternates routers and experts; use train.update all "
                          "(or method at/trades with update routers|experts)")
    for key, v in (("train.epochs", t.epochs), ("data.batch_size", r.data.batch_size), ("train.grad_accum", t.grad_accum),
                   ("advmoe.router_steps", r.advmoe.router_steps), ("moe.experts", r.moe.experts)):
        if v < 1:
            raise MoeifyError(f"{source}: {key} must be >= 1, got {v}")
    if not 0 <= t.warmup_epochs <= t.epochs:
        raise MoeifyError(f"{source}: train.warmup_epochs must be between 0 and train.epochs ({t.epochs}), "
                          f"got {t.warmup_epochs}")
    if r.attack.eps < 0:
        raise MoeifyError(f"{source}: attack.eps must be >= 0, got {r.attack.eps}")
    for key, v in (("train.expert_dropout", t.expert_dropout), ("train.revive_dead", t.revive_dead)):
        if not 0 <= v < 1:
            raise MoeifyError(f"{source}: {key} must be in [0, 1), got {v}")
    if r.moe.experts_by == "cluster" and (r.model.kind != "moe" or not t.init):
        raise MoeifyError(f"{source}: moe.experts_by cluster converts trained dense weights; set model.kind moe and "
                          "train.init to a dense model file")
