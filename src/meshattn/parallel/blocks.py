"""Attention between sets of sequence chunks under the chunk-level causal rule (no communication).

q holds the query chunks `q_chunks` (global chunk ids, in local order), k and v hold the key
chunks `k_chunks`; all chunks have the same length c. With a causal mask, query chunk i against
key chunk j is full if j < i, causal on the diagonal if j == i, and skipped if j > i; this holds
for any layout and any set of chunks, which is what lets all-gather, ring, Ulysses and the hybrid
share this code. Partial results are merged by log-sum-exp into fp32 accumulators.

Shapes: q (B, H, len(q_chunks)*c, D); k, v (B, G, len(k_chunks)*c, D); out fp32 like q; lse fp32
(B, H, len(q_chunks)*c).
"""

from __future__ import annotations

import torch
from torch.autograd import Function

from ..model.attention import block_backward, block_forward, merge_


def _runs(positions: list[int]) -> list[tuple[int, int]]:
    """Consecutive runs [start, stop) of sorted positions."""
    runs: list[tuple[int, int]] = []
    for pos in positions:
        if runs and runs[-1][1] == pos:
            runs[-1] = (runs[-1][0], pos + 1)
        else:
            runs.append((pos, pos + 1))
    return runs


def plan(q_chunks: list[int], k_chunks: list[int], causal: bool):
    """The block calls: (q rows [a, b), k rows [a, b), causal) in chunk units.

    Fast paths: non-causal -> one call over everything; q and k the same increasing run of
    chunks -> one causal call. Otherwise, per query chunk: one full call per consecutive run of
    earlier key chunks (adjacent query chunks reading the same run share one call), and one causal
    call for its own chunk if present.
    """
    nq, nk = len(q_chunks), len(k_chunks)
    if not causal:
        return [((0, nq), (0, nk), False)]
    if q_chunks == k_chunks and q_chunks == list(range(q_chunks[0], q_chunks[0] + nq)):
        return [((0, nq), (0, nk), True)]
    full: list[tuple[tuple[int, int], tuple[int, int], bool]] = []
    diag = []
    for qi, i in enumerate(q_chunks):
        for run in _runs(sorted(kj for kj, j in enumerate(k_chunks) if j < i)):
            same = [n for n, (rows, cols, _) in enumerate(full) if cols == run and rows[1] == qi]
            if same:
                rows = full[same[0]][0]
                full[same[0]] = ((rows[0], qi + 1), run, False)
            else:
                full.append(((qi, qi + 1), run, False))
        diag += [((qi, qi + 1), (kj, kj + 1), True) for kj, j in enumerate(k_chunks) if j == i]
    return full + diag


def attend_chunks(q, q_chunks, k, v, k_chunks, causal, scale, kernel, out, lse) -> None:
    """Accumulate into (out, lse) the attention of q's chunks to k's chunks."""
    c = q.shape[2] // len(q_chunks)
    for (qa, qb), (ka, kb), diag in plan(q_chunks, k_chunks, causal):
        rows, cols = slice(qa * c, qb * c), slice(ka * c, kb * c)
        o, l = block_forward(q[:, :, rows], k[:, :, cols], v[:, :, cols], diag, scale, kernel)
        merge_(out[:, :, rows], lse[:, :, rows], o, l)


def _accumulate(acc: torch.Tensor | None, like: torch.Tensor, region: slice, g: torch.Tensor) -> torch.Tensor:
    """acc[:, :, region] += g, creating acc on first use; a block that covers the whole tensor
    becomes the accumulator itself, saving one full-size buffer."""
    if acc is None:
        if g.shape == like.shape:
            return g.to(acc_dtype(like))
        acc = zeros_accumulator(like)
    acc[:, :, region] += g
    return acc


def attend_chunks_backward(dout, q, q_chunks, k, v, k_chunks, out, lse, causal, scale, kernel, dq=None):
    """This key set's share of dq (added into dq when given) and its dk, dv, as accumulators
    (fp32 for low-precision inputs). out and lse are the global (fully merged) results of q's rows."""
    c = q.shape[2] // len(q_chunks)
    dk = dv = None
    for (qa, qb), (ka, kb), diag in plan(q_chunks, k_chunks, causal):
        rows, cols = slice(qa * c, qb * c), slice(ka * c, kb * c)
        g_q, g_k, g_v = block_backward(dout[:, :, rows], q[:, :, rows], k[:, :, cols], v[:, :, cols],
                                       out[:, :, rows], lse[:, :, rows], diag, scale, kernel)
        dq = _accumulate(dq, q, rows, g_q)
        dk = _accumulate(dk, k, cols, g_k)
        dv = _accumulate(dv, v, cols, g_v)
        del g_q, g_k, g_v  # one block's gradients alive at a time
    z = zeros_accumulator  # where nothing attended
    return (z(q) if dq is None else dq), (z(k) if dk is None else dk), (z(v) if dv is None else dv)


def zeros_accumulator(like: torch.Tensor) -> torch.Tensor:
    """Zeros shaped like `like` (B, H, S, D) in the accumulation dtype, laid out (B, S, H, D) in
    memory like the CPU kernel's gradients (so a ring hop sends them without a copy)."""
    B, H, S, D = like.shape
    return torch.zeros((B, S, H, D), dtype=acc_dtype(like), device=like.device).transpose(1, 2)


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def empty_accumulators(q: torch.Tensor):
    """out = 0 and lse = -inf: the state of rows that have seen no key."""
    f = acc_dtype(q)
    return torch.zeros(q.shape, dtype=f, device=q.device), torch.full(q.shape[:3], float("-inf"), dtype=f,
                                                                      device=q.device)


class ChunkAttention(Function):
    """Local attention between chunk sets; forward merges blocks, backward replays them with the
    global out and lse. Differentiable in q, k and v."""

    @staticmethod
    def forward(ctx, q, k, v, q_chunks, k_chunks, causal, scale, kernel):
        out, lse = empty_accumulators(q)
        attend_chunks(q, q_chunks, k, v, k_chunks, causal, scale, kernel, out, lse)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (q_chunks, k_chunks, causal, scale, kernel)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        q_chunks, k_chunks, causal, scale, kernel = ctx.args
        dq, dk, dv = attend_chunks_backward(dout, q, q_chunks, k, v, k_chunks, out, lse, causal, scale, kernel)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def chunk_attention(q, k, v, q_chunks, k_chunks, causal=True, scale=None, kernel="auto") -> torch.Tensor:
    from ..model.attention import default_scale

    return ChunkAttention.apply(q, k, v, list(q_chunks), list(k_chunks), causal,
                                default_scale(q.shape[-1], scale), kernel)
