"""The parallel model's fused RMSNorm against nn.RMSNorm (the reference model's norm)."""

import pytest
import torch
import torch.nn as nn

from meshattn.model.norm import rms_norm


def test_gradcheck_float64():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, 1e-5), (x, w))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float64, 1e-13)])
def test_matches_nn_rmsnorm(dtype, tol):
    # Same math, different order of operations: agreement to a few units of the last place.
    torch.manual_seed(1)
    ref = nn.RMSNorm(64, eps=1e-5, dtype=dtype)
    with torch.no_grad():
        ref.weight.normal_()
    w = ref.weight.detach().clone().requires_grad_()
    x = torch.randn(2, 7, 64, dtype=dtype) * 3
    x_ref, x_new = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn(2, 7, 64, dtype=dtype)
    y_ref, y_new = ref(x_ref), rms_norm(x_new, w, 1e-5)
    y_ref.backward(g)
    y_new.backward(g)
    torch.testing.assert_close(y_new, y_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(x_new.grad, x_ref.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(w.grad, ref.weight.grad, rtol=tol * 10, atol=tol * 10)  # a sum over 14 rows


def test_low_precision_input_keeps_its_dtype_and_fp32_statistics():
    torch.manual_seed(2)
    x = torch.randn(4, 32)
    w = torch.randn(32)
    y = rms_norm(x.bfloat16(), w, 1e-5)
    assert y.dtype == torch.bfloat16
    # Only the final rounding to bf16 differs from the fp32 result (statistics in fp32).
    torch.testing.assert_close(y.float(), rms_norm(x.bfloat16().float(), w, 1e-5), rtol=8e-3, atol=8e-3)


def test_gradient_of_one_input_only():
    torch.manual_seed(3)
    x, w = torch.randn(4, 8), torch.randn(8)
    for needs_x in (True, False):
        a, b = x.clone().requires_grad_(needs_x), w.clone().requires_grad_(not needs_x)
        ra, rb = x.clone().requires_grad_(needs_x), w.clone().requires_grad_(not needs_x)
        rms_norm(a, b, 1e-5).pow(2).sum().backward()
        torch.nn.functional.rms_norm(ra, (8,), rb, 1e-5).pow(2).sum().backward()
        got, want = (a.grad, ra.grad) if needs_x else (b.grad, rb.grad)
        assert (b.grad if needs_x else a.grad) is None
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_autocast_does_not_lower_the_norm_precision():
    """Under bf16 autocast (backward included) the norm computes as in fp32: the weight gradient's
    matrix-vector product must not be autocast to bf16."""
    torch.manual_seed(4)
    x = torch.randn(6, 16, requires_grad=True)
    w = torch.randn(16, requires_grad=True)
    g = torch.randn(6, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = rms_norm(x, w, 1e-5)
        y.backward(g)
    x_ref, w_ref = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    rms_norm(x_ref, w_ref, 1e-5).backward(g)
    assert y.dtype == torch.float32
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=0)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=0, atol=0)
