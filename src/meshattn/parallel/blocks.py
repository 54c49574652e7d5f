"""Attention between sets of sequence chunks under the chunk-level causal rule (no communication).

q holds the query chunks `q_chunks` (global chunk ids, in local order), k and v hold the key
chunks `k_chunks`; all chunks have the same length c. A ChunkMask says for query chunk i against
key chunk j whether the block is empty (skipped), full, causal on the diagonal or partial (a
block mask); causal attention is full for j < i, causal for j == i, skipped for j > i. This
holds for any layout and any set of chunks, which is what lets all-gather, ring, Ulysses and the
hybrid share this code. Partial results are merged by log-sum-exp into fp32 accumulators.

Shapes: q (B, H, len(q_chunks)*c, D); k, v (B, G, len(k_chunks)*c, D); out fp32 like q; lse fp32
(B, H, len(q_chunks)*c).
"""

from __future__ import annotations

import torch
from torch.autograd import Function

from ..model.attention import block_backward, block_forward, merge_
from .chunkmask import DIAG, FULL, PARTIAL, ChunkMask


def _runs(positions: list[int]) -> list[tuple[int, int]]:
    """Consecutive runs [start, stop) of sorted positions."""
    runs: list[tuple[int, int]] = []
    for pos in positions:
        if runs and runs[-1][1] == pos:
            runs[-1] = (runs[-1][0], pos + 1)
        else:
            runs.append((pos, pos + 1))
    return runs


def plan(q_chunks: list[int], k_chunks: list[int], mask: ChunkMask, k_tiles: bool = False):
    """The block calls (q rows [a, b), k rows [a, b), kind, (i, j)) in units of the mask's tiles
    (its layout chunks cut f times finer), where kind is FULL, DIAG or PARTIAL (chunkmask.py)
    and (i, j) the global tile pair of a DIAG or PARTIAL call. EMPTY pairs make no call.
    k_tiles: k_chunks are already tile ids (a ring hop carrying only the tiles still needed).

    Fast paths for a plain mask: not causal -> one call over everything; q and k the same
    increasing run of chunks -> one causal call. Otherwise, per query chunk: one unmasked call
    per consecutive run of FULL key chunks (adjacent query chunks reading the same run share one
    call), then its DIAG and PARTIAL pairs one by one.
    """
    q_chunks, k_chunks = mask.refine(q_chunks), (k_chunks if k_tiles else mask.refine(k_chunks))
    nq, nk = len(q_chunks), len(k_chunks)
    if mask.trivial and not mask.causal:
        return [((0, nq), (0, nk), FULL, None)]
    if mask.trivial and q_chunks == k_chunks and q_chunks == list(range(q_chunks[0], q_chunks[0] + nq)):
        return [((0, nq), (0, nk), DIAG, None)]
    kinds = mask.kind_matrix(q_chunks, k_chunks)  # (nq, nk) int8
    full: list = []
    open_runs: dict[tuple[int, int], int] = {}  # key run -> index in `full` of the call ending at this row
    single = []
    for qi in range(nq):
        row = kinds[qi]
        ending = {}
        for run in _runs((row == FULL).nonzero().flatten().tolist()):
            n = open_runs.get(run)
            if n is not None and full[n][0][1] == qi:  # the query row above read the same run: extend
                full[n] = ((full[n][0][0], qi + 1), run, FULL, None)
            else:
                n = len(full)
                full.append(((qi, qi + 1), run, FULL, None))
            ending[run] = n
        open_runs = ending
        single += [((qi, qi + 1), (kj, kj + 1), int(row[kj]), (q_chunks[qi], k_chunks[kj]))
                   for kj in ((row == DIAG) | (row == PARTIAL)).nonzero().flatten().tolist()]
    return full + single


def call_args(kind, pair, mask: ChunkMask, dtype):
    """(causal, bias) of one planned call."""
    if kind == PARTIAL:
        return False, mask.bias(*pair, dtype)
    return kind == DIAG, None


def attend_chunks(q, q_chunks, k, v, k_chunks, mask, scale, kernel, out, lse, k_tiles=False) -> None:
    """Accumulate into (out, lse) the attention of q's chunks to k's chunks (or tiles)."""
    c = q.shape[2] // (len(q_chunks) * mask.factor)  # tokens per tile
    for (qa, qb), (ka, kb), kind, pair in plan(q_chunks, k_chunks, mask, k_tiles):
        rows, cols = slice(qa * c, qb * c), slice(ka * c, kb * c)
        causal, bias = call_args(kind, pair, mask, q.dtype)
        o, l = block_forward(q[:, :, rows], k[:, :, cols], v[:, :, cols], causal, scale, kernel, bias)
        merge_(out[:, :, rows], lse[:, :, rows], o, l)


def accumulate(acc: torch.Tensor | None, like: torch.Tensor, region: slice, g: torch.Tensor) -> torch.Tensor:
    """acc[:, :, region] += g, creating acc on first use; a block that covers the whole tensor
    becomes the accumulator itself, saving one full-size buffer."""
    if acc is None:
        if g.shape == like.shape:
            return g.to(acc_dtype(like))
        acc = zeros_accumulator(like)
    acc[:, :, region] += g
    return acc


def attend_chunks_backward(dout, q, q_chunks, k, v, k_chunks, out, lse, mask, scale, kernel, dq=None, k_tiles=False):
    """This key set's share of dq (added into dq when given) and its dk, dv, as accumulators
    (fp32 for low-precision inputs). out and lse are the global (fully merged) results of q's rows."""
    c = q.shape[2] // (len(q_chunks) * mask.factor)  # tokens per tile
    dk = dv = None
    for (qa, qb), (ka, kb), kind, pair in plan(q_chunks, k_chunks, mask, k_tiles):
        rows, cols = slice(qa * c, qb * c), slice(ka * c, kb * c)
        causal, bias = call_args(kind, pair, mask, q.dtype)
        g_q, g_k, g_v = block_backward(dout[:, :, rows], q[:, :, rows], k[:, :, cols], v[:, :, cols],
                                       out[:, :, rows], lse[:, :, rows], causal, scale, kernel, bias)
        dq = accumulate(dq, q, rows, g_q)
        dk = accumulate(dk, k, cols, g_k)
        dv = accumulate(dv, v, cols, g_v)
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
    def forward(ctx, q, k, v, q_chunks, k_chunks, mask, scale, kernel):
        out, lse = empty_accumulators(q)
        attend_chunks(q, q_chunks, k, v, k_chunks, mask, scale, kernel, out, lse)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (q_chunks, k_chunks, mask, scale, kernel)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        q_chunks, k_chunks, mask, scale, kernel = ctx.args
        dq, dk, dv = attend_chunks_backward(dout, q, q_chunks, k, v, k_chunks, out, lse, mask, scale, kernel)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def chunk_attention(q, k, v, q_chunks, k_chunks, causal=True, scale=None, kernel="auto", mask=None) -> torch.Tensor:
    """Differentiable attention between chunk sets; `mask` (a ChunkMask over all chunks) replaces
    the plain causal/full rule when given."""
    from ..model.attention import default_scale

    if mask is None:
        n = max(max(q_chunks), max(k_chunks)) + 1
        mask = ChunkMask(n, n * (q.shape[2] // len(q_chunks)), causal)
    return ChunkAttention.apply(q, k, v, list(q_chunks), list(k_chunks), mask, default_scale(q.shape[-1], scale),
                                kernel)
