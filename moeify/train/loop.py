"""``robustify``: train a recipe's model robustly, one explicit loop on top of Accelerate.

Per epoch: train (standard / AT / TRADES / AdvMoE), validate (clean and PGD accuracy on the held-out
split, expert load), keep the best model by validation robust accuracy, write a resumable
checkpoint. At the end the best model is evaluated on the test set (clean and PGD-20).
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
import time
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from torch import nn
from torch.utils.data import DataLoader, Sampler

from .. import io
from ..attacks import AttackConfig
from ..data import augment, load_data, to_float
from ..errors import MoeifyError, RoutingError
from ..macs import count_macs
from ..recipes import Recipe
from . import checkpoint as ckpt
from .build import build_model, hold_frozen_norms, split_parameters
from .validate import evaluate_robust, expert_load
from .methods import robust_loss


class EpochSampler(Sampler[int]):
    """A fresh seeded permutation per epoch: the same order whether or not a run was resumed."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def _schedule(kind: str, total: int, warmup: int) -> callable:
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
        if kind == "step":
            return 0.1 ** sum(t >= m for m in (0.5, 0.75))
        return 1.0
    return f


def _trackers() -> list[str] | None:
    """TensorBoard through Accelerate's trackers when it is installed."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return None
    return ["tensorboard"]


def _check_out(out: Path, resume: bool) -> None:
    if resume:
        if ckpt.checkpoint_dir(out) is None:
            raise MoeifyError(f"--resume: {out} holds no checkpoint to resume (start a new run without --resume)")
        return
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MoeifyError(f"{out} already exists and is not empty; pass --resume to continue that run, or choose "
                          "another --out (nothing was overwritten)")


def _autocast(device: torch.device, precision: str):
    if precision == "no":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype)


def _load_init(model: nn.Module, path: str) -> None:
    from safetensors.torch import load_model

    info = io.read_info(path)
    try:
        missing, unexpected = load_model(model, path, strict=False)
    except RuntimeError as e:
        first = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e).splitlines()[0])
        raise MoeifyError(f"train.init {path} does not fit this recipe's model ({first})") from None
    if missing or unexpected:
        raise MoeifyError(f"train.init {path} does not fit this recipe's model ({len(missing)} missing, "
                          f"{len(unexpected)} unexpected tensors; it is a {info.get('kind', 'moe')} model of "
                          f"{info.get('source')})")


def robustify(recipe: Recipe, out: str | Path, resume: bool = False, stop_after: int | None = None,
              console: Console | None = None) -> dict:
    """Train ``recipe`` into run folder ``out``; returns the final metrics (also in out/metrics.json).

    ``stop_after`` ends this session after that many epochs (resumable with ``resume=True``).
    """
    out = Path(out)
    _check_out(out, resume)
    console = console or Console()
    t, a = recipe.train, recipe.attack
    trackers = _trackers()
    accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(split_batches=True),
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
                              log_with=trackers, project_dir=str(out), cpu=not torch.cuda.is_available())
    main = accelerator.is_main_process
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if not resume:
            (out / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    if trackers:
        accelerator.init_trackers("moeify", config={"recipe": recipe.name, "method": t.method})
    set_seed(t.seed)
    data = load_data(recipe.data.dataset, recipe.data.root, recipe.data.val_size, t.seed, recipe.data.download,
                     recipe.data.train_subset, recipe.data.test_subset)
    if recipe.data.batch_size % accelerator.num_processes:
        raise MoeifyError(f"data.batch_size {recipe.data.batch_size} must divide among {accelerator.num_processes} processes")
    model = build_model(recipe, data)
    if t.init:
        _load_init(model, t.init)
    fmt = torch.channels_last if recipe.model.channels_last else torch.contiguous_format
    model = model.to(accelerator.device, memory_format=fmt)
    routers, experts = split_parameters(model)
    if t.update == "routers":
        for p in experts:
            p.requires_grad_(False)
    if t.update == "experts":
        for p in routers:
            p.requires_grad_(False)
    train_routers = bool(routers) and t.update != "experts"
    train_experts = t.update != "routers"
    opt_e = torch.optim.SGD(experts, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, nesterov=False)
    adv = recipe.advmoe
    opt_r = torch.optim.SGD(routers or [torch.zeros(1, requires_grad=True)], lr=adv.router_lr if t.method == "advmoe" else t.lr,
                            momentum=adv.router_momentum, weight_decay=adv.router_weight_decay)
    sampler = EpochSampler(len(data.train), t.seed)
    train_loader = DataLoader(data.train, batch_size=recipe.data.batch_size, sampler=sampler, drop_last=True,
                              num_workers=recipe.data.workers)
    steps = len(train_loader) if t.max_steps_per_epoch is None else min(len(train_loader), t.max_steps_per_epoch)
    total, warm = t.epochs * steps, t.warmup_epochs * steps
    sched_e = torch.optim.lr_scheduler.LambdaLR(opt_e, _schedule(t.schedule, total, warm))
    sched_r = torch.optim.lr_scheduler.LambdaLR(
        opt_r, _schedule(adv.router_schedule if t.method == "advmoe" else t.schedule, total, warm))
    model, opt_e, opt_r, train_loader = accelerator.prepare(model, opt_e, opt_r, train_loader)
    accelerator.register_for_checkpointing(sched_e, sched_r)
    raw = accelerator.unwrap_model(model)
    fwd, attacked = model, raw  # what the training forward and the training attack call
    if t.compile:  # one graph per mode (train; eval for bn_mode eval attacks), static routing inside
        fwd, attacked = torch.compile(model), torch.compile(raw)
    single = accelerator.num_processes == 1
    autocast = _autocast(accelerator.device, t.mixed_precision)
    scaler = torch.amp.GradScaler(accelerator.device.type) if t.mixed_precision == "fp16" else None
    attack = AttackConfig(eps=a.eps, steps=a.steps, alpha=a.alpha, norm=a.norm, random_start=a.random_start,
                          restarts=a.restarts, bn_mode=a.bn_mode)
    ev = recipe.eval
    val_attack = AttackConfig(eps=a.eps, steps=ev.val_pgd_steps, alpha=ev.pgd_alpha, norm=a.norm)
    progress = ckpt.Progress()
    if resume:
        progress = ckpt.load(accelerator, ckpt.checkpoint_dir(out))
        if main:
            console.print(f"resuming {out} after epoch {progress.epoch}")
    else:
        ckpt.save(accelerator, out, progress)  # epoch 0: Ctrl-C during the first epoch is resumable too

    def backward(loss: torch.Tensor, params: list[nn.Parameter] | None) -> None:
        kw = {"inputs": params} if (single and params) else {}
        if scaler is not None:
            scaler.scale(loss).backward(**kw)
        else:
            accelerator.backward(loss, **kw)

    def step(opt) -> None:
        if t.grad_clip and accelerator.sync_gradients:  # clip the accumulated gradient, not a partial sum
            if scaler is not None:
                scaler.unscale_(opt)
            params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
            accelerator.clip_grad_norm_(params, t.grad_clip)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()

    def fail(why: str) -> MoeifyError:
        return MoeifyError(f"{why} at epoch {progress.epoch + 1}; the run stopped; the last good checkpoint "
                           f"(epoch {progress.epoch}) is in {out}/checkpoint; lower the learning rate or set train.grad_clip, "
                           "and --resume")

    csv_path = out / "metrics.csv"
    epochs_this_session = 0
    try:
        for epoch in range(progress.epoch + 1, t.epochs + 1):
            if stop_after is not None and epochs_this_session >= stop_after:
                break
            sampler.set_epoch(epoch)
            rank_seed = t.seed * 100_003 + epoch * 7919 + accelerator.process_index
            torch.manual_seed(rank_seed)
            gen = torch.Generator().manual_seed(rank_seed)
            model.train()
            hold_frozen_norms(raw, t.update)
            start = time.time()
            sums = {"loss": 0.0, "correct": 0, "n": 0}
            bar = Progress(TextColumn("epoch {task.fields[epoch]}/{task.fields[epochs]}"), BarColumn(),
                           MofNCompleteColumn(), TextColumn("{task.fields[stats]}"), TimeElapsedColumn(),
                           TimeRemainingColumn(), console=console, disable=not main, transient=True)
            with bar:
                task = bar.add_task("train", total=steps, epoch=epoch, epochs=t.epochs, stats="")
                for i, (x, y) in enumerate(train_loader):
                    if i >= steps:
                        break
                    x = to_float(x)
                    if recipe.data.augment:
                        x = augment(x, gen)
                    x = x.contiguous(memory_format=fmt)
                    try:
                        if t.method == "advmoe":
                            loss, logits = _advmoe_step(fwd, attacked, x, y, recipe, attack, autocast, gen, backward,
                                                        step, opt_r, opt_e, routers, experts, fail)
                        else:
                            with accelerator.accumulate(model):
                                loss, logits, _ = robust_loss(fwd, attacked, x, y, t.method, t.beta, attack, autocast,
                                                              gen=gen, balance=t.balance)
                                if not torch.isfinite(loss):
                                    raise fail("the training loss became non-finite")
                                backward(loss, None)
                                if train_experts:
                                    step(opt_e)
                                if train_routers:
                                    step(opt_r)
                                opt_e.zero_grad(set_to_none=True)
                                opt_r.zero_grad(set_to_none=True)
                    except RoutingError as e:
                        raise fail(f"a router produced non-finite scores ({e})") from None
                    if train_experts:
                        sched_e.step()
                    if train_routers:
                        sched_r.step()
                    sums["loss"] += loss.item() * len(y)
                    sums["correct"] += int((logits.argmax(1) == y).sum())
                    sums["n"] += len(y)
                    bar.update(task, advance=1, stats=f"loss {sums['loss'] / sums['n']:.3f} "
                                                      f"acc {sums['correct'] / sums['n']:.1%}")
            train_s = time.time() - start
            val = evaluate_robust(raw, data.val, val_attack, ev.batch_size, accelerator, fmt)
            load = expert_load(raw, data.val, ev.batch_size, accelerator, fmt)
            row = {"epoch": epoch, "train_loss": sums["loss"] / max(1, sums["n"]),
                   "train_acc": sums["correct"] / max(1, sums["n"]), "val_clean": val["clean"],
                   "val_robust": val["robust"], "lr": sched_e.get_last_lr()[0], "train_s": round(train_s, 1),
                   "val_s": round(val["seconds"], 1), "load_balance": load}
            progress.epoch = epoch
            progress.history.append(row)
            if val["robust"] > progress.best_val_robust:
                progress.best_val_robust, progress.best_epoch = val["robust"], epoch
                if main:
                    io.save(raw, out / "model.moe", extra={"recipe": recipe.to_dict(), "epoch": epoch})
            ckpt.save(accelerator, out, progress)
            epochs_this_session += 1
            if main:
                _write_csv(csv_path, progress.history)
                lb = "-" if load is None else f"{load:.2f}"
                console.print(f"epoch {epoch}/{t.epochs}  loss {row['train_loss']:.3f}  train acc {row['train_acc']:.1%}  "
                              f"val clean {val['clean']:.1%}  val PGD-{ev.val_pgd_steps} {val['robust']:.1%}  "
                              f"lr {row['lr']:.4f}  load balance {lb}  {train_s:.0f}s + {val['seconds']:.0f}s")
                accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=epoch)
    except KeyboardInterrupt:
        if main:
            console.print(f"interrupted: {out}/checkpoint holds epoch {progress.epoch}; continue with --resume")
        raise
    if progress.epoch < t.epochs:
        if main:
            console.print(f"stopped after epoch {progress.epoch} of {t.epochs}; continue with --resume")
        return {"epochs_done": progress.epoch}
    return _finish(recipe, out, raw, data, accelerator, progress, attack, fmt, console)


def _advmoe_step(model, raw, x, y, recipe: Recipe, attack, autocast, gen, backward, step, opt_r, opt_e, routers,
                 experts, fail):
    """One AdvMoE batch: router step(s) then expert step (or the reverse), each on its own attack."""
    adv = recipe.advmoe
    kind = "trades" if adv.loss == "trades" else "at"
    phases = ["routers"] * adv.router_steps + ["experts"]
    if adv.order == "experts-first":
        phases = ["experts"] + ["routers"] * adv.router_steps
    shared = None
    loss = logits = None
    for phase in phases:
        loss, logits, x_adv = robust_loss(model, raw, x, y, kind, recipe.train.beta, attack, autocast,
                                          x_adv=shared if adv.shared_attack else None, gen=gen,
                                          balance=recipe.train.balance if phase == "routers" else 0.0)
        shared = x_adv
        if not torch.isfinite(loss):
            raise fail(f"the {phase[:-1]} loss became non-finite")
        backward(loss, routers if phase == "routers" else experts)
        step(opt_r if phase == "routers" else opt_e)
        opt_r.zero_grad(set_to_none=True)
        opt_e.zero_grad(set_to_none=True)
    return loss, logits


def _checksums(model: nn.Module, accelerator: Accelerator) -> list[float]:
    """A float64 sum over every parameter and buffer, from each process: equal when the replicas agree."""
    total = sum(t.detach().double().sum() for t in model.state_dict().values() if t.is_floating_point())
    return [float(v) for v in accelerator.gather(total.reshape(1).to(accelerator.device))]


def _write_csv(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


def _finish(recipe: Recipe, out: Path, raw: nn.Module, data, accelerator, progress, attack, fmt, console) -> dict:
    """Load the best model, evaluate it on the test set, write metrics.json and the summary table."""
    from safetensors.torch import load_model

    load_model(raw, str(out / "model.moe"), strict=False)
    ev = recipe.eval
    test_attack = AttackConfig(eps=attack.eps, steps=ev.pgd_steps, alpha=ev.pgd_alpha if ev.pgd_alpha else attack.eps / 4,
                               norm=attack.norm)
    res = evaluate_robust(raw, data.test, test_attack, ev.batch_size, accelerator, fmt)
    x = to_float(torch.stack([data.test[i][0] for i in range(min(64, len(data.test)))])).to(accelerator.device)
    macs = count_macs(raw, x)
    metrics = {
        "recipe": recipe.name, "method": recipe.train.method, "model": recipe.model.name, "kind": recipe.model.kind,
        "dataset": recipe.data.dataset, "eps": attack.eps, "norm": attack.norm,
        "clean_accuracy": res["clean"], "robust_accuracy": res["robust"], "robust_attack": f"PGD-{ev.pgd_steps}",
        "n_test": res["n"], "macs_per_sample": macs, "best_epoch": progress.best_epoch,
        "best_val_robust": progress.best_val_robust, "eval_seconds": res["seconds"], "history": progress.history,
        "processes": accelerator.num_processes, "weights_checksum_per_process": _checksums(raw, accelerator),
    }
    if accelerator.is_main_process:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        t = Table(title=f"{recipe.name}: {recipe.model.kind} {recipe.model.name}, {recipe.train.method}, "
                        f"{recipe.data.dataset}, eps {attack.eps:g} ({attack.norm})")
        for col in ("epoch", "train loss", "val clean", "val robust", "load balance", "time"):
            t.add_column(col, justify="right")
        for r in progress.history:
            t.add_row(str(r["epoch"]), f"{r['train_loss']:.3f}", f"{r['val_clean']:.1%}", f"{r['val_robust']:.1%}",
                      "-" if r["load_balance"] is None else f"{r['load_balance']:.2f}", f"{r['train_s'] + r['val_s']:.0f}s")
        console.print(t)
        console.print(f"test ({res['n']} images, best epoch {progress.best_epoch}): clean {res['clean']:.2%}, "
                      f"PGD-{ev.pgd_steps} {res['robust']:.2%}; {macs / 1e6:.2f} M MACs/sample; model: {out}/model.moe")
    accelerator.end_training()
    return metrics
