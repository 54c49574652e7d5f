"""Attention work per token, per chunk and per context-parallel rank, and a chunk table that
balances it.

Work is counted in query-key pairs the mask lets through (model/mask.py: documents, window,
causal, padding), the cost of an attention kernel that skips what is masked. Under a causal mask
a query's work grows with its position in its document, so with packed documents of uneven
lengths neither the contiguous nor the zigzag layout (layout.py) gives every rank the same work.
`balanced_table` cuts the sequence into more, smaller chunks and deals them out by work.

Every function here is pure torch on tensors the caller holds: each rank computes the same table
from the same global document ids, with no communication.
"""

from __future__ import annotations

import torch

from ..model.mask import check_documents, check_window
from .layout import check_table, chunk_table, table_for


def _check_count(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what}={value!r} must be an int >= 1")
    return value


def _check_chunks(n_chunks: int, seq_len: int) -> None:
    _check_count(n_chunks, "n_chunks")
    _check_count(seq_len, "seq_len")
    if seq_len % n_chunks:
        raise ValueError(f"seq_len {seq_len} is not divisible into {n_chunks} equal chunks; use a multiple of "
                         f"{n_chunks}, e.g. {-(-seq_len // n_chunks) * n_chunks}")


def token_work(seq_len: int, causal: bool = True, window: int | None = None,
               documents: torch.Tensor | None = None) -> torch.Tensor:
    """Keys each query sees, (B or 1, S) int64, in closed form (O(S), no S x S).

    A real token at i in a document whose tokens (with any padding between them) span
    [first, last] sees the real tokens in [max(first, i-w+1), i] (causal) or
    [max(first, i-w+1), min(last, i+w-1)] (not causal); w = S without a window. Padding sees 0.
    Equal to mask.visible_counts, the brute-force count."""
    _check_count(seq_len, "seq_len")
    w = check_window(window) or seq_len
    if documents is None:
        documents = torch.zeros(1, seq_len, dtype=torch.long)
    check_documents(documents, documents.shape[0], seq_len)
    docs = documents.long()
    real = docs >= 0  # (B, S)
    B, S = docs.shape
    idx = torch.arange(S, device=docs.device).expand(B, S)
    # Padding takes the id of the last real token before it: ids become non-decreasing and each
    # document is one run [first, last] of equal ids.
    run = torch.cummax(docs.masked_fill(~real, torch.iinfo(torch.int64).min), dim=1).values
    starts = torch.ones_like(real)
    starts[:, 1:] = run[:, 1:] != run[:, :-1]
    ends = torch.ones_like(real)
    ends[:, :-1] = starts[:, 1:]
    first = torch.cummax(torch.where(starts, idx, 0), dim=1).values  # (B, S)
    last = torch.cummin(torch.where(ends, idx, S - 1).flip(1), dim=1).values.flip(1)  # (B, S)
    lo = torch.maximum(first, idx - w + 1)
    hi = idx if causal else torch.minimum(last, idx + w - 1)
    reals_before = torch.zeros(B, S + 1, dtype=torch.long, device=docs.device)  # real tokens in [0, j)
    reals_before[:, 1:] = real.long().cumsum(1)
    counts = reals_before.gather(1, hi + 1) - reals_before.gather(1, lo)
    return counts.masked_fill(~real, 0)


def chunk_work(n_chunks: int, seq_len: int, causal: bool = True, window: int | None = None,
               documents: torch.Tensor | None = None) -> list[float]:
    """Query-key pairs of each of n_chunks equal chunks of the sequence (its queries against
    all keys), summed over the batch: n_chunks floats."""
    _check_chunks(n_chunks, seq_len)
    per_token = token_work(seq_len, causal, window, documents).sum(0)  # (S,)
    return [float(x) for x in per_token.view(n_chunks, -1).sum(1).tolist()]


def rank_work(table: list[list[int]], seq_len: int, causal: bool = True, window: int | None = None,
              documents: torch.Tensor | None = None) -> list[float]:
    """Query-key pairs each rank computes for its queries under `table` (per rank, the global
    chunk ids it holds; n = all chunks): len(table) floats."""
    n = sum(len(chunks) for chunks in check_table(table))
    work = chunk_work(n, seq_len, causal, window, documents)
    return [sum(work[c] for c in chunks) for chunks in table]


def _greedy(work: list[float], p: int, k: int) -> list[list[int]]:
    """Longest processing time first: chunks by decreasing work (ties: lower id), each to the
    least-loaded rank (ties: lower rank) that holds fewer than k."""
    table, loads = [[] for _ in range(p)], [0.0] * p
    for c in sorted(range(len(work)), key=lambda c: (-work[c], c)):
        r = min((r for r in range(p) if len(table[r]) < k), key=lambda r: (loads[r], r))
        table[r].append(c)
        loads[r] += work[c]
    return table


def _refined(table: list[list[int]], factor: int) -> list[list[int]]:
    """The same layout on chunks `factor` times finer: each chunk c becomes c*factor .. c*factor+factor-1."""
    return [[c * factor + i for c in chunks for i in range(factor)] for chunks in table]


def _improve(table: list[list[int]], work: list[float], rounds: int) -> list[list[int]]:
    """Pairwise swaps: while some chunk of the most-loaded rank can trade places with a lighter
    chunk of another rank leaving both below the old maximum, make the best such swap. Each swap
    lowers the sorted load vector, so the maximum never rises and the loop ends."""
    table = [list(chunks) for chunks in table]
    loads = [sum(work[c] for c in chunks) for chunks in table]
    for _ in range(rounds):
        a = max(range(len(table)), key=lambda r: (loads[r], -r))
        best = None  # (new max of the pair, b, i, j)
        for b in range(len(table)):
            if b == a:
                continue
            for i, x in enumerate(table[a]):
                for j, y in enumerate(table[b]):
                    d = work[x] - work[y]
                    top = max(loads[a] - d, loads[b] + d)
                    if top < loads[a] and (best is None or top < best[0]):  # so d > 0
                        best = (top, b, i, j)
        if best is None:
            break
        _, b, i, j = best
        d = work[table[a][i]] - work[table[b][j]]
        table[a][i], table[b][j] = table[b][j], table[a][i]
        loads[a] -= d
        loads[b] += d
    return table


def balance_chunks(work: list[float], p: int) -> list[list[int]]:
    """Deal len(work) chunks to p ranks, len(work)/p each, minimising the largest per-rank sum of
    `work` (one value per chunk). Starts from the best of greedy LPT and the contiguous and zigzag
    layouts refined to these chunks (where they fit), then improves by swaps: never worse than
    any of them. Deterministic; each rank's chunk ids ascending."""
    _check_count(p, "p")
    if not work or len(work) % p:
        raise ValueError(f"{len(work)} chunks cannot be dealt equally to {p} ranks; give a multiple of p chunks")
    k = len(work) // p
    starts = [_greedy(work, p, k)]
    starts += [_refined(chunk_table(layout, p), k // m) for layout, m in (("contiguous", 1), ("zigzag", 2))
               if k % m == 0]
    start = min(starts, key=lambda t: max(sum(work[c] for c in chunks) for chunks in t))  # first of equals
    return [sorted(chunks) for chunks in _improve(start, work, rounds=len(work))]


def balanced_table(p: int, chunks_per_rank: int, seq_len: int, causal: bool = True, window: int | None = None,
                   documents: torch.Tensor | None = None) -> list[list[int]]:
    """A chunk table for p ranks on n = p * chunks_per_rank equal chunks, chunks_per_rank each,
    with the largest per-rank attention work (rank_work) as small as balance_chunks finds.
    Each rank's global chunk ids ascending; the same on every rank given the same arguments."""
    _check_count(p, "p")
    _check_count(chunks_per_rank, "chunks_per_rank")
    return balance_chunks(chunk_work(p * chunks_per_rank, seq_len, causal, window, documents), p)


def causal_work(layout, p: int, seq_len: int, heads: int = 1, head_dim: int = 1, batch: int = 1,
                causal: bool = True, window: int | None = None, documents: torch.Tensor | None = None) -> list[float]:
    """Attention forward FLOPs per cp rank (4 * D per visible query-key pair: QK^T and PV, per
    head) under any mask: a layout name ("balanced" deals this batch's chunks) or a chunk table,
    and the batch's causality, window and documents (B, S); `batch` rows when documents is None."""
    table = table_for(layout, p, seq_len, causal, window, documents) if isinstance(layout, str) else layout
    rows = batch if documents is None else 1
    return [w * 4 * head_dim * heads * rows for w in rank_work(table, seq_len, causal, window, documents)]


def imbalance(work: list[float]) -> float:
    """max / mean: 1.0 is perfectly balanced; the slowest rank sets the step time."""
    return max(work) / (sum(work) / len(work))
