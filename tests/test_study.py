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
    recipes = {name: row_recipe(study, str(path), sets, name) for name, _, sets in plan.rows + plan.dissection}
    kinds = {name: (r.model.kind, r.train.method) for name, r in recipes.items()}
    assert kinds["Dense"] == ("dense", "standard") and kinds["Dense-AT"] == ("dense", "trades")
    assert kinds["S-Dense-AT"] == ("s-dense", "trades") and kinds["MoE-AT"] == ("moe", "trades")
    assert kinds["MoE-AdvMoE"] == ("moe", "advmoe")
    # AT uses AdvMoE's robust loss, so only the schedule differs
    assert recipes["MoE-AdvMoE"].advmoe.loss == "trades"
    assert [recipes[n].train.update for n, _, _ in plan.dissection] == ["all", "routers", "experts", "all"]
    assert all(recipes[n].train.method == "trades" for n, _, _ in plan.dissection[1:])


@pytest.mark.parametrize("text,message", [
    ("rows: []\n", "'rows' must be a non-empty list"),
    ("rows:\n  - {name: a, sett: []}\n", "unknown key 'rows[0].sett'"),
    ("rows:\n  - {name: a}\n  - {name: a}\n", "row names must be unique"),
    ("rows:\n  - {name: a}\ndissection: {init: b}\n", "dissection.init must name a row"),
    ("rows:\n  - {name: a}\nevaluate: {n: many}\n", "evaluate.n must be int"),
    ("rows:\n  - {name: a}\nevaluate: {autoattack: [fab]}\n", "evaluate.autoattack must list some of apgd-ce"),
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
    assert text.count("\n| ") >= 6 + 4 + 3  # five+ study rows, four dissection rows, headers
    page.write_text(text + "Hand-written discussion.\n")
    logs = []
    run_study("fmnist", out, page, ["data.train_subset=256", "data.val_size=64", "data.test_subset=48",
                                    "train.epochs=1", "train.max_steps_per_epoch=2"], n=48, log=logs.append)
    assert sum("skipped" in s for s in logs) == 10  # six rows, four dissection entries: nothing retrained
    assert not any("training" in s for s in logs)
    assert page.read_text().endswith(MARKER + "\nHand-written discussion.\n")
