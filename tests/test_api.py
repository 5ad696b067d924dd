"""The public API contract: model untouched, keys kept, MAC counts, save/load, clean refusals."""
import copy
import subprocess
import sys

import pytest
import torch

import moeify
from conftest import randomize
from models import DataDependent, NoConv, PreActResNet


def test_original_model_untouched_and_keys_kept():
    model = randomize(moeify.create_model("resnet18")).train()
    before = copy.deepcopy(model.state_dict())
    types = [type(m) for m in model.modules()]
    moe = moeify.convert(model, experts=4, top_k=2, example_inputs=torch.rand(1, 3, 64, 64))
    assert [type(m) for m in model.modules()] == types
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert moe.training  # keeps the original's mode
    missing, unexpected = moe.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected  # dense weights load into the MoE model under their own keys
    assert missing and all(k.startswith("moeify_layers.") for k in missing)  # only routers are new


def test_count_macs_resnet18():
    model = moeify.create_model("resnet18")
    x = torch.rand(2, 3, 224, 224)
    dense = moeify.count_macs(model, x)
    assert abs(dense / 1.814e9 - 1) < 0.02
    moe = moeify.convert(model, experts=2, top_k=1, scope="paper")
    assert moeify.count_macs(moe, x) <= 0.45 * dense
    with moeify.execution("masked"):
        assert moeify.count_macs(moe, x) > dense  # the reference path computes every expert (+ routers)


def test_plan_is_printable_and_converts_nothing():
    model = moeify.create_model("resnet18")
    p = moeify.plan(model, experts=4, top_k=2)
    text = str(p)
    assert "layer1.0.conv1" in text and "left dense" in text and "residual" in text
    assert p.moe_macs < p.dense_macs
    assert not any("MoE" in type(m).__name__ for m in model.modules())


def test_spec_object_and_kwargs_are_equivalent():
    model = randomize(PreActResNet()).eval()
    x = torch.rand(2, 3, 16, 16)
    spec = moeify.MoESpec(experts=2, top_k=1, scope="branches")
    a = moeify.plan(model, spec=spec, example_inputs=x)
    b = moeify.plan(model, experts=2, top_k=1, scope="branches", example_inputs=x)
    assert [lp.name for lp in a.layers] == [lp.name for lp in b.layers]
    assert moeify.MoESpec.from_dict(spec.to_dict()) == spec


def test_save_load_round_trip_named_and_user(tmp_path):
    x = torch.rand(3, 3, 64, 64)
    moe = moeify.convert(moeify.create_model("resnet18"), experts=4, top_k=2, example_inputs=x).eval()
    moeify.save(moe, tmp_path / "r18.moe")
    again = moeify.load(tmp_path / "r18.moe")
    with torch.no_grad():
        assert torch.equal(moe(x), again(x))
    user = moeify.convert(randomize(PreActResNet()), experts=2, example_inputs=x, scope="branches").eval()
    moeify.save(user, tmp_path / "user.moe")
    with pytest.raises(moeify.MoeifyError, match="pass model="):
        moeify.load(tmp_path / "user.moe")
    loaded = moeify.load(tmp_path / "user.moe", model=PreActResNet())
    with torch.no_grad():
        assert torch.equal(user(x), loaded(x))
    with pytest.raises(moeify.MoeifyError, match="does not match"):
        moeify.load(tmp_path / "user.moe", model=PreActResNet(width=32))


LOAD_PICKLED = """
import sys, torch, moeify
moe, x, y = torch.load(sys.argv[1], weights_only=False)
with torch.no_grad():
    assert torch.equal(moe(x), y), "outputs differ"
    next(iter(moeify.moe_layers(moe).values())).router.proj.weight.fill_(float("nan"))
    try:
        moe(x)
    except moeify.RoutingError:
        print("refused")
"""


def test_a_converted_model_pickles_whole(tmp_path):
    """torch.save of the whole model: a process that never converted a model loads it, with its
    MoE layers, the calls the rewrite inserted (the NaN/inf route check, the packed residual
    add) and its plan, and computes the same outputs; values kept between calls are not saved."""
    x = torch.rand(2, 3, 32, 32)
    moe = moeify.convert(randomize(moeify.create_model("cifar_resnet18", width=8)), experts=2, top_k=1,
                         scope="paper", example_inputs=x).eval()
    with torch.no_grad():
        for _ in range(2):
            moe(x[:1])  # the batch-1 lane keeps weight slices and lookups with the modules
        y = moe(x)
    torch.save((moe, x, y), tmp_path / "moe.pt")
    again = torch.load(tmp_path / "moe.pt", weights_only=False)[0]
    assert [(n.op, n.target) for n in again.graph.nodes] == [(n.op, n.target) for n in moe.graph.nodes]
    assert str(again.moeify_plan) == str(moe.moeify_plan)
    assert not any(k.startswith("_moe_") for m in again.modules() for k in vars(m))
    done = subprocess.run([sys.executable, "-c", LOAD_PICKLED, str(tmp_path / "moe.pt")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "refused", done.stderr[-2000:]


@pytest.mark.parametrize("kwargs,match", [
    (dict(experts=0), "experts must be"),
    (dict(experts=2, top_k=3), "cannot exceed"),
    (dict(experts=2, scope="everything"), "unknown scope"),
    (dict(experts=2, cuts="some"), "unknown cuts"),
    (dict(experts=3, layers=("blocks.0.conv1",)), "cannot be split into 3"),
    (dict(experts=2, layers=("nope",)), "no convertible channel group"),
])
def test_bad_specs_raise_conversion_error(kwargs, match):
    kwargs.setdefault("scope", "branches")
    with pytest.raises(moeify.ConversionError, match=match):
        moeify.convert(PreActResNet(), example_inputs=torch.rand(1, 3, 16, 16), **kwargs)


def test_untraceable_and_unconvertible_models():
    with pytest.raises(moeify.ConversionError, match="cannot trace DataDependent.*models.py"):
        moeify.convert(DataDependent(), experts=2, example_inputs=torch.rand(1, 3, 8, 8))
    with pytest.raises(moeify.ConversionError, match="no layer of NoConv"):
        moeify.convert(NoConv(), experts=2, example_inputs=torch.rand(1, 3, 8, 8))


def test_unconvertible_layers_stay_dense_with_reason():
    p = moeify.plan(moeify.create_model("resnet18"), experts=3)
    assert p.layers == [] or all(lp.channels % 3 == 0 for lp in p.layers)
    assert any("cannot be split into 3 equal experts" in d.reason for d in p.dense)


def test_unknown_model_suggests_names():
    with pytest.raises(moeify.MoeifyError, match="did you mean resnet18"):
        moeify.create_model("resnet181")


@pytest.mark.parametrize("scope", ["hidden", "paper"])
def test_static_twin_is_the_moe_routed_to_its_first_experts(scope):
    """The twin (S-Dense) computes what the MoE computes when every router picks experts 0..K-1,
    with the MoE's executed MACs minus its routers'."""
    from moeify.twin import static_twin

    model = randomize(PreActResNet()).eval()
    x = torch.rand(4, 3, 16, 16)
    moe = moeify.convert(model, experts=4, top_k=2, example_inputs=x, scope=scope).eval()
    twin = static_twin(model, experts=4, top_k=2, example_inputs=x, scope=scope).eval()
    with torch.no_grad():
        for layer in moeify.moe_layers(moe).values():
            layer.router.proj.weight.zero_()
            layer.router.proj.bias.copy_(torch.tensor([3.0, 2.0, 1.0, 0.0]))
        out, ref = moe(x), twin(x)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert moeify.count_macs(twin, x) < moeify.count_macs(moe, x) < 1.02 * moeify.count_macs(twin, x)
    assert moeify.count_macs(twin, x) < 0.75 * moeify.count_macs(model, x)
