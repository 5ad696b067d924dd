"""Masked execution's training BatchNorm: each channel normalised with the statistics of the samples
that selected it, its backward written by hand; checked against the definition, one channel at a
time, in float64."""
import pytest
import torch

from moeify.nn.selected_norm import SelectedBatchNorm


def by_definition(x, sel, weight, bias, eps):
    """Per channel: mean and biased variance over the selecting samples' elements (0 and 0 when
    none selects it), applied at every position; autograd differentiates it."""
    outs, means, variances = [], [], []
    for c in range(x.shape[1]):
        chosen = x[sel[:, c], c]
        mean = chosen.mean() if chosen.numel() else x.new_zeros(())
        var = (chosen - mean).square().mean() if chosen.numel() else x.new_zeros(())
        y = (x[:, c] - mean) / torch.sqrt(var + eps)
        outs.append(y if weight is None else y * weight[c] + bias[c])
        means.append(mean)
        variances.append(var)
    return torch.stack(outs, 1), torch.stack(means), torch.stack(variances)


@pytest.mark.parametrize("shape", [(6, 5, 4, 3), (7, 5, 9), (9, 5)])
@pytest.mark.parametrize("affine", [True, False])
def test_selected_batch_norm_matches_its_definition(shape, affine):
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(*shape, generator=g, dtype=torch.float64) * 2 + 1).requires_grad_()
    sel = torch.rand(shape[:2], generator=g) < 0.5
    sel[:, 0] = False  # a channel no sample selected
    sel[0, 1:] = True  # every other channel has a sample
    weight = (torch.rand(shape[1], generator=g, dtype=torch.float64) + 0.5).requires_grad_() if affine else None
    bias = torch.randn(shape[1], generator=g, dtype=torch.float64).requires_grad_() if affine else None
    upstream = torch.randn(*shape, generator=g, dtype=torch.float64)  # unselected positions too

    out, mean, var, count = SelectedBatchNorm.apply(x, sel, weight, bias, 1e-5)
    ref, ref_mean, ref_var = by_definition(x, sel, weight, bias, 1e-5)

    assert torch.allclose(out, ref, rtol=1e-10, atol=1e-9)
    assert torch.allclose(mean, ref_mean, rtol=1e-10, atol=1e-12)
    assert torch.allclose(var, ref_var, rtol=1e-10, atol=1e-12)
    assert torch.equal(count, sel.sum(0).double() * x[0, 0].numel())
    inputs = [x] + ([weight, bias] if affine else [])
    grads = torch.autograd.grad((out * upstream).sum(), inputs)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), inputs)
    for got, want in zip(grads, ref_grads):
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-9)


def test_selected_batch_norm_keeps_channels_last_and_float32():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 6, 5, 5, generator=g).contiguous(memory_format=torch.channels_last).requires_grad_()
    sel = torch.rand(8, 6, generator=g) < 0.5
    sel[0] = True
    out, *_ = SelectedBatchNorm.apply(x, sel, None, None, 1e-5)
    (gx,) = torch.autograd.grad(out.square().sum(), x)
    x64 = x.detach().double().requires_grad_()
    ref, *_ = by_definition(x64, sel, None, None, 1e-5)
    (ref_gx,) = torch.autograd.grad(ref.square().sum(), x64)
    assert out.dtype == gx.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.allclose(gx.double(), ref_gx, rtol=1e-4, atol=1e-4)


def test_selected_batch_norm_takes_half_precision_maps_as_autocast_gives_them():
    """Under autocast a conv hands BatchNorm a bfloat16 map while its parameters stay float32: the
    statistics are taken in float32, and the backward takes the float32 gradient of the output."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 6, 5, 5, generator=g).bfloat16().requires_grad_()
    sel = torch.rand(8, 6, generator=g) < 0.5
    sel[0] = True
    weight = (torch.rand(6, generator=g) + 0.5).requires_grad_()
    bias = torch.randn(6, generator=g).requires_grad_()
    out, mean, var, _ = SelectedBatchNorm.apply(x, sel, weight, bias, 1e-5)
    grads = torch.autograd.grad(out.square().sum(), [x, weight, bias])
    x64 = x.detach().double().requires_grad_()
    w64, b64 = weight.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
    ref, ref_mean, ref_var = by_definition(x64, sel, w64, b64, 1e-5)
    ref_grads = torch.autograd.grad(ref.square().sum(), [x64, w64, b64])
    assert mean.dtype == var.dtype == torch.float32 and grads[0].dtype == torch.bfloat16
    assert torch.allclose(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.allclose(var.double(), ref_var, rtol=1e-5, atol=1e-6)
    assert torch.allclose(grads[0].double(), ref_grads[0], rtol=1e-2, atol=1e-2)
    for got, want in zip(grads[1:], ref_grads[1:]):
        assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-4)
