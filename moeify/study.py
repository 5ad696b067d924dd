"""The AdvMoE study with moeify's own pieces: train every row of a study file, evaluate it, time it,
and write the results page.

A study file names a base recipe and rows (each a list of ``--set`` overrides of it), the
router-versus-expert analysis (fine-tunes of one row's model that adversarially train the routers,
the experts or both), and the evaluation. Every step writes its result into the study folder, so a
rerun skips what is done and resumes a half-trained row: the study is resumable at any point.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from . import io
from .bench import interleaved, machine
from .data import as_tensors, load_data
from .errors import MoeifyError
from .eval_file import EvalRequest, evaluate_file
from .evaluate import AA_ATTACKS
from .lock import folder_lock
from .recipes import Recipe, apply_overrides, build_config, check, find_recipe

STUDY_DIRS = (Path(__file__).resolve().parent.parent / "studies",)
MARKER = "<!-- everything above this line is written by `moeify study`; notes below it are kept -->"


@dataclass
class Row:
    name: str
    set: list = field(default_factory=list)  # --set overrides of the base recipe


@dataclass
class Dissection:
    """Routers x experts: fine-tunes of ``init``'s model, each updating one part adversarially."""
    init: str = ""  # the row whose model is the standard (router, expert) pair
    set: list = field(default_factory=list)  # overrides of the fine-tunes (method, epochs, ...)


@dataclass
class StudyEval:
    n: int = 1000  # a fixed, seeded subset of the test set
    attacks: list = field(default_factory=lambda: ["pgd", "autoattack", "adaptive"])
    autoattack: list = field(default_factory=list)  # a subset of AutoAttack's suite; [] = standard
    pgd_steps: int = 20
    square_queries: int = 1000
    batch_size: int = 500
    latency_batch: int = 1
    latency_repeats: int = 50


@dataclass
class Reference:
    """Published numbers shown beside the measured ones (e.g. the paper's CIFAR-10 figures)."""
    title: str = ""
    columns: list = field(default_factory=list)
    rows: list = field(default_factory=list)


@dataclass
class Study:
    name: str = "study"
    title: str = ""
    base: Any = "quickstart"  # a recipe name/path or an inline recipe mapping
    rows: list = field(default_factory=list)
    dissection: Dissection | None = None
    evaluate: StudyEval = field(default_factory=StudyEval)
    reference: Reference | None = None


def find_study(name_or_path: str) -> Path:
    """A study file from a path or a built-in name (``fmnist`` -> studies/fmnist.yaml)."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or "/" in name_or_path:
        if not p.is_file():
            raise MoeifyError(f"study file {name_or_path} not found")
        return p
    for d in STUDY_DIRS + (Path.cwd() / "studies",):
        if (d / f"{name_or_path}.yaml").is_file():
            return d / f"{name_or_path}.yaml"
    names = sorted({f.stem for d in STUDY_DIRS if d.is_dir() for f in d.glob("*.yaml")})
    raise MoeifyError(f"unknown study {name_or_path!r}; built-in studies: {', '.join(names) or 'none'}; or give a .yaml path")


def load_study(name_or_path: str) -> tuple[Study, Path]:
    """Read and validate a study file (rows as Row, unknown keys are one-line errors)."""
    path = find_study(name_or_path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise MoeifyError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    data.setdefault("name", path.stem)
    rows = data.pop("rows", None)
    if not isinstance(rows, list) or not rows:
        raise MoeifyError(f"{path}: 'rows' must be a non-empty list of {{name, set}} entries")
    study = build_config(Study, data, "", str(path))
    study.rows = [build_config(Row, r, f"rows[{i}]", str(path)) for i, r in enumerate(rows)]
    names = [r.name for r in study.rows]
    if len(set(names)) != len(names):
        raise MoeifyError(f"{path}: row names must be unique, got {names}")
    if isinstance(study.dissection, dict):
        study.dissection = build_config(Dissection, study.dissection, "dissection", str(path))
    if isinstance(study.reference, dict):
        study.reference = build_config(Reference, study.reference, "reference", str(path))
    if set(study.evaluate.autoattack) - set(AA_ATTACKS):
        raise MoeifyError(f"{path}: evaluate.autoattack must list some of {', '.join(AA_ATTACKS)} (or be empty for the "
                          f"standard suite), got {study.evaluate.autoattack}")
    if study.dissection and study.dissection.init not in names:
        raise MoeifyError(f"{path}: dissection.init must name a row ({', '.join(names)}), got {study.dissection.init!r}")
    return study, path


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _base_data(study: Study) -> dict:
    if isinstance(study.base, dict):
        return json.loads(json.dumps(study.base))
    base = find_recipe(str(study.base))
    data = yaml.safe_load(base.read_text()) or {}
    data.setdefault("name", base.stem)
    return data


def row_recipe(study: Study, source: str, overrides: list[str], name: str) -> Recipe:
    """The base recipe with the study-wide and the row's overrides applied, validated."""
    data = apply_overrides(_base_data(study), list(overrides))
    data["name"] = f"{study.name}/{_slug(name)}"
    recipe = build_config(Recipe, data, "", f"{source} ({name})")
    check(recipe, f"{source} ({name})")
    return recipe


@dataclass
class Plan:
    """What the study runs: (name, folder, overrides) for the rows, then the dissection fine-tunes."""
    rows: list[tuple[str, Path, list[str]]]
    dissection: list[tuple[str, Path, list[str]]]


DISSECTION = (("standard routers + standard experts", None),
              ("robust routers + standard experts", "routers"),
              ("standard routers + robust experts", "experts"),
              ("robust routers + robust experts", "all"))


def _last_wins(overrides: list[str]) -> list[str]:
    """The overrides with only the last value of each key (what applying them in order amounts to)."""
    last = {o.split("=", 1)[0]: o for o in overrides}
    return [o for o in overrides if last[o.split("=", 1)[0]] is o]


def make_plan(study: Study, out: Path, overrides: list[str]) -> Plan:
    rows = [(r.name, out / "rows" / _slug(r.name), r.set + overrides) for r in study.rows]
    cut = []
    if study.dissection:
        init = next(r for r in study.rows if r.name == study.dissection.init)
        init_dir = out / "rows" / _slug(init.name)
        for name, part in DISSECTION:
            if part is None:
                cut.append((name, init_dir, init.set + overrides))
            else:
                cut.append((name, out / "dissection" / part,
                            init.set + study.dissection.set + overrides
                            + [f"train.update={part}", f"train.init={init_dir / 'model.moe'}"]))
    return Plan([(n, d, _last_wins(o)) for n, d, o in rows], [(n, d, _last_wins(o)) for n, d, o in cut])


def _train(recipe: Recipe, run: Path, log: Callable[[str], None], console) -> None:
    from .train import robustify

    if (run / "metrics.json").is_file():
        log(f"{run}: trained (metrics.json), skipped")
        return
    resume = (run / "checkpoint").is_dir() or (run / "recipe.yaml").is_file()
    log(f"{run}: {'resuming' if resume else 'training'} {recipe.model.kind} {recipe.train.method} "
        f"(update {recipe.train.update})")
    robustify(recipe, run, resume=resume, console=console)


def _eval_data(recipe: Recipe, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = load_data(recipe.data.dataset, recipe.data.root, recipe.data.val_size, 0, recipe.data.download, test_subset=n)
    return as_tensors(data.test)


def _evaluate(run: Path, attacks: list[str], ev: StudyEval, log: Callable[[str], None], tag: str = "eval") -> dict:
    """RUN/TAG.json: the row's model evaluated on the study's test subset (resumed if it was stopped)."""
    req = EvalRequest(model_file=str(run / "model.moe"), n=ev.n, attacks=tuple(attacks), pgd_steps=ev.pgd_steps,
                      square_queries=ev.square_queries, autoattack=tuple(ev.autoattack), batch_size=ev.batch_size)
    return evaluate_file(req, run, resume=True, report_name=f"{tag}.json", log=log, plots=False)


def _latency(runs: dict[str, Path], recipe: Recipe, ev: StudyEval) -> dict[str, float]:
    """Median eval latency (ms) at ``latency_batch`` of every row's model, timed interleaved."""
    x, _ = _eval_data(recipe, ev.latency_batch)
    models = {name: io.load(run / "model.moe") for name, run in runs.items()}

    def call(m):
        def f():
            with torch.inference_mode():
                m(x)
        return f
    return interleaved({k: call(m) for k, m in models.items()}, ev.latency_repeats, warmup=3)


def run_study(name_or_path: str, out: str | Path, results: str | Path | None = None, overrides: list[str] | None = None,
              n: int | None = None, console=None, log: Callable[[str], None] = print,
              evaluate: dict | None = None) -> dict:
    """Run (or resume) a study into ``out``; write ``results`` (markdown). Returns the collected results.
    ``evaluate`` overrides fields of the study file's ``evaluate`` section (e.g. lighter attacks for a dry run)."""
    study, path = load_study(name_or_path)
    overrides = list(overrides or [])
    if n is not None:
        study.evaluate.n = n
    for key, value in (evaluate or {}).items():
        if not hasattr(study.evaluate, key):
            raise MoeifyError(f"unknown evaluate setting {key!r}; known: {', '.join(vars(study.evaluate))}")
        setattr(study.evaluate, key, value)
    out = Path(out)
    results = Path(results) if results else out / "results.md"
    kept = _kept_notes(results)
    plan = make_plan(study, out, overrides)
    recipes = {name: row_recipe(study, str(path), sets, name) for name, _, sets in plan.rows + plan.dissection}
    for name, _, _ in plan.dissection[1:]:
        if recipes[name].train.method not in ("at", "trades"):
            raise MoeifyError(f"{path}: the dissection fine-tunes train adversarially; set train.method=at or trades "
                              f"in dissection.set (got {recipes[name].train.method})")
    with folder_lock(out, "study"):
        _write(out / "study.yaml", path.read_text())
        _run_rows(plan, recipes, study.evaluate, out, log, console)
        collected = _collect(study, plan, out, recipes)
        collected["command"] = " ".join(
            ["moeify", "study", shlex.quote(str(name_or_path)), "--out", shlex.quote(str(out)), "--results",
             shlex.quote(str(results))] + [f"--set {shlex.quote(s)}" for s in overrides] + ([f"--n {n}"] if n is not None else []))
        _write(out / "results.json", json.dumps(collected, indent=2))
        results.parent.mkdir(parents=True, exist_ok=True)
        _write(results, render(study, collected) + "\n" + MARKER + "\n" + kept)
    log(f"wrote {results}")
    return collected


def _run_rows(plan: Plan, recipes: dict[str, Recipe], ev: StudyEval, out: Path, log: Callable[[str], None],
              console) -> None:
    """Train and evaluate every row and dissection fine-tune, then time the rows: each step skipped
    when its result is already in the study folder, resumed when it was stopped."""
    for name, run, _ in plan.rows:
        _train(recipes[name], run, log, console)
        log(f"{name}: evaluating on {ev.n} test images ({', '.join(ev.attacks)})")
        _evaluate(run, ev.attacks, ev, log)
    for name, run, _ in plan.dissection:
        _train(recipes[name], run, log, console)
        log(f"{name}: evaluating (PGD-{ev.pgd_steps}, flip rate, RA-E)")
        _evaluate(run, ["pgd"], ev, log, tag="eval-dissection")
    lat_file = out / "latency.json"
    if not lat_file.is_file():
        log(f"timing every row at batch {ev.latency_batch} ({ev.latency_repeats} interleaved repeats)")
        lat = _latency({name: run for name, run, _ in plan.rows}, recipes[plan.rows[0][0]], ev)
        _write(lat_file, json.dumps({"ms": lat, "machine": machine()}, indent=2))


def _write(path: Path, text: str) -> None:
    """Replace ``path`` atomically: a kill mid-write leaves the old file, never half of the new one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _kept_notes(results: Path) -> str:
    """The hand-written part of an existing results page; refuse to replace a page moeify did not write."""
    if not results.is_file():
        return ""
    text = results.read_text()
    if MARKER not in text:
        raise MoeifyError(f"{results} exists and was not written by `moeify study`; pass --results elsewhere "
                          "(nothing was overwritten)")
    return text.split(MARKER, 1)[1].lstrip("\n")


def _collect(study: Study, plan: Plan, out: Path, recipes: dict[str, Recipe]) -> dict:
    lat = json.loads((out / "latency.json").read_text())
    rows = []
    for name, run, sets in plan.rows:
        rep = json.loads((run / "eval.json").read_text())
        metrics = json.loads((run / "metrics.json").read_text())
        rows.append({"name": name, "run": str(run), "set": sets, "kind": recipes[name].model.kind,
                     "method": recipes[name].train.method, "seed": recipes[name].train.seed,
                     "train_s": round(sum(h["train_s"] for h in metrics["history"]), 1),
                     "latency_ms": lat["ms"][name], **{k: rep.get(k) for k in (
                         "clean_acc", "pgd_acc", "autoattack_acc", "adaptive_acc", "worst_case_acc", "flip_rate",
                         "ra_r", "ra_e", "macs_per_sample", "n_examples", "flags", "load_clean")}})
    cut = []
    for name, run, sets in plan.dissection:
        rep = json.loads((run / "eval-dissection.json").read_text())
        cut.append({"name": name, "run": str(run), "set": sets,
                    **{k: rep.get(k) for k in ("clean_acc", "pgd_acc", "flip_rate", "ra_e", "n_examples", "load_clean")}})
    r0 = recipes[plan.rows[0][0]]
    return {"study": study.name, "rows": rows, "dissection": cut, "machine": lat["machine"],
            "date": datetime.date.today().isoformat(), "eps": r0.attack.eps, "norm": r0.attack.norm,
            "dataset": r0.data.dataset, "model": r0.model.name, "model_kwargs": r0.model.kwargs,
            "evaluate": dataclasses.asdict(study.evaluate)}


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


def _se(p: float, n: int) -> float:
    """Standard error (points) of an accuracy p measured on n examples."""
    return 100 * (p * (1 - p) / max(n, 1)) ** 0.5


def render(study: Study, c: dict) -> str:
    """The results page: both tables, what was run, the reference numbers and measured comparisons."""
    ev = c["evaluate"]
    rows, n = c["rows"], c["rows"][0]["n_examples"]
    L = [f"# {study.title or study.name}", "",
         f"{c['dataset']}, L-{c['norm'].replace('linf', 'inf')} eps = {c['eps']:g}, backbone {c['model']} "
         f"{c['model_kwargs'] or ''}. Measured {c['date']} on {c['machine']}. Accuracies (%) on a fixed, seeded "
         f"subset of {n} test images (standard error up to {_se(0.5, n):.1f} points); latency: median of "
         f"{ev['latency_repeats']} interleaved eval calls at batch {ev['latency_batch']}.", "",
         "## Dense vs MoE, trained four ways", "",
         "| model | SA | PGD-20 RA | AutoAttack RA | MoE-adaptive RA | MACs / sample | CPU latency (ms) | train time (s) |",
         "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        L.append(f"| {r['name']} | {_pct(r['clean_acc'])} | {_pct(r['pgd_acc'])} | {_pct(r['autoattack_acc'])} | "
                 f"{_pct(r['adaptive_acc'])} | {r['macs_per_sample'] / 1e6:.2f} M | {r['latency_ms']:.2f} | {r['train_s']:.0f} |")
    aa = ("the standard suite" if not ev["autoattack"] else
          f"{' + '.join(a.upper() for a in ev['autoattack'])} of the standard suite, with its settings (the rest of "
          f"the suite left out for the compute budget)")
    L += ["", f"AutoAttack RA: `pyautoattack`, {aa}. "
          "PGD-20 RA is the worst of PGD-20 and PGD-40 with 2 restarts per example. MoE-adaptive RA is the "
          "worst case per example over PGD, AutoAttack, straight-through PGD with 3 restarts, transfer from the "
          f"soft-routing twin, Square ({ev['square_queries']} queries) and a routing-then-PGD attack (MoE rows only). "
          "Flags raised by the "
          "evaluation's sanity checks: " + ("; ".join(f"{r['name']}: {', '.join(r['flags'])}" for r in rows if r["flags"])
                                            or "none") + "."]
    moe_rows = [r for r in rows if r["flip_rate"] is not None]
    if moe_rows:
        L += ["", "| model | routing flip rate under PGD | RA-R (routers attacked) | RA-E (routes frozen) | expert load entropy (clean) |",
              "|---|---:|---:|---:|---:|"]
        for r in moe_rows:
            ent = sum(x["entropy"] for x in r["load_clean"]) / len(r["load_clean"])
            L.append(f"| {r['name']} | {_pct(r['flip_rate'])} | {_pct(r['ra_r'])} | {_pct(r['ra_e'])} | {ent:.2f} |")
    if c["dissection"]:
        L += ["", "## Router robustness vs expert robustness", "",
              f"Starting from the standard-trained MoE ({study.dissection.init}), fine-tunes that train only the "
              "routers, only the experts, or both, with the adversarial loss (the other part stays bit-identical).", "",
              "| routers + experts | SA | PGD-20 RA | routing flip rate | RA-E (routes frozen) |", "|---|---:|---:|---:|---:|"]
        for r in c["dissection"]:
            L.append(f"| {r['name']} | {_pct(r['clean_acc'])} | {_pct(r['pgd_acc'])} | {_pct(r['flip_rate'])} | {_pct(r['ra_e'])} |")
    L += ["", "## Measured comparisons", ""] + _findings(rows, c["dissection"], n)
    if study.reference and study.reference.rows:
        ref = study.reference
        L += ["", f"## Reference: {ref.title}", "", "| " + " | ".join(ref.columns) + " |",
              "|" + "---|" * len(ref.columns)]
        L += ["| " + " | ".join(str(v) for v in row) + " |" for row in ref.rows]
    L += ["", "## How these numbers were made", "", f"One command (resumable: rerun it to continue): `{c['command']}`.",
          "Each row is the study file's base recipe with these `--set` overrides; the resolved recipe is saved as "
          "`recipe.yaml` in each run folder, so `moeify robustify --recipe RUN/recipe.yaml --out NEW` retrains one row.", ""]
    for r in rows + c["dissection"]:
        sets = f"`{' '.join(r['set'])}`" if r["set"] else "none (the base recipe)"
        L.append(f"- {r['name']}: {sets} → {r['run']}")
    L += ["", f"Training seeds: {sorted({r['seed'] for r in rows})}; evaluation seed 0 (the test subset and every "
          f"attack's random start). Evaluation: `{', '.join(ev['attacks'])}`, PGD-{ev['pgd_steps']}, Square "
          f"{ev['square_queries']} queries; per-row reports are in each run folder (eval.json)."]
    return "\n".join(L) + "\n"


def _findings(rows: list[dict], cut: list[dict], n: int) -> list[str]:
    """Plain statements of the measured differences, with their noise level."""
    out = []

    def robust(r):
        return min(v for v in (r["pgd_acc"], r["autoattack_acc"], r["adaptive_acc"]) if v is not None)
    best = max(rows, key=robust)
    out.append(f"- Highest worst-case robust accuracy: {best['name']} ({_pct(robust(best))}%).")
    dense = next((r for r in rows if r["kind"] == "dense" and r["method"] != "standard"), None)
    for r in rows:
        if r is dense or r["method"] == "standard" or dense is None:
            continue
        d = 100 * (robust(r) - robust(dense))
        se = (2 ** 0.5) * _se(robust(dense), n)
        verdict = "within noise of" if abs(d) < 2 * se else ("above" if d > 0 else "below")
        out.append(f"- {r['name']}: {d:+.1f} points of worst-case robust accuracy vs {dense['name']} ({verdict} it; "
                   f"2 s.e. of a difference = {2 * se:.1f}), at {r['macs_per_sample'] / dense['macs_per_sample']:.0%} of its MACs and "
                   f"{r['latency_ms'] / dense['latency_ms']:.2f}x its latency.")
    if len(cut) == 4:
        def both(r):
            return f"SA {_pct(r['clean_acc'])}%, PGD-20 RA {_pct(r['pgd_acc'])}%"
        out.append(f"- From the standard MoE ({both(cut[0])}): robust routers alone {both(cut[1])}; robust experts "
                   f"alone {both(cut[2])}; both {both(cut[3])}.")
    return out
