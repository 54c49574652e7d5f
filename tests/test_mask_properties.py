"""Property-based tests (hypothesis) of masks as data: random document layouts (length-1 documents,
one document spanning everything, padding at the front, back or in the middle), sliding windows and
causality, under every context-parallel impl and layout, against the dense float64 oracle of
test_masks. Cases are drawn in the parent and sent in batches (one pool job per world size per
example), since a job costs far less than a process start; examples are derandomised so CI runs the
same ones every time. A failing case is reported, not raised in the worker (every rank has finished
its collectives by the time it compares), so the pool survives and hypothesis can shrink the batch
to the one case that fails. Chunks are also cut into small tiles (chunkmask.TILE, as long sequences
do with TILE = 256), so tiled classification runs under every impl."""

from __future__ import annotations


import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import meshattn.parallel.chunkmask as chunkmask
from meshattn.model.mask import dense_mask
from meshattn.parallel.chunkmask import DIAG, EMPTY, FULL, PARTIAL, ChunkMask
from meshattn.parallel.context import context_attention
from meshattn.parallel.layout import shard_sequence, unshard_sequence
from parity import RTOL, assert_close
from test_masks import _group, reference_case, tiles

IMPLS = ["allgather", "ring", "ulysses", "hybrid"]
LAYOUTS = ["contiguous", "zigzag"]
HEADS = [(2, 2), (4, 4), (4, 2), (8, 2), (8, 4), (2, 1), (4, 1)]  # (H, G): MHA, GQA, MQA
D = 4
CASES_PER_EXAMPLE = 8
SETTINGS = settings(max_examples=8, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


# -- what is drawn ---------------------------------------------------------------------------------

@st.composite
def document_row(draw, S: int) -> list[int]:
    """One row of global ids (S,): segments between random cut points, each a document or padding
    (a negative id); document ids non-decreasing, the same id possibly resuming after padding."""
    every = set(range(1, S))
    cuts = sorted(draw(st.one_of(st.sets(st.integers(1, S - 1), max_size=S - 1) if S > 1 else st.just(set()),
                                 st.just(every))))  # the empty set: one document spans everything
    bounds = [0, *cuts, S]
    ids, doc = [], 0
    for n, (a, b) in enumerate(zip(bounds, bounds[1:])):
        if draw(st.integers(0, 3)) == 3:  # padding: front, back or middle, wherever it falls
            ids += [draw(st.sampled_from([-1, -2, -7]))] * (b - a)
        else:
            doc += draw(st.sampled_from([1, 0, 3])) if n else 0  # 0: the previous document resumes
            ids += [doc] * (b - a)
    return ids


@st.composite
def mask(draw, S: int) -> dict:
    """causal, window (None or 1..S) and documents (None or B rows as lists)."""
    rows = draw(st.integers(1, 2))
    return dict(causal=draw(st.booleans()), window=draw(st.one_of(st.none(), st.integers(1, S))),
                documents=draw(st.one_of(st.none(), st.lists(document_row(S), min_size=rows, max_size=rows))))


def heads_for(impl: str, world: int) -> list[tuple[int, int]]:
    """(H, G) the impl can split: Ulysses over `world`, the hybrid over its ulysses groups of 2."""
    split = {"ulysses": world, "hybrid": 2}.get(impl)
    return [(H, G) for H, G in HEADS if split is None or (H % split == 0 and (G % split == 0 or split % G == 0))]


@st.composite
def attention_case(draw) -> dict:
    impl = draw(st.sampled_from(IMPLS))
    world = 4 if impl == "hybrid" else draw(st.sampled_from([2, 4]))
    S = 2 * world * draw(st.integers(1, 5))  # 2 * world chunks of 1..5 tokens
    layout = draw(st.sampled_from(LAYOUTS))
    m = draw(mask(S))
    B = len(m["documents"]) if m["documents"] is not None else draw(st.integers(1, 2))
    return dict(impl=impl, world=world, layout=layout, heads=draw(st.sampled_from(heads_for(impl, world))), S=S,
                B=B, seed=draw(st.integers(0, 2 ** 16)), **m,
                tile=tile_size(draw, S // (world * (2 if layout == "zigzag" else 1))))


def describe(case: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in case.items())


def tile_size(draw, chunk_len: int) -> int | None:
    """None: chunkmask's own tiling (none at these lengths); t: tiles of the largest divisor of a
    chunk <= t tokens (TILE = t, MIN_TILE = 1)."""
    if not hasattr(chunkmask, "TILE"):
        return None
    return draw(st.one_of(st.none(), st.integers(1, chunk_len)))


# -- in the workers ----------------------------------------------------------------------------------

def check_case(rank, world, impl, layout, heads, S, B, seed, causal, window, documents, tile) -> None:
    ulysses_size = 2 if impl == "hybrid" else None
    group, axis = _group(impl, world, ulysses_size)
    H, G = heads
    docs = None if documents is None else torch.tensor(documents, dtype=torch.long)
    (q, k, v, dout), ref, ref_grads = reference_case(B, H, G, S, D, seed, causal, window, docs)
    local = [shard_sequence(t, axis, 2, layout).requires_grad_() for t in (q, k, v)]
    doc_local = None if docs is None else shard_sequence(docs, axis, 1, layout)
    with tiles(tile):  # the ChunkMask is built inside, the backward uses the one built then
        out = context_attention(*local, group, impl=impl, layout=layout, causal=causal, documents=doc_local,
                                window=window, ulysses_size=ulysses_size)
        out.backward(shard_sequence(dout, axis, 2, layout))
    got = [unshard_sequence(t, axis, 2, layout) for t in (out.detach(), *(t.grad for t in local))]
    # every collective is done: from here a rank may fail alone without leaving the others stuck
    expected = [ref, *ref_grads]
    # A gradient the oracle makes exactly 0 (every query that sees anything sees only itself:
    # window=1, all length-1 documents) leaves assert_close no scale (atol 1e-43), while the kernel's
    # rowsum(dout * out) - dout @ v^T cancels only to rounding: such a tensor is held to RTOL of the
    # size of its terms, |dout| |v| |q or k| sqrt(D) (a wrong one is O(1)).
    terms = float(dout.abs().max() * v.abs().max() * max(q.abs().max(), k.abs().max()) * D ** 0.5)
    for name, a, e in zip(["out", "dq", "dk", "dv"], got, expected):
        assert torch.isfinite(a).all(), f"{name} is not finite"
        if bool(e.any()):
            assert_close(a, e, name)  # each tensor against the whole oracle tensor's scale
        else:
            torch.testing.assert_close(a, e, rtol=0, atol=RTOL[torch.float64] * terms,
                                       msg=lambda m, name=name: f"{name} (0 in the oracle): {m}")


def run_cases(rank, world, cases) -> list[str]:
    """Each case's failure on this rank ('' where it passed), in order. Anything but a failed
    comparison (raised before or between collectives) ends the job, naming the case."""
    failures = []
    for case in cases:
        try:
            check_case(rank, world, **{k: v for k, v in case.items() if k != "world"})
            failures.append("")
        except AssertionError as e:
            failures.append(str(e).strip()[:2000])
        except Exception as e:
            raise RuntimeError(f"case {describe(case)}: {type(e).__name__}: {e}") from e
    return failures


# -- the properties ----------------------------------------------------------------------------------

@SETTINGS
@given(st.lists(attention_case(), min_size=CASES_PER_EXAMPLE - 3, max_size=CASES_PER_EXAMPLE))
def test_random_masks_equal_the_dense_oracle_under_every_impl(pools, batch):
    problems = []
    for world in (2, 4):
        mine = [c for c in batch if c["world"] == world]
        if not mine:
            continue
        per_rank = pools.run(world, run_cases, cases=mine)
        for i, case in enumerate(mine):
            failed = sorted({f[i] for f in per_rank if f[i]})  # every rank checks the whole tensors
            if failed:
                problems.append(f"{describe(case)}\n  " + "\n  ".join(failed))
    assert not problems, "context_attention differs from the dense oracle:\n" + "\n".join(problems)


@st.composite
def chunked_mask(draw) -> tuple:
    n, c = draw(st.integers(1, 8)), draw(st.integers(1, 6))  # n layout chunks of c tokens
    m = draw(mask(n * c))
    subsets = st.lists(st.integers(0, n - 1), min_size=1, unique=True)  # a rank's chunks: never none
    return n, c, m, draw(subsets), draw(subsets), tile_size(draw, c)


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(chunked_mask())
def test_chunk_kinds_and_pairs_agree_with_the_dense_mask(example):
    """For every (tile) pair: EMPTY no visible pair; FULL all; DIAG on the diagonal, exactly the
    causal triangle; PARTIAL some but not all, its block mask the dense block. pairs() and
    needs() over sets of layout chunks are the dense count and whether it is > 0."""
    n, c, m, q_chunks, k_chunks, tile = example
    S = n * c
    docs = None if m["documents"] is None else torch.tensor(m["documents"], dtype=torch.long)
    with tiles(tile):
        cm = ChunkMask(n, S, m["causal"], m["window"], docs)
    rows = 1 if docs is None else docs.shape[0]
    dense = dense_mask(S, m["causal"], m["window"], docs).expand(rows, -1, -1, -1)  # (rows, 1, S, S)
    t = cm.c  # tokens per tile (per chunk without tiling)
    assert cm.n * t == S and c % t == 0 and (tile is None or cm.trivial or t <= tile), (cm.n, t)  # trivial: f = 1
    for i in range(cm.n):
        for j in range(cm.n):
            blk = dense[:, :, i * t:(i + 1) * t, j * t:(j + 1) * t]
            kind = cm.kind(i, j)
            where = dict(tile=(i, j), kind=kind, tokens=t)
            if kind == EMPTY:
                assert not blk.any(), where
            elif kind == FULL:
                assert blk.all(), where
            elif kind == DIAG:
                assert i == j, where
                assert torch.equal(blk, torch.ones(t, t, dtype=torch.bool).tril().expand_as(blk)), where
            else:
                assert kind == PARTIAL, where
                assert blk.any() and not blk.all(), where  # all visible would be FULL: no mask needed
                assert torch.equal(cm.block(i, j).expand_as(blk), blk), where
    assert cm.pairs(list(range(n)), list(range(n))) == int(dense.sum())
    q_idx = [x for i in q_chunks for x in range(i * c, (i + 1) * c)]
    k_idx = [x for j in k_chunks for x in range(j * c, (j + 1) * c)]
    sub = dense[:, :, q_idx][:, :, :, k_idx]
    assert cm.pairs(q_chunks, k_chunks) == int(sub.sum()), (q_chunks, k_chunks)
    assert cm.needs(q_chunks, k_chunks) == bool(sub.any()), (q_chunks, k_chunks)
