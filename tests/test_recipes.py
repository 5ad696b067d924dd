"""Recipes: every shipped recipe validates and builds its model; bad recipes fail with one line
naming the key and the file; the paper-setting recipes run one optimisation step on CIFAR-shaped data."""

import pytest
import torch

import moeify
from moeify.data import DataBundle, synthetic
from moeify.recipes import RECIPE_DIRS, load_recipe
from moeify.train.build import build_model, split_parameters, training_layout

RECIPES = sorted(p.stem for p in RECIPE_DIRS[0].glob("*.yaml"))


def _cifar_like(n=4, classes=10):
    ds = synthetic(n, (3, 32, 32), classes)
    return DataBundle("cifar10", ds, ds, ds, classes, (3, 32, 32), (0.5,) * 3, (0.25,) * 3)


def test_all_recipes_are_shipped():
    assert {"quickstart", "advmoe", "at", "trades", "standard", "advmoe-wrn28-10", "advmoe-vgg16",
            "advmoe-densenet"} <= set(RECIPES)


@pytest.mark.parametrize("classes", [10, 100])
@pytest.mark.parametrize("name", [r for r in RECIPES if r != "quickstart"])
def test_paper_recipes_build_and_take_one_step(name, classes):
    """Each CIFAR-10/100 recipe's model builds (dense, S-Dense or MoE as it says) and one SGD step on a
    synthetic CIFAR-shaped batch changes the weights and keeps the loss finite."""
    torch.manual_seed(0)
    recipe = load_recipe(name)
    model = build_model(recipe, _cifar_like(classes=classes)).train()
    if recipe.model.kind == "moe":
        assert moeify.moe_layers(model)
    routers, experts = split_parameters(model)
    assert bool(routers) == (recipe.model.kind == "moe")
    x, y = torch.rand(2, 3, 32, 32), torch.tensor([1, classes - 3])
    before = experts[-1].detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=recipe.train.lr, momentum=recipe.train.momentum)
    logits = model(x)
    assert logits.shape == (2, classes)
    loss = torch.nn.functional.cross_entropy(logits, y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and not torch.equal(before, experts[-1].detach())


def _write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize("text,overrides,message", [
    ("train:\n  epochz: 3\n", [], "unknown key 'train.epochz'"),
    ("train:\n  epochs: three\n", [], "train.epochs must be int"),
    ("train:\n  method: fgsm\n", [], "train.method must be one of"),
    ("model:\n  kind: dense\ntrain:\n  method: advmoe\n", [], "advmoe needs model.kind moe"),
    ("attack:\n  eps: -1\n", [], "attack.eps must be >= 0"),
    ("train:\n  expert_dropout: 1.0\n", [], "train.expert_dropout must be in [0, 1)"),
    ("train:\n  epochs: 2\n  warmup_epochs: 3\n", [], "train.warmup_epochs must be between 0 and train.epochs"),
    ("{}", ["train.lr"], "--set expects KEY=VALUE"),
    ("{}", ["data.batch_size=big"], "data.batch_size must be int"),
])
def test_bad_recipes_name_the_key_and_the_file(tmp_path, text, overrides, message):
    path = _write(tmp_path, text)
    with pytest.raises(moeify.MoeifyError) as e:
        load_recipe(path, overrides)
    assert message in str(e.value) and ("r.yaml" in str(e.value) or "--set" in str(e.value))


def test_overrides_apply_and_unknown_recipe_lists_builtins():
    r = load_recipe("quickstart", ["train.epochs=5", "moe.experts=4", "attack.eps=0.2"])
    assert (r.train.epochs, r.moe.experts, r.attack.eps) == (5, 4, 0.2)
    with pytest.raises(moeify.MoeifyError, match="built-in recipes: .*quickstart"):
        load_recipe("quikstart")


def test_training_layout_is_channels_last_on_a_cpu_unless_the_recipe_says():
    """``model.channels_last`` unset: channels-last on a CPU (oneDNN's layout), contiguous on other
    devices; set, it is followed everywhere."""
    r = load_recipe("quickstart")
    assert r.model.channels_last is None
    assert training_layout(r, "cpu") is torch.channels_last
    assert training_layout(r, "cuda") is torch.contiguous_format
    for value, fmt in (("false", torch.contiguous_format), ("true", torch.channels_last)):
        r = load_recipe("quickstart", [f"model.channels_last={value}"])
        assert training_layout(r, "cpu") is fmt and training_layout(r, "cuda") is fmt


def test_balance_loss_is_one_when_even_and_grows_with_collapse():
    """train.balance's loss (Switch Transformer): 1 for an even split, towards N for a collapsed router."""
    from moeify.nn.policy import Recorder
    from moeify.train.methods import balance_loss

    even, collapsed = Recorder(), Recorder()
    even.scores, even.choices = [torch.zeros(4, 2, requires_grad=True)], [torch.tensor([[0], [1], [0], [1]])]
    collapsed.scores = [torch.tensor([[9.0, 0.0]] * 4, requires_grad=True)]
    collapsed.choices = [torch.zeros(4, 1, dtype=torch.long)]
    assert balance_loss(even).item() == pytest.approx(1.0)
    loss = balance_loss(collapsed)
    assert loss.item() > 1.99
    loss.backward()
    assert collapsed.scores[0].grad[:, 0].gt(0).all()  # descending the loss lowers the chosen expert's score
