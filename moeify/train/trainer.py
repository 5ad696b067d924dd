"""``Trainer``: one run's state in one place, one named step per training method, an explicit loop.

Per epoch: train (``standard_step`` / ``at_step`` / ``trades_step`` / ``advmoe_step``, the last made of
``router_step`` and ``expert_step``), validate (clean and PGD accuracy on the held-out split,
expert load), keep the best model by validation robust accuracy, write a resumable checkpoint.
``finish`` evaluates the best model on the test set (clean and PGD-20).
"""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn
from torch.utils.data import DataLoader

from .. import io
from ..attacks import AttackConfig
from ..conversion import moe_layers
from ..nn import execution
from ..nn.policy import Soft, routing_policy
from ..data import augment, load_data, to_float
from ..errors import MoeifyError, RoutingError
from ..macs import count_macs
from ..recipes import Recipe
from . import checkpoint as ckpt
from .build import build_model, hold_frozen_norms, load_init, split_parameters, training_layout
from .methods import advmoe_kind, robust_loss
from .sampler import EpochSampler
from .schedule import lr_lambda
from .summary import checksums, print_summary, write_csv
from .validate import collapse_warning, evaluate_robust, expert_load


class Trainer:
    """Train ``recipe``'s model into run folder ``out`` (see the module docstring)."""

    def __init__(self, recipe: Recipe, out: Path, accelerator: Accelerator, console: Console) -> None:
        self.recipe, self.out, self.acc, self.console = recipe, out, accelerator, console
        self.t, self.main = recipe.train, accelerator.is_main_process
        set_seed(self.t.seed)  # the model's initial weights
        d = recipe.data
        self.data = load_data(d.dataset, d.root, d.val_size, self.t.seed, d.download, d.train_subset, d.test_subset)
        if d.batch_size % accelerator.num_processes:
            raise MoeifyError(f"data.batch_size {d.batch_size} must divide among {accelerator.num_processes} processes")
        self.fmt = training_layout(recipe, accelerator.device)
        self._build_model()
        self._build_optimisers()
        self._prepare()
        a, ev = recipe.attack, recipe.eval
        self.attack = AttackConfig(eps=a.eps, steps=a.steps, alpha=a.alpha, norm=a.norm, random_start=a.random_start,
                                   restarts=a.restarts, bn_mode=a.bn_mode)
        self.val_attack = AttackConfig(eps=a.eps, steps=ev.val_pgd_steps, alpha=ev.pgd_alpha, norm=a.norm)
        self.progress = ckpt.Progress()
        self.gen = torch.Generator()

    # ---- set-up ----
    def _build_model(self) -> None:
        model = build_model(self.recipe, self.data)
        if self.t.init and self.recipe.moe.experts_by != "cluster":  # (cluster: the dense weights were converted)
            load_init(model, self.t.init)
        self.model = model.to(self.acc.device, memory_format=self.fmt)
        self.routers, self.experts = split_parameters(self.model)
        for p in self.experts if self.t.update == "routers" else self.routers if self.t.update == "experts" else ():
            p.requires_grad_(False)
        self.train_routers = bool(self.routers) and self.t.update != "experts"
        self.train_experts = self.t.update != "routers"

    def _build_optimisers(self) -> None:
        t, adv = self.t, self.recipe.advmoe
        advmoe = t.method == "advmoe"
        self.opt_e = torch.optim.SGD(self.experts, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
        self.opt_r = None if not self.routers else torch.optim.SGD(
            self.routers, lr=adv.router_lr if advmoe else t.lr, momentum=adv.router_momentum,
            weight_decay=adv.router_weight_decay)
        self.loader = DataLoader(self.data.train, batch_size=self.recipe.data.batch_size, drop_last=True,
                                 sampler=EpochSampler(len(self.data.train), t.seed), num_workers=self.recipe.data.workers)
        self.steps = len(self.loader) if t.max_steps_per_epoch is None else min(len(self.loader), t.max_steps_per_epoch)
        total, warm = t.epochs * self.steps, round(t.warmup_epochs * self.steps)
        self.sched_e = torch.optim.lr_scheduler.LambdaLR(self.opt_e, lr_lambda(t.schedule, total, warm))
        self.sched_r = None if self.opt_r is None else torch.optim.lr_scheduler.LambdaLR(
            self.opt_r, lr_lambda(adv.router_schedule if advmoe else t.schedule, total, warm))

    def _prepare(self) -> None:
        # prepare: DDP-wrap the model, shard each batch across processes, wrap the optimisers
        opts = [o for o in (self.opt_e, self.opt_r) if o is not None]
        self.model, *opts, self.loader = self.acc.prepare(self.model, *opts, self.loader)
        self.opt_e, self.opt_r = opts[0], (opts[1] if len(opts) > 1 else None)
        self.acc.register_for_checkpointing(*[s for s in (self.sched_e, self.sched_r) if s is not None])
        self.raw = self.acc.unwrap_model(self.model)  # no DDP hooks: what attacks differentiate and what is saved
        self.fwd, self.attacked = self.model, self.raw  # what the training forward and the training attack call
        if self.t.compile:  # one graph per mode (train; eval for bn_mode eval attacks), static routing inside
            self.fwd, self.attacked = torch.compile(self.model), torch.compile(self.raw)
            if self.main and self.acc.device.type == "cpu" and moe_layers(self.raw):
                self.console.print("train.compile on a CPU: compiled MoE layers run the static strategy, which computes "
                                   "every expert's channels here; eager training is faster on a CPU "
                                   "(docs/benchmarks.md)", style="yellow", markup=False)
        self.scaler = torch.amp.GradScaler(self.acc.device.type) if self.t.mixed_precision == "fp16" else None

    def start(self, resume: bool) -> None:
        """Load the run's checkpoint, or write the epoch-0 one (so a kill in the first epoch is resumable)."""
        path = ckpt.checkpoint_dir(self.out) if resume else None
        if path is not None:
            self.progress = ckpt.load(self.acc, path)
            if self.main:
                self.console.print(f"resuming {self.out} after epoch {self.progress.epoch}")
        else:
            ckpt.save(self.acc, self.out, self.progress)

    # ---- the training methods: one named step each ----
    def standard_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._joint_step("standard", x, y)

    def at_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._joint_step("at", x, y)

    def trades_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._joint_step("trades", x, y)

    def advmoe_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """AdvMoE: router step(s) then the expert step (or the reverse), each on its own attack unless
        ``advmoe.shared_attack`` reuses the first one."""
        adv = self.recipe.advmoe
        phases = [self.router_step] * adv.router_steps + [self.expert_step]
        if adv.order == "experts-first":
            phases = [self.expert_step] + [self.router_step] * adv.router_steps
        shared = None
        for phase in phases:
            loss, logits, x_adv = phase(x, y, shared if adv.shared_attack else None)
            shared = x_adv
        return loss, logits

    def router_step(self, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor | None = None):
        """Update the routers only, on the robust loss (plus ``train.balance``): (loss, logits, x_adv)."""
        return self._part_step(self.routers, self.opt_r, "router", x, y, x_adv, self.t.balance, self.t.z_loss)

    def expert_step(self, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor | None = None):
        """Update everything but the routers, on the robust loss: (loss, logits, x_adv)."""
        return self._part_step(self.experts, self.opt_e, "expert", x, y, x_adv, 0.0, 0.0)

    def _joint_step(self, kind: str, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self.acc.accumulate(self.model):  # gradient accumulation and DDP's no-sync between micro-steps
            loss, logits, _ = robust_loss(self.fwd, self.attacked, x, y, kind, self.t.beta, self.attack,
                                          self._autocast, gen=self.gen, balance=self.t.balance, zloss=self.t.z_loss)
            self._check_finite(loss, "training")
            self._backward(loss, None)
            if self.train_experts:
                self._update(self.opt_e)
            if self.train_routers:
                self._update(self.opt_r)
            self._zero_grad()
        return loss, logits

    def _part_step(self, params, opt, name: str, x, y, x_adv, balance: float, zloss: float):
        kind = advmoe_kind(self.recipe.advmoe.loss)
        loss, logits, x_adv = robust_loss(self.fwd, self.attacked, x, y, kind, self.t.beta, self.attack,
                                          self._autocast, x_adv=x_adv, gen=self.gen, balance=balance, zloss=zloss)
        self._check_finite(loss, name)
        self._backward(loss, params)
        self._update(opt)
        self._zero_grad()
        return loss, logits, x_adv

    # ---- one update ----
    def _autocast(self):
        precision = self.t.mixed_precision
        if precision == "no":
            return contextlib.nullcontext()
        return torch.autocast(self.acc.device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)

    def _backward(self, loss: torch.Tensor, params: list[nn.Parameter] | None) -> None:
        # backward: through Accelerate (DDP's all-reduce); gradients only for ``params`` in one process
        kw = {"inputs": params} if (self.acc.num_processes == 1 and params) else {}
        if self.scaler is not None:
            self.scaler.scale(loss).backward(**kw)
        else:
            self.acc.backward(loss, **kw)

    def _update(self, opt) -> None:
        if self.t.grad_clip and self.acc.sync_gradients:  # clip the accumulated gradient, not a partial sum
            if self.scaler is not None:
                self.scaler.unscale_(opt)
            params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
            self.acc.clip_grad_norm_(params, self.t.grad_clip)
        if self.scaler is not None:
            self.scaler.step(opt)
            self.scaler.update()
        else:
            opt.step()

    def _zero_grad(self) -> None:
        for opt in (self.opt_e, self.opt_r):
            if opt is not None:
                opt.zero_grad(set_to_none=True)

    def _check_finite(self, loss: torch.Tensor, name: str) -> None:
        if not torch.isfinite(loss):
            raise self._failure(f"the {name} loss became non-finite")

    def _failure(self, why: str) -> MoeifyError:
        e = self.progress.epoch
        return MoeifyError(f"{why} at epoch {e + 1}; the run stopped; the last good checkpoint (epoch {e}) is in "
                           f"{self.out}/checkpoint; lower the learning rate or set train.grad_clip, and --resume")

    # ---- the loop ----
    def fit(self, stop_after: int | None = None) -> None:
        """Train the remaining epochs (at most ``stop_after`` of them in this session)."""
        done = 0
        for epoch in range(self.progress.epoch + 1, self.t.epochs + 1):
            if stop_after is not None and done >= stop_after:
                break
            sums, train_s = self.train_epoch(epoch)
            self.end_epoch(epoch, sums, train_s)
            done += 1

    def train_epoch(self, epoch: int) -> tuple[dict, float]:
        """One pass over the training data; returns the loss/accuracy sums and the seconds taken."""
        self.loader.set_epoch(epoch - 1)  # Accelerate's loader counts from 0 and passes it to the sampler
        rank_seed = self.t.seed * 100_003 + epoch * 7919 + self.acc.process_index
        torch.manual_seed(rank_seed)  # dropout and the like; attacks and augmentation use self.gen
        self.gen = torch.Generator().manual_seed(rank_seed)
        self.model.train()
        hold_frozen_norms(self.raw, self.t.update)
        if self.train_routers:
            self._revive_dead(epoch)
        step = getattr(self, f"{self.t.method}_step")
        start, sums = time.time(), {"loss": 0.0, "correct": 0, "n": 0}
        with self._bar(epoch) as advance:
            for i, (x, y) in enumerate(self.loader):
                if i >= self.steps:
                    break
                x = self._batch(x)
                self._set_exploration((epoch - 1) * self.steps + i)
                try:
                    with self._routing((epoch - 1) * self.steps + i):
                        loss, logits = step(x, y)
                except RoutingError as e:
                    raise self._failure(f"a router produced non-finite scores ({e})") from None
                for sched, on in ((self.sched_e, self.train_experts), (self.sched_r, self.train_routers)):
                    if on:
                        sched.step()
                sums["loss"] += loss.item() * len(y)
                sums["correct"] += int((logits.argmax(1) == y).sum())
                sums["n"] += len(y)
                advance(f"loss {sums['loss'] / sums['n']:.3f} acc {sums['correct'] / sums['n']:.1%}")
        return sums, time.time() - start

    def _set_exploration(self, step: int) -> None:
        """``train.router_noise`` annealed linearly to 0 over the run, and ``train.expert_dropout``,
        on every MoE layer (both act in training mode only)."""
        if self.t.router_noise or self.t.expert_dropout:
            scale = self.t.router_noise * max(0.0, 1.0 - step / max(1, self.t.epochs * self.steps))
            for layer in moe_layers(self.raw).values():
                layer.noise, layer.expert_dropout = scale, self.t.expert_dropout

    def _revive_dead(self, epoch: int) -> None:
        """``train.revive_dead``: an expert that the last validation routed less than that share of an
        even load to gets a perturbed copy of its layer's busiest expert's router row
        (``LayerRouter.revive``); seeded by run, epoch, layer and expert, so a resumed run and every
        process revive alike."""
        if not self.t.revive_dead or not self.progress.history:
            return
        loads = self.progress.history[-1].get("expert_load") or {}
        for i, (name, layer) in enumerate(moe_layers(self.raw).items()):
            load = loads.get(name, {}).get("load")
            if layer.router is None or not load:
                continue
            busiest = max(range(len(load)), key=load.__getitem__)
            for e, share in enumerate(load):
                if share < self.t.revive_dead / len(load):
                    gen = torch.Generator().manual_seed(self.t.seed * 100_003 + epoch * 7919 + i * 101 + e)
                    layer.router.revive(e, busiest, gen)
                    if self.main:
                        self.console.print(f"epoch {epoch}: {name}: expert {e} (load {share:.2f}) revived from "
                                           f"expert {busiest} (train.revive_dead)")

    def _routing(self, step: int):
        """Soft routing (every expert, weighted by K x the router's softmax; masked execution) for
        the first ``train.soft_warmup`` share of the run's steps, so every expert trains on every
        input before hard top-K routing starts; hard routing afterwards."""
        if step < self.t.soft_warmup * self.t.epochs * self.steps and moe_layers(self.raw):
            stack = contextlib.ExitStack()
            stack.enter_context(routing_policy(Soft()))
            stack.enter_context(execution("masked"))
            return stack
        return contextlib.nullcontext()

    def _batch(self, x: torch.Tensor) -> torch.Tensor:
        x = to_float(x)
        if self.recipe.data.augment:
            x = augment(x, self.gen)
        return x.contiguous(memory_format=self.fmt)

    @contextlib.contextmanager
    def _bar(self, epoch: int):
        bar = Progress(TextColumn("epoch {task.fields[epoch]}/{task.fields[epochs]}"), BarColumn(),
                       MofNCompleteColumn(), TextColumn("{task.fields[stats]}"), TimeElapsedColumn(),
                       TimeRemainingColumn(), console=self.console, disable=not self.main, transient=True)
        with bar:
            task = bar.add_task("train", total=self.steps, epoch=epoch, epochs=self.t.epochs, stats="")
            yield lambda stats: bar.update(task, advance=1, stats=stats)

    def end_epoch(self, epoch: int, sums: dict, train_s: float) -> None:
        """Validate, keep the best model, write the checkpoint and the epoch's line."""
        ev = self.recipe.eval
        val = evaluate_robust(self.raw, self.data.val, self.val_attack, ev.batch_size, self.acc, self.fmt)
        load = expert_load(self.raw, self.data.val, ev.batch_size, self.acc, self.fmt)
        n = max(1, sums["n"])
        row = {"epoch": epoch, "train_loss": sums["loss"] / n, "train_acc": sums["correct"] / n,
               "val_clean": val["clean"], "val_robust": val["robust"], "lr": self.sched_e.get_last_lr()[0],
               "train_s": round(train_s, 1), "val_s": round(val["seconds"], 1),
               "load_balance": None if load is None else load["entropy"],
               "load_min": None if load is None else load["min_entropy"],
               "expert_load": None if load is None else load["layers"]}
        self.progress.epoch = epoch
        self.progress.history.append(row)
        with ckpt.writing(self.out):
            if val["robust"] > self.progress.best_val_robust:
                self.progress.best_val_robust, self.progress.best_epoch = val["robust"], epoch
                if self.main:
                    io.save(self.raw, self.out / "model.moe", extra={"recipe": self.recipe.to_dict(), "epoch": epoch})
            ckpt.save(self.acc, self.out, self.progress)
            if self.main:
                write_csv(self.out / "metrics.csv", self.progress.history)
        if self.main:
            lb = "-" if load is None else " ".join(f"{v['entropy']:.2f}" for v in load["layers"].values())
            self.console.print(
                f"epoch {epoch}/{self.t.epochs}  loss {row['train_loss']:.3f}  train acc {row['train_acc']:.1%}  "
                f"val clean {val['clean']:.1%}  val PGD-{ev.val_pgd_steps} {val['robust']:.1%}  lr {row['lr']:.4f}  "
                f"expert-load entropy per layer {lb}  {train_s:.0f}s + {val['seconds']:.0f}s")
            warning = collapse_warning(load)
            if warning:
                self.console.print(warning, style="yellow", markup=False)
            self.acc.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=epoch)

    def finish(self) -> dict:
        """Load the best model, evaluate it on the test set, write metrics.json and the summary table."""
        from safetensors.torch import load_model

        load_model(self.raw, str(self.out / "model.moe"), strict=False)
        ev, attack = self.recipe.eval, self.attack
        test_attack = AttackConfig(eps=attack.eps, steps=ev.pgd_steps, norm=attack.norm,
                                   alpha=ev.pgd_alpha if ev.pgd_alpha else attack.eps / 4)
        res = evaluate_robust(self.raw, self.data.test, test_attack, ev.batch_size, self.acc, self.fmt)
        test = self.data.test
        x = to_float(torch.stack([test[i][0] for i in range(min(64, len(test)))])).to(self.acc.device)
        r = self.recipe
        metrics = {
            "recipe": r.name, "method": r.train.method, "model": r.model.name, "kind": r.model.kind,
            "dataset": r.data.dataset, "eps": attack.eps, "norm": attack.norm,
            "clean_accuracy": res["clean"], "robust_accuracy": res["robust"], "robust_attack": f"PGD-{ev.pgd_steps}",
            "n_test": res["n"], "macs_per_sample": count_macs(self.raw, x), "best_epoch": self.progress.best_epoch,
            "best_val_robust": self.progress.best_val_robust, "eval_seconds": res["seconds"],
            "history": self.progress.history, "processes": self.acc.num_processes,
            "weights_checksum_per_process": checksums(self.raw, self.acc),
            "expert_load_test": expert_load(self.raw, test, ev.batch_size, self.acc, self.fmt),
        }
        if self.main:
            with ckpt.writing(self.out):
                write_csv(self.out / "metrics.csv", self.progress.history)
                tmp = self.out / "metrics.json.tmp"
                tmp.write_text(json.dumps(metrics, indent=2))
                tmp.replace(self.out / "metrics.json")
            print_summary(self.console, r, metrics, self.out)
        self.acc.end_training()
        return metrics
