"""``fold_batchnorm``: BatchNorm folded into the convs changes no output (dense, or the MoE under
every execution strategy, routes spread), folds every BatchNorm that follows a conv, and leaves
the user's model as it was."""
import json

import pytest
import torch
from torch import nn

import moeify
from moeify.bench import spread_routing
from moeify.nn.executors import EXECUTORS
from test_cli import TESTS, run_here

CASES = {  # name: (input size, scope, constructor kwargs)
    "cifar_resnet18": ((3, 32, 32), "paper", {"width": 8}),
    "timm:efficientnet_b0": ((3, 32, 32), "hidden", {}),  # BatchNormAct, depthwise convs inside MoE layers
}


def _trained_bn(model: nn.Module) -> nn.Module:
    """Statistics and affine parameters away from a fresh BatchNorm's (which folds to nearly nothing)."""
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=gen) * 2 - 1)
            m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=gen) - 0.5)
    return model.eval()


def _batchnorms(gm: torch.fx.GraphModule) -> int:
    return sum(isinstance(gm.get_submodule(n.target), nn.modules.batchnorm._BatchNorm)
               for n in gm.graph.nodes if n.op == "call_module")


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> bool:
    return bool((a - b).abs().max() <= rtol * b.abs().max())


@pytest.mark.parametrize("name", list(CASES))
def test_folded_moe_equals_unfolded_under_every_strategy(name, monkeypatch):
    monkeypatch.setitem(EXECUTORS["static"].gather_max_batch, "cpu", 8)  # static's gathered path too
    size, scope, kwargs = CASES[name]
    torch.manual_seed(0)
    dense = _trained_bn(moeify.create_model(name, input_size=size, **kwargs))
    moe = moeify.convert(dense, experts=2, top_k=1, example_inputs=torch.rand(2, *size), scope=scope).eval()
    spread_routing(moe, seed=1)
    before = {k: v.clone() for k, v in moe.state_dict().items()}
    folded = moeify.fold_batchnorm(moe)
    assert _batchnorms(moe) > 0 and _batchnorms(folded) == 0
    assert all(torch.equal(v, before[k]) for k, v in moe.state_dict().items())  # the user's model untouched
    x = torch.rand(8, *size)
    with torch.no_grad(), moeify.execution("masked"):
        ref = moe(x)
        assert _close(moeify.fold_batchnorm(dense)(x), dense(x))
    for strategy in ("masked", "grouped", "static", "auto"):
        with torch.no_grad(), moeify.execution(strategy):
            assert _close(folded(x), ref), strategy


def test_folded_moe_with_every_expert_on_is_the_folded_dense_model():
    size, scope, kwargs = CASES["cifar_resnet18"]
    torch.manual_seed(0)
    dense = _trained_bn(moeify.create_model("cifar_resnet18", input_size=size, **kwargs))
    moe = moeify.convert(dense, experts=2, top_k=2, example_inputs=torch.rand(2, *size), scope=scope).eval()
    x = torch.rand(4, *size)
    with torch.no_grad():
        assert _close(moeify.fold_batchnorm(moe)(x), moeify.fold_batchnorm(dense)(x))


def test_fold_refuses_a_training_model_and_saving_the_folded_one(tmp_path):
    dense = moeify.create_model("cifar_resnet18", input_size=(3, 32, 32), width=8)
    with pytest.raises(moeify.MoeifyError, match="call model.eval"):
        moeify.fold_batchnorm(dense)
    folded = moeify.fold_batchnorm(dense.eval())
    with pytest.raises(moeify.MoeifyError, match="save the model before folding"):
        moeify.save(folded, tmp_path / "folded.moe")
    assert not (tmp_path / "folded.moe").exists()


def test_bench_fold_bn_times_folded_variants_and_refuses_training(capsys, tmp_path):
    model, out = f"{TESTS / 'models.py'}:build_preact", tmp_path / "bench.json"
    r = run_here(capsys, "bench", model, "--experts", "2", "--scope", "paper", "--input-size", "3,16,16",
                 "--batch", "2", "--repeats", "1", "--fold-bn", "--json", str(out))
    assert r.returncode == 0, r.stderr
    table = json.loads(out.read_text())
    assert table["batchnorm_folded"] and {row["variant"] for row in table["rows"]} >= {"dense", "moe auto"}
    bad = run_here(capsys, "bench", model, "--input-size", "3,16,16", "--mode", "train", "--fold-bn")
    assert bad.returncode != 0 and "--fold-bn folds inference BatchNorm" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
