"""The `moeify` command line: convert and inspect (robustify/evaluate build on these)."""
from __future__ import annotations

import math
import os
import sys
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from .errors import MoeifyError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="moeify: turn any CNN into a sparsely-gated Mixture-of-Experts CNN.")
console = Console()
err = Console(stderr=True)
_DEBUG = {"on": False}


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
          allocator: Annotated[str, typer.Option(
              help="CPU memory: 'kept' reuses freed memory for the next tensor (glibc; no fresh pages per "
                   "activation), 'system' leaves the C library's defaults.")] = "kept") -> None:
    _DEBUG["on"] = debug
    if allocator not in ("kept", "system"):
        raise MoeifyError(f"--allocator must be kept or system, not {allocator!r}")
    if allocator == "kept":
        from .allocator import keep_freed_memory

        keep_freed_memory()


def _int_list(text: str, option: str, example: str = "0,1,2", positive: bool = False) -> list[int]:
    """Comma-separated integers of a command-line option, or a one-line error naming it."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise MoeifyError(f"{option} must be comma-separated integers like {example}, got {text!r}") from None
    if positive and any(v < 1 for v in values):
        raise MoeifyError(f"{option} must be positive integers like {example}, got {text!r}")
    return values


def _size(text: str | None) -> tuple[int, ...] | None:
    return None if text is None else tuple(_int_list(text, "--input-size", "3,224,224", positive=True))


def _summary(dense_macs: float, moe_macs: float, n_layers: int) -> None:
    console.print(f"[bold]{n_layers}[/] MoE layers; measured MACs per sample: dense {dense_macs / 1e6:,.1f} M, "
                  f"MoE {moe_macs / 1e6:,.1f} M ({moe_macs / dense_macs:.1%} of dense)")


@app.command()
def convert(
    model: Annotated[str, typer.Argument(help="resnet18, timm:NAME, torchvision:NAME, FILE.py:FUNCTION, or a dense model file (.moe)")],
    experts: Annotated[int, typer.Option(help="Experts (channel groups) per MoE layer.")] = 4,
    top_k: Annotated[Optional[int], typer.Option("--top-k", help="Experts kept per sample [default: experts/2].")] = None,
    scope: Annotated[str, typer.Option(help="auto | hidden | branches | paper")] = "auto",
    cuts: Annotated[str, typer.Option(help="copies | all: which layers sharing channels among groups are cut into parts")] = "copies",
    router: Annotated[str, typer.Option(help="layer | global")] = "layer",
    input_size: Annotated[Optional[str], typer.Option("--input-size", help="C,H,W of one input.")] = None,
    num_classes: Annotated[Optional[int], typer.Option("--num-classes")] = None,
    weights: Annotated[Optional[str], typer.Option("--weights", help="Trained dense weights: a .moe/.safetensors file or a state_dict .pt/.pth.")] = None,
    calibrate: Annotated[Optional[str], typer.Option("--calibrate", help="Dataset whose training images (no labels) cluster the experts and fit the routers.")] = None,
    calibration_size: Annotated[int, typer.Option("--calibration-size", help="Calibration images (a seeded subset).")] = 5000,
    distil_steps: Annotated[int, typer.Option("--distil-steps", help="Then distil the MoE from the dense model for this many steps.")] = 0,
    distil_batch: Annotated[int, typer.Option("--distil-batch", help="Images per distillation step.")] = 128,
    distil_eps: Annotated[Optional[float], typer.Option("--distil-eps", help="Linf radius of the 2-step PGD inputs distilled on too; 0: clean only; default: the eps a .moe dense model was adversarially trained with, else 0.")] = None,
    root: Annotated[Optional[str], typer.Option(help="Dataset folder for --calibrate.")] = None,
    out: Annotated[Optional[str], typer.Option("--out", help="Save the MoE model here (.moe).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite --out if it exists.")] = False,
) -> None:
    """Print the conversion plan, convert, and report the MAC saving (optionally save)."""
    import torch

    from . import convert as convert_model, count_macs, moe_layers, save
    from .spec import MoESpec

    spec = MoESpec(experts=experts, top_k=top_k, scope=scope, router=router, cuts=cuts)
    if out and os.path.exists(out) and not force:
        raise MoeifyError(f"{out} already exists; choose another --out or pass --force to overwrite it")
    if distil_steps and not calibrate:
        raise MoeifyError("--distil-steps needs --calibrate DATASET (the images to distil on)")
    dense = _dense(model, weights, num_classes, _size(input_size))
    calibration = _calibration_images(calibrate, root, calibration_size) if calibrate else None
    moe = convert_model(dense, spec=spec, calibration=calibration)
    if distil_steps:
        from .attacks import AttackConfig
        from .fit import distil

        eps = _trained_eps(model) if distil_eps is None else distil_eps
        attack = AttackConfig(eps=eps, steps=2) if eps > 0 else None
        if attack is not None:
            console.print(f"distilling on clean and 2-step PGD inputs (eps {eps:g})")
        distil(moe, dense, calibration, steps=distil_steps, attack=attack, batch_size=distil_batch)
    moe.eval()
    console.print(moe.moeify_plan)
    x = torch.rand(2, *dense.moeify_input_size)
    _summary(count_macs(dense, x), count_macs(moe, x), len(moe_layers(moe)))
    if out:
        save(moe, out)
        console.print(f"saved to {out}")


def _trained_eps(model: str) -> float:
    """The attack radius a dense .moe model was adversarially trained with (0 when it was not)."""
    from . import io

    if not model.endswith(".moe"):
        return 0.0
    recipe = io.read_info(model).get("extra", {}).get("recipe", {})
    if recipe.get("train", {}).get("method", "standard") == "standard":
        return 0.0
    return float(recipe.get("attack", {}).get("eps", 0.0))


def _dense(model: str, weights: str | None, num_classes: int | None, size: tuple[int, ...] | None):
    """The dense model to convert: built by name (with --weights loaded) or read from a .moe file."""
    from . import create_model, io

    if model.endswith(".moe"):
        if weights:
            raise MoeifyError(f"{model} holds its weights already; drop --weights")
        kind = io.read_info(model).get("kind")
        if kind != "dense":
            raise MoeifyError(f"{model} is not a dense model (it is {kind}); convert a dense one")
        return io.load(model).eval()
    dense = create_model(model, num_classes=num_classes, input_size=size).eval()
    why = io.load_weights(dense, weights) if weights else None
    if why:
        raise MoeifyError(f"--weights {weights} does not fit {model} ({why}); pass the weights of this model")
    return dense


def _calibration_images(dataset: str, root: str | None, n: int):
    """A seeded subset of ``dataset``'s training images, floats in [0, 1]."""
    from .data import calibration_images, load_data

    if n < 1:
        raise MoeifyError(f"--calibration-size must be at least 1, got {n}")
    return calibration_images(load_data(dataset, root, val_size=1000, seed=0), n)


@app.command()
def inspect(path: Annotated[str, typer.Argument(help="A saved .moe file.")]) -> None:
    """Show the plan and the MAC cost of a saved MoE model."""
    import torch

    from . import count_macs, load, moe_layers
    from . import zoo
    from .io import read_info

    info = read_info(path)
    moe = load(path)
    console.print(f"{path}: {info.get('source')} input {tuple(info['input_shape'])}")
    console.print(moe.moeify_plan)
    x = torch.rand(2, *info["input_shape"])
    dense = zoo.rebuild(info["source"], info.get("model_kwargs", {})).eval()
    _summary(count_macs(dense, x), count_macs(moe, x), len(moe_layers(moe)))


@app.command()
def bench(
    model: Annotated[str, typer.Argument(help="Model name, as for convert.")] = "resnet18",
    experts: Annotated[int, typer.Option()] = 2,
    top_k: Annotated[Optional[int], typer.Option("--top-k")] = None,
    scope: Annotated[str, typer.Option(help="auto | hidden | branches | paper")] = "auto",
    cuts: Annotated[str, typer.Option(help="copies | all (see convert)")] = "copies",
    batch: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,16",
    repeats: Annotated[int, typer.Option()] = 10,
    device: Annotated[str, typer.Option(help="cpu | cuda")] = "cpu",
    mode: Annotated[str, typer.Option(help="eval (inference) | train (forward + backward step)")] = "eval",
    routing: Annotated[str, typer.Option(help="spread (samples take different routes, as after training) | model (the untrained routers' choice)")] = "spread",
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile every variant.")] = False,
    compile_mode: Annotated[Optional[str], typer.Option("--compile-mode", help="torch.compile's mode (implies --compile): default | reduce-overhead (CUDA graphs) | max-autotune | ...")] = None,
    input_size: Annotated[Optional[str], typer.Option("--input-size", help="C,H,W of one input.")] = None,
    sweep: Annotated[bool, typer.Option("--sweep", help="experts 2, 4, 8 at top_k = experts/2 (ignores --experts/--top-k; with --calibrate, every reference model at each).")] = False,
    json_out: Annotated[Optional[str], typer.Option("--json", help="Also write the rows as JSON here.")] = None,
    model_kwargs: Annotated[Optional[str], typer.Option("--model-kwargs", help="Constructor arguments, e.g. width=16,stem_stride=2.")] = None,
    calibrate: Annotated[Optional[str], typer.Option("--calibrate", help="Instead: measure the table the auto strategy reads (reference models, --batch sizes, --device) and write it here; auto uses it where MOEIFY_CALIBRATION names it.")] = None,
    fold_bn: Annotated[bool, typer.Option("--fold-bn", help="Fold every variant's BatchNorms into its convs first, as deployed inference does (eval only).")] = False,
    strategies: Annotated[Optional[str], typer.Option(help="Comma-separated MoE strategies to time (default: all; dense and the twins always are); fewer compile faster.")] = None,
) -> None:
    """Time dense, static twin (+ routers) and the MoE under every execution strategy (interleaved, medians)."""
    import json

    from .bench import STRATEGIES, compare, convert_seconds, machine, rows_as_dicts, variants_for
    from .bench import sweep as run_sweep
    from .nn.executors.auto import table_source
    from .spec import MoESpec

    _check_device(device)
    if mode not in ("eval", "train"):
        raise MoeifyError(f"--mode must be eval or train, not {mode!r}")
    if routing not in ("spread", "model"):
        raise MoeifyError(f"--routing must be spread or model, not {routing!r}")
    if json_out and os.path.exists(json_out):
        raise MoeifyError(f"{json_out} exists; choose another --json path (nothing was overwritten)")
    if fold_bn and (mode != "eval" or calibrate):
        raise MoeifyError("--fold-bn folds inference BatchNorm: use it with --mode eval and without --calibrate")
    if compile_mode is not None:
        import torch._inductor

        modes = list(torch._inductor.list_mode_options())
        if compile_mode not in modes:
            raise MoeifyError(f"--compile-mode must be one of {', '.join(modes)}, not {compile_mode!r}")
    batches = _int_list(batch, "--batch", "1,16", positive=True)
    chosen = STRATEGIES if strategies is None else tuple(s.strip() for s in strategies.split(",") if s.strip())
    variants_for(chosen)  # refused before any model is built
    if calibrate:
        if strategies is not None:
            raise MoeifyError("--calibrate measures every strategy, which auto chooses among: drop --strategies")
        _calibrate(calibrate, batches, repeats, device, mode, (2, 4, 8) if sweep else (2,))
        return
    size = _size(input_size)
    kw = dict(repeats=repeats, device=device, mode=mode, compile=compile or compile_mode is not None, routing=routing,
              input_size=size, model_kwargs=_kwargs(model_kwargs), fold_bn=fold_bn, compile_mode=compile_mode or "default",
              strategies=chosen)
    if sweep:
        conv_s = None
        rows = run_sweep(model, batches, scope=scope, cuts=cuts, **kw)
    else:
        spec = MoESpec(experts=experts, top_k=top_k, scope=scope, cuts=cuts)
        conv_s = convert_seconds(model, spec, input_size=size, model_kwargs=kw["model_kwargs"])
        rows = compare(model, spec, batches, **kw)
    title = f"{model} scope={scope} {mode} on {device} ({machine(device)}), routing {routing}, auto's table {table_source()}"
    if fold_bn:
        title += ", BatchNorm folded"
    if kw["compile"]:
        title += f", compiled (mode {kw['compile_mode']})"
    if conv_s is not None:
        title += f"; convert: {conv_s:.2f} s"
    # piped output has no width to fit: wide enough that no interval folds
    out = console if console.is_terminal else Console(width=max(console.width, 120))
    out.print(_bench_table(rows, title))
    if json_out:
        with open(json_out, "w") as f:
            json.dump({"machine": machine(device), "auto_table": table_source(), "convert_seconds": conv_s,
                       "batchnorm_folded": fold_bn, "rows": rows_as_dicts(rows)}, f, indent=2)


def _calibrate(path: str, batches: list[int], repeats: int, device: str, mode: str,
               experts: tuple[int, ...]) -> None:
    """Measure the table the auto strategy reads and write it to ``path`` (never over a file that
    was there), rewritten after each reference model."""
    import json

    from .bench import calibrate
    from .nn.executors.auto import MACHINE_TABLE

    if os.path.exists(path):
        raise MoeifyError(f"{path} exists; choose another --calibrate path (nothing was overwritten)")

    def write(table: dict) -> None:  # after each reference model, whole (a stopped run keeps what it measured)
        with open(f"{path}.part", "w") as f:
            json.dump(table, f, indent=2)
        os.replace(f"{path}.part", path)

    table = calibrate(batches, repeats, device, mode, experts, measured=write)
    console.print(f"calibration for {device} ({table['machine']}) written to {path}; auto reads it where "
                  f"{MACHINE_TABLE}={path} is set (in place of the shipped table's {device} {mode} points)",
                  soft_wrap=True)  # unbroken: the path is there to copy


def _bench_table(rows: list, title: str):
    from rich.table import Table

    t = Table(title=title, caption="(95% intervals: paired bootstrap over the interleaved rounds)")
    for col in ("experts", "batch", "variant", "ms / batch", "MACs / sample", "speed-up", "MAC-ideal",
                "of twin's gain"):
        t.add_column(col, justify="right", overflow="fold")  # a narrow terminal folds, never cuts, an interval
    for r in rows:
        fixed = r.variant in ("dense", "static twin")  # the references: no interval
        speedup = f"{r.speedup:.2f}x" + ("" if r.variant == "dense" else _interval(r.speedup_low, r.speedup_high, "{:.2f}"))
        share = "" if r.variant == "dense" else ("-" if math.isnan(r.of_twin) else f"{r.of_twin:.0%}" + (
            "" if fixed else _interval(r.of_twin_low, r.of_twin_high, "{:.0%}")))
        variant = f"{r.variant} ({r.runs})" if r.runs else r.variant  # auto: what it ran at this batch
        t.add_row(f"{r.top_k}/{r.experts}", str(r.batch), variant, f"{r.ms:.2f}", f"{r.macs / 1e6:,.1f} M",
                  speedup, f"{r.ideal:.2f}x", share)
    return t


def _interval(low: float, high: float, fmt: str) -> str:
    return "" if math.isnan(low) else f" ({fmt.format(low)}–{fmt.format(high)})"


def _kwargs(text: str | None) -> dict:
    """``a=1,b=x`` -> {"a": 1, "b": "x"} (values read as YAML scalars)."""
    import yaml

    out = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise MoeifyError(f"--model-kwargs: {item!r} is not key=value (e.g. width=16,stem_stride=2)")
        out[key.strip()] = yaml.safe_load(value)
    return out


@app.command("bench-train")
def bench_train(
    recipe: Annotated[str, typer.Option("--recipe", help="Recipe whose backbone, data shape and attack to use.")] = "quickstart",
    batch: Annotated[Optional[int], typer.Option(help="Batch size (default: the recipe's).")] = None,
    repeats: Annotated[int, typer.Option()] = 5,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Recipe override, e.g. attack.steps=10.")] = None,
    device: Annotated[str, typer.Option(help="cpu | cuda")] = "cpu",
) -> None:
    """Time one training batch: dense TRADES vs S-Dense TRADES (with and without the MoE's
    routers: the floor under the MoE) vs MoE TRADES vs MoE AdvMoE (medians, interleaved, with 95%
    intervals; ``--set train.compile=true`` compiles every model as training does)."""
    from rich.table import Table

    from .bench import machine, train_steps

    _check_device(device)
    rows = train_steps(recipe, batch, repeats, set_ or [], device)
    t = Table(title=f"one training batch, recipe {recipe}, batch {rows[0]['batch']}, "
                    f"{rows[0]['attack_steps']}-step attacks{', compiled' if rows[0]['compiled'] else ''}"
                    f"{', channels-last' if rows[0]['channels_last'] else ''}, AdvMoE loss {rows[0]['advmoe_loss']}"
                    f"{', one shared attack' if rows[0]['shared_attack'] else ', an attack per step'} "
                    f"on {device} ({machine(device)})",
              caption="(95% intervals: paired bootstrap over the interleaved rounds)")
    for col in ("variant", "ms / batch", "vs dense TRADES", "of S-Dense's gain"):
        t.add_column(col, justify="right", overflow="fold")
    for r in rows:
        fixed = r["variant"] in ("dense TRADES", "S-Dense TRADES")  # the references: no interval
        ratio = f"{r['vs_dense_trades']:.2f}x" + ("" if fixed else _interval(
            r["vs_dense_trades_low"], r["vs_dense_trades_high"], "{:.2f}"))
        share = "" if fixed else ("-" if math.isnan(r["of_sdense_gain"]) else f"{r['of_sdense_gain']:.0%}" + _interval(
            r["of_sdense_gain_low"], r["of_sdense_gain_high"], "{:.0%}"))
        t.add_row(r["variant"], f"{r['ms']:.1f}", ratio, share)
    out = console if console.is_terminal else Console(width=max(console.width, 100))
    out.print(t)


@app.command()
def evaluate(
    target: Annotated[str, typer.Argument(help="A run folder (from robustify) or a saved .moe model file.")],
    dataset: Annotated[Optional[str], typer.Option(help="Dataset (default: the run's recipe).")] = None,
    root: Annotated[Optional[str], typer.Option(help="Dataset folder (default: the recipe's data.root).")] = None,
    n: Annotated[Optional[int], typer.Option("--n", "--num-examples", help="Evaluate a fixed, seeded subset of this many test images (default: all); --num-examples under launchers that take --n for their own options.")] = None,
    eps: Annotated[Optional[float], typer.Option(help="Attack radius in pixel units (default: the recipe's).")] = None,
    norm: Annotated[Optional[str], typer.Option(help="linf | l2 (default: the recipe's).")] = None,
    attacks: Annotated[str, typer.Option(help="Comma-separated: pgd, autoattack, adaptive, square, sweep.")] = "pgd,autoattack,adaptive,sweep",
    pgd_steps: Annotated[int, typer.Option("--pgd-steps")] = 20,
    restarts: Annotated[int, typer.Option()] = 1,
    square_queries: Annotated[int, typer.Option("--square-queries")] = 1000,
    autoattack: Annotated[str, typer.Option("--autoattack", help="standard, or a comma-separated subset run with the standard settings: apgd-ce, apgd-t, fab-t, square.")] = "standard",
    autoattack_targets: Annotated[int, typer.Option("--autoattack-targets", help="Target classes of APGD-T and FAB-T in a subset run (the standard suite's 9; fewer cost less).")] = 9,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 500,
    out: Annotated[Optional[str], typer.Option("--out", help="Folder for report.json and plots (default: TARGET's folder / eval).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the evaluation stopped in --out (finished attacks are kept).")] = False,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the model the attacks call (faster on a GPU; the same results).")] = False,
) -> None:
    """Honest robustness evaluation: clean, PGD, AutoAttack, MoE-adaptive attacks, router/expert dissection."""
    from pathlib import Path

    from .eval_file import EvalRequest, evaluate_file, model_file
    from .report import table

    req = EvalRequest(model_file=str(model_file(target)), dataset=dataset, root=root, n=n, eps=eps, norm=norm,
                      attacks=_items(attacks), pgd_steps=pgd_steps, restarts=restarts, square_queries=square_queries,
                      autoattack=() if autoattack == "standard" else _items(autoattack),
                      autoattack_targets=autoattack_targets, batch_size=batch_size, compile=compile)
    req.check()
    path = Path(target)
    out_dir = Path(out) if out else (path if path.is_dir() else path.parent) / "eval"
    rep = evaluate_file(req, out_dir, resume=resume, log=lambda s: err.print(s, highlight=False, markup=False))
    if rep is None:  # not the main process
        return
    console.print(table(rep, f"{req.model_file}: {rep['kind']} {rep['model']} on {rep['dataset']} "
                             f"({rep['n_examples']} test images)"))
    console.print(f"report: {out_dir / 'report.json'} (and its plots)")


def _check_device(device: str) -> None:
    """A one-line error for a --device that is neither cpu nor a visible CUDA GPU."""
    import torch

    if device != "cpu" and not device.startswith("cuda"):
        raise MoeifyError(f"--device must be cpu or cuda, not {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MoeifyError("--device cuda asked for, but no CUDA GPU is visible; use --device cpu")


def _items(text: str) -> tuple[str, ...]:
    return tuple(a.strip() for a in text.split(",") if a.strip())


@app.command()
def robustify(
    recipe: Annotated[Optional[str], typer.Option("--recipe", help="A built-in recipe name (quickstart, advmoe, at, trades, standard, ...) or a .yaml path.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a recipe value, e.g. --set train.epochs=5 (repeatable).")] = None,
    out: Annotated[Optional[str], typer.Option("--out", help="Run folder (created; must be new or empty unless --resume).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last checkpoint.")] = False,
    stop_after: Annotated[Optional[int], typer.Option("--stop-after", help="End this session after N epochs (resumable).")] = None,
) -> None:
    """Train a recipe's model (dense, S-Dense or MoE) robustly: standard, PGD-AT, TRADES or AdvMoE."""
    from pathlib import Path

    import yaml

    from .recipes import load_recipe, recipe_from_dict
    from .train import robustify as run

    if resume:
        if not out:
            raise MoeifyError("--resume needs --out DIR (the run to continue)")
        if recipe or set_:
            raise MoeifyError("--resume continues with the run's saved recipe (DIR/recipe.yaml); drop --recipe/--set")
        saved = Path(out) / "recipe.yaml"
        if not saved.is_file():
            raise MoeifyError(f"{out} is not a moeify run folder (no recipe.yaml); start it without --resume")
        r = recipe_from_dict(yaml.safe_load(saved.read_text()), str(saved))
    else:
        r = load_recipe(recipe or "quickstart", set_ or [])
        out = out or f"runs/{r.name}"
    run(r, out, resume=resume, stop_after=stop_after, console=console)


@app.command()
def study(
    study_file: Annotated[str, typer.Argument(help="A study file (.yaml) or a built-in study name (fmnist).")],
    out: Annotated[Optional[str], typer.Option("--out", help="Study folder (rerun with the same --out to resume).")] = None,
    results: Annotated[Optional[str], typer.Option("--results", help="Results page to write (default: OUT/results.md).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override the base recipe for every row, e.g. --set data.train_subset=512.")] = None,
    n: Annotated[Optional[int], typer.Option("--n", help="Test images to evaluate on (default: the study file's).")] = None,
    seeds: Annotated[Optional[str], typer.Option("--seeds", help="Training seeds, e.g. 0,1,2 (default: the study file's).")] = None,
) -> None:
    """Reproduce the AdvMoE study: train and evaluate every row once per seed, time it, write the results page."""
    from .study import run_study

    seed_list = _int_list(seeds, "--seeds") if seeds else None
    run_study(study_file, out or f"runs/study-{study_file.rsplit('/', 1)[-1].removesuffix('.yaml')}", results,
              set_ or [], n, console=console, log=lambda s: err.print(s, highlight=False, markup=False), seeds=seed_list)


def main() -> None:
    """Entry point: one-line errors and a non-zero exit, tracebacks only with --debug."""
    try:
        app(standalone_mode=False)
    except MoeifyError as e:
        if _DEBUG["on"]:
            raise
        err.print(f"[red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        err.print("aborted")
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:  # click usage errors and anything unexpected
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if _DEBUG["on"]:
            raise
        err.print(f"[red]error:[/] {type(e).__name__}: {escape(str(e))} (rerun with --debug for the traceback)",
                  highlight=False, soft_wrap=True)
        sys.exit(1)
