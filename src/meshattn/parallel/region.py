"""The tensor-parallel region over the tp axis: its entry (fused with the column-parallel
matmuls that follow it) and its exit.

Without sequence parallelism the activations between regions are replicated over tp: the entry
moves nothing forward and all-reduces the input gradient backward; the exit all-reduces the
row-parallel partial sums. With Megatron's sequence parallelism they are sequence shards
(dim 1): the entry all-gathers, the exit reduce-scatters, and replicated parameters applied to
the shards (norms, biases after the exit, positions) have their gradients summed over tp.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd import Function

from ..comm import (Axis, all_gather_raw, all_gather_start, all_reduce_start, copy_to_group, reduce_from_group,
                    reduce_scatter, reduce_scatter_start)


class Region:
    """Entry and exit of a tensor-parallel region on one tp axis (see the module doc), and the
    replicated parameters used beside it."""

    def __init__(self, axis: Axis, sequence_parallel: bool, overlap: bool = True):
        self.axis, self.sp, self.overlap = axis, sequence_parallel and axis.size > 1, overlap

    def exit(self, x: torch.Tensor) -> torch.Tensor:  # partial (B, S, h) -> (B, S/tp | S, h)
        return reduce_scatter(x, 1, self.axis) if self.sp else reduce_from_group(x, self.axis)

    def column_linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Enter the region and apply a column-parallel linear: (B, S/tp | S, h) -> (B, S, out/tp)."""
        return self.column_linears(x, [(weight, bias)])[0]

    def column_linears(self, x: torch.Tensor, layers: list) -> tuple[torch.Tensor, ...]:
        """Enter the region once and apply several column-parallel linears [(weight, bias), ...]
        that read the same input (Q, K, V; fc and gate): one output (B, S, out_i/tp) each.

        The entry is fused with the matmuls (see _EnterLinears): backward sums their input
        gradients into one buffer and overlaps its collective with the weight gradients
        (Megatron's async all-reduce); no weight or output is concatenated. Under sequence
        parallelism only this rank's shard of the input is kept for backward, which gathers it
        again (Megatron's re-gather), so the full (B, S, h) input is never saved."""
        if self.axis.size == 1:
            if torch.is_autocast_enabled(x.device.type):  # cast once: autocast would keep a copy per matmul
                x = x.to(torch.get_autocast_dtype(x.device.type))
            return tuple(F.linear(x, w, b) for w, b in layers)
        weights = [w for w, _ in layers]
        biases = [b for _, b in layers]
        return _EnterLinears.apply(x, self.axis, self.sp, self.overlap, len(layers), *weights, *biases)

    def replicated(self, p: torch.Tensor | None) -> torch.Tensor | None:
        return copy_to_group(p, self.axis) if (self.sp and p is not None) else p

    def local_seq(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's sequence shard of a replicated tensor (a no-op without sequence parallelism)."""
        return x.chunk(self.axis.size, dim=dim)[self.axis.rank] if self.sp else x


class _EnterLinears(Function):
    """y_i = x W_i^T + b_i at the entry of the tensor-parallel region. Inputs: x, axis, gather,
    overlap, n, then n weights and n biases (None allowed).

    gather=False: x (B, S, h) is replicated over tp; forward moves nothing. Backward: the input
    gradient x' = sum_i y_i' W_i (partial: this rank's heads/columns) is all-reduced
    asynchronously while W_i' = y_i'^T x and b_i' are computed, then waited for.
    gather=True (sequence parallelism): x (B, S/tp, h) is this rank's sequence shard; forward
    all-gathers it and keeps only the shard. Backward re-gathers it (asynchronously, behind the
    input-gradient matmuls), reduce-scatters x' to sequence shards (asynchronously, behind the
    weight gradients). overlap=False waits for each collective at once.
    """

    @staticmethod
    def forward(ctx, x, axis, gather, overlap, n, *params):
        weights, biases = list(params[:n]), list(params[n:])
        if torch.is_autocast_enabled(x.device.type):  # save (and move) what the matmuls will use
            dt = torch.get_autocast_dtype(x.device.type)
            x, weights = x.to(dt), [w.to(dt) for w in weights]
            biases = [None if b is None else b.to(dt) for b in biases]
        ctx.axis, ctx.gather, ctx.overlap, ctx.n = axis, gather, overlap, n
        ctx.has_bias = [b is not None for b in biases]
        ctx.save_for_backward(x, *weights)  # x: the shard under sequence parallelism
        full = all_gather_raw(x, 1, axis, "fwd") if gather else x  # (B, S, h)
        return tuple(F.linear(full, w, b) for w, b in zip(weights, biases))

    @staticmethod
    def backward(ctx, *grads):
        x, *weights = ctx.saved_tensors
        axis, wait_now = ctx.axis, not ctx.overlap
        if ctx.gather:
            gathering, finish_gather = all_gather_start(x, 1, axis, "bwd")
            if wait_now:
                gathering.wait()
        g2 = [g.reshape(-1, g.shape[-1]) for g in grads]  # (N, out_i) each, N = B*S
        grad_x = g2[0] @ weights[0]  # (N, h), partial: this rank's heads/columns only
        for g, w in zip(g2[1:], weights[1:]):
            grad_x.addmm_(g, w)
        B, h = x.shape[0], x.shape[-1]
        grad_x = grad_x.view(B, -1, h)  # (B, S, h)
        if ctx.gather:
            work, grad_in = reduce_scatter_start(grad_x, 1, axis, "bwd")  # -> (B, S/tp, h)
            if not wait_now:
                gathering.wait()
            full = finish_gather()  # (B, S, h)
        else:
            grad_in, full = grad_x, x
            work = all_reduce_start(grad_in, axis, "bwd")
        if wait_now:
            work.wait()
        need, n = ctx.needs_input_grad, ctx.n
        x2 = full.reshape(-1, h)  # (N, h)
        grad_w = [g.t() @ x2 if need[5 + i] else None for i, g in enumerate(g2)]  # (out_i, h)
        grad_b = [g.sum(0) if ctx.has_bias[i] and need[5 + n + i] else None for i, g in enumerate(g2)]
        if not wait_now:
            work.wait()
        return (grad_in.view(x.shape), None, None, None, None, *grad_w, *grad_b)
