"""Ring attention: K/V blocks travel around the ring; partial results merge by log-sum-exp.

Forward, p steps: at step s rank r holds the K/V of ring rank (r - s) mod p. Before computing on
it, the rank posts the send of that block to r+1 and the receive of the next one from r-1, so the
transfer runs while the block is computed. A block travels only while a later rank still needs
it (`Route`): p-1 hops under plain zigzag causal attention, fewer when documents, a window or a
contiguous causal layout end the dependence early. A block nobody needs is neither computed
nor sent.

Backward: the merged output and lse were saved. The same rotation replays every block with the
fused attention backward, which given the global out and lse gives this rank's exact share of dq
(accumulated locally) and the block's dk, dv. dk/dv accumulators travel with their blocks: at
step s the accumulator of block (r - s) arrives from r-1 while this rank computes its own share
into a fresh buffer; the sum is sent on to r+1. The owner keeps its own share; the last rank
that needs a block sends the others' sum straight home (for a full ring that is the next rank):
as many dK/dV transfers as K/V hops (p-1 per rank on a full ring). The S x S matrix is never held.

`chunk_table[j]` lists the global chunk ids held by ring rank j (one rank's layout chunks, or a
whole Ulysses group's in the hybrid); the ChunkMask decides every block pair.
"""

from __future__ import annotations

import torch
from torch.autograd import Function

from ..comm import Axis, send_recv_start
from .blocks import ChunkAttention, attend_chunks, attend_chunks_backward, empty_accumulators, zeros_accumulator
from .chunkmask import ChunkMask

_K_TAG, _V_TAG, _DK_TAG, _DV_TAG, _RET_DK_TAG, _RET_DV_TAG = 17, 18, 19, 20, 21, 22


def _bshd(t: torch.Tensor) -> torch.Tensor:
    """t (B, H, S, D) laid out (B, S, H, D) in memory, the layout the CPU kernel returns
    gradients in; a copy only when it is not already."""
    return t if t.transpose(1, 2).is_contiguous() else t.transpose(1, 2).contiguous().transpose(1, 2)


# Wire layouts, fixed per kind of tensor so that both ends of a hop agree whatever strides the
# caller's tensors have: K/V travel contiguous (B, H, S, D); dK/dV travel (B, S, H, D), the
# kernel's own gradient layout, so accumulators are sent without a copy.
_LAYOUTS = {"bhsd": (lambda t: t.contiguous(), lambda t: t),
            "bshd": (_bshd, lambda t: t.transpose(1, 2))}


class Route:
    """Which blocks each rank needs and how far each block travels, the same on every rank.

    need[x][o]: ring rank x's queries see some key of ring rank o's block. Block o travels the
    ring o -> o+1 -> ... while some later rank still needs it: last[o] hops (p-1 for plain causal
    zigzag, fewer when documents or a window end the dependence, 0 when only o needs it)."""

    def __init__(self, table: list[list[int]], mask: ChunkMask):
        p = len(table)
        self.p = p
        self.need = [[mask.needs(table[x], table[o]) for o in range(p)] for x in range(p)]
        self.last = [max([d for d in range(1, p) if self.need[(o + d) % p][o]], default=0) for o in range(p)]

    def held(self, rank: int, step: int) -> bool:
        """Whether `rank` holds block (rank - step) at `step`."""
        return step <= self.last[(rank - step) % self.p]


class _Transfer:
    """Tensors sent to and received from ring peers, posted at construction and completed by
    `wait()`, which returns the received tensors; a second wait is a bug and raises.

    sends: (tensors, peer, tags); recv: (like tensors, peer, tags) or None."""

    def __init__(self, sends, recv, axis: Axis, phase: str, layout: str = "bhsd", complete: bool = False):
        to_wire, flat = _LAYOUTS[layout]
        self.sent = [(to_wire(t), peer, tag) for tensors, peer, tags in sends for t, tag in zip(tensors, tags)]
        self.received = None
        recvs = []
        if recv is not None:
            like, peer, tags = recv
            self.received = tuple(to_wire(torch.empty(t.shape, dtype=t.dtype, device=t.device)) for t in like)
            recvs = [(flat(t), peer, tag) for t, tag in zip(self.received, tags)]
        self.works = send_recv_start([(flat(t), peer, tag) for t, peer, tag in self.sent], recvs, axis, phase)
        self.done = False
        if complete:  # no overlap: finish the transfer now; wait() then returns at once
            self._finish()

    def _finish(self) -> None:
        for w in self.works:  # once only: a second wait on a gloo send blocks for another send
            w.wait()
        self.done, self.sent = True, None  # the sent buffers may be freed now

    def wait(self):
        if self.done is None:
            raise RuntimeError("ring exchange waited twice")
        if not self.done:
            self._finish()
        received, self.done = self.received, None
        return received


def _hop(route: Route, axis: Axis, step: int, tensors, like, tags, phase, overlap, layout="bhsd", first=0):
    """One ring hop of step `step` (>= first): send the block in hand on to r+1 if a later rank
    still needs it, receive the next block from r-1 if this rank is on its way. None if neither."""
    r, p = axis.rank, axis.size
    send = tensors is not None and first <= step < route.last[(r - step) % p]
    recv = first <= step < route.last[(r - 1 - step) % p]
    if not (send or recv):
        return None
    return _Transfer([(tensors, (r + 1) % p, tags)] if send else [], (like, (r - 1) % p, tags) if recv else None,
                     axis, phase, layout, complete=not overlap)


class _RingAttention(Function):
    @staticmethod
    def forward(ctx, q, k, v, axis, chunk_table, mask, scale, kernel, overlap):
        r, p = axis.rank, axis.size
        route = Route(chunk_table, mask)
        out, lse = empty_accumulators(q)  # (B, H, Sq, D), (B, H, Sq)
        own = (k.contiguous(), v.contiguous())  # (B, G, Sk, D) each
        kv = own  # the block in hand, None when this rank is not on its way
        for step in range(p):
            hop = _hop(route, axis, step, kv, own, (_K_TAG, _V_TAG), "fwd", overlap)
            o = (r - step) % p
            if kv is not None and route.need[r][o]:
                attend_chunks(q, chunk_table[r], *kv, chunk_table[o], mask, scale, kernel, out, lse)
            kv = None if hop is None else hop.wait()
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (axis, chunk_table, mask, scale, kernel, overlap, route)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        axis, chunk_table, mask, scale, kernel, overlap, route = ctx.args
        r, p = axis.rank, axis.size
        own = (k.contiguous(), v.contiguous())
        acc_like = (zeros_accumulator(k), zeros_accumulator(v))  # shapes and dtypes of dk/dv on the wire
        dq, kv, acc_hop, mine = None, own, None, None
        home = None  # the other ranks' share of our block's dk/dv, sent by its last user
        if route.last[r] > 0:
            home = _Transfer([], (acc_like, (r + route.last[r]) % p, (_RET_DK_TAG, _RET_DV_TAG)), axis, "bwd",
                             "bshd")
        returns = []
        for step in range(p):
            o = (r - step) % p
            hop = _hop(route, axis, step, kv, own, (_K_TAG, _V_TAG), "bwd", overlap)
            acc = None
            if kv is not None and route.need[r][o]:
                dq, *acc = attend_chunks_backward(dout, q, chunk_table[r], *kv, chunk_table[o], out, lse, mask,
                                                  scale, kernel, dq)
            incoming = None if acc_hop is None else acc_hop.wait()  # block o's dk/dv from r-1
            if kv is not None:
                if incoming is not None:
                    if acc is None:
                        acc = list(incoming)
                    else:
                        for part, theirs in zip(acc, incoming):
                            part += theirs
                if acc is None:
                    acc = [zeros_accumulator(k), zeros_accumulator(v)]
                if step == 0:  # our own share stays here
                    mine, acc = acc, None
                elif step == route.last[o]:  # the block's last user sends the others' share home
                    returns.append(_Transfer([(acc, o, (_RET_DK_TAG, _RET_DV_TAG))], None, axis, "bwd", "bshd"))
                    acc = None
            elif incoming is not None:
                raise RuntimeError("ring backward: accumulators arrived for a block this rank does not hold")
            acc_hop = _hop(route, axis, step, acc, acc_like, (_DK_TAG, _DV_TAG), "bwd", overlap, "bshd", first=1)
            kv = None if hop is None else hop.wait()
        if home is not None:
            for part, theirs in zip(mine, home.wait()):
                part += theirs
        for t in returns:
            t.wait()
        dq = zeros_accumulator(q) if dq is None else dq
        dk, dv = mine
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None


def ring_attention(q, k, v, axis: Axis, chunk_table: list[list[int]], mask: ChunkMask, scale: float,
                   kernel: str, overlap: bool = True) -> torch.Tensor:
    """q (B, H, Sq, D), k and v (B, G, Sk, D): this rank's chunks -> out (B, H, Sq, D)."""
    if axis.size == 1:
        return ChunkAttention.apply(q, k, v, chunk_table[0], chunk_table[0], mask, scale, kernel)
    return _RingAttention.apply(q, k, v, axis, chunk_table, mask, scale, kernel, overlap)
