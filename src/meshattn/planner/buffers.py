"""Per-rank memory of one context-parallel attention call, forward and backward, from sizes alone.

    context_buffer_bytes(impl, cp, batch, heads, kv_heads, seq, head_dim, itemsize, ...)
        the transient buffers a rank holds at its peak beyond its own q, k, v, dout, out (and
        lse) and dq, dk, dv: itemised by kind (below) and "total", in bytes
    context_attention_peak_bytes(...)
        the whole per-rank peak: own tensors + buffers + the kernels' outputs
    context_attention_memory(...)
        per rank: the peak and the bytes alive at it by kind (RankMemory)

The figures are what bench/live.py measures: the bytes of every tensor from the op that makes
it to its release, the caller holding q, k, v, dout (baseline, "inputs") and the returned out
throughout. They come from replaying, buffer by buffer, what parallel/ring.py, ulysses.py,
blocks.py, comm.py and autograd allocate and free for plain causal (or full) attention with the
fused CPU kernel, so they are exact for it: tests/test_cp_buffers.py compares them with the
measurement on every rank, byte for byte. Not counted, as not measured: the kernels' internal
workspace, gloo's own staging, the masks' index tensors of a few bytes. Pure Python (no torch,
no process group), except that layout="balanced" asks parallel/layout.py (torch) for its table.
Every size is B x (tokens per chunk) x a constant, so the replay runs once (cached) with one of
each and is scaled: O(cp^2) steps the first time (about 0.15 s at cp = 32), a look-up after.

Units: u = one local (B, H, S/p, D) tensor in the inputs' dtype; K/V-shaped ones are G/H u; the
accumulators (out, dq, dk/dv shares and sums) are fp32 (fp64 for fp64 inputs); lse is u/D.
Own tensors: q, k, v, dout 4u, out 1u (+ lse), dq, dk, dv 3u = 8u. Kinds of buffers:

    kv_in_hand     the K/V block computed on (received)                    ring
    kv_prefetch    the next K/V block, arriving while this one computes    ring, overlap
    kv_send_copy   the tiles sent on when not all of the block travels     ring (zigzag rank 0)
    dkv_incoming   the block's dK/dV sum from r-1, posted a step ahead     ring
    dkv_sending    the previous block's sum travelling to r+1 (or home)    ring
    dkv_share      this rank's zero-filled share when no sum arrives       ring
    dkv_home       the others' share of our tiles coming home              ring (last step)
    kernel_grads   the fused backward's dq, dk, dv of the call in progress every impl
    kernel_out     the fused forward's out and lse of the call             every impl
    merge          the log-sum-exp merge's (B, H, rows) temporaries        every impl
    gqa_repeat     K/V repeated to the query heads for the kernel          G < H
    a2a_copies     head-sharded q, k, v, out, dout (and chunk reorders)    ulysses, hybrid
    a2a_staging    an all-to-all's stacked send and receive buffers        ulysses, hybrid
    sharded_grads  the head-sharded dq, dk, dv                             ulysses, hybrid
    kv_gathered    the all-gathered K and V (2p G/H u)                     allgather
    dkv_gathered   their fp32 gradients (2p G/H u)                         allgather
    gather_staging the all-gather's flat buffer, the reduce-scatter's      allgather

Ring attention (zigzag, MHA, fp32) peaks in the backward as a block's fused backward returns,
from cp = 4 on at 18.5u + lse, whatever cp: own 8u, kv_in_hand 2u, kv_prefetch 2u,
dkv_incoming 2u, dkv_sending 2u, kernel_grads 2.5u (half the queries, all the keys: the dk, dv
returned become this rank's share, added into the incoming sum). Without overlap 14.5u:
no prefetch, no sum in flight. Issue 3's floor of 12u (10u without overlap) leaves out three
things the code must hold: the rank's own dk, dv (2u: its share of its own block, kept from the
first step so that adding the others' share gives the same bits as before), the previous sum
still travelling (2u: the price of overlapping the dK/dV transfers, the same volume as the
K/V's), and the fused kernel's fresh gradients of the block in hand (2.5u). At cp = 2 the ring
peaks at step 0 (12.5u); contiguous layouts compute whole blocks (kernel 3u, 19u at cp >= 4).
Ulysses: own 4u + out + the head-sharded q, k, v, out and dout (5u) and the kernel's 3u =
13u + lse, flat in cp. All-gather: 2p u gathered and 2p u of fp32 gradients, growing with cp.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

IMPLS = ("allgather", "ring", "ulysses", "hybrid")
OWN = ("out", "lse", "dq", "dk", "dv")  # the rank's own tensors besides q, k, v, dout


@dataclass
class RankMemory:
    """One rank's peak (bytes, q, k, v and dout included) and what was alive then, by kind."""

    peak: int
    at_peak: dict = field(default_factory=dict)

    @property
    def buffers(self) -> dict:
        """The kinds that are not the rank's own tensors, and their "total"."""
        out = {k: v for k, v in self.at_peak.items() if k not in OWN and k != "inputs"}
        out["total"] = sum(out.values())
        return out


# -- a ledger of live buffers ----------------------------------------------------------------------

class _Mem:
    """Live buffers with reference counts, like Python's; the peak and the live bytes by kind at it
    (taken after each allocation, as the measurement does)."""

    def __init__(self, inputs: int):
        self.size: dict[int, int] = {}
        self.kind: dict[int, str] = {}
        self.refs: dict[int, int] = {}
        self.current = self.peak = inputs
        self.at_peak = {"inputs": inputs}
        self._next = 0

    def new(self, kind: str, nbytes: int) -> int:
        h, self._next = self._next, self._next + 1
        self.size[h], self.kind[h], self.refs[h] = nbytes, kind, 1
        self.current += nbytes
        if self.current > self.peak:
            self.peak = self.current
            snap = {"inputs": self.at_peak["inputs"]}
            for b, n in self.size.items():
                snap[self.kind[b]] = snap.get(self.kind[b], 0) + n
            self.at_peak = snap
        return h

    def ref(self, h):
        if h is not None:
            self.refs[h] += 1
        return h

    def drop(self, *handles) -> None:
        for h in handles:
            if h is None:
                continue
            self.refs[h] -= 1
            if self.refs[h] == 0:
                self.current -= self.size.pop(h)
                del self.kind[h], self.refs[h]

    def retag(self, h, kind: str) -> None:
        if h is not None:
            self.kind[h] = kind


@dataclass(frozen=True)
class _Shape:
    """One attention call's sizes: B, query heads H, KV heads G, head dim D, input itemsize e and
    accumulation itemsize f (fp32; fp64 for fp64 inputs). Sizes of n tokens, in bytes."""

    B: int
    H: int
    G: int
    D: int
    e: int

    @property
    def f(self) -> int:
        return 8 if self.e == 8 else 4

    def q(self, n, f=False):  # (B, H, n, D)
        return self.B * self.H * n * self.D * (self.f if f else self.e)

    def kv(self, n, f=False):  # (B, G, n, D)
        return self.B * self.G * n * self.D * (self.f if f else self.e)

    def row(self, n):  # (B, H, n) in the accumulation dtype: lse and its kin
        return self.B * self.H * n * self.f

    def flag(self, n):  # (B, H, n) bool
        return self.B * self.H * n


# -- blocks.py: the planned calls, one call's kernel, the merge, the chunk sets ---------------------

def _runs(positions):
    runs = []
    for pos in positions:
        if runs and runs[-1][1] == pos:
            runs[-1] = (runs[-1][0], pos + 1)
        else:
            runs.append((pos, pos + 1))
    return runs


def _plan(q_chunks, k_chunks, causal):
    """blocks.plan for plain masks: [(query chunk rows (a, b), key chunk rows (a, b))]."""
    nq, nk = len(q_chunks), len(k_chunks)
    if not causal or (q_chunks == k_chunks and q_chunks == list(range(q_chunks[0], q_chunks[0] + nq))):
        return [((0, nq), (0, nk))]
    full, open_runs, single = [], {}, []
    for qi, qc in enumerate(q_chunks):
        ending = {}
        for run in _runs([j for j, kc in enumerate(k_chunks) if kc < qc]):
            n = open_runs.get(run)
            if n is not None and full[n][0][1] == qi:
                full[n] = ((full[n][0][0], qi + 1), run)
            else:
                n = len(full)
                full.append(((qi, qi + 1), run))
            ending[run] = n
        open_runs = ending
        single += [((qi, qi + 1), (j, j + 1)) for j, kc in enumerate(k_chunks) if kc == qc]
    return full + single


def _block_forward(m: _Mem, z: _Shape, rows: int, cols: int):
    """attention.block_forward: (out, lse) of a call; GQA repeats K/V to H heads for the kernel."""
    rep = []
    if z.H != z.G:
        rep = [m.new("gqa_repeat", z.q(cols)) for _ in range(2)]
    o, lse = m.new("kernel_out", z.q(rows)), m.new("kernel_out", z.row(rows))
    m.drop(*rep)
    return o, lse


def _merge(m: _Mem, z: _Shape, rows: int) -> None:
    """attention.merge_: its lse-sized temporaries (isfinite decomposes into abs, ne, eq, mul)."""
    r, new = z.row(rows), m.new
    new_lse = new("merge", r)
    a, b, c, seen = new("merge", r), new("merge", z.flag(rows)), new("merge", z.flag(rows)), new("merge", z.flag(rows))
    m.drop(c, b, a)
    zl = new("merge", r)
    safe = new("merge", r)
    m.drop(zl)
    weights = []
    for _ in range(2):  # w_old, w_new: where(seen, exp(x - safe), zeros_like(x))
        t1 = new("merge", r)
        t2 = new("merge", r)
        m.drop(t1)
        t3 = new("merge", r)
        weights.append(new("merge", r))
        m.drop(t2, t3)
    cast = new("merge", z.q(rows, f=True)) if z.e != z.f else None  # block_out.to(fp32)
    m.drop(cast, new_lse, seen, safe, *weights)


def _attend(m: _Mem, z: _Shape, calls, c: int) -> None:
    """blocks.attend_chunks: each call's block merged into out/lse; a call's (out, lse) lives until
    the next call's replaces it."""
    last = ()
    for (qa, qb), (ka, kb) in calls:
        o = _block_forward(m, z, (qb - qa) * c, (kb - ka) * c)
        m.drop(*last)
        _merge(m, z, (qb - qa) * c)
        last = o
    m.drop(*last)


def _block_backward(m: _Mem, z: _Shape, rows: int, cols: int):
    """attention.block_backward: the kernel's dq, dk, dv (H heads; GQA sums them to G)."""
    if z.H == z.G:
        return (m.new("kernel_grads", z.q(rows)), m.new("kernel_grads", z.q(cols)),
                m.new("kernel_grads", z.q(cols)))
    rep = [m.new("gqa_repeat", z.q(cols)) for _ in range(2)]
    g = [m.new("kernel_grads", z.q(rows)), m.new("kernel_grads", z.q(cols)), m.new("kernel_grads", z.q(cols))]
    sums = [m.new("kernel_grads", z.kv(cols)) for _ in range(2)]
    m.drop(*rep, g[1], g[2])
    return g[0], sums[0], sums[1]


def _accumulate(m: _Mem, z: _Shape, acc, whole: bool, g: int, nbytes: int, kind: str):
    """blocks.accumulate: the first block of the whole size becomes the accumulator (copied to
    fp32 for low precision), else a zero-filled one of nbytes takes it (added into in place)."""
    if acc is not None:
        return acc
    if not whole or z.e != z.f:
        return m.new(kind, nbytes)
    m.retag(g, kind)
    return m.ref(g)


def _attend_backward(m: _Mem, z: _Shape, calls, c: int, q_len: int, k_len: int, dq, kinds=("dq", "dk", "dv")):
    """blocks.attend_chunks_backward: dq (accumulated into the given one), dk, dv of the key set."""
    dk = dv = None
    for (qa, qb), (ka, kb) in calls:
        rows, cols = (qb - qa) * c, (kb - ka) * c
        g_q, g_k, g_v = _block_backward(m, z, rows, cols)
        dq = _accumulate(m, z, dq, rows == q_len, g_q, z.q(q_len, f=True), kinds[0])
        dk = _accumulate(m, z, dk, cols == k_len, g_k, z.kv(k_len, f=True), kinds[1])
        dv = _accumulate(m, z, dv, cols == k_len, g_v, z.kv(k_len, f=True), kinds[2])
        m.drop(g_q, g_k, g_v)
    dq = m.new(kinds[0], z.q(q_len, f=True)) if dq is None else dq
    dk = m.new(kinds[1], z.kv(k_len, f=True)) if dk is None else dk
    dv = m.new(kinds[2], z.kv(k_len, f=True)) if dv is None else dv
    return dq, dk, dv


def _cast_back(m: _Mem, z: _Shape, tensors, sizes, kinds):
    """`.to(input dtype)` of fp32 accumulators: copies for low precision, the originals freed."""
    if z.e == z.f:
        return list(tensors)
    out = [m.new(k, n) for k, n in zip(kinds, sizes)]
    m.drop(*tensors)
    return out


def _chunk_forward(m: _Mem, z: _Shape, q_chunks, k_chunks, c: int, causal: bool):
    """blocks.ChunkAttention.forward -> (out, lse) handles (saved)."""
    out, lse = m.new("out", z.q(len(q_chunks) * c, f=True)), m.new("lse", z.row(len(q_chunks) * c))
    _attend(m, z, _plan(q_chunks, k_chunks, causal), c)
    out = _cast_back(m, z, [out], [z.q(len(q_chunks) * c)], ["out"])[0]
    return out, lse


def _chunk_backward(m: _Mem, z: _Shape, q_chunks, k_chunks, c: int, causal: bool, kinds):
    nq, nk = len(q_chunks) * c, len(k_chunks) * c
    grads = _attend_backward(m, z, _plan(q_chunks, k_chunks, causal), c, nq, nk, None, kinds)
    return _cast_back(m, z, grads, [z.q(nq), z.kv(nk), z.kv(nk)], kinds)


# -- ring.py -------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def _route(table: tuple, causal: bool) -> _Route:
    return _Route(table, causal)


class _Route:
    """ring.Route for plain masks (tiles are layout chunks); built once per table (_route)."""

    def __init__(self, table, causal: bool):
        p = self.p = len(table)
        self.tiles = [list(t) for t in table]
        top = [max(t) for t in table]
        self.seen = [[[not causal or j <= top[x] for j in table[o]] for o in range(p)] for x in range(p)]
        self.last = [[max([d for d in range(1, p) if self.seen[(o + d) % p][o][i]], default=0)
                      for i in range(len(table[o]))] for o in range(p)]

    def held(self, owner, step):
        return [i for i, d in enumerate(self.last[owner]) if d >= step]

    def needs(self, rank, owner, positions):
        return any(self.seen[rank][owner][i] for i in positions)


def _disjoint(calls) -> bool:
    seen: set[int] = set()
    for _, (ka, kb) in calls:
        if seen.intersection(range(ka, kb)):
            return False
        seen.update(range(ka, kb))
    return True


def _share_backward(m: _Mem, z: _Shape, calls, c: int, q_len: int, dq, kind: str):
    """ring._share_backward: dq accumulated, each call's dk, dv kept as the kernel gave them."""
    share = []
    for (qa, qb), (ka, kb) in calls:
        rows, cols = (qb - qa) * c, (kb - ka) * c
        g_q, g_k, g_v = _block_backward(m, z, rows, cols)
        dq = _accumulate(m, z, dq, rows == q_len, g_q, z.q(q_len, f=True), kind)
        m.drop(g_q)
        share += [g_k, g_v]
    return dq, share


_KV, _DKV = ("kv_send_copy", "kv_prefetch"), ("dkv_sending", "dkv_incoming")  # _hop's kinds


class _Hop:
    """ring._Transfer's buffers: copies of the tiles sent when not all are, buffers received."""

    def __init__(self, m: _Mem, sends, recv: list[int], complete: bool):
        self.m, self.sent, self.received = m, sends, recv
        if complete:
            self.finish()

    def finish(self):
        self.m.drop(*(self.sent or ()))
        self.sent = None

    def wait(self):
        self.finish()
        received, self.received = self.received, None
        return received


def _hop(m: _Mem, route: _Route, r, step, tensors, held, size, kinds, overlap, first=0):
    """ring._Ring.hop: (hop or None, positions received); size(n tiles) -> bytes of one tensor;
    kinds: (of a copy of the tiles sent when not all are, of the buffers received)."""
    p = route.p
    send, recv = [], []
    if step >= first:
        if tensors is not None:
            send = [i for i in held if route.last[(r - step) % p][i] > step]
        recv = [i for i, d in enumerate(route.last[(r - 1 - step) % p]) if d > step]
    if not (send or recv):
        return None, []
    sends = []
    if send:
        if send == held:
            sends = [m.ref(t) for t in tensors]
        else:
            sends = [m.new(kinds[0], size(len(send))) for _ in tensors]
    received = [m.new(kinds[1], size(len(recv))) for _ in range(2)] if recv else None
    return _Hop(m, sends, received, complete=not overlap), recv


def _ring_forward(m: _Mem, z: _Shape, route: _Route, table, r, c, overlap, causal):
    p = route.p
    s = len(table[r]) * c
    out, lse = m.new("out", z.q(s, f=True)), m.new("lse", z.row(s))
    kv, held = None, route.held(r, 0)  # None: own k, v (the caller's)
    own = True
    kv_size = lambda n: z.kv(n * c)  # noqa: E731  (n tiles)
    for step in range(p):
        o = (r - step) % p
        hop = arriving = None
        in_hand = [None, None] if own else kv
        if overlap:
            hop, arriving = _hop(m, route, r, step, in_hand, held, kv_size, _KV, True)
        if in_hand is not None and route.needs(r, o, held):
            _attend(m, z, _plan(table[r], [route.tiles[o][i] for i in held], causal), c)
        if not overlap:
            hop, arriving = _hop(m, route, r, step, in_hand, held, kv_size, _KV, False)
        received = None if hop is None else hop.wait()
        if not own:
            m.drop(*(kv or ()))
        own = False
        kv, held = received, arriving
        for t in kv or ():
            m.retag(t, "kv_in_hand")
    out = _cast_back(m, z, [out], [z.q(s)], ["out"])[0]
    return out, lse


def _ring_backward(m: _Mem, z: _Shape, route: _Route, table, r, c, overlap, causal, kinds):
    """_RingAttention.backward -> (dq, dk, dv) handles, in the input dtype."""
    p = route.p
    s = len(table[r]) * c
    acc_size = lambda n: z.kv(n * c, f=True)  # noqa: E731
    kv_size = lambda n: z.kv(n * c)  # noqa: E731
    homes = {d: [i for i, di in enumerate(route.last[r]) if di == d] for d in set(route.last[r]) if d > 0}
    dq = mine = None
    sending = []
    kv, own, held = None, True, route.held(r, 0)
    acc_hop, acc_held = None, []

    def finish():
        for t in sending:
            t.finish()
        sending.clear()

    for step in range(p):
        o = (r - step) % p
        hop = arriving = None
        in_hand = [None, None] if own else kv
        if overlap:
            hop, arriving = _hop(m, route, r, step, in_hand, held, kv_size, _KV, True)
        holding, acc, share = in_hand is not None, None, None
        if holding and route.needs(r, o, held):
            calls = _plan(table[r], [route.tiles[o][i] for i in held], causal)
            if acc_held and acc_held == held and _disjoint(calls):  # the share goes into the arriving sum
                dq, share = _share_backward(m, z, calls, c, s, dq, kinds[0])
            else:
                names = ("dkv_share",) * 2 if step else kinds[1:]
                dq, *acc = _attend_backward(m, z, calls, c, s, len(held) * c, dq, (kinds[0],) + names)
        if overlap or not any(route.last[o][i] > step for i in held):
            if not own:
                m.drop(*(kv or ()))
            kv = None
        incoming = None if acc_hop is None else acc_hop.wait()
        finish()
        if holding:
            if share is not None:
                m.drop(*share)
                acc, share = incoming, None
            elif acc is None:
                acc = incoming if incoming is not None else [m.new("dkv_share", acc_size(len(held))) for _ in range(2)]
                for t in acc:
                    m.retag(t, "dkv_share")
            elif incoming is not None:
                m.drop(*incoming)
        coming = None
        if step in homes:
            coming = [m.new("dkv_home", acc_size(len(homes[step]))) for _ in range(2)]
        if holding and step == 0:
            mine, acc = acc, None
        elif holding:
            done = [i for i in held if route.last[o][i] == step]
            if done:
                sent = [m.ref(a) for a in acc] if done == held else [m.new("dkv_sending", acc_size(len(done)))
                                                                        for _ in acc]
                for t in sent:
                    m.retag(t, "dkv_sending")
                sending.append(_Hop(m, sent, None, complete=not overlap))
        acc_hop, acc_held = _hop(m, route, r, step, acc, held, acc_size, _DKV, overlap, first=1)
        if acc_hop is not None:
            for t in acc_hop.sent or ():
                m.retag(t, "dkv_sending")
        m.drop(*(acc or ()))
        if not overlap:
            hop, arriving = _hop(m, route, r, step, [None, None] if own else kv, held, kv_size, _KV, False)
            if not own:
                m.drop(*(kv or ()))
            kv = None
            finish()
        received = None if hop is None else hop.wait()
        if not own:
            m.drop(*(kv or ()))
        own = False
        kv, held = received, arriving
        for t in kv or ():
            m.retag(t, "kv_in_hand")
        m.drop(*(coming or ()))  # added into ours
    finish()
    dq = m.new(kinds[0], z.q(s, f=True)) if dq is None else dq
    return _cast_back(m, z, [dq] + mine, [z.q(s), z.kv(s), z.kv(s)], kinds)


# -- the impls: forward then backward of one call, on one rank ------------------------------------

def _grad_copies(m: _Mem, grads, sizes, kinds=("dq", "dk", "dv")) -> None:
    """AccumulateGrad: a gradient not in its leaf's layout ((B, S, H, D) from the kernel or the
    accumulators) is copied into it, one at a time, the original then freed."""
    for g, n, kind in zip(grads, sizes, kinds):
        m.new(kind, n)
        m.drop(g)


def _ring_impl(m, z, table, r, c, overlap, causal):
    route = _route(tuple(map(tuple, table)), causal)
    out, lse = _ring_forward(m, z, route, table, r, c, overlap, causal)
    m.retag(out, "out")
    grads = _ring_backward(m, z, route, table, r, c, overlap, causal, ("dq", "dk", "dv"))
    m.drop(lse)  # saved tensors go once the backward returns
    s = len(table[r]) * c
    _grad_copies(m, grads, [z.q(s), z.kv(s), z.kv(s)])


def _allgather_impl(m, z, table, r, c, overlap, causal):
    p = len(table)
    s = len(table[r]) * c
    gathered = []
    for _ in range(2):  # all_gather_raw: a flat receive buffer, then the concatenation
        flat = m.new("gather_staging", p * z.kv(s))
        gathered.append(m.new("kv_gathered", p * z.kv(s)))
        m.drop(flat)
    k_chunks = [ch for chunks in table for ch in chunks]
    out, lse = _chunk_forward(m, z, table[r], k_chunks, c, causal)
    dq, dk, dv = _chunk_backward(m, z, table[r], k_chunks, c, causal, ("dq", "dkv_gathered", "dkv_gathered"))
    m.drop(*gathered, lse)
    _grad_copies(m, [dq], [z.q(s)])
    for g in (dv, dk):  # reduce-scatter, v's first (the later node runs first)
        stack = m.new("gather_staging", p * z.kv(s))
        m.new("gather_staging", z.kv(s))  # its output, which the work's future keeps: copied for .grad
        m.drop(stack, g)
        m.new("dk", z.kv(s))


def _ulysses_impl(m, z, table, r, c, overlap, causal, u=None, inner=None):
    """ulysses_attention over a group of u ranks (all p for plain Ulysses); `inner` (the hybrid's
    ring across groups) replaces the local ChunkAttention: inner(m, zh, q_chunks, c) does the
    forward and returns a backward thunk."""
    p = len(table)
    u = u or p
    s = len(table[r]) * c
    rep = 1 if z.G % u == 0 else u // z.G
    zh = _Shape(z.B, z.H // u, z.G * rep // u, z.D, z.e)  # head-sharded
    gr = r // u
    mine = [ch for rank in range(gr * u, (gr + 1) * u) for ch in table[rank]]
    reorder = mine != sorted(mine)
    moves = u > 1  # on a group of one rank every all-to-all is the identity

    def a2a(n, kind):  # comm._all_to_all: the stacked chunks, the receive buffer, the concatenation
        if not moves:
            return None
        st, rv = m.new("a2a_staging", n), m.new("a2a_staging", n)
        out = m.new(kind, n)
        m.drop(st, rv)
        return out

    repeated = [m.new("gqa_repeat", z.kv(s) * rep) for _ in range(2)] if rep > 1 else []
    sizes = [z.q(s), z.kv(s) * rep, z.kv(s) * rep]
    shards = [a2a(n, "a2a_copies") for n in sizes]
    m.drop(*repeated)
    if reorder:
        old, shards = shards, [m.new("a2a_copies", n) for n in sizes]
        m.drop(*old)
    n_chunks = len(mine)
    group_chunks = sorted(mine)
    if inner is None:
        out_h, lse = _chunk_forward(m, zh, list(range(n_chunks)), list(range(n_chunks)), c, causal)
        m.retag(out_h, "a2a_copies")
        backward = None
    else:
        out_h, lse, backward = inner(m, zh, group_chunks, c)
    x = z.q(s)
    out_r = m.new("a2a_copies", x) if reorder else None
    if moves:
        a2a(x, "out")
        m.drop(out_r)
    else:  # the attention's (or its reorder's) output is the caller's
        m.retag(out_r if reorder else out_h, "out")
    # backward: the inverse all-to-all of dout, its reorder, the attention, then per input (v, k, q)
    g = a2a(x, "a2a_copies")
    if reorder:
        g2 = m.new("a2a_copies", x)
        m.drop(g)
        g = g2
    kinds = ("sharded_grads",) * 3  # the head-sharded dq, dk, dv
    if inner is None:
        grads = _chunk_backward(m, zh, list(range(n_chunks)), list(range(n_chunks)), c, causal, kinds)
    else:
        grads = backward(kinds)
    m.drop(g, *shards, lse, out_h if moves or reorder else None)  # else out_h is the caller's out
    if reorder:
        for i in (2, 1, 0):
            new = m.new("a2a_copies", sizes[i])
            m.drop(grads[i])
            grads[i] = new
    if not moves:
        if not reorder:
            _grad_copies(m, grads, sizes)
        return
    back = {}
    for i, kind in ((2, "dv"), (1, "dk"), (0, "dq")):
        back[i] = a2a(sizes[i], kind)
        m.drop(grads[i])
    if rep > 1:  # repeat_interleave's backward sums the copies (its nodes are older: they run last)
        for i, kind in ((2, "dv"), (1, "dk")):
            m.new(kind, z.kv(s))
            m.drop(back[i])


def _hybrid_impl(m, z, table, r, c, overlap, causal, u):
    p = len(table)
    if p == u:  # a ring of one group: Ulysses with ChunkAttention over the group's chunks
        return _ulysses_impl(m, z, table, r, c, overlap, causal)
    groups = [sorted(ch for rank in range(g * u, (g + 1) * u) for ch in table[rank]) for g in range(p // u)]
    ring_rank = r // u

    def inner(m, zh, group_chunks, c):
        route = _route(tuple(map(tuple, groups)), causal)
        out, lse = _ring_forward(m, zh, route, groups, ring_rank, c, overlap, causal)
        m.retag(out, "a2a_copies")

        def backward(kinds):
            return _ring_backward(m, zh, route, groups, ring_rank, c, overlap, causal, kinds)
        return out, lse, backward

    _ulysses_impl(m, z, table, r, c, overlap, causal, u=u, inner=inner)


# -- the public functions --------------------------------------------------------------------------

def _table(layout, cp: int):
    if not isinstance(layout, str):
        return [list(chunks) for chunks in layout]
    if layout == "zigzag":
        return [[r, 2 * cp - 1 - r] for r in range(cp)]
    if layout == "contiguous":
        return [[r] for r in range(cp)]
    from ..parallel.layout import chunk_table  # "balanced": the deal of balance.py (torch)

    return chunk_table(layout, cp)


def context_attention_memory(impl: str, cp: int, batch: int, heads: int, kv_heads: int, seq: int, head_dim: int,
                             itemsize: int = 4, ulysses_size: int | None = None, overlap: bool = True,
                             layout="zigzag", causal: bool = True) -> list[RankMemory]:
    """Per rank: the peak bytes of one context_attention call, forward then backward (the caller
    holding q, k, v, dout and out throughout), and what is alive at it by kind. seq is the global
    sequence length; heads and kv_heads those the call sees (per tensor-parallel rank)."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is unknown; choose one of {IMPLS}")
    table = _table(layout, cp)
    n = sum(len(t) for t in table)
    if seq % n:
        raise ValueError(f"seq={seq} is not divisible into the layout's {n} chunks")
    if impl == "hybrid" and (ulysses_size is None or cp % ulysses_size):
        raise ValueError(f"impl='hybrid' needs a ulysses_size dividing cp={cp}; got {ulysses_size}")
    unit = _per_unit(impl, cp, heads, kv_heads, head_dim, itemsize, ulysses_size, overlap,
                     tuple(map(tuple, table)), causal)
    scale = batch * (seq // n)  # every size is B * (tokens per chunk) * a constant: so is the whole timeline
    return [RankMemory(peak * scale, {k: v * scale for k, v in at.items()}) for peak, at in unit]


@functools.lru_cache(maxsize=512)
def _per_unit(impl, cp, heads, kv_heads, head_dim, itemsize, ulysses_size, overlap, table, causal):
    """context_attention_memory for batch 1 and one token per chunk: per rank (peak, at_peak)."""
    z = _Shape(1, heads, kv_heads, head_dim, itemsize)
    table, c = [list(t) for t in table], 1
    result = []
    for r in range(cp):
        s = len(table[r]) * c
        m = _Mem(2 * z.q(s) + 2 * z.kv(s))  # q, dout, k, v
        if cp == 1:
            _local(m, z, table, c, causal)
        elif impl == "ring":
            _ring_impl(m, z, table, r, c, overlap, causal)
        elif impl == "allgather":
            _allgather_impl(m, z, table, r, c, overlap, causal)
        elif impl == "ulysses":
            _ulysses_impl(m, z, table, r, c, overlap, causal)
        else:
            _hybrid_impl(m, z, table, r, c, overlap, causal, ulysses_size)
        result.append((m.peak, m.at_peak))
    return tuple(result)


def _local(m, z, table, c, causal):
    """cp = 1: one ChunkAttention over the rank's chunks."""
    out, lse = _chunk_forward(m, z, table[0], table[0], c, causal)
    grads = _chunk_backward(m, z, table[0], table[0], c, causal, ("dq", "dk", "dv"))
    m.drop(lse)
    s = len(table[0]) * c
    _grad_copies(m, grads, [z.q(s), z.kv(s), z.kv(s)])


def context_attention_peak_bytes(impl: str, cp: int, batch: int, heads: int, kv_heads: int, seq: int,
                                 head_dim: int, itemsize: int = 4, ulysses_size: int | None = None,
                                 overlap: bool = True, layout="zigzag", causal: bool = True,
                                 rank: int | None = None) -> int:
    """The per-rank peak of one call, forward and backward, own tensors included (the largest over
    ranks, or `rank`'s)."""
    ranks = context_attention_memory(impl, cp, batch, heads, kv_heads, seq, head_dim, itemsize, ulysses_size,
                                     overlap, layout, causal)
    return max(x.peak for x in ranks) if rank is None else ranks[rank].peak


def context_buffer_bytes(impl: str, cp: int, batch: int, heads: int, kv_heads: int, seq: int, head_dim: int,
                         itemsize: int = 4, ulysses_size: int | None = None, overlap: bool = True,
                         layout="zigzag", causal: bool = True, rank: int | None = None) -> dict:
    """The transient buffers one rank holds at its peak beyond its own q, k, v, dout, out, lse,
    dq, dk, dv, by kind (module doc), and "total", in bytes: of the rank with the largest peak,
    or of `rank`."""
    ranks = context_attention_memory(impl, cp, batch, heads, kv_heads, seq, head_dim, itemsize, ulysses_size,
                                     overlap, layout, causal)
    worst = max(range(cp), key=lambda i: ranks[i].peak) if rank is None else rank
    return ranks[worst].buffers
