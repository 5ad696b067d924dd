"""``static`` execution compiles as one graph (no graph break, nothing read back to the host) and
the compiled model computes what masked execution does: outputs, input gradients, parameter and
router gradients, BatchNorm statistics, with samples spread over experts. Traced without code generation
(dynamo, and AOTAutograd in training): no graph break is a property of the trace."""
import pytest
import torch

import moeify
from moeify.bench import spread_routing
from moeify.conversion import is_router
from moeify.nn.executors import EXECUTORS

CASES = {  # name: (input size, scope, constructor kwargs); no dropout or stochastic depth: their draws differ once compiled
    "resnet18": ((3, 48, 48), "hidden", {}),
    "efficientnet_b0": ((3, 48, 48), "hidden", {"dropout": 0.0, "stochastic_depth_prob": 0.0}),
    "cifar_resnet18": ((3, 32, 32), "paper", {}),
}


def _run(moe, x, train: bool, mode: str, compiled: bool):
    """Output, input gradient, parameter gradients and state after one call, routes spread
    (the same ones for every run: hooks re-installed)."""
    moe.zero_grad(set_to_none=True)
    hooks = spread_routing(moe, seed=1)
    x = x.clone().requires_grad_(train)
    with moeify.execution(mode):
        # the graph as dynamo captures it (eager backend); in training also through AOTAutograd
        fn = torch.compile(moe, fullgraph=True, backend="aot_eager" if train else "eager") if compiled else moe
        out = fn(x)
    for h in hooks:
        h.remove()
    grads = {}
    if train:
        out.square().mean().backward()
        grads = {n: p.grad.clone() for n, p in moe.named_parameters() if p.grad is not None}
    state = {k: v.clone() for k, v in moe.state_dict().items()}
    return out.detach(), (x.grad if train else None), grads, state


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> bool:
    return bool((a - b).abs().max() <= rtol * b.abs().max().clamp_min(1e-30))


# efficientnet_b0 in training only: its eval trace (20 s of the suite's budget) adds no op that the
# training trace and the two ResNets' eval traces do not already cover
COMBOS = [(n, t) for n in CASES for t in (False, True) if t or n != "efficientnet_b0"]


@pytest.mark.parametrize("name,train", COMBOS, ids=[f"{n}-{'train' if t else 'eval'}" for n, t in COMBOS])
def test_static_compiles_fullgraph_and_equals_masked(name, train, monkeypatch):
    """Per-sample gathered weights (the static strategy's sparse path, at this batch size on a GPU)."""
    monkeypatch.setitem(EXECUTORS["static"].gather_max_batch, "cpu", 8)
    size, scope, kwargs = CASES[name]
    torch.manual_seed(0)
    model = moeify.create_model(name, input_size=size, **kwargs)
    # float64 where rounding through many train-mode BatchNorms exceeds 1e-5 in float32 (efficientnet's
    # input gradient: 1.6e-5); there the agreement is exact to 1e-10
    double = name == "cifar_resnet18" or (name == "efficientnet_b0" and train)
    dtype, rtol = (torch.float64, 1e-10) if double else (torch.float32, 1e-5)
    moe = moeify.convert(model, experts=2, top_k=1, example_inputs=torch.rand(2, *size), scope=scope)
    moe = moe.to(dtype).train(train)
    x = torch.rand(6, *size, dtype=dtype)
    start = {k: v.clone() for k, v in moe.state_dict().items()}
    out_c, gx_c, gp_c, st_c = _run(moe, x, train, "static", compiled=True)
    moe.load_state_dict(start)
    out_m, gx_m, gp_m, st_m = _run(moe, x, train, "masked", compiled=False)
    assert _close(out_c, out_m, rtol)
    if train:
        assert _close(gx_c, gx_m, rtol)
        assert set(gp_c) == set(gp_m) and any(is_router(n) for n in gp_m)
        overall = max(g.abs().max() for g in gp_m.values())
        for n in gp_m:  # relative to the tensor, with a floor for gradients that are zero up to rounding
            assert (gp_c[n] - gp_m[n]).abs().max() <= 3 * rtol * gp_m[n].abs().max() + 0.1 * rtol * overall, n
    for k, v in st_m.items():
        if v.is_floating_point():
            assert _close(st_c[k], v, rtol) or torch.allclose(st_c[k], v, rtol=rtol, atol=rtol), k
        else:
            assert torch.equal(st_c[k], v), k


def test_the_static_twin_compiles_as_one_graph():
    """The S-Dense baseline (static twin) is compiled whenever training or ``moeify bench`` compiles:
    its narrow residual adds (a narrow branch into a wide stream) must not break the graph."""
    from moeify.twin import static_twin

    torch.manual_seed(0)
    model = moeify.create_model("cifar_resnet18", input_size=(1, 28, 28), width=16, stem_stride=2, in_chans=1)
    twin = static_twin(model, spec=moeify.MoESpec(experts=2, top_k=1, scope="paper")).eval()
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(torch.compile(twin, fullgraph=True, backend="eager")(x), twin(x))


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_the_twin_with_routers_compiles_as_one_graph(train):
    """The routing floor under a compiled MoE (``with_routers``: the twin plus the MoE's routers,
    standardised as the MoE's are) keeps its choices on the device when compiled: one graph, and
    the twin's outputs (the choice scales by exactly 1) with the routers still run (their
    running statistics move in training, and they get a gradient, as an MoE's routers do)."""
    from moeify.bench import with_routers
    from moeify.twin import static_twin

    torch.manual_seed(0)
    model = moeify.create_model("cifar_resnet18", input_size=(1, 28, 28), width=8, stem_stride=2, in_chans=1)
    spec = moeify.MoESpec(experts=2, top_k=1, scope="paper", router_norm=True)
    twin = static_twin(model, spec=spec)
    routed = with_routers(twin, moeify.convert(model, spec=spec)).train(train)
    twin.train(train)
    x = torch.rand(4, 1, 28, 28)
    before = [b.clone() for n, b in routed.named_buffers() if n.endswith("in_mean")]
    assert before, "with_routers added no standardised router"
    with torch.set_grad_enabled(train):
        out = torch.compile(routed, fullgraph=True, backend="aot_eager" if train else "eager")(x)
        assert torch.equal(out, twin(x))
    after = [b for n, b in routed.named_buffers() if n.endswith("in_mean")]
    assert any(not torch.equal(a, b) for a, b in zip(after, before)) == train
    if train:
        out.square().mean().backward()
        grads = [p.grad for n, p in routed.named_parameters() if "moeify_bench_router" in n]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def _nan_router(moe) -> None:
    with torch.no_grad():
        next(iter(moeify.moe_layers(moe).values())).router.proj.weight.fill_(float("nan"))


def test_compiled_static_still_refuses_non_finite_routes():
    """The route check survives compilation (one flag read per call), and its RoutingError
    reaches the caller as itself under ``fullgraph=True`` (fx's own error report would turn it
    into a dynamo error), also for a copy of the model; the opaque op that checks where the
    model's own call cannot (the model traced into a larger graph) is declared unsafe for CUDA
    graphs, so inductor captures the rest of the model around it."""
    import copy

    torch.manual_seed(0)
    model = moeify.create_model("cifar_resnet18", input_size=(1, 28, 28), width=16, stem_stride=2, in_chans=1)
    moe = copy.deepcopy(moeify.convert(model, experts=2, top_k=1, scope="paper")).eval()
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad(), moeify.execution("static"):
        fn = torch.compile(moe, fullgraph=True, backend="aot_eager")
        assert torch.isfinite(fn(x)).all()
        _nan_router(moe)
        with pytest.raises(moeify.RoutingError, match="NaN"):
            fn(x)
    if hasattr(torch.Tag, "cudagraph_unsafe"):
        assert torch.Tag.cudagraph_unsafe in torch.ops.moeify.check_routes.default.tags


def test_every_route_is_checked_compiled_alone_and_inside_a_larger_graph():
    """Compiled on its own (inductor's C++ code here), a MoE leaves its route check to its own
    call, which reads it after the compiled code; traced into a larger compiled graph
    (``fullgraph=True``), or its forward compiled without that call, it checks with the opaque op
    (the compiled forward is not reused across the two). Either way a NaN in any one router's
    scores is refused as RoutingError, the first router's as the last's: each route's check is
    carried into the next route's choice, and the last one's reaches the end of the call."""
    torch.manual_seed(0)
    model = moeify.create_model("cifar_resnet_small", input_size=(1, 28, 28), width=8, stem_stride=2, in_chans=1)
    moe = moeify.convert(model, experts=2, top_k=1, scope="paper").eval()
    x = torch.rand(2, 1, 28, 28)
    runs = {"alone": torch.compile(moe, fullgraph=True),
            "inside": torch.compile(torch.nn.Sequential(torch.nn.Identity(), moe), fullgraph=True,
                                    backend="aot_eager"),
            "its forward, compiled after the model was": torch.compile(moe.forward, fullgraph=True,
                                                                       backend="aot_eager")}
    layers = list(moeify.moe_layers(moe).values())
    assert len(layers) == 6
    with torch.no_grad(), moeify.execution("static"):
        for run in runs.values():
            assert torch.isfinite(run(x)).all()
        for layer in layers:
            w = layer.router.proj.weight
            kept = w.clone()
            w[0, 0] = float("nan")
            for run in runs.values():
                with pytest.raises(moeify.RoutingError, match="NaN"):
                    run(x)
            w.copy_(kept)
        for run in runs.values():  # and nothing is left over from a refused call
            assert torch.isfinite(run(x)).all()


def test_a_compiled_training_call_refuses_a_nan_in_the_first_route():
    """In training (autograd through AOTAutograd) the check is left to the model's call as in
    eval: a NaN in the first router's scores, carried through every later route's choice, is
    refused as RoutingError, and a finite call trains as before (its gradients are finite)."""
    torch.manual_seed(0)
    model = moeify.create_model("cifar_resnet_small", input_size=(1, 28, 28), width=8, stem_stride=2, in_chans=1)
    moe = moeify.convert(model, experts=2, top_k=1, scope="paper").train()
    x = torch.rand(4, 1, 28, 28)
    with moeify.execution("static"):
        run = torch.compile(moe, fullgraph=True, backend="aot_eager")
        run(x).square().mean().backward()
        assert all(torch.isfinite(p.grad).all() for p in moe.parameters() if p.grad is not None)
        with torch.no_grad():
            next(iter(moeify.moe_layers(moe).values())).router.proj.weight[0, 0] = float("nan")
        with pytest.raises(moeify.RoutingError, match="NaN"):
            run(x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("batch,gather", [(1, 0), (1, 1), (8, 8)])
def test_static_runs_in_cuda_graphs_like_masked(batch, gather, monkeypatch):
    """``torch.compile(moe, mode="reduce-overhead")`` captures the static strategy in CUDA graphs,
    with its masked math (the CUDA default) and with gathered per-sample weights: no part of the
    model is skipped, replays equal eager masked execution (true fp32), and a NaN route is still
    refused."""
    from torch._dynamo.utils import counters

    from moeify.attacks import full_fp32

    monkeypatch.setitem(EXECUTORS["static"].gather_max_batch, "cuda", gather)

    torch.manual_seed(0)
    size = (3, 48, 48)
    moe = moeify.convert(moeify.create_model("resnet18", input_size=size), experts=2, top_k=1,
                         example_inputs=torch.rand(2, *size)).cuda().eval()
    hooks = spread_routing(moe, seed=1)
    x = torch.rand(batch, *size, device="cuda")
    counters.clear()
    with torch.no_grad(), full_fp32():
        with moeify.execution("masked"):
            ref = moe(x)
        with moeify.execution("static"):
            fn = torch.compile(moe, mode="reduce-overhead", fullgraph=True)
            outs = [fn(x).clone() for _ in range(3)]  # warm-up, record, replay
            assert counters["inductor"]["cudagraph_skips"] == 0
            for out in outs:
                assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5)
            _nan_router(moe)
            with pytest.raises(moeify.RoutingError, match="NaN"):
                fn(x)
    for h in hooks:
        h.remove()
