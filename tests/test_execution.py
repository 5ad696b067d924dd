"""Execution semantics a user relies on: sparse == masked (values and gradients), batch
independence, routers learn from the task loss, deterministic ties, NaN scores refuse to route."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import moeify
from conftest import randomize
from models import PreActResNet, Zoo
from moeify.bench import spread_routing
from moeify.nn import cache, onednn, select_top_k
from moeify.nn.executors import EXECUTORS
from moeify.nn.executors.static import per_sample_weight
from moeify.nn.route import Route
from moeify.nn.weights import weight_slice, weight_slices


def _moe(cls=PreActResNet, scope="branches", experts=4, top_k=2, train=False):
    model = randomize(cls())
    moe = moeify.convert(model, experts=experts, top_k=top_k, example_inputs=torch.rand(2, 3, 16, 16), scope=scope)
    return moe.train(train)


def _grads(moe, x, mode, spread=False):
    """Output, input gradient and parameter gradients; ``spread`` sends samples on different routes
    (the same ones on every call)."""
    moe.zero_grad()
    x = x.clone().requires_grad_(True)
    hooks = spread_routing(moe, seed=0) if spread else []
    with moeify.execution(mode):
        out = moe(x)
    for h in hooks:
        h.remove()
    (out.square().sum()).backward()
    return out.detach(), x.grad.detach(), {n: p.grad.clone() for n, p in moe.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["grouped", "static", "static-gather"])
@pytest.mark.parametrize("cls,scope", [(PreActResNet, "branches"), (PreActResNet, "paper"), (Zoo, "hidden")])
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("spread,experts,top_k,dtype,rtol", [
    (False, 4, 2, torch.float32, 1e-5), (True, 4, 2, torch.float32, 1e-5),
    (False, 4, 2, torch.float64, 1e-10), (True, 4, 2, torch.float64, 1e-10), (True, 2, 1, torch.float64, 1e-10)])
def test_strategy_equals_masked_with_gradients(mode, cls, scope, train, dtype, rtol, spread, experts, top_k,
                                               monkeypatch):
    """Every strategy (grouped: per routing pattern; static: masked math at this batch size on the
    CPU, or per-sample gathered weights) against the masked reference. Outputs, input gradients, parameter gradients (experts and
    routers) and, in training, BatchNorm running statistics agree; float64 shows the agreement is exact up to rounding.
    Spread routing with top-1 of 2 has groups that share no expert (BatchNorm per group); in
    float32 its training-mode gradients agree to about 2e-5 (4 samples per channel amplify rounding),
    so that case is checked in float64, where it is exact. Static execution sums a weight's
    gradient over per-sample copies (another order than a conv's own batch reduction): in float32
    its parameter gradients agree to 3e-5 of the tensor's largest."""
    if mode == "static-gather":  # per-sample gathered weights at this batch size (the default on a GPU)
        monkeypatch.setitem(EXECUTORS["static"].gather_max_batch, "cpu", 8)
        mode = "static"
    moe = _moe(cls, scope, experts=experts, top_k=top_k, train=train).to(dtype)
    grad_rtol = 3 * rtol if mode == "static" and dtype == torch.float32 else rtol
    x = torch.rand(8, 3, 16, 16, dtype=dtype)
    state = {k: v.clone() for k, v in moe.state_dict().items()}
    out_s, gx_s, gp_s = _grads(moe, x, mode, spread)
    stats_s = {k: v.clone() for k, v in moe.state_dict().items()}
    moe.load_state_dict(state)
    out_m, gx_m, gp_m = _grads(moe, x, "masked", spread)
    stats_m = moe.state_dict()
    assert torch.allclose(out_s, out_m, rtol=rtol, atol=rtol * out_m.abs().max())
    assert torch.allclose(gx_s, gx_m, rtol=rtol, atol=rtol * gx_m.abs().max())
    assert set(gp_s) == set(gp_m) and any(n.startswith("moeify_layers.") for n in gp_m)
    overall = max(g.abs().max() for g in gp_m.values())
    for name in gp_m:  # relative to the tensor; a floor for gradients that are zero up to rounding (bias before BN)
        allowed = grad_rtol * gp_m[name].abs().max() + 0.1 * grad_rtol * overall
        assert (gp_s[name] - gp_m[name]).abs().max() <= allowed, name
    for name, v in stats_m.items():
        assert torch.allclose(stats_s[name].to(v.dtype), v, rtol=rtol, atol=rtol), name


@pytest.mark.parametrize("mode", ["grouped", "static-gather"])
@pytest.mark.parametrize("cls,scope,experts,top_k", [(PreActResNet, "paper", 2, 1), (Zoo, "hidden", 4, 2)])
def test_strategies_train_under_autocast_like_masked(mode, cls, scope, experts, top_k, monkeypatch):
    """Mixed-precision training (``train.mixed_precision: bf16``): every strategy's training step
    runs under autocast on bfloat16 maps (masked math's BatchNorm included) and agrees with masked
    to bfloat16's precision: outputs, parameter gradients, BatchNorm running statistics. Input
    gradients are only required finite: bfloat16 rounding moves them by a fifth of their largest."""
    if mode == "static-gather":
        monkeypatch.setitem(EXECUTORS["static"].gather_max_batch, "cpu", 8)
        mode = "static"
    torch.manual_seed(0)
    moe = _moe(cls, scope, experts=experts, top_k=top_k, train=True)
    state = {k: v.clone() for k, v in moe.state_dict().items()}
    x = torch.rand(8, 3, 16, 16)
    results = {}
    for strategy in (mode, "masked"):
        moe.load_state_dict(state)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, gx, gp = _grads(moe, x, strategy, spread=True)
        results[strategy] = out.float(), gx, gp, {k: v.clone() for k, v in moe.state_dict().items()}
    (out_s, gx_s, gp_s, st_s), (out_m, gx_m, gp_m, st_m) = results[mode], results["masked"]
    assert out_m.dtype == torch.float32 and bool(torch.isfinite(gx_s).all()) and bool(torch.isfinite(gx_m).all())
    assert (out_s - out_m).abs().max() <= 2e-2 * out_m.abs().max()
    overall = max(g.abs().max() for g in gp_m.values())
    assert set(gp_s) == set(gp_m) and all((gp_s[n] - gp_m[n]).abs().max() <= 2e-2 * overall for n in gp_m)
    for name, v in st_m.items():
        if v.is_floating_point():
            assert torch.allclose(st_s[name], v, rtol=1e-2, atol=1e-3), name


@pytest.mark.parametrize("mode", ["masked", "grouped", "static", "static-gather"])
def test_channels_last_trains_like_contiguous(mode, monkeypatch):
    """Training lays models and images out channels-last on a CPU (``train.build.training_layout``):
    every strategy's training step computes in that layout what it does on contiguous tensors
    (outputs, input and parameter gradients, BatchNorm running statistics; float64, routes spread).
    ``static-gather``: static's per-sample weight blocks, gathered in the weight's own layout."""
    if mode == "static-gather":
        monkeypatch.setitem(EXECUTORS["static"].gather_max_batch, "cpu", 8)
        mode = "static"
    moe = _moe(PreActResNet, "paper", experts=4, top_k=2, train=True).double()
    state = {k: v.clone() for k, v in moe.state_dict().items()}
    x = torch.rand(8, 3, 16, 16, dtype=torch.float64)
    out_c, gx_c, gp_c = _grads(moe, x, mode, spread=True)
    stats_c = {k: v.clone() for k, v in moe.state_dict().items()}
    moe.load_state_dict(state)
    moe.to(memory_format=torch.channels_last)
    out_l, gx_l, gp_l = _grads(moe, x.contiguous(memory_format=torch.channels_last), mode, spread=True)
    assert gx_l.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out_l, out_c, rtol=1e-10, atol=1e-10 * out_c.abs().max())
    assert torch.allclose(gx_l, gx_c, rtol=1e-10, atol=1e-10 * gx_c.abs().max())
    assert set(gp_l) == set(gp_c)
    for name in gp_c:
        assert torch.allclose(gp_l[name], gp_c[name], rtol=1e-10, atol=1e-10 * gp_c[name].abs().max() + 1e-14), name
    for name, v in moe.state_dict().items():
        assert torch.allclose(v.double(), stats_c[name].double(), rtol=1e-10, atol=1e-12), name


@pytest.mark.parametrize("shape,layout", [((8, 12), torch.contiguous_format), ((8, 12, 3), torch.contiguous_format),
                                          ((8, 12, 3, 3), torch.contiguous_format), ((8, 12, 3, 3), torch.channels_last)])
@pytest.mark.parametrize("sides", ["in", "out", "both"])
def test_static_weight_blocks_are_each_samples_channels(shape, layout, sides):
    """``static`` gathers whole expert blocks of a weight per sample (its GPU path up to 64
    samples): sample b's weight is the layer's weight at b's selected output and input channels, in
    slot order, for linear layers and convs, in either weight layout."""
    experts = 4
    r_in = Route(torch.tensor([[0, 2], [1, 3], [0, 1]]), None, experts) if sides != "out" else None
    r_out = Route(torch.tensor([[1, 2], [0, 3], [3, 2]]), None, experts) if sides != "in" else None
    w = torch.randn(*shape)
    ws = per_sample_weight(w.contiguous(memory_format=layout), r_in, r_out)
    for b in range(3):
        want = w if r_out is None else w[r_out.channel_index(shape[0] // experts)[b]]
        want = want if r_in is None else want[:, r_in.channel_index(shape[1] // experts)[b]]
        assert torch.equal(ws[b], want)


@pytest.mark.parametrize("cls,scope,experts,top_k,norm", [
    (PreActResNet, "paper", 2, 1, False), (PreActResNet, "branches", 4, 2, False), (PreActResNet, "paper", 4, 2, True),
    (Zoo, "hidden", 4, 2, False)])
def test_one_sample_lane_equals_masked(cls, scope, experts, top_k, norm, monkeypatch):
    """Batch 1 in inference under grouped (auto's choice there on the CPU) runs each routed op on
    the sample's selection alone (``executors/selected.py``): outputs equal masked execution for
    samples on different routes (adjacent and split selections, packed and full-width layers,
    depthwise convs, a functional conv, standardised routers), in float32 and float64. So does
    static, which at batch 1 on the CPU runs one sample's gathered weight slices."""
    from moeify.nn.executors.selected import Selected

    ran = []
    for name in ("contract", "batch_norm", "follow"):
        real = getattr(Selected, name)
        monkeypatch.setattr(Selected, name, lambda self, *a, _real=real, _name=name: ran.append(_name) or _real(self, *a))
    model = randomize(cls())
    moe = moeify.convert(model, experts=experts, top_k=top_k, example_inputs=torch.rand(2, 3, 16, 16), scope=scope,
                         router_norm=norm).eval()
    for dtype, rtol in ((torch.float32, 1e-5), (torch.float64, 1e-10)):
        moe.to(dtype)
        for seed in range(4):
            x = torch.rand(1, 3, 16, 16, dtype=dtype)
            hooks = spread_routing(moe, seed=seed)
            with torch.inference_mode():
                outs = {}
                for mode in ("auto", "grouped", "static", "masked"):
                    with moeify.execution(mode):
                        outs[mode] = moe(x)
            for h in hooks:
                h.remove()
            for mode in ("auto", "grouped", "static"):
                assert torch.allclose(outs[mode], outs["masked"], rtol=rtol, atol=rtol * outs["masked"].abs().max()), mode
    assert {"contract", "batch_norm", "follow"} <= set(ran)


def test_one_sample_call_resolves_its_strategy_once(monkeypatch):
    """At batch 1 in inference, the call's first MoE layer settles the strategy and every later
    layer follows its lane (through the route it reads, or the one made before it); the
    strategy is resolved once per call, and the output is masked execution's."""
    from moeify.nn.executors.auto import Auto

    resolved = []
    real = Auto.resolve
    monkeypatch.setattr(Auto, "resolve", lambda self, x, layer=None: resolved.append(layer) or real(self, x, layer))
    moe = _moe(scope="paper", experts=4, top_k=2).eval()
    assert len(moeify.moe_layers(moe)) > 2
    spread_routing(moe, seed=1)
    x = torch.rand(1, 3, 16, 16)
    with torch.inference_mode():
        with moeify.execution("auto"):
            y = moe(x)
        with moeify.execution("masked"):
            ref = moe(x)
    assert len(resolved) == 1
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-6)


def test_one_sample_with_gradients_is_not_the_inference_lane():
    """Batch 1 with autograd on, where a router's input carries no gradient (its routers and
    every layer before them frozen, as when fine-tuning only the experts): the route is chosen
    on the host, but the experts' ops must still be recorded, so their gradients equal masked
    execution's."""
    moe = _moe(experts=4, top_k=2).eval()
    experts = {n for layer in moeify.moe_layers(moe).values() for n in layer.producers + layer.consumers}
    for n, p in moe.named_parameters():
        p.requires_grad_(n.rsplit(".", 1)[0] in experts)
    x = torch.rand(1, 3, 16, 16)
    grads = {}
    for mode in ("grouped", "masked"):
        moe.zero_grad()
        hooks = spread_routing(moe, seed=0)
        with moeify.execution(mode):
            moe(x).square().sum().backward()
        for h in hooks:
            h.remove()
        grads[mode] = {n: p.grad.clone() for n, p in moe.named_parameters() if p.grad is not None}
    assert set(grads["grouped"]) == set(grads["masked"]) and grads["masked"]
    for n, g in grads["masked"].items():
        assert torch.allclose(grads["grouped"][n], g, rtol=1e-5, atol=1e-5 * g.abs().max()), n


def test_routers_receive_gradient_from_the_task_loss():
    moe = _moe(train=True)
    _, _, grads = _grads(moe, torch.rand(8, 3, 16, 16), "sparse")
    router_grads = [g for n, g in grads.items() if n.startswith("moeify_layers.")]
    assert router_grads and all(g.abs().sum() > 0 for g in router_grads)


def test_batch_independence():
    moe = _moe().eval()
    x = torch.rand(8, 3, 16, 16)
    with torch.no_grad():
        whole = moe(x)
        alone = torch.cat([moe(x[i:i + 1]) for i in range(8)])
        shuffled = moe(x.flip(0)).flip(0)
    assert torch.allclose(whole, alone, rtol=1e-5, atol=1e-6)
    assert torch.allclose(whole, shuffled, rtol=1e-5, atol=1e-6)


def test_routing_reports_top_k_per_sample_and_samples_differ():
    moe = _moe(experts=4, top_k=2)
    r = moeify.routing(moe, torch.rand(16, 3, 16, 16))
    assert set(r) == set(moeify.moe_layers(moe))
    for idx in r.values():
        assert idx.shape == (16, 2) and idx.dtype == torch.long
        assert (idx[:, 0] < idx[:, 1]).all() and idx.min() >= 0 and idx.max() < 4
    assert any(len(torch.unique(idx, dim=0)) > 1 for idx in r.values())


def test_bench_noise_in_the_biases_routes_a_sample_as_the_added_noise_does():
    """``moeify bench`` at batch 1 moves each router's spread noise into its bias (no extra op per
    call): every sample must take the routes the per-call noise gives it, and the user's biases
    come back unchanged."""
    from moeify.bench import noise_in_biases

    moe = _moe(experts=4, top_k=2).eval()
    spread_routing(moe, seed=3)
    biases = {n: p.clone() for n, p in moe.named_parameters() if n.endswith("proj.bias")}
    with torch.no_grad():
        for i in range(6):
            x = torch.rand(1, 3, 16, 16)
            added = moeify.routing(moe, x)
            with noise_in_biases(moe):
                folded = moeify.routing(moe, x)
            assert all(torch.equal(added[k], folded[k]) for k in added)
        for layer in moeify.moe_layers(moe).values():  # the scores themselves: the noise counted once
            h = torch.rand(1, layer.router.proj.in_features)
            with noise_in_biases(moe):
                folded = layer.router.scores(h)
            assert torch.allclose(folded, layer.router.scores(h), rtol=1e-6, atol=1e-3)
    assert biases and all(torch.equal(p, biases[n]) for n, p in moe.named_parameters() if n in biases)


def test_ties_break_to_the_lower_expert_and_gate_is_one():
    scores = torch.zeros(3, 4, requires_grad=True)
    route = select_top_k(scores, 2)
    assert route.idx.tolist() == [[0, 1]] * 3
    assert torch.equal(route.gate, torch.ones(3, 2))
    route.gate.sum().backward()
    assert scores.grad.abs().sum() > 0


@pytest.mark.parametrize("top_k", [1, 2])
def test_gates_carry_the_chosen_experts_log_probability_gradient(top_k):
    """The straight-through gate: value exactly 1, gradient that of log softmax(scores) at the
    chosen experts (what routers learn from)."""
    g = torch.Generator().manual_seed(top_k)
    scores = torch.randn(6, 4, generator=g, requires_grad=True)
    route = select_top_k(scores, top_k)
    upstream = torch.randn(6, top_k, generator=g)
    (got,) = torch.autograd.grad((route.gate * upstream).sum(), scores)
    leaf = scores.detach().requires_grad_()
    (want,) = torch.autograd.grad((torch.log_softmax(leaf, -1).gather(1, route.idx) * upstream).sum(), leaf)
    assert torch.equal(route.gate, torch.ones(6, top_k))
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("top_k", [1, 2])
def test_constant_gate_mask_selects_the_channels_the_gated_mask_does(top_k):
    """Without a gradient the channel mask is made by a comparison (bool), with one by scattering
    the gates: the same channels, and zeroing with either gives the same tensor and dtype."""
    scores = torch.randn(6, 4, generator=torch.Generator().manual_seed(top_k))
    plain = select_top_k(scores, top_k)
    gated = select_top_k(scores.clone().requires_grad_(), top_k)
    assert plain.needs_grad is False and gated.needs_grad
    mask = plain.channel_mask(12)
    assert mask.dtype == torch.bool and mask.shape == (6, 12)
    assert torch.equal(mask, gated.channel_mask(12).detach().ne(0))
    assert mask.sum(1).tolist() == [top_k * 3] * 6
    x = torch.randn(6, 12, 5, dtype=torch.float64)
    assert torch.equal(plain.apply(x, 1), gated.apply(x, 1).detach())
    assert plain.apply(x, 1).dtype == torch.float64


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
@pytest.mark.parametrize("mode", ["sparse", "masked"])
def test_nan_scores_refuse_to_route(device, mode):
    """On the CPU the router raises; on CUDA the model call does, at its end (one host read)."""
    with pytest.raises(moeify.RoutingError, match="NaN"):
        moeify.nn.route.routes_checked(select_top_k(torch.tensor([[float("nan"), 0.0]], device=device), 1))
    moe = _moe().to(device)
    layer = next(iter(moeify.moe_layers(moe).values()))
    with torch.no_grad():
        layer.router.proj.weight.fill_(float("nan"))
    with pytest.raises(moeify.RoutingError), moeify.execution(mode):
        moe(torch.rand(2, 3, 16, 16, device=device))
    with torch.no_grad():
        layer.router.proj.weight.normal_()
    with moeify.execution(mode):
        assert torch.isfinite(moe(torch.rand(2, 3, 16, 16, device=device))).all()  # nothing left pending


@pytest.mark.parametrize("top_k", [1, 2])
def test_infinite_chosen_scores_refuse_to_route_and_minus_inf_elsewhere_means_never(top_k):
    inf = float("inf")
    with pytest.raises(moeify.RoutingError):
        select_top_k(torch.tensor([[0.0, inf, 1.0], [0.0, 1.0, 2.0]]), top_k)
    with pytest.raises(moeify.RoutingError):
        select_top_k(torch.tensor([[-inf, -inf, -inf]]), top_k)
    route = select_top_k(torch.tensor([[-inf, 1.0, 2.0], [3.0, -inf, 2.0]]), top_k)
    assert route.idx.tolist() == ([[2], [0]] if top_k == 1 else [[1, 2], [0, 2]])
    big = select_top_k(torch.tensor([[3e38, 0.0, 1.0], [3e38, 2.0, 0.0]]), top_k)  # finite, though they sum to inf
    assert big.idx.tolist() == ([[0], [0]] if top_k == 1 else [[0, 2], [0, 1]])


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_one_sample_is_chosen_as_in_a_batch(top_k):
    """A single sample's choice is made on the host (one read of its scores): the same experts as
    its row of a batch, ties included, the same refusals of NaN and of a chosen inf."""
    g = torch.Generator().manual_seed(0)
    inf = float("inf")
    scores = torch.randint(-2, 3, (64, 5), generator=g).float()  # many ties
    scores[:8, 1] = -inf
    scores[8:16, 3] = 3e38
    batch = select_top_k(scores, top_k)
    for i in range(len(scores)):
        one = select_top_k(scores[i:i + 1], top_k)
        assert one.idx.tolist() == batch.idx[i:i + 1].tolist()
        assert one.groups() == [(batch.idx[i].tolist(), None)]
    for bad in ([[0.0, float("nan"), 1.0, 0.0, 0.0]], [[0.0, inf, 1.0, 0.0, 0.0]], [[-inf] * 5]):
        with pytest.raises(moeify.RoutingError):
            select_top_k(torch.tensor(bad), top_k)


def test_global_router_shares_one_route():
    model = randomize(PreActResNet())
    moe = moeify.convert(model, experts=2, top_k=1, example_inputs=torch.rand(2, 3, 16, 16), scope="branches",
                         router="global").eval()
    r = moeify.routing(moe, torch.rand(6, 3, 16, 16))
    first = next(iter(r.values()))
    assert all(torch.equal(v, first) for v in r.values())
    full = moeify.convert(model, experts=2, top_k=2, example_inputs=torch.rand(2, 3, 16, 16), router="global").eval()
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(full(x), model.eval()(x), atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("experts,top_k,spread", [(4, 2, False), (4, 2, True), (2, 1, True)])
@pytest.mark.parametrize("mode,cuda_limit", [("grouped", None), ("grouped", 8), ("static", None), ("static", 8),
                                             ("auto", None)])
def test_cuda_strategy_equals_masked(experts, top_k, spread, mode, cuda_limit, monkeypatch):
    """The CUDA path: grouped runs a batch routed alike sparse and a spread batch masked by default
    (``MAX_GROUPS``) or, allowed more groups, split by routing pattern (row groups); static runs the
    masked math by default or, allowed to (``GATHER_MAX_BATCH``), gathers per-sample weights. In
    true fp32 (TF32, on by default for CUDA convolutions, rounds sliced and full convs differently)."""
    from moeify.attacks import full_fp32
    from moeify.nn.executors import EXECUTORS, grouped

    if cuda_limit and mode == "grouped":
        monkeypatch.setitem(grouped.MAX_GROUPS, "cuda", cuda_limit)
    if cuda_limit and mode == "static":
        monkeypatch.setitem(EXECUTORS["static"].gather_max_batch, "cuda", cuda_limit)
    moe = _moe(experts=experts, top_k=top_k).cuda()
    x = torch.rand(8, 3, 16, 16, device="cuda")
    with full_fp32():
        out_s, gx_s, _ = _grads(moe, x, mode, spread)
        out_m, gx_m, _ = _grads(moe, x, "masked", spread)
    assert torch.allclose(out_s, out_m, rtol=1e-4, atol=1e-5)
    assert torch.allclose(gx_s, gx_m, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ["auto", "grouped"])
def test_torch_compile_runs_the_moe_model_like_eager(mode):
    """Under torch.compile ``auto`` runs the static strategy (one graph); ``grouped`` reads routing
    patterns back, so the compiler breaks the graph there. Both match eager execution."""
    moe = _moe(scope="paper").eval()
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad(), moeify.execution(mode):
        ref = moe(x)
        out = torch.compile(moe, fullgraph=mode == "auto", backend="aot_eager")(x)
        again = torch.compile(moe, fullgraph=mode == "auto", backend="aot_eager")(x.flip(0)).flip(0)
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5)
    assert torch.allclose(again, ref, rtol=1e-4, atol=1e-5)


def test_auto_picks_the_fastest_measured_strategy():
    """``auto`` never picks a strategy the calibration table measured slower than another one, at
    the measured point (batch size, model MACs, experts) nearest to the call's; a device without
    measurements runs static; every layer of one model call gets the same strategy."""
    from moeify.nn.executors import auto

    table = auto.calibration()
    assert table, "moeify ships a calibration table"
    assert {mode for _, mode in table} == {"eval", "train"}
    for (dev, mode), points in table.items():
        for macs, batch, experts, times in points:
            assert set(times) >= {"masked", "grouped", "static"}
            assert times[auto.fastest(dev, batch, macs, mode, experts)] == min(times.values()), \
                (dev, batch, macs, mode, experts)
    assert {experts for points in table.values() for _, _, experts, _ in points} >= {2, 4, 8}
    made = {("cpu", "eval"): [(1e7, 1, 2, {"grouped": 0.9, "static": 1.2, "masked": 1.5}),
                    (1e7, 64, 2, {"grouped": 1.6, "static": 1.1, "masked": 1.0}),
                    (1e9, 64, 2, {"grouped": 0.6, "static": 1.1, "masked": 1.0}),
                    (1e9, 64, 8, {"grouped": 1.2, "static": 1.1, "masked": 1.0})]}
    assert auto.fastest("cpu", 2, 2e7, table=made) == "grouped" and auto.fastest("cpu", 128, 1e7, table=made) == "masked"
    assert auto.fastest("cpu", 128, 5e8, table=made) == "grouped"
    assert auto.fastest("cpu", 128, 5e8, experts=8, table=made) == "masked"  # many experts: many patterns
    assert auto.fastest("cpu", 128, 5e8, experts=3, table=made) == "grouped"  # nearer 2 than 8
    assert auto.fastest("cpu", 128, 1e7, "train", table=made) == "masked"  # no train points: the eval ones
    assert auto.fastest("xpu", 8, 1e7, table=made) == "static"
    moe = _moe()
    chosen = []
    hooks = [m.register_forward_hook(lambda _m, _i, r: chosen.append(r.executor)) for m in moeify.moe_layers(moe).values()]
    with torch.no_grad():
        moe(torch.rand(3, 3, 16, 16))
    for h in hooks:
        h.remove()
    assert len(chosen) == len(moeify.moe_layers(moe)) and len({e.name for e in chosen}) == 1
    layer = next(iter(moeify.moe_layers(moe).values()))
    assert chosen[0].name == auto.fastest("cpu", 3, layer.model_macs, experts=layer.experts)


def test_a_machines_own_table_replaces_the_shipped_points(tmp_path, monkeypatch):
    """``$MOEIFY_CALIBRATION`` (tables ``moeify bench --calibrate`` wrote on this machine) replaces
    the shipped points of each device type and mode it measured, keeps the others, and is what a
    model call under ``auto`` follows; a missing or foreign file is a one-line error."""
    import json

    from moeify.errors import MoeifyError
    from moeify.nn.executors import EXECUTORS, auto

    shipped = auto.calibration()
    own = {"machine": "test", "devices": {
        "cpu": [{"mode": "eval", "macs": 1e6, "batch": 4, "relative_ms": {"masked": 0.5, "grouped": 2.0, "static": 3.0}}],
        "cuda": [{"mode": "eval", "macs": 1e6, "batch": 4, "relative_ms": {"masked": 2.0, "grouped": 0.5, "static": 3.0}}]}}
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(own))
    monkeypatch.setenv(auto.MACHINE_TABLE, str(path))
    table = auto.active_table()
    assert table["cpu", "eval"] == [(1e6, 4, 2, {"masked": 0.5, "grouped": 2.0, "static": 3.0})]
    assert table["cpu", "train"] == shipped["cpu", "train"]  # not measured here: shipped
    assert auto.fastest("cuda", 256, 1e9) == "grouped" and auto.fastest("cpu", 256, 1e9) == "masked"
    assert str(path) in auto.table_source()
    moe = _moe()
    chosen = []
    hooks = [m.register_forward_hook(lambda _m, _i, r: chosen.append(r.executor.name))
             for m in moeify.moe_layers(moe).values()]
    monkeypatch.setattr(EXECUTORS["auto"], "_chosen", {})
    with torch.no_grad():
        moe(torch.rand(3, 3, 16, 16))
    for h in hooks:
        h.remove()
    assert set(chosen) == {"masked"}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"devices": {"cpu": [{"batch": 4}]}}))
    for name, message in ((tmp_path / "none.json", "no such file"), (bad, "not a table")):
        monkeypatch.setenv(auto.MACHINE_TABLE, str(name))
        monkeypatch.setattr(EXECUTORS["auto"], "_chosen", {})
        with pytest.raises(MoeifyError, match=message), torch.no_grad():
            moe(torch.rand(3, 3, 16, 16))
    monkeypatch.setattr(EXECUTORS["auto"], "_told", set())
    monkeypatch.setenv(auto.MACHINE_TABLE, str(path))
    on_meta = torch.empty(2, 3, 4, 4, device="meta")  # a device type no table measured
    with pytest.warns(UserWarning, match="no measurements for meta"):
        assert EXECUTORS["auto"].resolve(on_meta).name == "static"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per device type
        EXECUTORS["auto"].resolve(torch.empty(3, 3, 4, 4, device="meta"))
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"devices": {"cpu": [{"macs": 1e6, "batch": 4, "relative_ms": {"fused": 0.1}}]}}))
    monkeypatch.setenv(auto.MACHINE_TABLE, str(unknown))
    monkeypatch.setattr(EXECUTORS["auto"], "_chosen", {})
    with pytest.raises(MoeifyError, match="'fused'"), torch.no_grad():
        moe(torch.rand(3, 3, 16, 16))


def test_row_groups_behave_like_the_tensor_they_split():
    """Sparse execution hands a layer's interior its tensor split by routing pattern; every op
    must see the same values as on the merged tensor (per-sample ops per part, the rest merged)."""
    from moeify.nn.route import pattern_groups
    from moeify.nn.rowgroups import RowGroups

    torch.manual_seed(0)
    x = torch.randn(6, 4, 3, 3)
    groups = pattern_groups(torch.tensor([[1], [0], [1], [1], [0], [1]]), 2)
    rg = RowGroups([x[r] for _, r in groups], groups, torch.zeros(6, 1), [sel for sel, _ in groups])
    assert rg.shape == x.shape and rg.ndim == 4 and torch.equal(rg.full(), x)
    cases = {
        "relu": (lambda t: torch.nn.functional.relu(t), True),
        "method": (lambda t: t.sigmoid(), True),
        "pool": (lambda t: torch.nn.functional.max_pool2d(t, 2), True),
        "scale": (lambda t: 2 * t - 1, True),
        "product": (lambda t: t * t, True),
        "batch mean": (lambda t: t.mean(0), False),
        "clamp by a batch tensor": (lambda t: torch.clamp(t, min=x.flip(0)), False),
        "cat": (lambda t: torch.cat([t, x], 1), False),
        "index": (lambda t: t[1:3], False),
    }
    for name, (fn, stays_split) in cases.items():
        y = fn(rg)
        assert isinstance(y, RowGroups) == stays_split, name
        # allclose: vectorised sigmoid rounds a tensor's tail elements differently by an ulp
        assert torch.allclose(y.full() if stays_split else y, fn(x), rtol=1e-6, atol=0), name


def test_inference_weight_slices_stay_within_their_memory_budget(monkeypatch):
    """Routes that keep changing (8 experts, top-4: 70 selections) must not make a layer hold a
    copy of its weights for every selection it has seen; outputs stay those of masked execution."""
    monkeypatch.setattr(cache, "CACHE_FLOOR", 0)
    moe = _moe(experts=8, top_k=4).eval()

    def run(x, seed, mode):  # the same seed: the same routes
        hooks = spread_routing(moe, seed=seed)
        with moeify.execution(mode):
            y = moe(x)
        for h in hooks:
            h.remove()
        return y

    torch.manual_seed(0)
    with torch.inference_mode():
        for seed in range(30):
            x = torch.rand(1, 3, 16, 16)
            assert torch.allclose(run(x, seed, "sparse"), run(x, seed, "masked"), rtol=1e-5, atol=1e-6)
    weights = {id(p): p for p in moe.parameters()}
    held = {i: sum(cache._nbytes(v) for v in c.values()) for i, (_, c) in cache._SLICES.items() if i in weights}
    assert held and any(v > 0 for v in held.values())
    for i, nbytes in held.items():
        w = weights[i]
        assert nbytes <= cache.CACHE_BUDGET * w.numel() * w.element_size()


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("batch", [3, 1])
def test_cached_slices_follow_the_weights_they_were_made_from(batch, layout, monkeypatch):
    """Weights updated in place (an optimizer step), moved (``.to``) or replaced (``param.data =
    ...``) between inference calls: sparse execution (per pattern, or batch 1's one-selection
    lane) never reuses slices of old values or memory, nor their blocked oneDNN copies
    (channels-last on the CPU), and still equals masked execution."""
    monkeypatch.setattr(cache, "_SLICES", {})  # this test's caches only
    monkeypatch.setattr(onednn, "LARGE_WEIGHT", 0)  # blocked weights for one small sample too
    moe = _moe(experts=4, top_k=2).eval().to(memory_format=layout)
    x = torch.rand(batch, 3, 16, 16).contiguous(memory_format=layout)

    def both():
        with torch.inference_mode():
            with moeify.execution("sparse"):
                s = moe(x.to(next(moe.parameters()).dtype))
            with moeify.execution("masked"):
                m = moe(x.to(next(moe.parameters()).dtype))
        return s, m

    for _ in range(onednn.PLAIN_USES + 1):
        both()  # fills the caches (a slice's blocked copy is made after PLAIN_USES plain calls)
    assert (_blocked_count() > 0) == (layout == torch.channels_last and onednn.available())
    with torch.no_grad():
        for p in moe.parameters():
            p.mul_(0.9).add_(0.01)
    s, m = both()
    assert torch.allclose(s, m, rtol=1e-5, atol=1e-6)
    for p in moe.parameters():
        p.data = torch.randn_like(p) * 0.1
    for m in moe.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.data = torch.rand_like(m.running_mean)
    s, m = both()
    assert torch.allclose(s, m, rtol=1e-5, atol=1e-6)
    moe.double()
    s, m = both()
    assert s.dtype == torch.float64 and torch.allclose(s, m, rtol=1e-10, atol=1e-12)


def _blocked_count() -> int:
    """How many weights the inference caches hold in oneDNN's blocked layout (``nn/onednn.py``)."""
    return sum(getattr(v, "is_mkldnn", False) for _, store in cache._SLICES.values() for v in store.values())


@pytest.mark.skipif(not onednn.available(), reason="this PyTorch build has no oneDNN (mkldnn) convolution")
@pytest.mark.parametrize("batch", [8, 1])
@pytest.mark.parametrize("cls,scope", [(PreActResNet, "paper"), (Zoo, "hidden")])
def test_blocked_weights_run_like_plain_convs(cls, scope, batch, monkeypatch):
    """Channels-last inference on the CPU runs a routed conv with its weight slice kept in
    oneDNN's blocked layout; grouped, auto and the one-sample lane still equal masked execution
    (routes spread), and a call whose input needs a gradient (an attack) takes the plain conv."""
    monkeypatch.setattr(cache, "_SLICES", {})  # this test's caches only
    monkeypatch.setattr(onednn, "LARGE_WEIGHT", 0)  # blocked weights for one small sample too
    moe = _moe(cls, scope, experts=4, top_k=2).eval().to(memory_format=torch.channels_last)
    x = torch.rand(batch, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    hooks = spread_routing(moe, seed=batch)
    outs = {}
    with torch.inference_mode():
        with moeify.execution("grouped"):
            for _ in range(onednn.PLAIN_USES):
                moe(x)  # a slice's blocked copy is made after PLAIN_USES plain calls
        for mode in ("grouped", "auto", "masked"):
            with moeify.execution(mode):
                outs[mode] = moe(x)
    assert _blocked_count() > 0
    for mode in ("grouped", "auto"):
        assert torch.allclose(outs[mode], outs["masked"], rtol=1e-5, atol=1e-5 * outs["masked"].abs().max()), mode
    xg = x.clone().requires_grad_(True)
    with moeify.execution("grouped"):
        y = moe(xg)
    y.square().sum().backward()
    assert torch.allclose(y.detach(), outs["masked"], rtol=1e-5, atol=1e-5 * outs["masked"].abs().max())
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    for h in hooks:
        h.remove()


@pytest.mark.skipif(not onednn.available(), reason="this PyTorch build has no oneDNN (mkldnn) convolution")
def test_blocked_conv_equals_f_conv2d_and_falls_back_where_it_cannot_serve(monkeypatch):
    """``onednn.conv2d`` gives F.conv2d's values for strides, paddings, dilations, with and
    without bias, at several batch sizes from one blocked copy, made after a slice's first
    ``PLAIN_USES`` calls (a slice used once or twice is not worth it); a contiguous input,
    float64, a weight that is not a kept slice and a small single sample (where PyTorch's native
    kernel is faster) take F.conv2d itself."""
    monkeypatch.setattr(cache, "_SLICES", {})
    large = onednn.LARGE_WEIGHT
    monkeypatch.setattr(onednn, "LARGE_WEIGHT", 0)
    w0 = torch.randn(12, 6, 3, 3)
    b = torch.randn(12)
    w = cache.cached(w0, ("test slice",), lambda: w0[:, :4].contiguous(memory_format=torch.channels_last))
    assert cache.is_kept(w) and not cache.is_kept(w0)
    for _ in range(onednn.PLAIN_USES):
        with torch.no_grad():
            onednn.conv2d(torch.randn(2, 4, 11, 9).contiguous(memory_format=torch.channels_last), w, None, 1, 1, 1)
    assert _blocked_count() == 0  # the slice's first uses: no blocked copy yet
    for stride, padding, dilation in ((1, 1, 1), (2, 0, 1), ((1, 2), (2, 1), 2)):
        for batch in (1, 5):
            x = torch.randn(batch, 4, 11, 9).contiguous(memory_format=torch.channels_last)
            for bias in (None, b):
                with torch.no_grad():
                    y = onednn.conv2d(x, w, bias, stride, padding, dilation)
                ref = F.conv2d(x, w, bias, stride, padding, dilation)
                assert y.is_contiguous(memory_format=torch.channels_last)
                assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max()), (stride, padding, dilation)
    assert _blocked_count() > 0
    x = torch.randn(2, 4, 11, 9)
    plain = torch.randn(12, 4, 3, 3)
    one = x[:1].contiguous(memory_format=torch.channels_last)
    assert onednn.usable(one, w, None, 1)
    monkeypatch.setattr(onednn, "LARGE_WEIGHT", large)
    for args in ((x, w), (x.contiguous(memory_format=torch.channels_last), plain),
                 (x.double().contiguous(memory_format=torch.channels_last), w.double()), (one, w)):
        assert not onednn.usable(args[0], args[1], None, 1)
        assert torch.equal(onednn.conv2d(*args, None, 1, 1, 1), F.conv2d(*args, None, 1, 1, 1))


def test_router_pool_has_the_gradient_of_mean():
    """The routers' pool (an expanded, unmaterialised backward) gives the input exactly the
    gradient ``mean`` gives it, for maps and for token dims, whatever else accumulates there."""
    from moeify.nn.pool import pool_mean
    for shape, dims in (((4, 6, 5, 5), [2, 3]), ((3, 7, 5), [1])):
        x = torch.rand(shape, dtype=torch.float64)
        w = torch.rand(shape, dtype=torch.float64)
        grads = []
        for pool in (pool_mean, lambda t, d: t.mean(d)):
            t = x.clone().requires_grad_(True)
            h = pool(t.relu(), dims)
            (h.square().sum() + (t * w).sum()).backward()
            grads.append(t.grad)
        assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("shape, sels", [
    ((6, 8), [([0], 4, [1], 3), ([1], 4, [0], 3), ([0], 4, [0], 3), ([1], 4, [1], 3)]),  # top-1 both sides: a partition
    ((6, 5), [(None, 1, [0], 3), (None, 1, [1], 3)]),  # output side only: a partition
    ((6, 8), [([0], 4, [1], 3), ([1], 4, [0], 3)]),  # disjoint, two blocks never selected
    ((5, 12), [([0, 1], 4, None, 1), ([1, 2], 4, None, 1), ([0, 2], 4, None, 1)]),  # top-2 of 3: overlapping
])
def test_weight_slices_gradient_equals_autograd_slicing(shape, sels):
    """Several routing patterns' slices of one weight as one op: its gradient is the sum of the
    slices' gradients, whether the patterns partition the weight, leave parts of it out or overlap."""
    g = torch.Generator().manual_seed(len(sels))
    w = torch.randn(*shape, 3, 3, generator=g, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    w.requires_grad_()
    slices = weight_slices(w, sels)
    ups = [torch.randn(s.shape, generator=g, dtype=torch.float64) for s in slices]
    (got,) = torch.autograd.grad(sum((s * u).sum() for s, u in zip(slices, ups)), w)
    leaf = w.detach().requires_grad_()
    views = [weight_slice(leaf, *sel) for sel in sels]
    (want,) = torch.autograd.grad(sum((v * u).sum() for v, u in zip(views, ups)), leaf)
    assert all(torch.equal(a, b) for a, b in zip(slices, views))
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
