"""The command line: tables, saved files, and one-line errors with non-zero exits."""
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).parent


def run(*args, cwd=None):
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "moeify", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def run_here(capsys, *args):
    """The command line in this process (no interpreter start-up): exit code, stdout and stderr as
    ``run`` gives them."""
    from moeify.cli import main

    argv, sys.argv = sys.argv, ["moeify", *args]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = argv
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def test_convert_prints_plan_and_saves_then_inspect(tmp_path):
    out = tmp_path / "r18.moe"
    r = run("convert", "resnet18", "--experts", "4", "--input-size", "3,64,64", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "layer1.0.conv1" in r.stdout and "left dense" in r.stdout and "MoE layers" in r.stdout
    assert out.exists()
    r = run("inspect", str(out))
    assert r.returncode == 0, r.stderr
    assert "torchvision:resnet18" in r.stdout and "layer4.1.conv1" in r.stdout
    again = run("convert", "resnet18", "--experts", "4", "--input-size", "3,64,64", "--out", str(out))
    assert again.returncode != 0 and "already exists" in again.stderr  # never overwrites silently


def test_convert_user_file():
    r = run("convert", f"{TESTS / 'models.py'}:build_preact", "--experts", "2", "--scope", "paper",
            "--input-size", "3,32,32", "--num-classes", "10")
    assert r.returncode == 0, r.stderr
    assert "blocks.0.conv1" in r.stdout and "blocks.0.conv2" in r.stdout


@pytest.mark.parametrize("args,message", [
    (("convert", "resnet18", "--experts", "0"), "experts must be"),
    (("convert", "resnet18", "--experts", "2", "--top-k", "3"), "cannot exceed"),
    (("convert", "resnet181", "--experts", "2"), "did you mean resnet18"),
    (("convert", "missing.py:build", "--experts", "2"), "not found"),
    (("convert", f"{TESTS / 'models.py'}:nope", "--experts", "2"), "has no function"),
    (("convert", "resnet18", "--experts", "2", "--input-size", "3,x"), "--input-size"),
    (("inspect", "nothing.moe"), "no such file"),
    (("inspect", "[/x].moe"), "no such file '[/x].moe'"),  # printed as text, never read as rich markup
    (("study", "nosuch"), "unknown study 'nosuch'; built-in studies: fmnist"),
    (("study", "fmnist", "--seeds", "0,x"), "--seeds must be comma-separated integers like 0,1,2"),
    (("study", "fmnist", "--seeds", "1,1"), "--seeds: seeds must be a non-empty list of distinct integers"),
    (("bench", "cifar_resnet18", "--batch", "0"), "--batch must be positive integers like 1,16"),
    (("evaluate", "run", "--autoattack", "apgd-ce,fab"), "--autoattack: unknown attack(s) fab; use standard or some of"),
    (("evaluate", "run", "--autoattack-targets", "3"), "--autoattack-targets applies to a subset of AutoAttack"),
    (("bench", "cifar_resnet18", "--model-kwargs", "width"), "--model-kwargs: 'width' is not key=value"),
    pytest.param(("bench-train", "--device", "cuda"), "no CUDA GPU is visible; use --device cpu",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")),
    (("bench-train", "--device", "gpu"), "--device must be cpu or cuda, not 'gpu'"),
    (("bench", "resnet18", "--device", "gpu"), "--device must be cpu or cuda, not 'gpu'"),
    (("bench", "resnet18", "--compile-mode", "fast"), "--compile-mode must be one of default,"),
    (("bench", "resnet18", "--strategies", "static,fast"), "--strategies must be some of masked,grouped,static,auto, not fast"),
    (("bench", "--calibrate", "cal.json", "--strategies", "static"), "--calibrate measures every strategy"),
    (("--allocator", "jemalloc", "convert", "resnet18"), "--allocator must be kept or system, not 'jemalloc'"),
])
def test_bad_input_is_one_line_without_traceback(capsys, args, message):
    r = run_here(capsys, *args)
    assert r.returncode != 0
    assert message in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_untraceable_model_names_the_line(tmp_path):
    src = tmp_path / "net.py"
    src.write_text("import torch\nfrom torch import nn\n\nclass Net(nn.Module):\n"
                   "    def __init__(self):\n        super().__init__()\n        self.c = nn.Conv2d(3, 8, 3)\n"
                   "    def forward(self, x):\n        if x.mean() > 0:\n            return self.c(x)\n"
                   "        return x\n\ndef build():\n    return Net()\n")
    r = run("convert", f"{src}:build", "--experts", "2", "--input-size", "3,8,8")
    assert r.returncode != 0 and "cannot trace" in r.stderr and "net.py:9" in r.stderr
    assert "Traceback" not in r.stderr
    r = run("--debug", "convert", f"{src}:build", "--experts", "2", "--input-size", "3,8,8")
    assert "Traceback" in r.stderr


def test_bench_times_all_variants_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    r = run("bench", f"{TESTS / 'models.py'}:build_preact", "--experts", "2", "--scope", "paper",
            "--input-size", "3,16,16", "--batch", "1,4", "--repeats", "1", "--mode", "train", "--json", str(out))
    assert r.returncode == 0, r.stderr
    import json

    record = json.loads(out.read_text())
    kept = platform.libc_ver()[0] == "glibc"  # the command line keeps freed memory by default (glibc)
    assert record["machine"].endswith("allocator kept" if kept else "allocator system")
    rows = record["rows"]
    assert {(x["batch"], x["variant"]) for x in rows} == {
        (b, v) for b in (1, 4) for v in ("dense", "static twin", "twin + routers", "moe masked", "moe grouped",
                                          "moe static", "moe auto")}
    for x in rows:  # a 95% interval around every speed-up (one round here: the point itself)
        assert x["speedup_low"] <= x["speedup"] + 1e-9 and x["speedup"] <= x["speedup_high"] + 1e-9, x["variant"]
    macs = {(x["batch"], x["variant"]): x["macs"] for x in rows}
    # grouped and static execute the twin's MACs plus their routers (static on the CPU only at batch 1,
    # above it the masked math); masked at least the dense MACs
    for strategy, b in (("moe grouped", 1), ("moe grouped", 4), ("moe static", 1)):
        assert macs[b, "static twin"] < macs[b, strategy] < 1.05 * macs[b, "static twin"] < macs[b, "dense"]
    assert macs[1, "moe masked"] >= macs[1, "dense"] and macs[4, "moe static"] >= macs[4, "dense"]
    # the twin + routers baseline adds the routers' MACs to the twin's, never more than the MoE runs
    assert macs[1, "static twin"] < macs[1, "twin + routers"] <= macs[1, "moe grouped"]
    for x in rows:  # auto's row names the strategy it ran at that batch, and counts that strategy's MACs
        assert (x["runs"] in ("masked", "grouped", "static")) == (x["variant"] == "moe auto"), x
        assert x["variant"] != "moe auto" or x["macs"] == macs[x["batch"], f"moe {x['runs']}"]
    assert "moe auto (" in r.stdout
    again = run("bench", f"{TESTS / 'models.py'}:build_preact", "--input-size", "3,16,16", "--json", str(out))
    assert again.returncode != 0 and "exists" in again.stderr
    some = tmp_path / "some.json"  # --strategies: dense and the twins, then only the strategies named
    r = run("bench", f"{TESTS / 'models.py'}:build_preact", "--input-size", "3,16,16", "--batch", "2", "--repeats", "1",
            "--strategies", "static,masked", "--json", str(some))
    assert r.returncode == 0, r.stderr
    assert [x["variant"] for x in json.loads(some.read_text())["rows"]] == [
        "dense", "static twin", "twin + routers", "moe masked", "moe static"]


def test_bench_train_reports_intervals_and_the_share_of_s_dense_gain(capsys, monkeypatch):
    """``bench-train`` times the five training steps in interleaved rounds and reports each ratio
    to dense TRADES with a 95% interval that holds its point estimate, and each row's share of
    S-Dense's gain over dense TRADES (the issue's training target), in its rows and its table."""
    import moeify.bench

    seen, measure = [], moeify.bench.train_steps

    def rows(*args, **kwargs):
        seen.extend(measure(*args, **kwargs))
        return seen

    monkeypatch.setattr(moeify.bench, "train_steps", rows)
    r = run_here(capsys, "bench-train", "--batch", "4", "--repeats", "3", "--set", "model.kwargs.width=4",
                 "--set", "model.channels_last=true")
    assert r.returncode == 0, r.stderr
    assert [x["variant"] for x in seen] == ["dense TRADES", "S-Dense TRADES", "S-Dense + routers TRADES", "MoE TRADES",
                                           "MoE AdvMoE"]
    for x in seen:
        assert x["vs_dense_trades_low"] <= x["vs_dense_trades"] + 1e-9 <= x["vs_dense_trades_high"] + 2e-9, x
        speedup, gain = 1 / x["vs_dense_trades"], 1 / seen[1]["vs_dense_trades"] - 1
        if gain >= moeify.bench.MIN_TWIN_GAIN:  # else noise over noise: NaN, as bench's share of the twin's gain
            assert x["of_sdense_gain"] == pytest.approx((speedup - 1) / gain)
        else:
            assert math.isnan(x["of_sdense_gain"])
    assert "of S-Dense's gain" in r.stdout and "95% intervals" in r.stdout and "channels-last" in r.stdout
    assert "AdvMoE loss ce, one shared attack" in r.stdout  # the quickstart's AdvMoE, timed as it trains


@pytest.mark.parametrize("loss,kind", [("ce", "at"), ("trades", "trades")])
def test_bench_train_times_advmoe_with_the_recipes_loss(monkeypatch, loss, kind):
    """``bench-train``'s AdvMoE steps take the recipe's ``advmoe.loss``, as the trainer's do: the
    quickstart trains AdvMoE with cross-entropy on the attack, the other rows are TRADES steps."""
    import moeify.bench
    import moeify.train.methods

    kinds, measure = [], moeify.train.methods.robust_loss

    def recording(*args, **kwargs):
        kinds.append(args[4])
        return measure(*args, **kwargs)

    monkeypatch.setattr(moeify.train.methods, "robust_loss", recording)
    rows = moeify.bench.train_steps("quickstart", batch=4, repeats=1,
                                    overrides=["model.kwargs.width=4", f"advmoe.loss={loss}"])
    assert rows[-1]["variant"] == "MoE AdvMoE" and rows[-1]["advmoe_loss"] == loss
    # a warm-up round and a timed one (variants in shuffled order): four TRADES rows, AdvMoE's two steps
    assert sorted(kinds) == sorted(2 * (["trades"] * 4 + [kind] * 2))


def test_bench_calibrate_sweep_writes_a_table_auto_reads(capsys, tmp_path, monkeypatch):
    """``bench --calibrate --sweep``: points for 2, 4 and 8 experts, which ``auto`` reads and picks
    the measured-fastest strategy from (a tiny reference model stands in for the real ones)."""
    import moeify.bench
    from moeify.nn.executors import auto
    from moeify.spec import MoESpec

    monkeypatch.setattr(moeify.bench, "CALIBRATION_MODELS", (
        ("cifar_resnet_small", MoESpec(experts=2, top_k=1, scope="hidden"), (1, 16, 16), {"width": 8, "in_chans": 1}),))
    out = tmp_path / "cal.json"
    r = run_here(capsys, "bench", "--calibrate", str(out), "--sweep", "--batch", "4", "--repeats", "1")
    assert r.returncode == 0, r.stderr
    table = auto.calibration(str(out))
    points = table["cpu", "eval"]
    assert sorted(n for _, _, n, _ in points) == [2, 4, 8]
    for macs, batch, n, times in points:
        assert times[auto.fastest("cpu", batch, macs, "eval", n, table=table)] == min(times.values())
    assert f"MOEIFY_CALIBRATION={out}" in r.stdout
    monkeypatch.setenv("MOEIFY_CALIBRATION", str(out))  # what the message says: auto now reads it
    assert auto.active_table()["cpu", "eval"] == points
    assert auto.active_table()["cpu", "train"] == auto.calibration()["cpu", "train"]
    again = run_here(capsys, "bench", "--calibrate", str(out), "--batch", "4")
    assert again.returncode != 0 and "exists" in again.stderr


def test_a_stopped_calibration_keeps_the_reference_models_it_measured(capsys, tmp_path, monkeypatch):
    """``bench --calibrate`` rewrites its table after each reference model: a run stopped during the
    second model (a lent GPU's time running out) leaves the first model's points, which auto reads."""
    import moeify.bench
    from moeify.errors import MoeifyError
    from moeify.nn.executors import auto
    from moeify.spec import MoESpec

    tiny = ("cifar_resnet_small", MoESpec(experts=2, top_k=1, scope="hidden"), (1, 16, 16), {"width": 8, "in_chans": 1})
    monkeypatch.setattr(moeify.bench, "CALIBRATION_MODELS", (tiny, (*tiny[:3], {"width": 4, "in_chans": 1})))
    compare = moeify.bench.compare

    def stopped_at_the_second(name, spec, batches, **kw):
        if kw["model_kwargs"]["width"] == 4:
            raise MoeifyError("stopped")
        return compare(name, spec, batches, **kw)

    monkeypatch.setattr(moeify.bench, "compare", stopped_at_the_second)
    out = tmp_path / "cal.json"
    r = run_here(capsys, "bench", "--calibrate", str(out), "--batch", "2", "--repeats", "1")
    assert r.returncode != 0 and "stopped" in r.stderr
    points = auto.calibration(str(out))["cpu", "eval"]
    assert [batch for _, batch, _, _ in points] == [2] and not (tmp_path / "cal.json.part").exists()


@pytest.mark.parametrize("args,message", [
    (("robustify", "--recipe", "nosuchrecipe"), "unknown recipe 'nosuchrecipe'"),
    (("robustify", "--recipe", "quickstart", "--set", "train.epochz=1"), "unknown key 'train.epochz'"),
    (("robustify", "--resume"), "--resume needs --out"),
])
def test_robustify_bad_input_is_one_line(capsys, args, message):
    r = run_here(capsys, *args)
    assert r.returncode != 0 and message in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_robustify_refuses_an_existing_run_folder(capsys, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    r = run_here(capsys, "robustify", "--recipe", "quickstart", "--out", str(tmp_path))
    assert r.returncode != 0 and "already exists" in r.stderr and "Traceback" not in r.stderr
    assert (tmp_path / "keep.txt").read_text() == "mine"
