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
(the kernel's dk, dv, added into the arrived sum, bit for bit as share + sum); the sum is sent on
to r+1. The owner keeps its own share; the last rank that needs a block sends the others' sum
straight home (for a full ring that is the next rank): as many dK/dV transfers as K/V hops (p-1
per rank on a full ring). The S x S matrix is never held.

Memory (planner/buffers.py counts it): a step holds the block in hand, the next one arriving,
the arriving sum, the previous sum still travelling and the kernel's gradients; every buffer is
dropped as soon as its last transfer and use are done, and the others' share of our tiles is
received only at the step it is sent. Without overlap each transfer is posted after the
computation and completed at once, so no second block is held while computing. The results are
the same bits with overlap or without, and the same bits as before any of this bookkeeping.

`chunk_table[j]` lists the global chunk ids held by ring rank j (one rank's layout chunks, or a
whole Ulysses group's in the hybrid); the ChunkMask decides every block pair.
"""

from __future__ import annotations

import torch
from torch.autograd import Function

from ..comm import Axis, send_recv_start
from ..model.attention import block_backward
from .blocks import (ChunkAttention, accumulate, call_args, acc_dtype, attend_chunks, attend_chunks_backward,
                     empty_accumulators, plan, zeros_accumulator)
from .chunkmask import ChunkMask

_K_TAG, _V_TAG, _DK_TAG, _DV_TAG, _RET_DK_TAG, _RET_DV_TAG = 17, 18, 19, 20, 21, 22


def _bshd(t: torch.Tensor) -> torch.Tensor:
    """t (B, H, S, D) laid out (B, S, H, D) in memory, the layout the CPU kernel returns
    gradients in; a copy only when it is not already."""
    return t if t.transpose(1, 2).is_contiguous() else t.transpose(1, 2).contiguous().transpose(1, 2)


def _empty_bshd(like: torch.Tensor, shape) -> torch.Tensor:
    B, H, S, D = shape
    return like.new_empty((B, S, H, D)).transpose(1, 2)


# Wire layouts, fixed per kind of tensor so that both ends of a hop agree whatever strides the
# caller's tensors have: K/V travel contiguous (B, H, S, D); dK/dV travel (B, S, H, D), the
# kernel's own gradient layout, so accumulators are sent without a copy. Per layout: (a tensor
# in wire layout, a copy only when needed; its flat view for the wire; an empty receive buffer
# of a (B, H, S, D) shape, allocated in wire layout).
_LAYOUTS = {"bhsd": (lambda t: t.contiguous(), lambda t: t, lambda like, shape: like.new_empty(shape)),
            "bshd": (_bshd, lambda t: t.transpose(1, 2), _empty_bshd)}


class Route:
    """Which tiles of which block each ring step carries, the same on every rank.

    Ring rank o's block holds the tiles mask.refine(table[o]) (T each; the layout chunks
    themselves under plain causal attention). seen[x][o][i]: some query of rank x sees tile i of
    block o. Tile i travels o -> o+1 -> ... while a later rank still needs it: last[o][i] hops
    (p-1 under plain causal zigzag for every tile but rank 0's last ones, fewer when documents, a
    window or a contiguous layout end the dependence, 0 when only o sees it). A hop sends only the
    tiles some later rank needs, and none when no tile is needed."""

    def __init__(self, table: list[list[int]], mask: ChunkMask):
        p = self.p = len(table)
        self.tiles = [mask.refine(chunks) for chunks in table]  # global tile ids of each block
        self.seen = [[mask.seen(table[x], table[o]) for o in range(p)] for x in range(p)]
        self.last = [[max([d for d in range(1, p) if self.seen[(o + d) % p][o][i]], default=0)
                      for i in range(len(self.tiles[o]))] for o in range(p)]

    def held(self, owner: int, step: int) -> list[int]:
        """Positions (in the owner's tile order) of the tiles held `step` hops from the owner."""
        return [i for i, d in enumerate(self.last[owner]) if d >= step]

    def needs(self, rank: int, owner: int, positions: list[int]) -> bool:
        return any(self.seen[rank][owner][i] for i in positions)


def _take(t: torch.Tensor, positions: list[int], of: list[int], c: int) -> torch.Tensor:
    """The tiles at `positions` of t (B, H, len(of) * c, D), whose tiles are those at `of`: t
    itself when that is all of them, else one copy, in t's memory layout ((B, S, H, D) stays so,
    ready for the wire)."""
    if positions == of:
        return t
    parts = [t[:, :, of.index(i) * c:(of.index(i) + 1) * c] for i in positions]
    if not t.is_contiguous() and t.transpose(1, 2).is_contiguous():
        return torch.cat([x.transpose(1, 2) for x in parts], dim=1).transpose(1, 2)
    return torch.cat(parts, dim=2)


class _Transfer:
    """Tensors sent to and received from ring peers, posted at construction and completed by
    `wait()`, which returns the received tensors; a second wait is a bug and raises.

    sends: (tensors, peer, tags); recv: (shapes, like, peer, tags) or None: buffers of these
    shapes with the dtype and device of `like` (only those are read from it).
    Memory: a finished transfer keeps no reference to what it moved (its works hold their
    tensors too), so a sent buffer is freed as soon as its last user drops it, and a received
    one belongs to whoever called wait()."""

    def __init__(self, sends, recv, axis: Axis, phase: str, layout: str = "bhsd", complete: bool = False):
        to_wire, flat, empty = _LAYOUTS[layout]
        self.sent = [(to_wire(t), peer, tag) for tensors, peer, tags in sends for t, tag in zip(tensors, tags)]
        self.received = None
        recvs = []
        if recv is not None:
            shapes, like, peer, tags = recv
            self.received = tuple(empty(like, shape) for shape in shapes)
            recvs = [(flat(t), peer, tag) for t, tag in zip(self.received, tags)]
        self.works = send_recv_start([(flat(t), peer, tag) for t, peer, tag in self.sent], recvs, axis, phase)
        self.done = False
        if complete:  # no overlap: finish the transfer now; wait() then returns at once
            self._finish()

    def _finish(self) -> None:
        for w in self.works:  # once only: a second wait on a gloo send blocks for another send
            w.wait()
        self.done, self.sent, self.works = True, None, None  # the sent buffers may be freed now (works hold them too)

    def wait(self):
        if self.done is None:
            raise RuntimeError("ring exchange waited twice")
        if not self.done:
            self._finish()
        received, self.done, self.received = self.received, None, None
        return received


def _add_(into, parts) -> None:
    """into[i] += parts[i], in place."""
    for a, b in zip(into, parts):
        a += b


def _disjoint(calls) -> bool:
    """Whether no key tile is in two of the planned calls."""
    seen: set[int] = set()
    for _, (ka, kb), _, _ in calls:
        if seen.intersection(range(ka, kb)):
            return False
        seen.update(range(ka, kb))
    return True


def _share_backward(dout, q, k, v, calls, c: int, out, lse, mask, scale, kernel, dq):
    """attend_chunks_backward's calls, on disjoint key tiles, with this rank's dK/dV share left as
    the kernel returns it: (dq, [(key rows, dk, dv) per call]). Nothing zero-filled."""
    share = []
    for (qa, qb), (ka, kb), kind, pair in calls:
        rows, cols = slice(qa * c, qb * c), slice(ka * c, kb * c)
        causal, bias = call_args(kind, pair, mask, q.dtype)
        g_q, g_k, g_v = block_backward(dout[:, :, rows], q[:, :, rows], k[:, :, cols], v[:, :, cols],
                                       out[:, :, rows], lse[:, :, rows], causal, scale, kernel, bias)
        dq = accumulate(dq, q, rows, g_q)
        del g_q
        share.append((cols, g_k, g_v))
    return dq, share


def _add_share_(into, share, length: int) -> None:
    """into (the dk, dv sums that arrived, length keys) += this rank's share (_share_backward),
    bit for bit what `share += into` gives for the share attend_chunks_backward builds: a call
    covering the block is the share itself (a + b == b + a); otherwise the share is 0 + dk (so
    -0.0 becomes 0.0) where a call lies and 0 where none does, so those are what is added."""
    whole = len(share) == 1 and (share[0][0].start, share[0][0].stop) == (0, length)
    for cols, *grads in share:
        for acc, g in zip(into, grads):
            if not whole:
                g.add_(0.0)  # the kernel's own buffer
            acc[:, :, cols] += g
    if not whole:
        at = 0
        for start, stop in sorted((cols.start, cols.stop) for cols, _, _ in share) + [(length, length)]:
            if start > at:
                for acc in into:
                    acc[:, :, at:start] += 0.0
            at = max(at, stop)


def _sent(sending: list) -> list:
    """Wait for the sums sent on; returns a fresh list for the next ones (the buffers go)."""
    for t in sending:
        t.wait()
    return []


def _come_home(positions: list[int], transfer, mine, c: int) -> None:
    """Wait for the others' share of our tiles at `positions` and add it into `mine` (our dk,
    dv) tile by tile."""
    for a, b in zip(mine, transfer.wait()):
        for j, i in enumerate(positions):
            a[:, :, i * c:(i + 1) * c] += b[:, :, j * c:(j + 1) * c]


class _Ring:
    """One rank's view of the ring for one call: tile bookkeeping shared by forward and backward."""

    def __init__(self, axis: Axis, route: Route, tile_len: int, overlap: bool):
        self.axis, self.route, self.c, self.overlap = axis, route, tile_len, overlap
        self.r, self.p = axis.rank, axis.size

    def hop(self, step: int, tensors, held: list[int], like: torch.Tensor, tags, phase: str, layout: str = "bhsd",
            first: int = 0):
        """Step `step`'s hop: the tiles of the block in hand (`tensors`, holding positions `held`)
        that a later rank needs go to r+1; those of the next block that this rank or a later one
        needs come from r-1. Returns (transfer or None, positions received)."""
        r, p, c, route = self.r, self.p, self.c, self.route
        send, recv = [], []
        if step >= first:
            if tensors is not None:
                send = [i for i in held if route.last[(r - step) % p][i] > step]
            recv = [i for i, d in enumerate(route.last[(r - 1 - step) % p]) if d > step]
        if not (send or recv):
            return None, []
        sends = [([_take(t, send, held, c) for t in tensors], (r + 1) % p, tags)] if send else []
        shape = (*like.shape[:2], len(recv) * c, like.shape[3])
        return _Transfer(sends, ((shape,) * len(tags), like, (r - 1) % p, tags) if recv else None, self.axis, phase,
                         layout, complete=not self.overlap), recv


class _RingAttention(Function):
    @staticmethod
    def forward(ctx, q, k, v, axis, chunk_table, mask, scale, kernel, overlap):
        r, p = axis.rank, axis.size
        route = Route(chunk_table, mask)
        ring = _Ring(axis, route, k.shape[2] // len(route.tiles[r]), overlap)
        out, lse = empty_accumulators(q)  # (B, H, Sq, D), (B, H, Sq)
        kv, held = (k.contiguous(), v.contiguous()), route.held(r, 0)  # the tiles in hand, (B, G, |held| c, D)
        for step in range(p):
            o = (r - step) % p
            if overlap:  # the next block arrives while this one is computed
                hop, arriving = ring.hop(step, kv, held, k, (_K_TAG, _V_TAG), "fwd")
            if kv is not None and route.needs(r, o, held):
                attend_chunks(q, chunk_table[r], *kv, [route.tiles[o][i] for i in held], mask, scale, kernel, out,
                              lse, k_tiles=True)
            if not overlap:  # after the computation: no second block is held while computing
                hop, arriving = ring.hop(step, kv, held, k, (_K_TAG, _V_TAG), "fwd")
            kv, held = (None if hop is None else hop.wait()), arriving  # None when this rank only sent
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (axis, chunk_table, mask, scale, kernel, overlap, route)
        return out

    @staticmethod
    def backward(ctx, dout):
        """One step holds: the block in hand (and, overlapping, the next one arriving), this
        rank's share of the block's dK/dV (the kernel's), the sum for the same block arriving
        from r-1 (posted a step earlier) and, overlapping, the previous block's sum still
        travelling to r+1. Every buffer is dropped as soon as its transfer and last use are done."""
        q, k, v, out, lse = ctx.saved_tensors
        axis, chunk_table, mask, scale, kernel, overlap, route = ctx.args
        r, p = axis.rank, axis.size
        c = k.shape[2] // len(route.tiles[r])
        ring = _Ring(axis, route, c, overlap)
        B, G, _, D = k.shape
        acc_like = torch.empty((B, G, 0, D), dtype=acc_dtype(k), device=k.device)  # dK/dV's dtype on the wire
        # Other ranks' shares of our tiles come home from the last rank that needs them, at the
        # step it computes on them (d hops away, step d).
        homes = {d: [i for i, di in enumerate(route.last[r]) if di == d] for d in set(route.last[r]) if d > 0}
        dq, mine, sending = None, None, []  # sending: sums on their way (to r+1 or home)
        kv, held = (k.contiguous(), v.contiguous()), route.held(r, 0)
        acc_hop, acc_held = None, []
        for step in range(p):
            o = (r - step) % p
            if overlap:  # the next block arrives while this one is computed
                hop, arriving = ring.hop(step, kv, held, k, (_K_TAG, _V_TAG), "bwd")
            holding, acc, share = kv is not None, None, None
            if holding and route.needs(r, o, held):
                tiles = [route.tiles[o][i] for i in held]
                calls = plan(chunk_table[r], tiles, mask, k_tiles=True)
                if acc_held and acc_held == held and _disjoint(calls):  # our share goes into the arriving sum
                    dq, share = _share_backward(dout, q, *kv, calls, c, out, lse, mask, scale, kernel, dq)
                else:
                    dq, *acc = attend_chunks_backward(dout, q, chunk_table[r], *kv, tiles, out, lse, mask, scale,
                                                      kernel, dq, k_tiles=True)
            if overlap or not any(route.last[o][i] > step for i in held):
                kv = None  # what travels on, the hop holds (or will take when posted after the computation)
            incoming = None if acc_hop is None else acc_hop.wait()  # block o's dk/dv from r-1
            sending = _sent(sending)  # the previous step's sums have left
            if incoming is not None and acc_held != held:
                raise RuntimeError("ring backward: accumulators arrived for tiles this rank does not hold")
            if holding:
                if share is not None:
                    _add_share_(incoming, share, len(held) * c)
                    acc, share = list(incoming), None
                elif acc is None:
                    acc = list(incoming) if incoming is not None else [zeros_accumulator(k[:, :, :len(held) * c])
                                                                       for _ in range(2)]
                elif incoming is not None:
                    _add_(acc, incoming)
                incoming = None
            elif incoming is not None:
                raise RuntimeError("ring backward: accumulators arrived for a block this rank does not hold")
            coming = None
            if step in homes:  # the others' share of our tiles, sent home at this step (posted before any
                shape = (B, G, len(homes[step]) * c, D)  # send that waits: without overlap, sends complete at once)
                coming = (homes[step], _Transfer([], ((shape, shape), acc_like, (r + step) % p,
                                                      (_RET_DK_TAG, _RET_DV_TAG)), axis, "bwd", "bshd"))
            if holding and step == 0:  # our own share stays here
                mine, acc = acc, None
            elif holding:  # tiles whose last user this rank is: the others' share goes home
                done = [i for i in held if route.last[o][i] == step]
                if done:
                    sending.append(_Transfer([([_take(a, done, held, c) for a in acc], o, (_RET_DK_TAG, _RET_DV_TAG))],
                                             None, axis, "bwd", "bshd", complete=not overlap))
            acc_hop, acc_held = ring.hop(step, acc, held, acc_like, (_DK_TAG, _DV_TAG), "bwd", "bshd", first=1)
            acc = None  # what travels on, the hop holds
            if not overlap:  # after the computation: no second block is held while computing
                hop, arriving = ring.hop(step, kv, held, k, (_K_TAG, _V_TAG), "bwd")
                kv = None
                sending = _sent(sending)
            kv, held = (None if hop is None else hop.wait()), arriving  # None when this rank only sent
            if coming is not None:  # in before the next block, so its buffers are not held through it
                _come_home(*coming, mine, c)
                coming = None
        _sent(sending)
        dq = zeros_accumulator(q) if dq is None else dq
        dk, dv = mine
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None


def ring_attention(q, k, v, axis: Axis, chunk_table: list[list[int]], mask: ChunkMask, scale: float,
                   kernel: str, overlap: bool = True) -> torch.Tensor:
    """q (B, H, Sq, D), k and v (B, G, Sk, D): this rank's chunks -> out (B, H, Sq, D)."""
    if axis.size == 1:
        return ChunkAttention.apply(q, k, v, chunk_table[0], chunk_table[0], mask, scale, kernel)
    return _RingAttention.apply(q, k, v, axis, chunk_table, mask, scale, kernel, overlap)
