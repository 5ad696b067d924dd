"""Routers that route: what each remedy for collapse changes, on tiny models, and the routing
health a run and an evaluation report (collapse warning, expert load per layer, routing used)."""
import copy

import pytest
import torch
import torch.nn.functional as F

import moeify
from moeify.evaluate import EvalConfig, load_entropy, routing_used
from moeify.nn import LayerRouter
from moeify.nn.policy import Recorder, routing_policy
from moeify.train.methods import balance_loss
from moeify.train.validate import COLLAPSED, collapse_warning
from moeify.zoo import create_model


def _moe(router_norm=False, experts=2, top_k=1, scope="hidden"):
    torch.manual_seed(0)
    m = create_model("cifar_resnet_small", num_classes=10, in_chans=1, width=8, stem_stride=2)
    return moeify.convert(m, experts=experts, top_k=top_k, scope=scope, example_inputs=torch.rand(2, 1, 28, 28),
                          router_norm=router_norm)


def _x(n=32, seed=1):
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def _entropies(moe, x):
    with torch.no_grad():
        routes = moeify.routing(moe.eval(), x)
    return [load_entropy(torch.bincount(r.flatten(), minlength=2)) for r in routes.values()]


def test_standardised_router_ignores_what_every_input_shares():
    """A shared offset of the pooled features (the mean every image has) moves an unnormalised
    router's scores for all inputs alike; a standardising router (no bias), once it has seen the
    inputs, gives every expert a mean score of zero and scores how each input differs."""
    torch.manual_seed(0)
    r = LayerRouter(6, 2, 1, norm=True)
    assert r.proj.bias is None
    h = torch.randn(64, 6, 4, 4) * 0.05 + 3.0  # small differences on a large shared mean
    r.train()
    for _ in range(30):
        r.scores(h)
    r.eval()
    s = r.scores(h)
    assert s.mean(0).abs().max() < 0.2 * s.std(0).min()
    plain = LayerRouter(6, 2, 1)
    with torch.no_grad():
        plain.proj.weight.copy_(r.proj.weight)
        plain.proj.bias.zero_()
    sp = plain.scores(h)
    assert (sp[:, 1] - sp[:, 0]).mean().abs() > 5 * (sp[:, 1] - sp[:, 0]).std()  # one offset for all


def test_standardised_router_trains_on_the_batch_statistics():
    """In training a standardising router uses the batch's statistics, as BatchNorm: when the
    features move far from the running statistics (early in training) its scores stay bounded
    (each standardised input is at most sqrt(B) in size), and they still carry a gradient to
    the features; the running statistics follow the batches, and eval uses them."""
    torch.manual_seed(0)
    r = LayerRouter(6, 2, 1, norm=True).train()
    for _ in range(20):
        r.scores(torch.randn(32, 6, 4, 4) * 0.01)
    h = (torch.randn(32, 6, 4, 4) * 5.0 + 50.0).requires_grad_()
    s = r.scores(h)
    assert s.abs().max() <= 32 ** 0.5 * r.proj.weight.abs().sum(1).max()
    (s[:, 0] - s[:, 1])[:8].sum().backward()  # (a plain sum over the batch has no gradient: centred)
    assert h.grad is not None and h.grad.abs().sum() > 1e-3
    assert r.in_mean.min() > 1.0  # the shifted batch moved the running mean
    r.eval()
    assert r.scores(h.detach()).abs().max() > 10 * s.abs().max()  # eval follows the (lagging) running ones


def test_standardised_router_reads_a_packed_input_as_its_full_width_one():
    """A router whose input holds only the experts every sample selected (a packed layer with one
    routing pattern) trains as on the full-width input with zeros elsewhere: the same scores, and
    running statistics of 0 mean and variance for the channels no sample holds."""
    torch.manual_seed(0)
    full_width = LayerRouter(8, 2, 1, norm=True).train()
    packed = copy.deepcopy(full_width)
    for step in range(3):
        x = torch.zeros(16, 8, 3, 3)
        x[:, 4:] = torch.randn(16, 4, 3, 3) * 2 + step  # expert 1's channels (4 per expert)
        s_full = full_width.scores(x)
        s_packed = packed.scores(x[:, 4:], [1])
        assert torch.allclose(s_packed, s_full, rtol=1e-5, atol=1e-5)
    assert torch.allclose(packed.in_mean, full_width.in_mean, atol=1e-6)
    assert torch.allclose(packed.in_var, full_width.in_var, atol=1e-6)
    assert full_width.in_mean[4:].min() > 0.5 and full_width.in_var[4:].min() > 0.1  # statistics that moved


@pytest.mark.parametrize("norm", [False, True], ids=["plain", "standardised"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_compiled_router_scores_equal_eager(norm, train):
    """Under torch.compile a router's product is a broadcast sum over the channels (so inductor
    fuses it with the pooling; eager it is one F.linear): the same scores, the same gradients for
    the input and the router's weights, and the same running statistics, in every router path
    (float64, so only the summation order differs)."""
    torch.manual_seed(0)
    eager = LayerRouter(24, 4, 2, norm=norm).double().train(train)
    if norm:
        with torch.no_grad():
            eager.in_mean.normal_()
            eager.in_var.uniform_(0.5, 2.0)
    compiled = copy.deepcopy(eager)
    x = torch.randn(5, 24, 3, 3, dtype=torch.float64)
    runs = []
    for r, fn in ((eager, eager.scores), (compiled, torch.compile(compiled.scores, fullgraph=True, backend="eager"))):
        h = x.clone().requires_grad_(train)
        with torch.set_grad_enabled(train):
            s = fn(h)
        grads = ()
        if train:
            # weighted per sample and expert: a standardised router's scores sum to zero over the
            # batch, so a weight per expert alone would give zero gradients to compare
            (s * torch.arange(1.0, 21.0, dtype=torch.float64).view(5, 4)).sum().backward()
            grads = (h.grad, r.proj.weight.grad)
        runs.append((s.detach(), grads, [b.clone() for b in r.buffers()]))
    (s_e, g_e, b_e), (s_c, g_c, b_c) = runs
    assert not train or all(g.abs().max() > 1e-3 for g in g_e)
    assert torch.allclose(s_c, s_e, rtol=1e-12, atol=1e-12)
    assert all(torch.allclose(c, e, rtol=1e-12, atol=1e-12) for c, e in zip(g_c, g_e))
    assert all(torch.equal(c, e) for c, e in zip(b_c, b_e))


def test_standardised_routers_split_inputs_from_the_first_batches():
    moe = _moe(router_norm=True).eval()
    for layer in moeify.moe_layers(moe).values():
        layer.router.train()  # the routers take their statistics; BatchNorm stays as in eval
    with torch.no_grad():
        moe(_x(64))
    assert min(_entropies(moe, _x(64, seed=5))) > 0.8


@pytest.mark.parametrize("mode", ["grouped", "static"])
def test_standardised_routers_run_alike_in_every_strategy(mode):
    """Scores, running statistics and gradients of standardising routers are the same whichever
    strategy executes the layer (packed inputs included: paper scope), in training and eval."""
    moe = _moe(router_norm=True, scope="paper")
    other = copy.deepcopy(moe)
    x, y = _x(16), torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(2))
    outs = []
    for model, ex in ((moe, "masked"), (other, mode)):
        model.train()
        with moeify.execution(ex):
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            model.eval()
            with torch.no_grad():
                outs.append((model(x), {k: v.clone() for k, v in model.state_dict().items() if "in_" in k},
                             {n: p.grad.clone() for n, p in model.named_parameters() if "moeify_layers" in n}))
    (a, sa, ga), (b, sb, gb) = outs
    assert sa and torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    for k in sa:
        assert torch.allclose(sa[k].float(), sb[k].float(), rtol=1e-5, atol=1e-6), k
    for k in ga:
        assert torch.allclose(ga[k], gb[k], rtol=1e-4, atol=1e-7), k


def test_balance_loss_raises_entropy_from_a_collapsed_start():
    moe = _moe()
    with torch.no_grad():
        for layer in moeify.moe_layers(moe).values():
            layer.router.proj.bias.copy_(torch.tensor([2.0, 0.0]))
    x = _x(64)
    assert max(_entropies(moe, x)) < COLLAPSED
    opt = torch.optim.SGD(moeify.router_parameters(moe), lr=0.1)
    moe.train()
    for _ in range(100):
        with routing_policy(Recorder()) as rec:
            moe(x)
        opt.zero_grad()
        balance_loss(rec).backward()
        opt.step()
    assert min(_entropies(moe, x)) > 0.9


def test_a_collapsing_layer_is_named_in_one_warning_line():
    load = {"entropy": 0.5, "min_entropy": 0.0, "layers": {"a.conv": {"load": [1.0, 0.0], "entropy": 0.0},
                                                            "b.conv": {"load": [0.5, 0.5], "entropy": 1.0}}}
    line = collapse_warning(load)
    assert "\n" not in line and "a.conv 0.00" in line and "b.conv" not in line and "1 of 2" in line
    assert collapse_warning({**load, "layers": {"b.conv": load["layers"]["b.conv"]}}) is None
    assert collapse_warning(None) is None


def test_routing_used_is_zero_with_one_expert_and_counts_route_swaps():
    x, y = _x(24), torch.randint(0, 10, (24,), generator=torch.Generator().manual_seed(3))
    cfg = EvalConfig(eps=0.1, batch_size=10)
    assert routing_used(_moe(experts=1, top_k=1).eval(), x, y, cfg)["routing_used"] == 0.0
    moe = _moe().eval()
    with torch.no_grad():
        for layer in moeify.moe_layers(moe).values():
            layer.router.proj.weight.mul_(50)  # routes differ between images
    with torch.no_grad():
        base = moe(x).argmax(1) == y
    out = routing_used(moe, x, y, cfg)
    assert out["routing_used"] == pytest.approx(base.float().mean().item() - out["swapped_acc"])


def test_router_noise_explores_in_training_only_and_strategies_still_agree():
    moe = _moe()
    with torch.no_grad():
        for layer in moeify.moe_layers(moe).values():
            layer.router.proj.bias.copy_(torch.tensor([5.0, 0.0]))  # collapsed: expert 0 always
            layer.noise = 10.0
    x = _x(64)
    moe.train()
    with torch.no_grad(), routing_policy(Recorder()) as rec:
        moe(x)
    assert all(0 < int(c.sum()) < len(c) for c in rec.choices)  # noise sends some inputs to expert 1
    moe.eval()
    with torch.no_grad():
        routes = moeify.routing(moe, x)
        ref = moe(x)
        with moeify.execution("grouped"):
            assert torch.allclose(moe(x), ref, rtol=1e-5, atol=1e-6)
    assert all(int(r.sum()) == 0 for r in routes.values())  # no noise in eval


def test_expert_dropout_explores_in_training_only_and_strategies_still_agree():
    """``train.expert_dropout``: in training some inputs of a collapsed router take the other
    expert, every sample keeps K distinct experts, grouped == masked under the same draws; none
    in eval; a NaN score still refuses to route; a choice forced by the dropout gives the router
    no gradient."""
    from moeify.errors import RoutingError
    from moeify.nn.route import select_top_k
    moe = _moe(experts=4, top_k=2)
    with torch.no_grad():
        for layer in moeify.moe_layers(moe).values():
            layer.router.proj.bias.copy_(torch.tensor([9.0, 8.0, 0.0, 0.0]))  # collapsed: experts 0, 1
            layer.expert_dropout = 0.5
    x = _x(64)
    moe.train()
    with torch.no_grad(), routing_policy(Recorder()) as rec:
        moe(x)
    for idx in rec.choices:
        assert (idx >= 2).any() and (idx[:, 0] < idx[:, 1]).all()  # explores; two distinct experts each
    outs = {}
    for mode in ("masked", "grouped"):
        torch.manual_seed(5)
        with moeify.execution(mode):
            outs[mode] = moe(x)
    assert torch.allclose(outs["grouped"], outs["masked"], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        routes = moeify.routing(moe.eval(), x)
    assert all(set(r.flatten().tolist()) == {0, 1} for r in routes.values())  # no dropout in eval
    scores = torch.zeros(8, 4)
    scores[3, 2] = float("nan")
    with pytest.raises(RoutingError):
        select_top_k(scores, 2, drop=0.9)
    scores = torch.tensor([[3.0, 0.0]] * 64, requires_grad=True)  # expert 0 preferred by every sample
    torch.manual_seed(0)
    r = select_top_k(scores, 1, drop=0.5)
    forced = r.idx[:, 0] == 1
    assert 0 < int(forced.sum()) < 64
    (r.gate[:, 0] * torch.arange(64.0)).sum().backward()
    assert (scores.grad[forced] == 0).all() and (scores.grad[~forced] != 0).any()  # forced: no router gradient


def test_reviving_a_dead_expert_splits_the_busiest_ones_inputs():
    """``train.revive_dead``: a dead expert gets the busiest expert's router row, perturbed; the
    two then share the inputs the busiest one had."""
    torch.manual_seed(0)
    r = LayerRouter(16, 2, 1)
    with torch.no_grad():
        r.proj.bias.copy_(torch.tensor([6.0, 0.0]))
    h = torch.randn(256, 16)
    assert (r(h).idx == 0).all()
    r.revive(1, 0, torch.Generator().manual_seed(0))
    load = torch.bincount(r(h).idx.flatten(), minlength=2).float() / 256
    assert load.min() > 0.2


def test_z_loss_shrinks_router_scores():
    from moeify.train.methods import z_loss
    moe = _moe()
    x = _x(32)
    opt = torch.optim.SGD(moeify.router_parameters(moe), lr=0.1)
    sizes = []
    for _ in range(20):
        with routing_policy(Recorder()) as rec:
            moe(x)
        loss = z_loss(rec)
        sizes.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert sizes[-1] < 0.5 * sizes[0]


def test_soft_warmup_routing_trains_every_expert_on_every_input():
    """What ``train.soft_warmup`` runs: with soft routing every expert's weights get a gradient
    from every input, even where hard routing sends all inputs to one expert."""
    from moeify.nn.policy import Soft
    moe = _moe()
    with torch.no_grad():
        for layer in moeify.moe_layers(moe).values():
            layer.router.proj.bias.copy_(torch.tensor([5.0, 0.0]))  # hard routing: expert 0 only
    x, y = _x(16), torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(4))
    layer = next(iter(moeify.moe_layers(moe).values()))
    conv = moe.get_submodule(layer.producers[0])
    per = conv.out_channels // 2
    for soft, expert1_learns in ((False, False), (True, True)):
        moe.zero_grad()
        with routing_policy(Soft()) if soft else routing_policy(Recorder()), moeify.execution("masked"):
            F.cross_entropy(moe.train()(x), y).backward()
        assert (conv.weight.grad[per:].abs().sum() > 0) == expert1_learns
        assert conv.weight.grad[:per].abs().sum() > 0
