"""RMSNorm as one autograd function with few passes over memory (the parallel model's norm).

On CPU, `F.rms_norm` runs as a composite of pow, mean, add, rsqrt and two multiplies, and its
backward differentiates each of them: 14.0 ms forward+backward for a (2048, 512) fp32 input on
one core here, against 4.7 ms for this function (benchmarks/norm.py; BENCHMARKS.md). Forward
makes one reduction pass for the inverse RMS and two elementwise passes; backward one
elementwise pass, one reduction, one fused multiply-add and one matrix-vector product for the
weight gradient. Only x and the (N,) inverse RMS are saved.

Math, per row x of width h, with r = rsqrt(mean(x^2) + eps) and g the output gradient:
    y      = x * r * w
    dx     = r * (g*w) - x * r^3 * <g*w, x> / h
    dw     = sum over rows of g * x * r
Statistics are taken in fp32 at least (fp16/bf16 inputs are upcast), like PyTorch's own kernel.
The reference model keeps `nn.RMSNorm`: it is the oracle this function is tested against.
"""

from __future__ import annotations

import torch
from torch.autograd import Function


class _RMSNorm(Function):
    # Autocast is off inside both passes: the math below picks its own precision, and under
    # autocast the weight-gradient matrix-vector product would otherwise run in bf16/fp16.

    @staticmethod
    def forward(ctx, x, weight, eps):
        with torch.autocast(x.device.type, enabled=False):
            return _RMSNorm._forward(ctx, x, weight, eps)

    @staticmethod
    def backward(ctx, grad):
        with torch.autocast(grad.device.type, enabled=False):
            return _RMSNorm._backward(ctx, grad)

    @staticmethod
    def _forward(ctx, x, weight, eps):
        shape, dtype = x.shape, x.dtype
        x2 = x.reshape(-1, shape[-1])  # (N, h)
        if x2.dtype in (torch.float16, torch.bfloat16):
            x2 = x2.float()
        rstd = torch.rsqrt(torch.linalg.vecdot(x2, x2).div_(shape[-1]).add_(eps))  # (N,)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.dtype = dtype
        y = (x2 * rstd[:, None]).mul_(weight.to(x2.dtype))  # (N, h)
        return y.to(dtype).view(shape)

    @staticmethod
    def _backward(ctx, grad):
        x2, weight, rstd = ctx.saved_tensors
        h = x2.shape[-1]
        g2 = grad.reshape(-1, h).to(x2.dtype)  # (N, h)
        grad_x = grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = ((g2 * x2).t() @ rstd).to(weight.dtype)  # (h,) = sum_n g x r
        if ctx.needs_input_grad[0]:
            gw = g2 * weight.to(x2.dtype)  # (N, h)
            coef = torch.linalg.vecdot(gw, x2).mul_(rstd.pow(3)).div_(h)  # (N,)
            grad_x = gw.mul_(rstd[:, None]).addcmul_(x2, coef[:, None], value=-1)
            grad_x = grad_x.to(ctx.dtype).view(grad.shape)
        return grad_x, grad_w, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS-normalise x (..., h) over its last dimension and scale by weight (h,)."""
    return _RMSNorm.apply(x, weight, eps)
