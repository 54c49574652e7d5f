"""Local chunk attention and the merge: exact against SDPA on the whole sequence, any chunk order."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from meshattn.model.attention import block_backward, block_forward, merge_
from meshattn.parallel.blocks import chunk_attention, plan
from meshattn.parallel.chunkmask import DIAG, ChunkMask
from parity import assert_close


def _qkv(B=2, H=4, G=2, S=24, D=6, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, S, D, generator=g, dtype=dtype)
    k, v = (torch.randn(B, G, S, D, generator=g, dtype=dtype) for _ in range(2))
    return q, k, v


def _reference(q, k, v, causal):
    rep = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), is_causal=causal)


def _take(t, chunks, n):
    parts = t.chunk(n, dim=2)
    return torch.cat([parts[c] for c in chunks], dim=2)


@pytest.mark.parametrize("kernel", ["flash", "math"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("order", [[0, 1, 2, 3], [0, 3, 1, 2], [3, 2, 1, 0]])
def test_chunk_attention_in_any_order_equals_sdpa(kernel, causal, order):
    q, k, v = (t.requires_grad_() for t in _qkv())
    ref = _reference(q, k, v, causal)
    dout = torch.randn_like(ref)
    ref.backward(dout)
    ref_grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    ql, kl, vl = (_take(t, order, 4) for t in (q, k, v))
    out = chunk_attention(ql, kl, vl, order, order, causal, kernel=kernel)
    assert_close(out, _take(ref, order, 4).detach(), "out")
    out.backward(_take(dout, order, 4))
    for name, t, g in zip("qkv", (q, k, v), ref_grads):
        assert_close(t.grad, g, f"d{name}")


def test_queries_against_a_subset_of_keys_merge_exactly():
    """Query chunks {1, 3} against key chunks {0, 2} then {1, 3}, merged: equals full causal rows."""
    q, k, v = _qkv(dtype=torch.float64)
    ref = _reference(q, k, v, True)
    from meshattn.parallel.blocks import attend_chunks, empty_accumulators

    ql = _take(q, [1, 3], 4)
    out, lse = empty_accumulators(ql)
    for ks in ([0, 2], [1, 3]):
        attend_chunks(ql, [1, 3], _take(k, ks, 4), _take(v, ks, 4), ks, ChunkMask(4, 24), 6 ** -0.5, "flash", out, lse)
    assert_close(out, _take(ref, [1, 3], 4))


def _plan(qc, kc, causal):
    """plan() under a plain mask, as (q rows, k rows, causal?) triples."""
    return [(rows, cols, kind == DIAG) for rows, cols, kind, _ in plan(qc, kc, ChunkMask(8, 8, causal))]


def test_plan_follows_the_chunk_rule():
    assert _plan([0, 1], [0, 1], True) == [((0, 2), (0, 2), True)]  # one fused causal call
    assert _plan([3], [0, 1, 2, 3], True) == [((0, 1), (0, 3), False), ((0, 1), (3, 4), True)]
    assert _plan([0], [2, 3], True) == []  # all keys are in the future
    assert _plan([2, 5], [1, 6], True) == [((0, 2), (0, 1), False)]  # both query chunks read key chunk 1: one call
    assert _plan([1, 6], [2, 5], True) == [((1, 2), (0, 2), False)]
    assert _plan([2, 5], [1, 6], False) == [((0, 2), (0, 2), False)]


def test_plan_covers_every_pair_once_by_the_chunk_rule():
    """Random chunk sets: every (query chunk, key chunk) pair the causal rule keeps is computed
    exactly once, full calls hold only pairs with j < i, causal calls are square runs of the same
    consecutive chunks (inside which the token-level mask keeps exactly j <= i)."""
    import random

    rng = random.Random(0)
    for _ in range(2000):
        n = rng.randint(1, 8)
        qc, kc = rng.sample(range(n), rng.randint(1, n)), rng.sample(range(n), rng.randint(1, n))
        for causal in (True, False):
            covered = []
            for (qa, qb), (ka, kb), diag in _plan(qc, kc, causal):
                pairs = [(qi, kj) for qi in range(qa, qb) for kj in range(ka, kb)]
                if diag:
                    run = qc[qa:qb]
                    assert run == kc[ka:kb] and run == list(range(run[0], run[0] + len(run)))
                    pairs = [(qi, kj) for qi, kj in pairs if kc[kj] <= qc[qi]]
                elif causal:
                    assert all(kc[kj] < qc[qi] for qi, kj in pairs)
                covered += pairs
            want = {(qi, kj) for qi, i in enumerate(qc) for kj, j in enumerate(kc) if not causal or j <= i}
            assert len(covered) == len(set(covered)) and set(covered) == want, (qc, kc, causal)


def test_merge_of_finite_and_empty_blocks_and_large_gaps():
    out, lse = torch.full((1, 1, 2, 3), 2.0, dtype=torch.float64), torch.tensor([[[0.0, 300.0]]], dtype=torch.float64)
    merge_(out, lse, torch.ones(1, 1, 2, 3, dtype=torch.float64), torch.tensor([[[float("-inf"), -300.0]]],
                                                                              dtype=torch.float64))
    assert torch.equal(out, torch.full((1, 1, 2, 3), 2.0, dtype=torch.float64))  # -inf block: no change
    assert lse[0, 0, 0] == 0.0 and lse[0, 0, 1] == 300.0  # exp(-600) vanishes without overflow


@pytest.mark.parametrize("causal", [True, False])
def test_math_kernel_tiles_match_sdpa(causal, monkeypatch):
    import meshattn.model.attention as attention

    monkeypatch.setattr(attention, "MATH_TILE", 5)  # several ragged tiles
    q, k, v = (t.requires_grad_() for t in _qkv(S=23))
    ref = _reference(q, k, v, causal)
    dout = torch.randn_like(ref)
    ref.backward(dout)
    out, lse = block_forward(q.detach(), k.detach(), v.detach(), causal, 6 ** -0.5, "math")
    assert_close(out, ref.detach())
    for g, t in zip(block_backward(dout, q.detach(), k.detach(), v.detach(), out, lse, causal, 6 ** -0.5, "math"),
                    (q, k, v)):
        assert_close(g, t.grad)


def test_merge_keeps_unseen_rows_finite():
    out, lse = torch.zeros(1, 1, 2, 3), torch.full((1, 1, 2), float("-inf"))
    merge_(out, lse, torch.ones(1, 1, 2, 3), torch.tensor([[[float("-inf"), 0.5]]]))
    assert torch.isfinite(out).all() and lse[0, 0, 0] == float("-inf") and lse[0, 0, 1] == 0.5
    assert torch.equal(out[0, 0, 0], torch.zeros(3)) and torch.equal(out[0, 0, 1], torch.ones(3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flash_and_math_blocks_agree(dtype):
    q, k, v = _qkv(dtype=dtype, D=8)
    (o1, l1), (o2, l2) = block_forward(q, k, v, True, 0.3, "flash"), block_forward(q, k, v, True, 0.3, "math")
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(o1.float(), o2.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(l1, l2, rtol=1e-4, atol=1e-4)
    dout = torch.randn_like(o1)
    for a, b in zip(block_backward(dout, q, k, v, o1, l1, True, 0.3, "flash"),
                    block_backward(dout, q, k, v, o1, l1, True, 0.3, "math")):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol * 5, atol=tol * 5)
