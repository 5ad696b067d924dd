"""The graph rules on user-written modules: what converts, what stays dense and why, exactness."""
import torch

import moeify
from moeify.bench import spread_routing
from conftest import randomize
import pytest

from models import (StreamReuse, ChannelShuffle, FoldedHeads, GatedMLPs, GhostBlock, OptionalMask, PreActDense, PreActResNet, ResidualOnly, SelectiveKernel,
                    SplitAttention, SplitConvs, StdConvNet, TinyViT, Zoo)


def _plan(model, scope="hidden", experts=2):
    return moeify.plan(model, experts=experts, example_inputs=torch.rand(2, 3, 16, 16), scope=scope)


def _dense_reason(plan, name):
    return next(d.reason for d in plan.dense if d.name == name)


def test_user_zoo_plan_follows_the_rules():
    p = _plan(Zoo())
    layers = {lp.name: lp for lp in p.layers}
    assert layers["expand"].consumers == ["left", "right"]  # fan-out: one gate, two consumers
    assert set(layers["grouped"].producers) == {"grouped", "se.expand"}  # SE stays inside the group
    assert set(layers["grouped"].consumers) == {"se.reduce", "project"}
    assert layers["mid"].consumers == ["conv2d"]  # functional conv consumes
    assert layers["conv2d"].consumers == ["head"]  # functional conv produces; flatten of 1x1 keeps channels
    assert "mixed" in _dense_reason(p, "left")  # cat of left/right, consumed as one tensor
    # a channel shuffle, mapped exactly: the consumer after it runs in full behind the reordered gate
    assert layers["pre_shuffle"].consumers == ["mid"] and "another order" in layers["pre_shuffle"].pack_blocker
    assert "model output" in _dense_reason(p, "head")


def test_grouped_conv_needs_aligned_experts():
    p = _plan(Zoo(), experts=8)  # experts of 4 channels cannot cover whole 8-channel conv groups
    assert "grouped conv" in _dense_reason(p, "grouped")


def test_preactivation_dense_connectivity():
    """The stem and every conv2 are concatenated into one tensor that later convs read whole. By
    default they stay dense; with ``cuts="all"`` each such reader is cut into one part per group it
    reads (summed), so those groups convert too, exactly."""
    default = _plan(PreActDense())
    assert [lp.name for lp in default.layers] == ["layers.0.conv1", "layers.1.conv1", "layers.2.conv1"]
    assert "mixed" in _dense_reason(default, "stem")
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    model = randomize(PreActDense()).double().eval()
    p = moeify.plan(model, experts=2, example_inputs=x, scope="hidden", cuts="all")
    by_name = {lp.name: lp for lp in p.layers}
    assert list(by_name) == ["stem", "layers.0.conv1", "layers.0.conv2", "layers.1.conv1", "layers.1.conv2",
                             "layers.2.conv1", "layers.2.conv2"]
    assert by_name["layers.0.conv2"].consumers == ["layers.1.conv1[:, 16:24]", "layers.2.conv1[:, 16:24]",
                                                   "fc[:, 16:24]"]
    assert by_name["layers.2.conv1"].producers == ["layers.2.conv1", "layers.2.conv1[:, 16:24]",
                                                   "layers.2.conv1[:, 24:32]"]
    assert by_name["layers.2.conv1"].packed  # the parts' sum is inside the group
    with torch.no_grad():
        full = moeify.convert(model, experts=2, top_k=2, example_inputs=x, scope="hidden", cuts="all").double()
        assert torch.allclose(full.eval()(x), model(x), rtol=1e-10, atol=1e-12)
    moe = moeify.convert(model, experts=2, top_k=1, example_inputs=x, scope="hidden", cuts="all").double()
    spread_routing(moe)
    _strategies_agree(moe, x, [moe.get_submodule("stem").weight, moe.get_submodule("fc").weight], rtol=1e-9)


def test_scopes_on_preact_resnet():
    hidden = _plan(PreActResNet())
    assert "branches" in _dense_reason(hidden, "blocks.0.conv2")
    branches = _plan(PreActResNet(), scope="branches")
    gated = {lp.name: lp for lp in branches.layers}
    assert gated["blocks.0.conv2"].add_gates == ["add"]
    assert "stream" in _dense_reason(branches, "stem")


def test_user_models_are_exact_and_sparse_equals_masked():
    x = torch.rand(4, 3, 16, 16)
    for cls, scope in ((Zoo, "hidden"), (PreActDense, "hidden"), (PreActResNet, "branches")):
        model = randomize(cls()).eval()
        with torch.no_grad():
            ref = model(x)
            full = moeify.convert(model, experts=2, top_k=2, example_inputs=x, scope=scope).eval()
            assert ((full(x) - ref).abs().max() <= 1e-4 * ref.abs().max())
            moe = moeify.convert(model, experts=2, top_k=1, example_inputs=x, scope=scope).eval()
            with moeify.execution("masked"):
                masked = moe(x)
            assert torch.allclose(moe(x), masked, rtol=1e-5, atol=1e-6)


def test_a_branch_is_added_into_the_stream_only_where_nothing_reads_the_stream_later(monkeypatch):
    """The liveness pass: an add may take its stream's memory only when no later op reads it
    (through an alias either), and never a model input's. Grouped inference with routes spread
    (rows added in place) and static with per-sample gathers (a scatter in place) equal masked
    and leave the caller's input untouched."""
    from moeify.nn.executors import EXECUTORS
    monkeypatch.setitem(EXECUTORS["static"].gather_max_batch, "cpu", 8)  # packed, per sample, at this batch
    x = torch.rand(6, 3, 16, 16)
    for cls, scope, expected in ((StreamReuse, "branches", [False, True]), (PreActResNet, "branches", [True, True]),
                                 (ResidualOnly, "branches", [True, True])):
        model = randomize(cls()).eval()
        moe = moeify.convert(model, experts=2, top_k=1, example_inputs=x, scope=scope).eval()
        adds = [n for n in moe.graph.nodes if getattr(n.target, "__name__", "") == "moe_add"]
        assert [any(n.kwargs["free"]) for n in adds] == expected, cls.__name__
        spread_routing(moe)
        for _ in range(2):  # the second call reuses cached slices
            x0 = x.clone()
            with torch.inference_mode():
                with moeify.execution("masked"):
                    masked = moe(x)
                for mode in ("grouped", "static"):
                    with moeify.execution(mode):
                        out = moe(x)
                    assert torch.allclose(out, masked, rtol=1e-5, atol=1e-6), (cls.__name__, mode)
            assert torch.equal(x, x0)


def test_liveness_follows_aliases_to_inputs_and_later_readers():
    """``free_at`` on plain traced code: a model input is never free, nor a view of a value read
    later; a fresh value whose last reader is the add is."""
    import torch.fx as fx
    from torch.fx.passes.shape_prop import ShapeProp
    from moeify.graph.liveness import free_at, fresh_ops

    class M(torch.nn.Module):
        def forward(self, x):
            a = x * 2            # fresh
            v = a.view(-1)       # shares a's memory
            s = a + x            # input read here (x) and a read here
            t = v.sum()          # a's memory read after s
            b = s * 3
            return b + s + t     # s read here (the add below) last

    gm = fx.symbolic_trace(M())
    ShapeProp(gm).propagate(torch.rand(2, 3))
    nodes = {n.name: n for n in gm.graph.nodes}
    fresh = fresh_ops({})
    assert not free_at(nodes["x"], nodes["add"], fresh)       # the caller's input
    assert not free_at(nodes["mul"], nodes["add"], fresh)     # its view is summed later
    assert free_at(nodes["add"], nodes["add_1"], fresh)       # s: its last reader
    assert not free_at(nodes["add"], nodes["mul_1"], fresh)   # s: read again after b


def test_resnet18_paper_scope_matches_the_paper_layer_set():
    model = moeify.create_model("resnet18")
    p = moeify.plan(model, experts=2, top_k=1, scope="paper")
    names = {lp.name for lp in p.layers}
    block_convs = {f"layer{s}.{b}.conv{c}" for s in range(1, 5) for b in range(2) for c in (1, 2)}
    assert names == block_convs  # all 16 block convs; stem, shortcuts and fc stay dense
    assert "first conv" in _dense_reason(moeify.plan(moeify.create_model("vgg11_bn"), experts=2, scope="paper"),
                                          "features.0")


def test_non_persistent_buffers_stay_out_of_the_converted_state_dict(monkeypatch):
    """A buffer the model keeps out of its state_dict (input normalisation) stays out after
    conversion, also under a torch whose fx copies every buffer as persistent, so a file saved
    under one torch version loads under another."""
    import torch.fx.graph_module as gmod

    from moeify.models.wrap import InputNormalize

    def old_copy_attr(from_module, to_module, target):  # torch < 2.14: persistence is lost
        *prefix, field = target.split(".")
        for item in prefix:
            f, t = getattr(from_module, item), getattr(to_module, item, None)
            if f is t:
                return
            if t is None:
                t = torch.nn.Module()
                setattr(to_module, item, t)
            from_module, to_module = f, t
        orig = getattr(from_module, field)
        if isinstance(orig, torch.Tensor) and not isinstance(orig, torch.nn.Parameter):
            to_module.register_buffer(field, orig)
        else:
            setattr(to_module, field, orig)

    dense = InputNormalize(PreActResNet(), mean=(0.5,), std=(0.25,), channels=3)
    for copy_attr in (gmod._copy_attr, old_copy_attr):
        monkeypatch.setattr(gmod, "_copy_attr", copy_attr)
        moe = moeify.convert(dense, experts=2, top_k=1, example_inputs=torch.rand(2, 1, 16, 16))
        keys = set(moe.state_dict())
        assert not {"mean", "std"} & keys
        assert {k for k in keys if "router" not in k} == set(dense.state_dict())


def test_scope_auto_keeps_hidden_where_it_saves_else_takes_branches():
    x = torch.rand(2, 3, 16, 16)
    p = moeify.plan(PreActResNet(), experts=2, example_inputs=x)  # auto is the default
    assert p.spec.scope == "auto" and p.scope == "hidden" and "hidden" in p.scope_reason
    assert [lp.name for lp in p.layers] == [lp.name for lp in _plan(PreActResNet()).layers]
    q = moeify.plan(ResidualOnly(), experts=2, example_inputs=x)
    assert q.scope == "branches" and "finds no MoE layer" in q.scope_reason
    assert [lp.name for lp in q.layers] == ["convs.0", "convs.1"]
    assert "scope=auto -> branches" in str(q) and "chose branches" in str(q)
    named = moeify.plan(ResidualOnly(), experts=2, example_inputs=x, layers=["convs.0"])  # named, not hidden
    assert named.scope == "branches" and [lp.name for lp in named.layers] == ["convs.0"]
    with pytest.raises(moeify.ConversionError, match="try another scope"):  # explicit scopes keep their meaning
        moeify.convert(ResidualOnly(), experts=2, example_inputs=x, scope="hidden")
    model = randomize(ResidualOnly()).eval()
    with torch.no_grad():
        assert torch.allclose(moeify.convert(model, experts=2, top_k=2, example_inputs=x).eval()(x), model(x),
                              rtol=1e-5, atol=1e-6)


def _strategies_agree(moe, x, params, rtol):
    """grouped and static equal masked, in eval and training: outputs, input gradients and the
    gradients of ``params``."""
    for train in (False, True):
        moe.train(train)
        out = {}
        for mode in ("masked", "grouped", "static"):
            xi = x.clone().requires_grad_()
            with moeify.execution(mode):
                y = moe(xi)
            y.square().sum().backward()
            out[mode] = [y.detach(), xi.grad] + [p.grad.clone() for p in params]
            moe.zero_grad()
        for mode in ("grouped", "static"):
            for a, b in zip(out[mode], out["masked"]):
                assert torch.allclose(a, b, rtol=rtol, atol=rtol * b.abs().max()), mode


def _converts_exactly(model, x, experts, top_k, macs_below, params, **spec):
    """All experts on equals the dense model; the parameters and their keys are unchanged; with
    samples spread over experts the MoE runs under ``macs_below`` of the dense MACs and every
    strategy equals masked (gradients of the MoE's ``params``, named as in the model, included)."""
    with torch.no_grad():
        full = moeify.convert(model, experts=experts, top_k=experts, example_inputs=x, **spec).double().eval()
        assert torch.allclose(full(x), model(x), rtol=1e-10, atol=1e-12)
    moe = moeify.convert(model, experts=experts, top_k=top_k, example_inputs=x, **spec).double()
    assert set(moe.state_dict()) - {k for k in moe.state_dict() if k.startswith("moeify_layers.")} == \
        set(model.state_dict())
    spread_routing(moe)
    assert moeify.count_macs(moe, x) < macs_below * moeify.count_macs(model, x)
    _strategies_agree(moe, x, [moe.get_parameter(n) for n in params], rtol=1e-9)
    return moe


def test_transformer_mlp_blocks_convert_with_tokens_as_an_extra_dim():
    """fc1 -> GELU -> fc2 on the last dim is a hidden group although the token stream before it
    (after the class token's cat) tracks no channels; attention's qkv stays dense."""
    x = torch.rand(4, 3, 16, 16)
    model = TinyViT().eval()
    p = moeify.plan(model, experts=4, top_k=2, example_inputs=x)
    assert p.scope == "hidden"
    assert [(lp.name, lp.consumers) for lp in p.layers] == [("blocks.0.fc1", ["blocks.0.fc2"]),
                                                            ("blocks.1.fc1", ["blocks.1.fc2"])]
    assert all(lp.packed for lp in p.layers)
    with torch.no_grad():
        ref = model(x)
        full = moeify.convert(model, experts=4, top_k=4, example_inputs=x).eval()
        assert torch.allclose(full(x), ref, rtol=1e-5, atol=1e-6)
    moe = moeify.convert(model, experts=4, top_k=2, example_inputs=x)
    spread_routing(moe)
    assert moeify.count_macs(moe, x) < 0.8 * moeify.count_macs(model, x)
    _strategies_agree(moe, x, [moe.get_submodule("blocks.0.fc1").weight], rtol=1e-5)
    routes = {moeify.routing(moe.eval(), x)[name][:, 0].unique().numel() for name in moeify.moe_layers(moe)}
    assert max(routes) > 1  # samples really take different experts


def test_weight_standardised_convs_run_sparse_on_their_computed_weight():
    """A conv whose forward standardises its weight (timm's StdConv2d family) is sliced after the
    standardisation: exact, every strategy equals masked with gradients, and the MACs drop."""
    x = torch.rand(4, 3, 16, 16, dtype=torch.float64)
    model = StdConvNet().double().eval()
    with torch.no_grad():
        full = moeify.convert(model, experts=4, top_k=4, example_inputs=x).double().eval()
        assert torch.allclose(full(x), model(x), rtol=1e-10, atol=1e-12)
    moe = moeify.convert(model, experts=4, top_k=2, example_inputs=x).double()
    assert [lp.name for lp in moe.moeify_plan.layers] == ["stem", "a", "b", "c"]
    spread_routing(moe)
    assert moeify.count_macs(moe, x) < 0.6 * moeify.count_macs(model, x)  # sliced, not masked
    _strategies_agree(moe, x, [moe.get_submodule("b").weight, moe.get_submodule("a").gain], rtol=1e-9)


def test_forward_arguments_with_defaults_are_traced_at_their_defaults():
    x = torch.rand(2, 3, 8, 8)
    model = OptionalMask().eval()
    with torch.no_grad():
        moe = moeify.convert(model, experts=2, top_k=2, example_inputs=x).eval()
        assert torch.allclose(moe(x), model(x), rtol=1e-5, atol=1e-6)
    assert [lp.name for lp in moe.moeify_plan.layers] == ["a", "b"]


def test_gated_mlps_gate_both_copies_of_their_channels():
    """A first layer whose output is two copies of one group's channels (GLU's chunk, MambaOut's
    split) becomes one producer per copy, on its slice of the weight: one selection gates both
    copies, the parameters and their keys are unchanged, and every strategy equals masked."""
    x = torch.rand(4, 3, 8, 8, dtype=torch.float64)
    model = GatedMLPs().double().eval()
    p = moeify.plan(model, experts=4, top_k=2, example_inputs=x)
    assert [(lp.name, lp.producers, lp.consumers) for lp in p.layers] == [
        ("glu_in", ["glu_in", "glu_in[32:64]"], ["glu_out"]), ("fc1", ["fc1", "fc1[32:64]"], ["fc2"])]
    _converts_exactly(model, x, 4, 2, 0.75, ["fc1.weight", "glu_in.bias"])


def test_a_conv_reading_two_copies_of_a_group_is_cut_per_copy():
    """GhostNet's cat of a conv's output and its depthwise copy: the next conv becomes one
    contraction per copy, summed, and the first conv's channels become an MoE layer."""
    x = torch.rand(4, 3, 8, 8, dtype=torch.float64)
    model = randomize(GhostBlock()).double().eval()
    p = moeify.plan(model, experts=4, top_k=2, example_inputs=x)
    assert [(lp.name, lp.consumers) for lp in p.layers] == [("primary", ["out", "out[:, 8:16]"])]
    _converts_exactly(model, x, 4, 2, 0.8, ["out.weight", "cheap.weight"])


def test_a_split_feeding_several_convs_and_a_cat_feeding_one():
    """With ``cuts="all"``, a layer whose output is split between two convs is cut into one part
    per piece (each its own MoE layer and router); the 1x1 conv reading both convs' outputs
    concatenated is cut into one part per group, summed."""
    x = torch.rand(4, 3, 8, 8, dtype=torch.float64)
    model = randomize(SplitConvs()).double().eval()
    assert [lp.name for lp in moeify.plan(model, experts=2, top_k=1, example_inputs=x).layers] == ["d"]  # default
    p = moeify.plan(model, experts=2, top_k=1, example_inputs=x, cuts="all")
    assert [(lp.name, lp.consumers) for lp in p.layers] == [
        ("a", ["b"]), ("a[8:16]", ["c"]), ("b", ["d"]), ("c", ["d[:, 16:32]"]), ("d", ["head"])]
    _converts_exactly(model, x, 2, 1, 0.6, ["a.weight", "d.weight"], cuts="all")


@pytest.mark.parametrize("module,experts,layer,producers,consumers,params", [
    # ResNeSt's split attention: a grouped conv's output viewed as [B, radix, C, H, W], summed over
    # the radix dim and weighted by a softmax over it; the grouped conv is cut per conv group (on its
    # input channels), the attention's last conv per radix
    (SplitAttention, 4, "conv", ["conv", "conv[16:32]", "fc2", "fc2[16:32]"], ["fc1", "out"],
     ["conv.weight", "fc2.weight"]),
    # SKNet's selective kernel: two branches stacked on a new dim, attention logits viewed as
    # [B, 2, C, 1, 1] and normalised by a softmax over the stack
    (SelectiveKernel, 2, "paths.0", ["paths.0", "paths.1", "select", "select[16:32]"], ["reduce", "out"],
     ["paths.1.weight", "select.weight"]),
], ids=["split-attention", "selective-kernel"])
def test_factored_channels_and_stacked_branches(module, experts, layer, producers, consumers, params):
    """Reshapes that factor the channel dim are followed channel by channel, and a sum or softmax
    over a factor puts a channel's branches together: every branch conv and every part of the
    attention's last conv produce one MoE layer's channels, one selection gates them all, exactly,
    and every strategy equals masked."""
    x = torch.rand(4, 3, 8, 8, dtype=torch.float64)
    model = randomize(module()).double().eval()
    layers = {lp.name: lp for lp in moeify.plan(model, experts=experts, top_k=experts // 2, example_inputs=x).layers}
    assert (layers[layer].producers, layers[layer].consumers) == (producers, consumers)
    _converts_exactly(model, x, experts, experts // 2, 0.7, params)


def test_a_channel_shuffle_gates_its_producer_and_runs_its_consumer_in_full():
    """A channel shuffle maps every channel to its new place (view, transpose, flatten): the
    consumer after it reads the group in another order, so experts cannot be contiguous on both
    sides. The 1x1 conv before it becomes the MoE layer; the grouped conv after it runs in full
    behind the layer's gate taken in the shuffled order (nothing in between follows the route):
    exact, every strategy equal to masked, and the producer's MACs saved."""
    x = torch.rand(4, 3, 8, 8, dtype=torch.float64)
    model = randomize(ChannelShuffle()).double().eval()
    p = moeify.plan(model, experts=2, top_k=1, example_inputs=x)
    lp = next(lp for lp in p.layers if lp.name == "a")
    assert lp.consumers == ["b"] and not lp.packed and "b reads the channels in another order" in lp.pack_blocker
    assert "b (reordered: in full)" in str(p)
    moe = _converts_exactly(model, x, 2, 1, 1.0, ["a.weight", "dw.weight"])
    saved = model.a.weight.numel() * 64 / 2  # half of a's MACs; b and dw run in full
    assert moeify.count_macs(moe, x) == pytest.approx(moeify.count_macs(model, x) - saved, rel=0.02)
    # the gate follows the shuffle: the dense model with the unselected channels zeroed after a, and
    # again after the depthwise conv at their shuffled places, is the MoE
    moe.eval()
    keep = torch.zeros(4, 16, dtype=torch.float64).scatter(1, moeify.routing(moe, x)["a"].repeat_interleave(8, 1)
                                                          * 8 + torch.arange(8).repeat(1, 1), 1.0)
    shuffled = keep.view(4, 2, 8).transpose(1, 2).reshape(4, 16)
    hooks = [model.a.register_forward_hook(lambda m, i, o: o * keep[:, :, None, None]),
             model.dw.register_forward_hook(lambda m, i, o: o * shuffled[:, :, None, None])]
    with torch.no_grad():
        reference = model(x)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        assert torch.allclose(moe(x), reference, rtol=1e-10, atol=1e-12)


def test_channel_factors_moved_onto_the_batch_dim_are_a_barrier():
    """Attention that permutes q/k/v and the heads in front of the batch ([3, B * heads, N, d], as
    SAM's) is not followed there: qkv stays dense with the reason, and the MLP after it converts."""
    x = torch.rand(4, 5, 16, dtype=torch.float64)
    model = randomize(FoldedHeads()).double().eval()
    p = moeify.plan(model, experts=2, top_k=1, example_inputs=x)
    assert [lp.name for lp in p.layers] == ["fc1"]
    assert "qkv" in {d.name for d in p.dense}
    _converts_exactly(model, x, 2, 1, 0.8, ["fc1.weight", "qkv.weight"])
