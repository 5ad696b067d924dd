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
import statistics
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
from .evaluate import AA_ATTACKS, AA_TARGETS, correct_from_bits, targets_problem
from .lock import folder_lock
from .recipes import Recipe, apply_overrides, build_config, check, find_recipe
from .stats import paired_difference

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
    n: int = 1000  # a fixed, seeded subset of the test set: every attack
    pgd_n: int = 0  # clean and PGD on this many (its first n are the images above); 0 = n
    attacks: list = field(default_factory=lambda: ["pgd", "autoattack", "adaptive"])
    autoattack: list = field(default_factory=list)  # a subset of AutoAttack's suite; [] = standard
    autoattack_targets: int = AA_TARGETS  # target classes of the subset's APGD-T / FAB-T
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
    seeds: list = field(default_factory=lambda: [0])  # training seeds: every row is trained once per seed
    comparisons: list = field(default_factory=list)  # [A, B] row pairs: A minus B with paired 95% intervals


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
    problem = targets_problem(study.evaluate.autoattack_targets, study.evaluate.autoattack)
    if problem:
        raise MoeifyError(f"{path}: evaluate.autoattack_targets {problem}")
    if study.dissection and study.dissection.init not in names:
        raise MoeifyError(f"{path}: dissection.init must name a row ({', '.join(names)}), got {study.dissection.init!r}")
    check_seeds(study.seeds, str(path))
    for pair in study.comparisons:
        if not (isinstance(pair, list) and len(pair) == 2 and all(p in names for p in pair)):
            raise MoeifyError(f"{path}: each comparison must be a pair of row names [A, B] ({', '.join(names)}), "
                              f"got {pair!r}")
    return study, path


def check_seeds(seeds, where: str) -> None:
    """A one-line error unless ``seeds`` is a non-empty list of distinct integers."""
    if not (isinstance(seeds, list) and seeds and all(isinstance(v, int) for v in seeds)
            and len(set(seeds)) == len(seeds)):
        raise MoeifyError(f"{where}: seeds must be a non-empty list of distinct integers, got {seeds!r}")


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
    """What the study runs: (name, folder, overrides) for every row and seed, then the dissection
    fine-tunes (from the first seed)."""
    rows: list[tuple[str, Path, list[str]]]
    dissection: list[tuple[str, Path, list[str]]]

    @property
    def seeds(self) -> dict[str, list[Path]]:
        """{row name: its folders, one per seed in the study's seed order}."""
        out: dict[str, list[Path]] = {}
        for name, run, _ in self.rows:
            out.setdefault(name, []).append(run)
        return out


DISSECTION = (("standard routers + standard experts", None),
              ("robust routers + standard experts", "routers"),
              ("standard routers + robust experts", "experts"),
              ("robust routers + robust experts", "all"))


def _last_wins(overrides: list[str]) -> list[str]:
    """The overrides with only the last value of each key (what applying them in order amounts to)."""
    last = {o.split("=", 1)[0]: o for o in overrides}
    return [o for o in overrides if last[o.split("=", 1)[0]] is o]


def _seed_dir(out: Path, row: str, seed: int) -> Path:
    return out / "rows" / _slug(row) / f"seed-{seed}"


def make_plan(study: Study, out: Path, overrides: list[str]) -> Plan:
    """Every row once per training seed (the seed set last, so it wins), then the dissection."""
    rows = [(r.name, _seed_dir(out, r.name, s), r.set + overrides + [f"train.seed={s}"])
            for s in study.seeds for r in study.rows]
    cut = []
    if study.dissection:
        init = next(r for r in study.rows if r.name == study.dissection.init)
        first = [f"train.seed={study.seeds[0]}"]
        init_dir = _seed_dir(out, init.name, study.seeds[0])
        for name, part in DISSECTION:
            if part is None:
                cut.append((name, init_dir, init.set + overrides + first))
            else:
                cut.append((name, out / "dissection" / part,
                            init.set + study.dissection.set + overrides + first
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


def _evaluate(run: Path, attacks: list[str], ev: StudyEval, log: Callable[[str], None], tag: str = "eval",
              n: int | None = None, routing: bool = True, start: int = 0) -> dict:
    """RUN/TAG.json: the row's model evaluated on the study's test images ``start`` to ``n``
    (resumed if stopped); ``routing``: with an MoE's routing dissection."""
    req = EvalRequest(model_file=str(run / "model.moe"), n=n or ev.n, start=start, attacks=tuple(attacks),
                      pgd_steps=ev.pgd_steps, square_queries=ev.square_queries, autoattack=tuple(ev.autoattack),
                      autoattack_targets=ev.autoattack_targets, batch_size=ev.batch_size, routing=routing)
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
              evaluate: dict | None = None, seeds: list[int] | None = None) -> dict:
    """Run (or resume) a study into ``out``; write ``results`` (markdown). Returns the collected results.
    ``evaluate`` overrides fields of the study file's ``evaluate`` section (e.g. lighter attacks for a dry run);
    ``seeds`` replaces its training seeds."""
    study, path = load_study(name_or_path)
    overrides = list(overrides or [])
    if n is not None:  # every attack on these n images
        study.evaluate.n, study.evaluate.pgd_n = n, 0
    for key, value in (evaluate or {}).items():
        if not hasattr(study.evaluate, key):
            raise MoeifyError(f"unknown evaluate setting {key!r}; known: {', '.join(vars(study.evaluate))}")
        setattr(study.evaluate, key, value)
    if seeds is not None:
        check_seeds(seeds, "--seeds")
        study.seeds = list(seeds)
    out = Path(out)
    results = Path(results) if results else out / "results.md"
    kept = _kept_notes(results)
    plan = make_plan(study, out, overrides)
    recipes = {run: row_recipe(study, str(path), sets, name) for name, run, sets in plan.rows + plan.dissection}
    for name, run, _ in plan.dissection[1:]:
        if recipes[run].train.method not in ("at", "trades"):
            raise MoeifyError(f"{path}: the dissection fine-tunes train adversarially; set train.method=at or trades "
                              f"in dissection.set (got {recipes[run].train.method})")
    with folder_lock(out, "study"):
        _write(out / "study.yaml", path.read_text())
        _run_rows(plan, recipes, study.evaluate, out, log, console)
        collected = _collect(study, plan, out, recipes)
        collected["command"] = " ".join(
            ["moeify", "study", shlex.quote(str(name_or_path)), "--out", shlex.quote(str(out)), "--results",
             shlex.quote(str(results))] + [f"--set {shlex.quote(s)}" for s in overrides]
            + ([f"--n {n}"] if n is not None else []) + ([f"--seeds {','.join(map(str, seeds))}"] if seeds else []))
        _write(out / "results.json", json.dumps(collected, indent=2))
        results.parent.mkdir(parents=True, exist_ok=True)
        _write(results, render(study, collected) + "\n" + MARKER + "\n" + kept)
    log(f"wrote {results}")
    return collected


def _run_rows(plan: Plan, recipes: dict[Path, Recipe], ev: StudyEval, out: Path, log: Callable[[str], None],
              console) -> None:
    """Train and evaluate every row (every seed) and dissection fine-tune, then time the rows: each
    step skipped when its result is already in the study folder, resumed when it was stopped."""
    for name, run, _ in plan.rows:
        _train(recipes[run], run, log, console)
        log(f"{name} ({run.name}): evaluating on {ev.n} test images ({', '.join(ev.attacks)})")
        _evaluate(run, ev.attacks, ev, log)
        if ev.pgd_n > ev.n and not (run / "eval-pgd.json").is_file():  # (a study run before eval-rest)
            log(f"{name} ({run.name}): clean and PGD-{ev.pgd_steps} on test images {ev.n + 1} to {ev.pgd_n}")
            _evaluate(run, ["pgd"], ev, log, tag="eval-rest", n=ev.pgd_n, routing=False, start=ev.n)
    for name, run, _ in plan.dissection:
        _train(recipes[run], run, log, console)
        log(f"{name}: evaluating (PGD-{ev.pgd_steps}, flip rate, RA-E)")
        _evaluate(run, ["pgd"], ev, log, tag="eval-dissection")
    lat_file = out / "latency.json"
    if not lat_file.is_file():
        log(f"timing every row at batch {ev.latency_batch} ({ev.latency_repeats} interleaved repeats)")
        lat = _latency({name: runs[0] for name, runs in plan.seeds.items()}, recipes[plan.rows[0][1]], ev)
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


ACCURACIES = ("clean_acc", "pgd_acc", "autoattack_acc", "adaptive_acc", "worst_case_acc")
ROUTING = ("flip_rate", "ra_r", "ra_e", "routing_used")
METRICS = (("clean", "clean", True), ("PGD-20", "pgd", True), ("worst case", "worst_case", False))
"""Compared metrics: (label, per_example key, read from the larger clean/PGD evaluation when there is one)."""


def _reports(run: Path) -> tuple[dict, dict]:
    """(all attacks, clean and PGD) reports of one trained row; the second is the first when the
    study evaluates clean and PGD on the same images, else the first joined with the rest's
    (eval-rest.json), or the one evaluation of them all that studies made before (eval-pgd.json)."""
    full = json.loads((run / "eval.json").read_text())
    wide, rest = run / "eval-pgd.json", run / "eval-rest.json"
    if wide.is_file():
        return full, json.loads(wide.read_text())
    return full, _joined(full, json.loads(rest.read_text())) if rest.is_file() else full


def _clean_pgd_files(runs: list[Path]) -> list[str]:
    """The report files of a row's runs that hold their clean and PGD results."""
    return ["eval.json"] + [f for f in ("eval-pgd.json", "eval-rest.json") if any((r / f).is_file() for r in runs)]


def _joined(head: dict, rest: dict) -> dict:
    """Clean and PGD over the head report's images followed by the rest's: what one evaluation of
    them all reports (PGD draws its random starts per batch of images: with the head a whole
    number of batches, the same run)."""
    out: dict = {"n_examples": head["n_examples"] + rest["n_examples"], "per_example": {}}
    for key in ("clean", "pgd"):
        bits = head["per_example"][key] + rest["per_example"][key]
        out["per_example"][key], out[f"{key}_acc"] = bits, bits.count("1") / len(bits)
    return out


def _mean(values: list) -> float | None:
    """Mean over seeds of the values measured (None where none was)."""
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _spread(values: list) -> float | None:
    """Standard deviation over seeds (None with fewer than two)."""
    values = [v for v in values if v is not None]
    return statistics.stdev(values) if len(values) > 1 else None


def _entropy(rep: dict) -> float | None:
    load = rep.get("load_clean")
    return sum(x["entropy"] for x in load) / len(load) if load else None


def _collect(study: Study, plan: Plan, out: Path, recipes: dict[Path, Recipe]) -> dict:
    lat = json.loads((out / "latency.json").read_text())
    seeds = plan.seeds
    sets = {name: s for name, run, s in plan.rows if run == seeds[name][0]}
    rows = []
    for name, runs in seeds.items():
        reps = [_reports(run) for run in runs]
        per_seed = []
        for run, (full, wide) in zip(runs, reps):
            metrics = json.loads((run / "metrics.json").read_text())
            per_seed.append({"seed": recipes[run].train.seed, "run": str(run),
                             "train_s": round(sum(h["train_s"] for h in metrics["history"]), 1),
                             "clean_acc": wide.get("clean_acc"), "pgd_acc": wide.get("pgd_acc"),
                             **{k: full.get(k) for k in ACCURACIES[2:] + ROUTING},
                             "entropy": _entropy(full), "flags": full.get("flags", [])})
        first = recipes[runs[0]]
        rows.append({"name": name, "runs": [str(r) for r in runs], "set": [o for o in sets[name] if not o.startswith("train.seed=")],
                     "kind": first.model.kind, "method": first.train.method, "seeds": [p["seed"] for p in per_seed],
                     "train_s": _mean([p["train_s"] for p in per_seed]), "latency_ms": lat["ms"][name],
                     "macs_per_sample": reps[0][0].get("macs_per_sample"), "n_examples": reps[0][0].get("n_examples"),
                     "pgd_n": reps[0][1].get("n_examples"), "clean_pgd_files": _clean_pgd_files(runs),
                     **{k: _mean([p[k] for p in per_seed]) for k in ACCURACIES + ROUTING + ("entropy",)},
                     **{f"{k}_sd": _spread([p[k] for p in per_seed]) for k in ACCURACIES},
                     "flags": [f"seed {p['seed']}: {f}" for p in per_seed for f in p["flags"]],
                     "per_seed": per_seed})
    cut = []
    for name, run, s in plan.dissection:
        rep = json.loads((run / "eval-dissection.json").read_text())
        cut.append({"name": name, "run": str(run), "set": s,
                    **{k: rep.get(k) for k in ("clean_acc", "pgd_acc", "flip_rate", "ra_e", "n_examples", "load_clean")}})
    r0 = recipes[plan.rows[0][1]]
    return {"study": study.name, "rows": rows, "dissection": cut, "comparisons": _comparisons(study, plan),
            "seeds": list(study.seeds), "machine": lat["machine"],
            "date": datetime.date.today().isoformat(), "eps": r0.attack.eps, "norm": r0.attack.norm,
            "dataset": r0.data.dataset, "model": r0.model.name, "model_kwargs": r0.model.kwargs,
            "evaluate": dataclasses.asdict(study.evaluate)}


def _comparisons(study: Study, plan: Plan) -> list[dict]:
    """Every [A, B] of the study file, per metric: A minus B, paired over the same images and seeds."""
    out, seeds = [], plan.seeds
    for a, b in study.comparisons:
        for label, key, wide in METRICS:
            bits = {row: [_reports(run)[1 if wide else 0].get("per_example", {}).get(key) for run in seeds[row]]
                    for row in (a, b)}
            if any(v is None for vs in bits.values() for v in vs):
                continue  # a metric the evaluation did not measure (e.g. no attack beside clean)
            d = paired_difference(*(torch.stack([correct_from_bits(v) for v in bits[row]]) for row in (a, b)))
            out.append({"a": a, "b": b, "metric": label, "mean": d.mean, "low": d.low, "high": d.high,
                        "images": d.images, "seeds": d.seeds, "verdict": d.verdict})
    return out


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


def _pm(r: dict, key: str) -> str:
    """Mean over seeds (%), with the standard deviation over seeds where there are several."""
    sd = r.get(f"{key}_sd")
    return _pct(r[key]) + ("" if sd is None else f" ± {100 * sd:.1f}")


def render(study: Study, c: dict) -> str:
    """The results page: the tables (means over seeds), what was run, the reference numbers and the
    paired comparisons."""
    ev = c["evaluate"]
    rows, n = c["rows"], c["rows"][0]["n_examples"]
    pgd_n, seeds = c["rows"][0]["pgd_n"], c["seeds"]
    images = f"{n} test images" if pgd_n == n else f"{pgd_n} test images (clean, PGD) and the first {n} of them (the other attacks)"
    L = [f"# {study.title or study.name}", "",
         f"{c['dataset']}, L-{c['norm'].replace('linf', 'inf')} eps = {c['eps']:g}, backbone {c['model']} "
         f"{c['model_kwargs'] or ''}. Measured {c['date']} on {c['machine']}. Accuracies (%) on a fixed, seeded "
         f"subset of {images}, the mean over {len(seeds)} training seed(s)"
         + (" ± their standard deviation" if len(seeds) > 1 else "") + "; latency: median of "
         f"{ev['latency_repeats']} interleaved eval calls at batch {ev['latency_batch']} (first seed's models).", "",
         "## Dense vs MoE, trained four ways", "",
         "| model | SA | PGD-20 RA | AutoAttack RA | MoE-adaptive RA | MACs / sample | CPU latency (ms) | train time (s) |",
         "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        L.append(f"| {r['name']} | {_pm(r, 'clean_acc')} | {_pm(r, 'pgd_acc')} | {_pm(r, 'autoattack_acc')} | "
                 f"{_pm(r, 'adaptive_acc')} | {r['macs_per_sample'] / 1e6:.2f} M | {r['latency_ms']:.2f} | {r['train_s']:.0f} |")
    targets = ev.get("autoattack_targets", AA_TARGETS)
    aa = ("the standard suite" if not ev["autoattack"] else
          f"{' + '.join(a.upper() for a in ev['autoattack'])} of the standard suite, with its settings"
          + (f" but {targets} target classes (the standard {AA_TARGETS} cost {AA_TARGETS / targets:.0f}x more)"
             if targets != AA_TARGETS else "")
          + " (the rest of the suite left out for the compute budget)")
    flags = [f"{r['name']} ({f})" for r in rows for f in r["flags"]]
    L += ["", f"AutoAttack RA: `pyautoattack`, {aa}. "
          "PGD-20 RA is the worst of PGD-20 and PGD-40 with 2 restarts per example. MoE-adaptive RA is the "
          "worst case per example over PGD, AutoAttack, straight-through PGD with 3 restarts, transfer from the "
          f"soft-routing twin, Square ({ev['square_queries']} queries) and a routing-then-PGD attack (MoE rows only). "
          "Flags raised by the evaluation's sanity checks: " + ("; ".join(flags) or "none") + "."]
    moe_rows = [r for r in rows if r["flip_rate"] is not None]
    if moe_rows:
        L += ["", "| model | routing flip rate under PGD | RA-R (routers attacked) | RA-E (routes frozen) | "
              "expert load entropy (clean) | routing used (points) |", "|---|---:|---:|---:|---:|---:|"]
        for r in moe_rows:
            used = "—" if r["routing_used"] is None else f"{100 * r['routing_used']:.1f}"
            L.append(f"| {r['name']} | {_pct(r['flip_rate'])} | {_pct(r['ra_r'])} | {_pct(r['ra_e'])} | "
                     f"{r['entropy']:.2f} | {used} |")
    if c["dissection"]:
        L += ["", "## Router robustness vs expert robustness", "",
              f"Starting from the standard-trained MoE ({study.dissection.init}, seed {seeds[0]}), fine-tunes that "
              "train only the routers, only the experts, or both, with the adversarial loss (the other part stays "
              "bit-identical).", "",
              "| routers + experts | SA | PGD-20 RA | routing flip rate | RA-E (routes frozen) |", "|---|---:|---:|---:|---:|"]
        for r in c["dissection"]:
            L.append(f"| {r['name']} | {_pct(r['clean_acc'])} | {_pct(r['pgd_acc'])} | {_pct(r['flip_rate'])} | {_pct(r['ra_e'])} |")
    L += ["", "## Measured comparisons", ""] + _findings(rows, c["comparisons"])
    if study.reference and study.reference.rows:
        ref = study.reference
        L += ["", f"## Reference: {ref.title}", "", "| " + " | ".join(ref.columns) + " |",
              "|" + "---|" * len(ref.columns)]
        L += ["| " + " | ".join(str(v) for v in row) + " |" for row in ref.rows]
    L += ["", "## How these numbers were made", "", f"One command (resumable: rerun it to continue): `{c['command']}`.",
          "Each row is the study file's base recipe with these `--set` overrides, trained once per seed "
          "(`train.seed=S`, folder `seed-S`); the resolved recipe is saved as `recipe.yaml` in each run folder, so "
          "`moeify robustify --recipe RUN/recipe.yaml --out NEW` retrains one.", ""]
    for r in rows:
        sets = f"`{' '.join(r['set'])}`" if r["set"] else "none (the base recipe)"
        L.append(f"- {r['name']}: {sets} → {Path(r['runs'][0]).parent}/seed-*")
    for r in c["dissection"]:
        L.append(f"- {r['name']}: `{' '.join(r['set'])}` → {r['run']}")
    L += ["", f"Training seeds: {seeds}; evaluation seed 0 (the test subset and every attack's random start). "
          f"Evaluation: `{', '.join(ev['attacks'])}`, PGD-{ev['pgd_steps']}, Square {ev['square_queries']} queries; "
          "per-row reports, with every example's correctness, are in each run folder "
          f"({', '.join(dict.fromkeys(f for r in rows for f in r['clean_pgd_files']))})."]
    return "\n".join(L) + "\n"


def _findings(rows: list[dict], comparisons: list[dict]) -> list[str]:
    """The best row, each robust row's cost against the robust dense model, and the paired
    comparisons with their intervals (a verdict only where the interval excludes zero)."""
    def robust(r):
        values = [v for v in (r["pgd_acc"], r["autoattack_acc"], r["adaptive_acc"]) if v is not None]
        return min(values) if values else 0.0
    best = max(rows, key=robust)
    out = [f"- Highest worst-case robust accuracy (mean over seeds): {best['name']} ({_pct(robust(best))}%)."]
    dense = next((r for r in rows if r["kind"] == "dense" and r["method"] != "standard"), None)
    for r in rows:
        if dense is not None and r is not dense and r["method"] != "standard":
            out.append(f"- {r['name']}: {r['macs_per_sample'] / dense['macs_per_sample']:.0%} of {dense['name']}'s "
                       f"MACs, {r['latency_ms'] / dense['latency_ms']:.2f}x its latency.")
    if comparisons:
        out += ["", "Paired differences, A minus B in points, with 95% intervals over the same images and training "
                "seeds (image sampling and seed-to-seed variation both counted: `moeify.stats.paired_difference`); "
                "a verdict only where the interval excludes zero.", "",
                "| A | B | metric | A − B | 95% interval | images × seeds | verdict |", "|---|---|---|---:|---|---:|---|"]
        for d in comparisons:
            verdict = {"above": "A above B", "below": "A below B"}.get(d["verdict"], d["verdict"])
            out.append(f"| {d['a']} | {d['b']} | {d['metric']} | {d['mean']:+.1f} | [{d['low']:+.1f}, {d['high']:+.1f}] | "
                       f"{d['images']} × {d['seeds']} | {verdict} |")
    return out
