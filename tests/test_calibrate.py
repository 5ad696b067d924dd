"""Converting a trained dense model with a calibration set: permuting a group's channels is exact on
the model zoo (with every expert on, the calibrated MoE is the dense model), fitted routers route
a trained model better than random ones, and bad calibration input is a one-line error."""
import copy
import os

import pytest
import torch

import moeify
from conftest import randomize
from models import build_zoo
from moeify.conversion import _analyse
from moeify.experts import balanced_clusters, permutable, permute
from moeify.spec import MoESpec

ZOO = ["torchvision:resnet18", "torchvision:mobilenet_v3_small", "timm:efficientnet_b0", "zoo"]


def _model(name):
    return randomize(build_zoo() if name == "zoo" else moeify.create_model(name)).eval()


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", ZOO)
def test_permuting_expert_channels_is_exact(name):
    model = _model(name)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    gm, plan = _analyse(model, (x,), MoESpec(experts=2, top_k=1))
    g = torch.Generator().manual_seed(0)
    done = 0
    for lp in plan.layers:
        if permutable(gm, lp) is None:
            permute(gm, lp, torch.randperm(lp.channels, generator=g).tolist())
            done += 1
    assert done >= 1
    with torch.no_grad():
        assert _rel(gm(x), ref) <= 1e-5
        full = moeify.convert(model, experts=2, top_k=2, example_inputs=x, calibration=torch.rand(8, 3, 64, 64)).eval()
        assert _rel(full(x), ref) <= 1e-4  # permuted, routers fitted: with every expert on, the dense model
    assert any(lp.experts_by.startswith(("cluster", "contiguous (")) for lp in full.moeify_plan.layers)


def test_balanced_clusters_are_equal_sized_and_find_planted_groups():
    g = torch.Generator().manual_seed(0)
    signal = torch.rand(3, 200, generator=g)  # three activity patterns over 200 samples
    profiles = torch.cat([signal[i % 3] + 0.05 * torch.rand(200, generator=g) for i in range(12)]).reshape(12, 200)
    clusters = balanced_clusters(profiles, 3)
    assert sorted(len(c) for c in clusters) == [4, 4, 4]
    assert sorted(sorted(i % 3 for i in c) for c in clusters) == [[0] * 4, [1] * 4, [2] * 4]


@pytest.mark.parametrize("bad,message", [
    (torch.rand(0, 1, 28, 28), "calibration set is empty"),
    ([], "calibration set is empty"),
    (torch.rand(4, 3, 28, 28), r"shaped like the model's input \(1, 28, 28\)"),
    ([torch.rand(4, 1, 28, 28), "images"], "got str"),
])
def test_bad_calibration_input_is_a_clear_error(bad, message):
    model = moeify.create_model("cifar_resnet_small", num_classes=10, in_chans=1, width=8, stem_stride=2).eval()
    with pytest.raises(moeify.ConversionError, match=message):
        moeify.convert(model, experts=2, top_k=1, example_inputs=torch.rand(2, 1, 28, 28), calibration=bad)


@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"), reason="needs dataset-fashion-mnist")
def test_fitted_routers_follow_a_trained_model_better_than_random_ones():
    """A briefly trained tiny CNN, converted with calibration: its outputs stay closer to the dense
    model's on held-out images than the same MoE's with fresh random routers."""
    from moeify.data import load_data, to_float

    torch.manual_seed(0)
    data = load_data("fashion-mnist", val_size=100, seed=0, train_subset=2000)
    x = to_float(torch.stack([data.train[i][0] for i in range(2000)]))
    y = torch.tensor([int(data.train[i][1]) for i in range(2000)])
    dense = moeify.create_model("cifar_resnet_small", num_classes=10, in_chans=1, width=8, stem_stride=2,
                                normalize={"mean": [0.29], "std": [0.35], "channels": 1})
    opt = torch.optim.SGD(dense.parameters(), lr=0.1, momentum=0.9)
    for i in range(0, 1500, 50):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(dense(x[i:i + 50]), y[i:i + 50]).backward()
        opt.step()
    dense.eval()
    moe = moeify.convert(dense, experts=4, top_k=2, example_inputs=x[:2], calibration=x[:1500]).eval()
    rand = copy.deepcopy(moe)
    for layer in moeify.moe_layers(rand).values():
        layer.router.proj.reset_parameters()
    held = x[1500:]
    with torch.no_grad():
        target = torch.softmax(dense(held), 1)

        def gap(m):
            return torch.nn.functional.kl_div(torch.log_softmax(m(held), 1), target, reduction="batchmean").item()
        assert gap(moe) < gap(rand)
        assert (moe(held).argmax(1) == target.argmax(1)).float().mean() > (rand(held).argmax(1) == target.argmax(1)).float().mean()


@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"), reason="needs dataset-fashion-mnist")
def test_cli_converts_a_trained_dense_file_with_calibration_and_refuses_foreign_weights(tmp_path, capsys):
    from test_cli import run_here

    dense = moeify.create_model("cifar_resnet_small", num_classes=10, in_chans=1, width=8, stem_stride=2,
                                input_size=(1, 28, 28))
    moeify.save(dense, tmp_path / "dense.moe")
    r = run_here(capsys, "convert", str(tmp_path / "dense.moe"), "--experts", "4", "--calibrate", "fashion-mnist",
                 "--calibration-size", "64", "--distil-steps", "2", "--distil-batch", "32", "--distil-eps", "0.1",
                 "--out", str(tmp_path / "m.moe"))
    assert r.returncode == 0, r.stderr
    assert "MoE layers" in r.stdout and moeify.moe_layers(moeify.load(tmp_path / "m.moe"))
    assert "2-step PGD inputs (eps 0.1)" in r.stdout  # a robust teacher's robustness is distilled too
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "other.pt")
    r = run_here(capsys, "convert", "resnet18", "--weights", str(tmp_path / "other.pt"))
    assert r.returncode != 0 and "does not fit resnet18" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    moeify.save(moeify.load(tmp_path / "m.moe"), tmp_path / "moe.moe")
    r = run_here(capsys, "convert", str(tmp_path / "moe.moe"), "--experts", "2")
    assert r.returncode != 0 and "is not a dense model" in r.stderr


@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"), reason="needs dataset-fashion-mnist")
def test_a_recipe_starts_an_moe_from_trained_dense_weights(tmp_path):
    """moe.experts_by: cluster with train.init = a dense run's model: the MoE starts as the converted
    dense model (clustered experts, fitted routers), not from random weights."""
    from moeify.recipes import load_recipe
    from moeify.train import robustify
    from test_robustify import TINY

    robustify(load_recipe("quickstart", TINY + ["model.kind=dense", "train.method=standard", "train.epochs=1"]),
              tmp_path / "dense")
    init = tmp_path / "dense" / "model.moe"
    sets = TINY + ["train.epochs=1", "train.method=at", "train.update=routers", "train.lr=0", "moe.experts_by=cluster",
                   "moe.calibration_size=64", f"train.init={init}", "moe.experts=4", "moe.top_k=4"]
    robustify(load_recipe("quickstart", sets), tmp_path / "moe")
    dense, moe = moeify.load(init), moeify.load(tmp_path / "moe" / "model.moe")
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():  # routers at lr 0, experts frozen, every expert on: the converted model is the dense one
        assert _rel(moe(x), dense(x)) <= 1e-4
    with pytest.raises(moeify.MoeifyError, match="experts_by cluster converts trained dense weights"):
        load_recipe("quickstart", ["moe.experts_by=cluster"])


def test_calibration_may_be_an_iterator_of_batches_for_conversion_and_distillation():
    """A generator of batches, or of (inputs, labels) pairs as a DataLoader gives, serves conversion and
    distillation, and is read whole."""
    torch.manual_seed(0)
    dense = moeify.create_model("cifar_resnet_small", num_classes=10, in_chans=1, width=8, stem_stride=2,
                                input_size=(1, 28, 28)).eval()
    x = torch.rand(24, 1, 28, 28)
    moe = moeify.convert(dense, experts=2, top_k=1, calibration=(b for b in x.split(8)))
    seen = []
    losses = moeify.distil(moe, dense, ((seen.append(len(b)) or b, None) for b in x.split(8)), steps=3, batch_size=8)
    assert seen == [8, 8, 8]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    with pytest.raises(moeify.MoeifyError, match="update must be all or routers"):
        moeify.distil(moe, dense, x, steps=1, update="experts")
