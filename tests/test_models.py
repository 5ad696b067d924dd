"""Every named torchvision/timm model converts exactly: top_k == experts is the dense model, and
top_k < experts runs, agrees with the masked reference and counts fewer MACs."""
import pytest
import torch

import moeify
from conftest import randomize

TORCHVISION = ["alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "efficientnet_v2_s", "googlenet",
               "inception_v3", "mnasnet0_5", "mobilenet_v2", "mobilenet_v3_small", "regnet_x_400mf",
               "regnet_y_400mf", "resnet18", "resnet50", "resnext50_32x4d", "shufflenet_v2_x1_0", "squeezenet1_1",
               "vgg11_bn", "wide_resnet50_2"]
TIMM = ["resnet18", "resnet50d", "seresnext26d_32x4d", "efficientnet_b0", "mobilenetv3_large_100", "regnetx_002",
        "regnety_004", "convnext_atto", "densenet121", "dpn68", "ghostnet_100", "vgg11_bn", "tf_efficientnet_b0",
        "res2net50_14w_8s", "cspresnet50", "repvgg_a0", "inception_v3", "test_nfnet", "test_mambaout"]
# transformers, made small: their MLP blocks (fc1 -> act -> fc2 on the last dim) are the MoE layers
TRANSFORMERS = {"vit_tiny_patch16_224": dict(depth=2, img_size=64),
                "swin_tiny_patch4_window7_224": dict(depths=(1, 1, 1, 1), img_size=64, window_size=2),
                "beit_base_patch16_224": dict(depth=2, img_size=64, embed_dim=96, num_heads=2)}
KWARGS = {f"timm:{n}": kw for n, kw in TRANSFORMERS.items()}
# repvgg has no hidden channels at all (every conv output is summed into the stream): scope auto
# (the default) takes branches there
CASES = [f"torchvision:{n}" for n in TORCHVISION] + [f"timm:{n}" for n in TIMM] + list(KWARGS)
KWARGS["timm:vgg11_bn"] = dict(mlp_ratio=0.0625)  # its 7x7 pre-logits conv at width 256, not 4096: 10 s less


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", CASES)
def test_model_converts_exactly(name):
    model = randomize(moeify.create_model(name, **KWARGS.get(name, {}))).eval()
    side = 96 if "inception" in name else 64
    x = torch.rand(2, 3, side, side)
    with torch.no_grad():
        ref = model(x)
        full = moeify.convert(model, experts=2, top_k=2, example_inputs=x).eval()
        assert _rel(full(x), ref) <= 1e-4
        moe = moeify.convert(model, experts=2, top_k=1, example_inputs=x).eval()
        assert len(moeify.moe_layers(moe)) >= 1
        sparse = moe(x)
        with moeify.execution("masked"):
            masked = moe(x)
        assert torch.isfinite(sparse).all()
        assert _rel(sparse, masked) <= 1e-4
    assert moeify.count_macs(moe, x) < moeify.count_macs(model, x)
