"""What each evaluation metric means, checked on tiny models, and one command for dense, S-Dense
and MoE models."""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import moeify
from conftest import randomize
from moeify.attacks import AttackConfig, pgd
from moeify.evaluate import EvalConfig, correct_from_bits, evaluate, pgd_accuracy, ra_e
from moeify.zoo import create_model

NORM = {"mean": [0.5], "std": [0.25], "channels": 1}


def _backbone():
    torch.manual_seed(0)
    return create_model("cifar_resnet_small", num_classes=10, in_chans=1, width=8, stem_stride=2, normalize=NORM).eval()


def _data(n=24):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def _moe(experts=2, top_k=1):
    x, _ = _data(2)
    return moeify.convert(_backbone(), experts=experts, top_k=top_k, example_inputs=x).eval()


def test_eps_zero_gives_clean_accuracy():
    x, y = _data()
    rep = evaluate(_moe(), x, y, EvalConfig(eps=0.0, attacks=("pgd",), pgd_steps=3))
    assert rep["pgd_acc"] == rep["clean_acc"]


def test_a_single_expert_never_flips():
    x, y = _data()
    rep = evaluate(_moe(experts=1, top_k=1), x, y, EvalConfig(eps=0.1, attacks=("pgd",), pgd_steps=3))
    assert rep["flip_rate"] == 0.0 and set(rep["flip_rate_per_layer"].values()) == {0.0}


def test_routing_dissection_can_be_left_out_without_changing_the_accuracies():
    """``routing=False`` (a study's second, larger clean/PGD evaluation) skips the flip rate, RA-R,
    RA-E and expert load, and leaves clean and PGD accuracy and each example's correctness as they are."""
    x, y = _data()
    moe = _moe()
    full = evaluate(moe, x, y, EvalConfig(eps=0.1, attacks=("pgd",), pgd_steps=3))
    lean = evaluate(moe, x, y, EvalConfig(eps=0.1, attacks=("pgd",), pgd_steps=3, routing=False))
    assert "flip_rate" in full and not {"flip_rate", "ra_e", "ra_r", "load_clean"} & set(lean)
    assert (lean["clean_acc"], lean["pgd_acc"], lean["per_example"]) == (full["clean_acc"], full["pgd_acc"],
                                                                         full["per_example"])


def test_compiled_evaluation_reports_what_eager_does(monkeypatch):
    """``compile``: the attacks and predictions call one ``torch.compile`` wrapper of the model (its
    MoE layers then run ``static``; eager ones run what ``auto`` picks), and every accuracy and
    every example's result is the eager evaluation's; routes spread over the experts."""
    from moeify.bench import spread_routing

    real, made = torch.compile, []
    monkeypatch.setattr(torch, "compile", lambda m, **kw: made.append(m) or real(m, backend="aot_eager", **kw))
    x, _ = _data()
    moe = moeify.convert(randomize(_backbone()), experts=2, top_k=1, example_inputs=x[:2]).eval()
    spread_routing(moe)
    with torch.no_grad():
        y = moe(x).argmax(1)  # labels the model mostly gets right, for the attacks to take away
    kw = dict(eps=0.1, attacks=("pgd", "autoattack"), autoattack=("apgd-ce",), pgd_steps=3, batch_size=24, routing=False)
    eager = evaluate(moe, x, y, EvalConfig(**kw))
    compiled = evaluate(moe, x, y, EvalConfig(compile=True, **kw))
    assert made == [moe] and compiled["compiled"] and not eager["compiled"]
    keys = ("clean_acc", "pgd_acc", "autoattack_acc", "worst_case_acc", "per_example")
    assert [compiled[k] for k in keys] == [eager[k] for k in keys]
    assert eager["clean_acc"] > eager["worst_case_acc"] > 0  # the attacks did something


def test_frozen_routes_change_nothing_when_routing_never_changes():
    moe = _moe(experts=4, top_k=2)
    with torch.no_grad():
        for layer in moeify.moe_layers(moe).values():
            layer.router.proj.weight.zero_()
            layer.router.proj.bias.copy_(torch.tensor([0.0, 3.0, 2.0, 1.0]))
    x, y = _data()
    cfg = EvalConfig(eps=0.1, pgd_steps=3)
    assert ra_e(moe, x, y, cfg) == pgd_accuracy(moe, x, y, cfg)


def test_autoattack_standard_is_at_least_as_strong_as_its_apgd_ce_part():
    """The standard suite starts with the same APGD-CE run, then attacks what survived further."""
    x, y = _data()
    moe = _moe()
    part = evaluate(moe, x, y, EvalConfig(eps=0.02, attacks=("autoattack",), autoattack=("apgd-ce",), batch_size=24))
    full = evaluate(moe, x, y, EvalConfig(eps=0.02, attacks=("autoattack",), batch_size=24))
    assert (part["autoattack_version"], full["autoattack_version"]) == ("apgd-ce", "standard")
    assert full["autoattack_acc"] <= part["autoattack_acc"] <= part["clean_acc"]


def test_eps_sweep_falls_to_zero():
    x, y = _data()
    rep = evaluate(_moe(), x, y, EvalConfig(eps=0.1, attacks=("sweep",)))
    accs = [p["acc"] for p in rep["eps_sweep"]]
    assert accs[0] == rep["clean_acc"] and accs[-1] <= 0.05


class Masked(nn.Module):
    """Gradient masking on purpose: the input's gradient is zero."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x.detach())


def test_a_model_that_zeroes_input_gradients_is_flagged():
    x, y = _data()
    rep = evaluate(Masked(_backbone()), x, y, EvalConfig(eps=0.1, attacks=("pgd",), pgd_steps=2))
    assert any("all-zero input gradient" in f for f in rep["flags"])


def test_more_steps_never_raise_accuracy_and_batch_independence():
    x, y = _data()
    rep = evaluate(_moe(), x, y, EvalConfig(eps=0.05, attacks=("pgd",), pgd_steps=3))
    assert rep["pgd_acc"] <= rep["clean_acc"] and rep["sanity_more_steps_acc"] <= rep["clean_acc"]
    assert rep["batch_independent"]


@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"), reason="needs dataset-fashion-mnist")
def test_dense_s_dense_and_moe_evaluate_through_one_command(tmp_path):
    x, _ = _data(2)
    dense = _backbone()
    models = {"dense": dense, "s-dense": moeify.static_twin(dense, experts=2, top_k=1, example_inputs=x),
              "moe": moeify.convert(dense, experts=2, top_k=1, example_inputs=x)}
    for kind, m in models.items():
        moeify.save(m, tmp_path / f"{kind}.moe")
        r = subprocess.run([sys.executable, "-m", "moeify", "evaluate", str(tmp_path / f"{kind}.moe"), "--dataset",
                            "fashion-mnist", "--eps", "0.1", "--n", "20", "--attacks", "pgd,adaptive,sweep",
                            "--square-queries", "20", "--pgd-steps", "2", "--out", str(tmp_path / kind)],
                           capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"})
        assert r.returncode == 0, r.stderr[-2000:]
        rep = json.loads((tmp_path / kind / "report.json").read_text())
        assert rep["kind"] == kind and rep["n_examples"] == 20 and "pgd_acc" in rep
        assert ("flip_rate" in rep) == (kind == "moe") and ("adaptive_acc" in rep) == (kind == "moe")
        # per-example correctness, for paired comparisons: the accuracies are its means
        bits = {k: correct_from_bits(v) for k, v in rep["per_example"].items()}
        assert all(len(b) == 20 for b in bits.values())
        assert bits["clean"].float().mean().item() == pytest.approx(rep["clean_acc"])
        assert bits["worst_case"].float().mean().item() == pytest.approx(rep["worst_case_acc"])
        assert not (bits["worst_case"] & ~bits["pgd"]).any()  # the worst case is correct only where PGD failed to flip
        assert (tmp_path / kind / "robust_vs_eps.png").is_file()
    again = subprocess.run([sys.executable, "-m", "moeify", "evaluate", str(tmp_path / "moe.moe"), "--dataset",
                            "fashion-mnist", "--eps", "0.1", "--out", str(tmp_path / "moe")], capture_output=True, text=True)
    assert again.returncode != 0 and "exists" in again.stderr and "Traceback" not in again.stderr


@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"), reason="needs dataset-fashion-mnist")
def test_two_processes_evaluate_every_example_once(tmp_path):
    """Through torchrun (or accelerate launch) the examples are sharded and the metrics gathered:
    the same example count and clean accuracy as one process."""
    x, _ = _data(2)
    moeify.save(moeify.convert(_backbone(), experts=2, top_k=1, example_inputs=x), tmp_path / "m.moe")
    args = ["-m", "moeify", "evaluate", str(tmp_path / "m.moe"), "--dataset", "fashion-mnist", "--eps", "0.1",
            "--n", "21", "--attacks", "pgd,adaptive", "--square-queries", "10", "--pgd-steps", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    # what torchrun sets up (torchrun itself would read "--n" as one of its own abbreviated options)
    procs = [subprocess.Popen([sys.executable] + args + ["--out", str(tmp_path / "two")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env={**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29544", "WORLD_SIZE": "2",
                                   "RANK": str(r), "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": "2"})
             for r in range(2)]
    for proc in procs:
        _, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-2000:]
    one = subprocess.run([sys.executable] + args + ["--out", str(tmp_path / "one")], capture_output=True, text=True,
                         env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    r2 = json.loads((tmp_path / "two" / "report.json").read_text())
    r1 = json.loads((tmp_path / "one" / "report.json").read_text())
    assert r2["processes"] == 2 and r2["n_examples"] == r1["n_examples"] == 21
    assert r2["clean_acc"] == r1["clean_acc"]
    # every example's correctness comes back in the examples' order, whichever process ran it
    assert r2["per_example"]["clean"] == r1["per_example"]["clean"]
    assert sum(sum(l["load"]) for l in r2["load_clean"]) == pytest.approx(len(r2["layers"]))


@pytest.mark.parametrize("restarts", [1, 2])
def test_pgd_spends_a_forward_on_ranking_only_between_restarts(restarts):
    """One restart returns where its steps end without another forward (ranking one candidate
    keeps it anyway); with several, each restart's end is ranked by one more forward."""
    model = _backbone()
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    x, y = _data(8)
    cfg = AttackConfig(eps=0.1, steps=3, alpha=0.03, restarts=restarts)
    adv = pgd(model, x, y, cfg, gen=torch.Generator().manual_seed(0))
    assert len(calls) == restarts * 3 + (restarts > 1) * restarts
    assert (adv - x).abs().max() <= 0.1 + 1e-6 and not adv.requires_grad


@pytest.mark.parametrize("kind", ["at", "trades"])
def test_a_training_attack_leaves_the_model_statistics_alone(kind):
    """A training step's attack runs in the recipe's BatchNorm mode (eval), the TRADES attack's
    clean distribution included, as TRADES computes it: a model in training mode comes out of
    the attack with its running statistics (BatchNorm's, the standardised routers') untouched."""
    from moeify.train.methods import _attack

    x, y = _data(8)
    moe = moeify.convert(_backbone(), experts=2, top_k=1, example_inputs=x[:2], router_norm=True).train()
    before = {k: v.clone() for k, v in moe.state_dict().items()}
    _attack(moe, x, y, kind, AttackConfig(eps=0.1, steps=2), None, torch.Generator().manual_seed(0))
    assert moe.training and all(torch.equal(before[k], v) for k, v in moe.state_dict().items())
