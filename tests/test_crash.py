"""Crash safety: a training run SIGKILLed mid-checkpoint write, mid-test evaluation or at a seeded
moment (mid-batch, mid-validation), then resumed, ends with the weights and test metrics of the
run left alone; a second process on a running folder is refused and a killed run leaves no stuck
lock; a failed checkpoint write is a clean error and the previous checkpoint still resumes; a
killed evaluation and a killed study continue to the results of ones left alone."""
import errno
import json
import os
import random
import subprocess
import sys
import time

import pytest
import yaml
from accelerate import Accelerator
from safetensors.torch import load_file

import moeify
from moeify.eval_file import EvalRequest, evaluate_file
from moeify.recipes import load_recipe, recipe_from_dict
from moeify.study import _joined
from moeify.lock import LOCK_NAME
from moeify.train import robustify
from moeify.train.checkpoint import saved_epoch
from test_robustify import TINY, needs_fmnist

pytestmark = needs_fmnist
RUN = TINY + ["data.test_subset=256", "eval.pgd_steps=5"]  # a test evaluation long enough to be killed in
TIMING = ("train_s", "val_s", "eval_seconds", "seconds")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The run left alone, and how long it took."""
    out = tmp_path_factory.mktemp("crash") / "ref"
    start = time.time()
    metrics = robustify(load_recipe("quickstart", RUN), out)
    return metrics, out, time.time() - start


def _start(out, resume=False):
    cmd = [sys.executable, "-m", "moeify", "robustify", "--out", str(out)]
    cmd += ["--resume"] if resume else ["--recipe", "quickstart"] + [v for item in RUN for v in ("--set", item)]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=env)


def _holder(out):
    try:
        return (out / LOCK_NAME).read_text()
    except OSError:
        return None


def _kill_when(proc, ready, timeout=300):
    """SIGKILL ``proc`` as soon as ``ready()`` holds; False if it ended first."""
    end = time.time() + timeout
    while time.time() < end:
        if ready():
            proc.kill()
            proc.wait()
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.002)
    proc.kill()
    raise AssertionError("the run neither reached the kill point nor ended")


def _resume(out):
    recipe = recipe_from_dict(yaml.safe_load((out / "recipe.yaml").read_text()), str(out / "recipe.yaml"))
    return robustify(recipe, out, resume=True)


def _untimed(value):
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if k not in TIMING}
    if isinstance(value, list):
        return [_untimed(v) for v in value]
    return value


def _assert_same_run(out, reference):
    metrics, ref, _ = reference
    assert _untimed(json.loads((out / "metrics.json").read_text())) == _untimed(metrics)
    a, b = load_file(str(ref / "model.moe")), load_file(str(out / "model.moe"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert (out / "metrics.csv").read_text().count("\n") == (ref / "metrics.csv").read_text().count("\n")


def _epoch_checkpoint_being_written(out):
    return (out / "model.moe").is_file() and (out / "checkpoint.tmp").is_dir()


def _testing(out):
    return saved_epoch(out) == 2 and not (out / "metrics.json").exists()


def test_killed_mid_checkpoint_write_then_mid_test_evaluation_resumes_exactly(tmp_path, reference):
    """One run killed twice: while its epoch-1 checkpoint is being written, then (resumed in a new
    process, which holds the folder: a second process there is refused) during the final test
    evaluation; resumed once more, it ends as the run left alone."""
    out = tmp_path / "run"
    proc = _start(out)
    assert _kill_when(proc, lambda: (out / "model.moe").is_file() and (out / "checkpoint.tmp").is_dir()), \
        proc.stderr.read().decode()[-2000:]
    assert saved_epoch(out) in (0, 1)
    proc, refused = _start(out, resume=True), []

    def testing():
        if not refused and _holder(out) == str(proc.pid):  # the resumed process holds the folder
            with pytest.raises(moeify.MoeifyError, match="another moeify process"):
                robustify(load_recipe("quickstart", RUN), out, resume=True)
            refused.append(True)
        return saved_epoch(out) == 2 and not (out / "metrics.json").exists()
    assert _kill_when(proc, testing), proc.stderr.read().decode()[-2000:]
    assert refused and not (out / "metrics.json").exists()
    _resume(out)
    _assert_same_run(out, reference)


def test_killed_at_a_seeded_moment_resumes_exactly(tmp_path, reference):
    """A kill at a seeded time after training began: anywhere in a batch, a validation, a
    checkpoint write or the test evaluation."""
    delay, out, began = random.Random(13).uniform(0, reference[2]), tmp_path / "run", []

    def ready():
        if not began and saved_epoch(out) is not None:
            began.append(time.time())
        return bool(began) and time.time() - began[0] >= delay
    _kill_when(_start(out), ready)
    _resume(out)  # the killed run's lock went with it
    _assert_same_run(out, reference)


def test_a_failed_checkpoint_write_is_one_error_and_the_last_checkpoint_resumes(tmp_path, reference, monkeypatch):
    out = tmp_path / "run"
    real, calls = Accelerator.save_state, []

    def full_disk(self, *a, **kw):
        calls.append(1)
        if len(calls) == 3:  # the epoch-2 checkpoint (epoch 0 and 1 were written)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *a, **kw)
    monkeypatch.setattr(Accelerator, "save_state", full_disk)
    with pytest.raises(moeify.MoeifyError, match=r"No space left on device.*checkpoint of epoch 1 is intact"):
        robustify(load_recipe("quickstart", RUN), out)
    assert saved_epoch(out) == 1 and not (out / "checkpoint.tmp").exists()
    monkeypatch.setattr(Accelerator, "save_state", real)
    _resume(out)
    _assert_same_run(out, reference)


def test_an_unwritable_out_is_one_error(tmp_path):
    (tmp_path / "file").write_text("mine")
    with pytest.raises(moeify.MoeifyError, match="cannot write to"):
        robustify(load_recipe("quickstart", RUN), tmp_path / "file" / "run")
    assert (tmp_path / "file").read_text() == "mine"


EVAL = ["--n", "64", "--attacks", "pgd,autoattack,adaptive", "--autoattack", "apgd-ce", "--square-queries", "20",
        "--pgd-steps", "2", "--batch-size", "64"]


def _eval_request(model):
    return EvalRequest(model_file=str(model), n=64, attacks=("pgd", "autoattack", "adaptive"), autoattack=("apgd-ce",),
                       square_queries=20, pgd_steps=2, batch_size=64)


def test_a_killed_evaluation_continues_from_its_finished_attacks(tmp_path, reference):
    """SIGKILLed once PGD is done (in AutoAttack), `moeify evaluate --resume` keeps the finished
    parts and writes the report of an evaluation left alone; without --resume it is refused."""
    model = reference[1] / "model.moe"
    whole = evaluate_file(_eval_request(model), tmp_path / "whole")
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "moeify", "evaluate", str(model), "--out", str(out)] + EVAL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert _kill_when(proc, lambda: (out / "report.parts" / "pgd.rank0.pt").is_file()), proc.stderr.read().decode()
    with pytest.raises(moeify.MoeifyError, match="holds a stopped evaluation; rerun with --resume"):
        evaluate_file(_eval_request(model), out)
    logs = []
    resumed = evaluate_file(_eval_request(model), out, resume=True, log=logs.append)
    assert "pgd: kept from the stopped run" in logs and "adaptive done" in " ".join(logs)
    drop = ("timings_s", "model_file")
    assert {k: v for k, v in resumed.items() if k not in drop} == {k: v for k, v in whole.items() if k not in drop}
    assert json.loads((out / "report.json").read_text())["clean_acc"] == whole["clean_acc"]
    assert not (out / "report.parts").exists()


def test_an_evaluation_in_two_slices_joins_to_one(tmp_path, reference):
    """The study's clean and PGD split in two (eval.json on the first images, eval-rest.json on the
    others) gives every image the result one evaluation of them all gives; a start past the last
    image, or below 0, is refused with nothing written."""
    model = reference[1] / "model.moe"

    def req(n, start=0):
        return EvalRequest(model_file=str(model), n=n, start=start, attacks=("pgd",), pgd_steps=2, batch_size=16,
                           routing=False)
    whole = evaluate_file(req(48), tmp_path / "whole")
    joined = _joined(evaluate_file(req(16), tmp_path / "head"), evaluate_file(req(48, 16), tmp_path / "rest"))
    assert joined["per_example"] == {k: whole["per_example"][k] for k in ("clean", "pgd")}
    assert joined["n_examples"] == 48
    assert (joined["clean_acc"], joined["pgd_acc"]) == pytest.approx((whole["clean_acc"], whole["pgd_acc"]))
    with pytest.raises(moeify.MoeifyError, match="start 48 leaves no image of the 48"):
        evaluate_file(req(48, 48), tmp_path / "none")
    with pytest.raises(moeify.MoeifyError, match="start must be >= 0"):
        evaluate_file(req(48, -1), tmp_path / "none")
    assert not (tmp_path / "none").exists()


STUDY = """name: tiny
base: quickstart
rows:
  - {name: Dense-AT, set: [model.kind=dense, train.method=at]}
  - {name: MoE-AdvMoE, set: []}
evaluate: {n: 48, attacks: [pgd], pgd_steps: 2, batch_size: 48, latency_repeats: 2}
"""


def test_a_killed_study_resumes_to_the_same_results(tmp_path):
    """`moeify study` SIGKILLed at a seeded moment of its second row and rerun: the same numbers
    as a study left alone (timings aside)."""
    from moeify.study import run_study

    study = tmp_path / "tiny.yaml"
    study.write_text(STUDY)
    whole = run_study(str(study), tmp_path / "whole", overrides=TINY, log=lambda s: None)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "moeify", "study", str(study), "--out", str(out)] + [v for s in TINY for v in ("--set", s)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "2"})
    second, delay, began = out / "rows" / "moe-advmoe" / "seed-0", random.Random(5).uniform(0, 2), []

    def ready():
        if not began and (second / "recipe.yaml").is_file():
            began.append(time.time())
        return bool(began) and time.time() - began[0] >= delay
    assert _kill_when(proc, ready), proc.stderr.read().decode()[-2000:]
    resumed = run_study(str(study), out, overrides=TINY, log=lambda s: None)
    keep = ("name", "clean_acc", "pgd_acc", "flip_rate", "ra_e", "macs_per_sample", "n_examples", "flags", "entropy")
    assert [{k: r[k] for k in keep} for r in resumed["rows"]] == [{k: r[k] for k in keep} for r in whole["rows"]]
