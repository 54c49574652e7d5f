"""Ring attention: K/V blocks travel around the ring; partial results merge by log-sum-exp.

Forward, p steps: at step s rank r holds the K/V of ring rank (r - s) mod p. Before computing on
it, the rank posts the send of that block to r+1 and the receive of the next one from r-1, so the
transfer runs while the block is computed. p-1 transfers of the local K and V per rank.

Backward: the merged output and lse were saved. The same rotation replays every block with the
fused attention backward, which given the global out and lse gives this rank's exact share of dq
(accumulated locally) and the block's dk, dv. dk/dv accumulators travel with their blocks: at
step s the accumulator of block (r - s) arrives from r-1 while this rank computes its own share
into a fresh buffer; the sum is sent on to r+1. After p steps every accumulator is back at its
owner: p-1 K/V transfers and p dK/dV transfers per rank. The S x S matrix is never held.

`chunk_table[j]` lists the global chunk ids held by ring rank j (one rank's layout chunks, or a
whole Ulysses group's in the hybrid), so the chunk-level causal rule decides every block pair.
"""

from __future__ import annotations

import torch
from torch.autograd import Function

from ..comm import Axis, ring_shift_start
from .blocks import ChunkAttention, attend_chunks, attend_chunks_backward, empty_accumulators

_K_TAG, _V_TAG, _DK_TAG, _DV_TAG = 17, 18, 19, 20


def _bshd(t: torch.Tensor) -> torch.Tensor:
    """t (B, H, S, D) laid out (B, S, H, D) in memory, the layout the CPU kernel returns
    gradients in; a copy only when it is not already."""
    return t if t.transpose(1, 2).is_contiguous() else t.transpose(1, 2).contiguous().transpose(1, 2)


# Wire layouts, fixed per kind of tensor so that both ends of a hop agree whatever strides the
# caller's tensors have: K/V travel contiguous (B, H, S, D); dK/dV travel (B, S, H, D), the
# kernel's own gradient layout, so accumulators are sent without a copy.
_LAYOUTS = {"bhsd": (lambda t: t.contiguous(), lambda t: t),
            "bshd": (_bshd, lambda t: t.transpose(1, 2))}


class _Exchange:
    """One ring hop of several (B, H, S, D) tensors: each is sent to the next rank while a
    same-shaped one is received from the previous. Posted at construction, completed by `wait()`,
    which returns the received tensors; a second wait is a bug and raises."""

    def __init__(self, tensors: tuple[torch.Tensor, ...], tags: tuple[int, ...], axis: Axis, phase: str,
                 layout: str = "bhsd", complete: bool = False):
        to_wire, flat = _LAYOUTS[layout]
        self.sent = tuple(to_wire(t) for t in tensors)  # kept alive until wait()
        self.received = tuple(to_wire(torch.empty(t.shape, dtype=t.dtype, device=t.device)) for t in tensors)
        self.works = ring_shift_start([flat(t) for t in self.sent], [flat(t) for t in self.received], list(tags),
                                      axis, phase)
        self.done = False
        if complete:  # no overlap: finish the transfer now; wait() then returns at once
            self._finish()

    def _finish(self) -> None:
        for w in self.works:  # once only: a second wait on a gloo send blocks for another send
            w.wait()
        self.done, self.sent = True, None  # the sent buffers may be freed now

    def wait(self) -> tuple[torch.Tensor, ...]:
        if self.received is None:
            raise RuntimeError("ring exchange waited twice")
        if not self.done:
            self._finish()
        received, self.received = self.received, None
        return received


class _RingAttention(Function):
    @staticmethod
    def forward(ctx, q, k, v, axis, chunk_table, causal, scale, kernel, overlap):
        r, p = axis.rank, axis.size
        out, lse = empty_accumulators(q)  # (B, H, Sq, D), (B, H, Sq)
        kv = (k.contiguous(), v.contiguous())  # (B, G, Sk, D) each, the block in hand
        for step in range(p):
            hop = _Exchange(kv, (_K_TAG, _V_TAG), axis, "fwd", complete=not overlap) if step < p - 1 else None
            attend_chunks(q, chunk_table[r], *kv, chunk_table[(r - step) % p], causal, scale, kernel, out, lse)
            if hop is not None:
                kv = hop.wait()
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (axis, chunk_table, causal, scale, kernel, overlap)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        axis, chunk_table, causal, scale, kernel, overlap = ctx.args
        r, p = axis.rank, axis.size
        dq = None
        kv = (k.contiguous(), v.contiguous())
        incoming = None  # the dk/dv accumulators of the block in hand, on their way from r-1
        for step in range(p):
            hop = _Exchange(kv, (_K_TAG, _V_TAG), axis, "bwd", complete=not overlap) if step < p - 1 else None
            dq, *dkv = attend_chunks_backward(dout, q, chunk_table[r], *kv, chunk_table[(r - step) % p], out, lse,
                                              causal, scale, kernel, dq)
            if incoming is not None:
                for mine, theirs in zip(dkv, incoming.wait()):
                    mine += theirs
            incoming = _Exchange(dkv, (_DK_TAG, _DV_TAG), axis, "bwd", layout="bshd", complete=not overlap)
            if hop is not None:
                kv = hop.wait()
        dk, dv = incoming.wait()  # our own block's accumulators, home after p hops
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None


def ring_attention(q, k, v, axis: Axis, chunk_table: list[list[int]], causal: bool, scale: float,
                   kernel: str, overlap: bool = True) -> torch.Tensor:
    """q (B, H, Sq, D), k and v (B, G, Sk, D): this rank's chunks -> out (B, H, Sq, D)."""
    if axis.size == 1:
        return ChunkAttention.apply(q, k, v, chunk_table[0], chunk_table[0], causal, scale, kernel)
    return _RingAttention.apply(q, k, v, axis, chunk_table, causal, scale, kernel, overlap)
