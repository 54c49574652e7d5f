"""Which chunks of the global sequence each context-parallel rank holds, and what that costs.

contiguous: the sequence is cut into p equal chunks; rank r holds chunk r.
zigzag:     the sequence is cut into 2p equal chunks; rank r holds chunks r and 2p-1-r, in that
            order, so under a causal mask every rank does the same work.

The same layout shards token ids, positions (rotary angles use global positions) and labels.
"""

from __future__ import annotations

import torch

from ..comm import Axis, gather_from_group
from ..config import CpLayout

# Global chunk ids rank r of p holds, in local order: one function per layout (config.CpLayout
# defines the names and how many chunks each rank holds).
_CHUNKS = {
    CpLayout.CONTIGUOUS: lambda r, p: [r],
    CpLayout.ZIGZAG: lambda r, p: [r, 2 * p - 1 - r],
}


def n_chunks(layout: str, p: int) -> int:
    return CpLayout.parse(layout, "layout").n_chunks(p)


def chunks_of(layout: str, rank: int, p: int) -> list[int]:
    """Global chunk ids rank `rank` holds, in local order."""
    return _CHUNKS[CpLayout.parse(layout, "layout")](rank, p)


def chunk_table(layout: str, p: int) -> list[list[int]]:
    return [chunks_of(layout, r, p) for r in range(p)]


def check_divisible(seq_len: int, layout: str, p: int, what: str = "sequence length") -> None:
    n = n_chunks(layout, p)
    if seq_len % n:
        raise ValueError(f"{what} {seq_len} is not divisible into {n} equal chunks for layout={layout!r} with cp={p}; "
                         f"use a multiple of {n}, e.g. {(-(-seq_len // n)) * n}")


def shard_sequence(x: torch.Tensor, group, dim: int = 2, layout: str = "zigzag") -> torch.Tensor:
    """This rank's part of a global tensor along `dim` (the same global x on every rank)."""
    axis = Axis.from_group(group, "cp")
    check_divisible(x.shape[dim], layout, axis.size)
    parts = x.chunk(n_chunks(layout, axis.size), dim=dim)
    return torch.cat([parts[c] for c in chunks_of(layout, axis.rank, axis.size)], dim=dim)


def global_order(layout: str, p: int) -> list[int]:
    """For the rank-ordered concatenation of all ranks' chunks, the position of each global chunk."""
    flat = [c for chunks in chunk_table(layout, p) for c in chunks]
    return [flat.index(c) for c in range(len(flat))]


def unshard_sequence(x_local: torch.Tensor, group, dim: int = 2, layout: str = "zigzag") -> torch.Tensor:
    """The global tensor from every rank's part (all-gather, then chunks back in global order).
    Differentiable: the backward keeps this rank's part of the gradient."""
    axis = Axis.from_group(group, "cp")
    gathered = gather_from_group(x_local, dim, axis)  # rank-ordered chunks
    if layout == "contiguous":
        return gathered
    parts = gathered.chunk(n_chunks(layout, axis.size), dim=dim)
    return torch.cat([parts[i] for i in global_order(layout, axis.size)], dim=dim)


def local_positions(seq_len: int, layout: str, rank: int, p: int, device=None) -> torch.Tensor:
    """Global positions (S/p,) of this rank's tokens."""
    return shard_sequence(torch.arange(seq_len, device=device), Axis("cp", None, p, rank), 0, layout)


def causal_work(layout: str, p: int, seq_len: int, heads: int = 1, head_dim: int = 1, batch: int = 1,
                causal: bool = True) -> list[float]:
    """Attention forward FLOPs per rank (4 * D per query-key pair: QK^T and PV) under the
    chunk-level rule: query chunk i against key chunk j is full if j < i, a causal triangle if
    j == i (c(c+1)/2 pairs), skipped if j > i."""
    n = n_chunks(layout, p)
    c = seq_len / n
    per_pair = 4 * head_dim * heads * batch
    work = []
    for rank in range(p):
        pairs = 0.0
        for i in chunks_of(layout, rank, p):
            pairs += n * c * c if not causal else i * c * c + c * (c + 1) / 2
        work.append(pairs * per_pair)
    return work


def imbalance(work: list[float]) -> float:
    """max / mean: 1.0 is perfectly balanced; the slowest rank sets the step time."""
    return max(work) / (sum(work) / len(work))
