"""`moeify study`: the study file is validated, every row is trained, evaluated and timed, the results
page is written; a rerun resumes (nothing retrained) and keeps the notes written below the marker; a
page moeify did not write is never overwritten."""
import os
import runpy
import sys
from pathlib import Path

import pytest

import moeify
from moeify.study import MARKER, load_study, make_plan, row_recipe, run_study

EXAMPLES = Path(__file__).parent.parent / "examples"
needs_fmnist = pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"),
                                  reason="needs dataset-fashion-mnist (scripts/setup.sh installs it)")


def test_shipped_study_builds_the_paper_rows():
    study, path = load_study("fmnist")
    plan = make_plan(study, Path("out"), [])
    recipes = {run: row_recipe(study, str(path), sets, name) for name, run, sets in plan.rows + plan.dissection}
    first = {name: recipes[runs[0]] for name, runs in plan.seeds.items()}
    kinds = {name: (r.model.kind, r.train.method) for name, r in first.items()}
    assert kinds["Dense"] == ("dense", "standard") and kinds["Dense-AT"] == ("dense", "trades")
    assert kinds["S-Dense-AT"] == ("s-dense", "trades") and kinds["MoE-AT"] == ("moe", "trades")
    assert kinds["MoE-AdvMoE"] == ("moe", "advmoe") and kinds["MoE-AdvMoE (live routing)"] == ("moe", "advmoe")
    # AT uses AdvMoE's robust loss, so only the schedule differs
    assert first["MoE-AdvMoE"].advmoe.loss == "trades"
    # the paper's router beside live routing (standardised router); every row at one learning rate
    assert not first["MoE-AT"].moe.router_norm and first["MoE-AT (live routing)"].moe.router_norm
    assert len({(r.train.lr, r.train.epochs, r.train.max_steps_per_epoch) for r in first.values()}) == 1
    # every row once per seed, each in its own folder with its own seed
    assert len(study.seeds) >= 3 and len(plan.rows) == len(study.rows) * len(study.seeds)
    for name, runs in plan.seeds.items():
        assert [recipes[r].train.seed for r in runs] == study.seeds and len(set(runs)) == len(runs)
    assert [recipes[r].train.update for _, r, _ in plan.dissection] == ["all", "routers", "experts", "all"]
    assert all(recipes[r].train.method == "trades" for _, r, _ in plan.dissection[1:])
    assert study.evaluate.pgd_n >= 2000 and study.evaluate.n >= 1000


@pytest.mark.parametrize("text,message", [
    ("rows: []\n", "'rows' must be a non-empty list"),
    ("rows:\n  - {name: a, sett: []}\n", "unknown key 'rows[0].sett'"),
    ("rows:\n  - {name: a}\n  - {name: a}\n", "row names must be unique"),
    ("rows:\n  - {name: a}\ndissection: {init: b}\n", "dissection.init must name a row"),
    ("rows:\n  - {name: a}\nevaluate: {n: many}\n", "evaluate.n must be int"),
    ("rows:\n  - {name: a}\nevaluate: {autoattack: [fab]}\n", "evaluate.autoattack must list some of apgd-ce"),
    ("rows:\n  - {name: a}\nseeds: [0, 0]\n", "seeds must be a non-empty list of distinct integers"),
    ("rows:\n  - {name: a}\nevaluate: {autoattack_targets: 3}\n", "evaluate.autoattack_targets applies to a subset"),
    ("rows:\n  - {name: a}\nevaluate: {autoattack: [apgd-t], autoattack_targets: 0}\n",
     "evaluate.autoattack_targets must be >= 1"),
    ("rows:\n  - {name: a}\ncomparisons: [[a, b]]\n", "each comparison must be a pair of row names"),
])
def test_bad_study_files_name_the_problem(tmp_path, text, message):
    f = tmp_path / "s.yaml"
    f.write_text(text)
    with pytest.raises(moeify.MoeifyError, match=message.replace("[", r"\[").replace("]", r"\]")) as e:
        load_study(str(f))
    assert "s.yaml" in str(e.value)


def test_results_page_not_written_by_moeify_is_left_alone(tmp_path):
    page = tmp_path / "results.md"
    page.write_text("my own notes\n")
    with pytest.raises(moeify.MoeifyError, match="was not written by `moeify study`"):
        run_study("fmnist", tmp_path / "out", page)
    assert page.read_text() == "my own notes\n" and not (tmp_path / "out").exists()


@needs_fmnist
def test_study_example_runs_resumes_and_keeps_notes(tmp_path, monkeypatch, capsys):
    out = tmp_path / "study"
    monkeypatch.setattr(sys, "argv", ["study.py", str(out), "--quick"])
    runpy.run_path(str(EXAMPLES / "study.py"), run_name="__main__")
    printed = capsys.readouterr().out
    assert "MoE-AdvMoE" in printed and "robust routers + standard experts" in printed
    page = out / "results.md"
    text = page.read_text()
    for heading in ("## Dense vs MoE, trained four ways", "## Router robustness vs expert robustness",
                    "## Reference", "## How these numbers were made"):
        assert heading in text
    assert text.count("\n| ") >= 8 + 4 + 3  # eight study rows, four dissection rows, headers
    assert "| MoE-AdvMoE (live routing) | MoE-AT (live routing) | PGD-20 |" in text  # a paired comparison
    page.write_text(text + "Hand-written discussion.\n")
    logs = []
    run_study("fmnist", out, page, ["data.train_subset=256", "data.val_size=64", "data.test_subset=48",
                                    "train.epochs=1", "train.max_steps_per_epoch=2", "eval.val_pgd_steps=1",
                                    "eval.pgd_steps=2"], n=48, log=logs.append, seeds=[0])
    assert sum("skipped" in s for s in logs) == 12  # eight rows, four dissection entries: nothing retrained
    assert not any("training" in s for s in logs)
    assert page.read_text().endswith(MARKER + "\nHand-written discussion.\n")
