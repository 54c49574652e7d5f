"""Masks as data (documents, sliding windows, padding) under every context-parallel impl and layout,
against an independent oracle: dense float64 attention with the mask built element by element."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist

from distributed import hybrid_context
from meshattn.comm import Axis, CommCounter
from meshattn.model.mask import dense_mask, document_positions, visible_counts
from meshattn.parallel import chunkmask
from meshattn.parallel.chunkmask import DIAG, EMPTY, FULL, PARTIAL, ChunkMask
from meshattn.parallel.context import context_attention
from meshattn.parallel.layout import chunk_table, shard_sequence
from parity import assert_close


def oracle(q, k, v, allowed):
    """softmax(q k^T / sqrt(D) masked) v in float64, rows that see nothing give 0. allowed (B|1, 1, S, S)."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    seen = allowed.any(-1, keepdim=True)
    s = s.masked_fill(~allowed, float("-inf")).masked_fill(~seen, 0.0)
    return (torch.softmax(s, -1) * allowed) @ v


def reference_case(B, H, G, S, D, seed, causal, window, docs):
    """Seeded float64 q, k, v, dout and the oracle's out and [dq, dk, dv]."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, S, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, G, S, D, generator=g, dtype=torch.float64) for _ in range(2))
    dout = torch.randn(B, H, S, D, generator=g, dtype=torch.float64)
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = oracle(*ref_in, dense_mask(S, causal, window, docs))
    ref.backward(dout)
    return (q, k, v, dout), ref.detach(), [t.grad for t in ref_in]


@contextlib.contextmanager
def tiles(tile: int | None):
    """Chunks cut into tiles of at most `tile` tokens (chunkmask.TILE; the default only tiles
    chunks longer than these tests use)."""
    if tile is None:
        yield
        return
    saved = chunkmask.TILE, chunkmask.MIN_TILE
    chunkmask.TILE, chunkmask.MIN_TILE = tile, 1
    try:
        yield
    finally:
        chunkmask.TILE, chunkmask.MIN_TILE = saved


def documents_of(lengths, pad_front=0, pad_back=0):
    ids = [-1] * pad_front + [d for d, n in enumerate(lengths) for _ in range(n)] + [-1] * pad_back
    return torch.tensor(ids, dtype=torch.long)


def cases(S, c):
    """(name, documents (B, S) or None, window, causal): the masks the issue names."""
    g = torch.Generator().manual_seed(S)
    rand = []
    for _ in range(2):  # random lengths with some length-1 documents
        lengths, left = [], S
        while left:
            n = min(left, int(torch.randint(1, 2 * c, (1,), generator=g)) if torch.rand(1, generator=g) > 0.3 else 1)
            lengths.append(n)
            left -= n
        rand.append(documents_of(lengths))
    docs = torch.stack(rand)  # (2, S)
    span = torch.stack([documents_of([1, S - 2, 1]), documents_of([S])])  # one document spans every rank
    padded = torch.stack([documents_of([c + 1, S - c - 4], pad_back=3), documents_of([S - 5], pad_front=2, pad_back=3)])
    out = []
    for causal in (True, False):
        out += [("docs", docs, None, causal), ("span", span, None, causal), ("padding", padded, None, causal)]
        for w in (c // 2, c, 2 * c + 1):
            out += [(f"window{w}", None, w, causal), (f"docs+window{w}", docs, w, causal)]
        out.append(("padding+window", padded, c - 1, causal))
    return out


def _group(impl, world, ulysses_size, counter=None):
    """(what context_attention takes, the cp axis for sharding)."""
    axis = Axis("cp", dist.group.WORLD, world, dist.get_rank(), counter)
    if impl == "hybrid":
        return hybrid_context(world, ulysses_size, counter), axis
    return axis, axis


def check_masks(rank, world, impl, layout, heads=(4, 2), ulysses_size=None, dtypes=("float64", "float32"),
                tile=None):
    with tiles(tile):
        return _check_masks(world, impl, layout, heads, ulysses_size, dtypes)


def _check_masks(world, impl, layout, heads, ulysses_size, dtypes):
    group, axis = _group(impl, world, ulysses_size)
    H, G = heads
    n = len(chunk_table(layout, world)) * len(chunk_table(layout, world)[0])
    B, S, D = 2, 6 * n, 8
    c = S // n
    checked = 0
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        for name, docs, window, causal in cases(S, c):
            (q64, k64, v64, dout64), ref, ref_grads = reference_case(B, H, G, S, D, checked, causal, window, docs)
            local = [shard_sequence(t.to(dtype), axis, 2, layout).requires_grad_() for t in (q64, k64, v64)]
            doc_local = None if docs is None else shard_sequence(docs, axis, 1, layout)
            out = context_attention(*local, group, impl=impl, layout=layout, causal=causal, documents=doc_local,
                                    window=window, ulysses_size=ulysses_size)
            out.backward(shard_sequence(dout64.to(dtype), axis, 2, layout))
            what = f"{impl}/{layout}/{name}/causal={causal}/{dtype_name}"
            assert torch.isfinite(out).all(), what
            # parity.RTOL: rounding from summation order only (fp32 1e-5, fp64 1e-13 of the scale)
            assert_close(out, shard_sequence(ref, axis, 2, layout).to(dtype), what)
            for t, r, gname in zip(local, ref_grads, "qkv"):
                assert_close(t.grad, shard_sequence(r, axis, 2, layout).to(dtype), f"{what} d{gname}")
            checked += 1
    return checked


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("impl,world", [("allgather", 2), ("ring", 2), ("ulysses", 2), ("ring", 4), ("allgather", 4),
                                        ("ulysses", 4)])
def test_masks_equal_the_dense_oracle(pools, impl, world, layout):
    # float32 once per impl (zigzag at cp=2); float64, whose tolerance is tight, everywhere
    fp32 = world == 2 and layout == "zigzag"
    counts = pools.run(world, check_masks, impl=impl, layout=layout, dtypes=("float64", "float32") if fp32 else
                       ("float64",))
    assert counts[0] == counts[-1] > 0


@pytest.mark.parametrize("world,ulysses_size,heads", [(4, 2, (4, 2)), (8, 2, (4, 1))])
def test_hybrid_masks_equal_the_dense_oracle(pools, world, ulysses_size, heads):
    counts = pools.run(world, check_masks, impl="hybrid", layout="zigzag", heads=heads, ulysses_size=ulysses_size,
                       dtypes=("float64",))
    assert counts[0] > 0


@pytest.mark.parametrize("impl,world,layout,ulysses_size", [
    ("ring", 2, "contiguous", None), ("ring", 4, "zigzag", None), ("allgather", 2, "zigzag", None),
    ("ulysses", 2, "contiguous", None), ("hybrid", 4, "zigzag", 2)])
def test_masks_with_chunks_cut_into_tiles(pools, impl, world, layout, ulysses_size):
    """Chunks of 6 tokens cut into tiles of 2 or 3: what long sequences do with TILE = 256."""
    assert pools.run(world, check_masks, impl=impl, layout=layout, ulysses_size=ulysses_size,
                     dtypes=("float64",), tile=3)[0] > 0


def test_mqa_masks_on_the_ring(pools):
    assert pools.run(4, check_masks, impl="ring", layout="zigzag", heads=(4, 1), dtypes=("float64",))[0] > 0


# -- without processes: the chunk classification and the reference pieces ---------------------------

def test_chunk_kinds_agree_with_the_dense_mask():
    """Every chunk pair's kind matches the dense mask: EMPTY has no visible pair, FULL all of
    them, DIAG exactly the causal triangle, PARTIAL anything else (and is never empty)."""
    S, n = 48, 8
    c = S // n
    for name, docs, window, causal in cases(S, c):
        cm, dense = ChunkMask(n, S, causal, window, docs), dense_mask(S, causal, window, docs)
        for i in range(n):
            for j in range(n):
                blk = dense[:, 0, i * c:(i + 1) * c, j * c:(j + 1) * c]
                kind = cm.kind(i, j)
                if kind == EMPTY:
                    assert not blk.any(), (name, i, j)
                elif kind == FULL:
                    assert blk.all(), (name, i, j)
                elif kind == DIAG:
                    assert i == j and torch.equal(blk, torch.ones(c, c, dtype=torch.bool).tril().expand_as(blk))
                else:
                    assert kind == PARTIAL and blk.any() and torch.equal(cm.block(i, j)[:, 0].expand_as(blk), blk)
        assert cm.pairs(list(range(n)), list(range(n))) == int(dense.expand(len(docs) if docs is not None else 1,
                                                                            -1, -1, -1).sum())


def test_positions_restart_at_each_document():
    docs = documents_of([3, 1, 4], pad_back=2)[None]
    assert document_positions(docs).tolist() == [[0, 1, 2, 0, 0, 1, 2, 3, 0, 1]]


def test_visible_counts_is_the_rule():
    docs = documents_of([5, 2, 9])[None]
    counts = visible_counts(16, True, 3, docs)
    assert counts.tolist() == [[1, 2, 3, 3, 3, 1, 2, 1, 2, 3, 3, 3, 3, 3, 3, 3]]


def ring_bytes(rank, world, doc_len, S):
    counter = CommCounter()
    group, _ = _group("ring", world, None, counter)
    B, H, D = 1, 2, 8
    q, k, v = (torch.randn(B, H, S, D) for _ in range(3))
    docs = (torch.arange(S) // doc_len)[None]
    local = [shard_sequence(t, group, 2, "contiguous").requires_grad_() for t in (q, k, v)]
    out = context_attention(*local, group, impl="ring", layout="contiguous",
                            documents=shard_sequence(docs, group, 1, "contiguous"))
    out.sum().backward()
    return counter.total(kind="send_recv")


def test_ring_sends_only_blocks_that_are_needed(pools):
    """Documents shorter than a rank's share: a block is needed by its own rank and, when a
    document crosses the boundary, by the next; nothing travels further."""
    world, S = 4, 64
    inside = sum(pools.run(world, ring_bytes, doc_len=8, S=S))  # no document crosses a rank boundary
    crossing = sum(pools.run(world, ring_bytes, doc_len=12, S=S))  # documents cross rank boundaries
    one_doc = sum(pools.run(world, ring_bytes, doc_len=S, S=S))
    kv = 2 * (S // world) * 8 * 4  # one rank's K or V: B*H*(S/p)*D fp32
    assert inside == 0
    # crossing: documents [12, 24) and [24, 36) cross into ranks 1 and 2, so blocks 0 and 1 go
    # one hop each: K and V forward; K and V again and dK, dV home backward
    assert crossing == 2 * (2 * kv + 2 * kv + 2 * kv)
    assert one_doc > crossing


@pytest.mark.parametrize("position", ["rope", "learned"])
def test_reference_packed_rows_equal_each_document_alone(position):
    """The independent oracle for documents: a packed row's logits equal those of each document
    run by itself (positions restarting), and padding changes nothing around it."""
    from meshattn import ModelConfig, Transformer

    cfg = ModelConfig(d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, d_ff=64, vocab_size=64, max_seq_len=32,
                      position=position)
    torch.manual_seed(0)
    model = Transformer(cfg).double()
    lengths = [5, 1, 9, 3]
    docs = documents_of(lengths, pad_back=2)[None]  # (1, 20)
    ids = torch.randint(0, 64, docs.shape)
    packed, _ = model(ids, documents=docs)
    start = 0
    for n in lengths:
        alone, _ = model(ids[:, start:start + n])
        torch.testing.assert_close(packed[:, start:start + n], alone, rtol=1e-12, atol=1e-12)
        start += n
    plain, _ = model(ids)
    assert not torch.allclose(packed[:, 5:], plain[:, 5:])  # the mask does something


def test_reference_window_equals_the_oracle():
    """The reference's sliding window against attention restricted by hand: a query sees the
    last w keys of its own row, computed with explicit loops."""
    from meshattn.model.transformer import attention_core

    torch.manual_seed(0)
    S, w = 12, 4
    q, k, v = (torch.randn(1, 2, S, 8, dtype=torch.float64) for _ in range(3))
    out = attention_core(q, k, v, mask=dense_mask(S, True, w))
    for i in range(S):
        lo = max(0, i - w + 1)
        s = (q[:, :, i:i + 1] @ k[:, :, lo:i + 1].transpose(-1, -2)) * 8 ** -0.5
        torch.testing.assert_close(out[:, :, i:i + 1], torch.softmax(s, -1) @ v[:, :, lo:i + 1])


def test_context_attention_on_one_rank_takes_documents_without_a_process_group():
    """cp = 1 (no process group at all): the same masked path, against the oracle."""
    docs = documents_of([7, 1, 16])[None].expand(2, -1)  # (2, 24)
    (q, k, v, dout), ref, grads = reference_case(2, 4, 2, 24, 8, 0, True, 5, docs)
    local = [t.clone().requires_grad_() for t in (q, k, v)]
    out = context_attention(*local, Axis.single("cp"), documents=docs, window=5)
    out.backward(dout)
    assert_close(out, ref, "out")
    for t, g, name in zip(local, grads, "qkv"):
        assert_close(t.grad, g, f"d{name}")
