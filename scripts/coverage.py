"""Conversion coverage across timm: one model per model family, converted at the default scope.

Usage: python scripts/coverage.py [--families a,b,...] [--json OUT.json] [--md docs/coverage.md]
                                  [--timeout SECONDS] [--cuts copies|all]

Per timm family (a module of timm.models) with a Conv2d, its smallest model (fewest parameters
among up to 25 name-ranked candidates, built on the meta device) is built with random weights at
its default input size and converted with experts 2, top-1, scope auto (the default). Checked:
exact with all experts on (top_k == experts equals the dense model), grouped == masked with
samples spread over experts, and executed MACs (``count_macs``) against dense. Outcomes:
converted (MACs <= 90% of dense, both checks pass), small saving (MACs above 90%), refused (the
ConversionError, which names the op and the reason), inexact (a check failed) or error (any
other exception, e.g. the model does not trace). Runs on the CPU; nothing is downloaded.
"""
from __future__ import annotations

import json
import signal
import sys
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

import moeify
from moeify.bench import spread_routing

SMALL = ("atto", "femto", "pico", "nano", "tiny", "xxs", "xs", "small", "mobile", "lite", "_t", "_s", "18", "26")
MAX_RATIO = 0.9


@dataclass
class Row:
    family: str
    model: str
    status: str
    scope: str = ""
    layers: int = 0
    mac_ratio: float = float("nan")
    full_err: float = float("nan")
    strategy_err: float = float("nan")
    seconds: float = 0.0
    reason: str = ""


class _Timeout(Exception):
    pass


def _alarm(_signum, _frame):
    raise _Timeout()


def smallest(family: str) -> str | None:
    """The family's model with the fewest parameters (and a Conv2d), among name-ranked candidates."""
    import timm

    names = sorted(timm.list_models(module=family), key=lambda n: (not any(s in n for s in SMALL), len(n), n))
    best: tuple[int, str] | None = None
    for name in names[:25]:
        try:
            with torch.device("meta"):
                m = timm.create_model(name, pretrained=False)
        except Exception:
            continue
        if not any(isinstance(x, nn.Conv2d) for x in m.modules()):
            continue
        n = sum(p.numel() for p in m.parameters())
        if best is None or n < best[0]:
            best = (n, name)
    return None if best is None else best[1]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def check(family: str, name: str, cuts: str = "copies") -> Row:
    """Convert one model (``cuts`` as ``MoESpec.cuts``) and check it; never raises."""
    torch.manual_seed(0)
    start = time.perf_counter()
    try:
        model = moeify.create_model(f"timm:{name}").eval()
        x = torch.rand(2, *model.moeify_input_size)
        with torch.no_grad():
            ref = model(x)
            plan = moeify.plan(model, experts=2, top_k=1, example_inputs=x, cuts=cuts)
            full = moeify.convert(model, experts=2, top_k=2, example_inputs=x, cuts=cuts).eval()
            full_err = _rel(full(x), ref)
            moe = moeify.convert(model, experts=2, top_k=1, example_inputs=x, cuts=cuts).eval()
            spread_routing(moe)
            grouped = moe(x)
            with moeify.execution("masked"):
                masked = moe(x)
        seconds = time.perf_counter() - start
        ratio = moeify.count_macs(moe, x[:1]) / moeify.count_macs(model, x[:1])
        row = Row(family, name, "", plan.scope, len(plan.layers), ratio, full_err, _rel(grouped, masked), seconds)
        if not (full_err <= 1e-4 and row.strategy_err <= 1e-4):
            row.status, row.reason = "inexact", f"all experts {full_err:.1e}, grouped vs masked {row.strategy_err:.1e}"
        elif ratio > MAX_RATIO:
            row.status = "small saving"
            row.reason = "; ".join(sorted({d.reason.split(" (")[0] for d in plan.dense}))[:300]
        else:
            row.status = "converted"
        return row
    except moeify.ConversionError as e:
        return Row(family, name, "refused", seconds=time.perf_counter() - start, reason=str(e)[:300])
    except _Timeout:
        return Row(family, name, "error", seconds=time.perf_counter() - start, reason="timed out")
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return Row(family, name, "error", seconds=time.perf_counter() - start, reason=f"{type(e).__name__}: {msg}"[:300])


def _num(v: float, fmt: str) -> str:
    return "" if v != v else format(v, fmt)  # NaN: not measured


NOTES = "<!-- notes written by hand: kept when scripts/coverage.py rewrites the table above -->"


def _notes(path: str) -> str:
    """What follows the ``NOTES`` marker in an existing page (hand-written notes), marker included."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return ""
    return "\n" + text[text.index(NOTES):] if NOTES in text else ""


def markdown(rows: list[Row]) -> str:
    done = sum(r.status == "converted" for r in rows)
    lines = [
        "# Conversion coverage across timm",
        "",
        "Written by `python scripts/coverage.py --md docs/coverage.md` (one model per timm family, the smallest;",
        "random weights, default input size, experts 2, top-1, default scope `auto`; checked exact with all",
        "experts on and grouped == masked with samples spread over experts; MACs by `moeify.count_macs`).",
        "",
        f"**{done} of {len(rows)} families convert** with executed MACs at most {MAX_RATIO:.0%} of dense, exact.",
        "",
        "| family | model | outcome | scope | MoE layers | MACs vs dense | all experts (rel. err) | grouped vs masked | s | reason |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        reason = r.reason.replace("|", "/").replace("\n", " ")
        lines.append(f"| {r.family} | {r.model} | {r.status} | {r.scope} | {r.layers or ''} | {_num(r.mac_ratio, '.0%')} | "
                     f"{_num(r.full_err, '.1e')} | {_num(r.strategy_err, '.1e')} | {r.seconds:.1f} | {reason} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    import timm

    args = sys.argv[1:]
    opt = {a: args[i + 1] for i, a in enumerate(args[:-1]) if a.startswith("--")}
    families = opt["--families"].split(",") if "--families" in opt else sorted(set(timm.list_modules()))
    timeout = int(opt.get("--timeout", "180"))
    signal.signal(signal.SIGALRM, _alarm)
    rows = []
    for family in families:
        name = smallest(family)
        if name is None:
            print(f"{family}: no model with a Conv2d, skipped", flush=True)
            continue
        signal.alarm(timeout)
        try:
            row = check(family, name, opt.get("--cuts", "copies"))
        finally:
            signal.alarm(0)
        rows.append(row)
        print(json.dumps(asdict(row)), flush=True)
    if "--json" in opt:
        with open(opt["--json"], "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    if "--md" in opt:
        notes = _notes(opt["--md"])
        with open(opt["--md"], "w") as f:
            f.write(markdown(rows) + notes)
    print(f"converted {sum(r.status == 'converted' for r in rows)} of {len(rows)} families")


if __name__ == "__main__":
    main()
