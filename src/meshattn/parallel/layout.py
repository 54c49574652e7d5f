"""Which chunks of the global sequence each context-parallel rank holds (what that costs: balance.py).

contiguous: the sequence is cut into p equal chunks; rank r holds chunk r.
zigzag:     the sequence is cut into 2p equal chunks; rank r holds chunks r and 2p-1-r, in that
            order, so under a causal mask every rank does the same work.
balanced:   4p chunks dealt to ranks by their work under the batch's mask (balance.py), so packed
            documents of any lengths keep the work even; without documents, the deal for one
            causal sequence. The table is data that travels with the batch (`table_for`).

The same layout shards token ids, positions (rotary angles use global positions) and labels.
"""

from __future__ import annotations

import functools

import torch

from ..comm import Axis, gather_from_group
from ..config import CpLayout

# Global chunk ids rank r of p holds, in local order: one function per layout (config.CpLayout
# defines the names and how many chunks each rank holds).
_CHUNKS = {
    CpLayout.CONTIGUOUS: lambda r, p: [r],
    CpLayout.ZIGZAG: lambda r, p: [r, 2 * p - 1 - r],
    CpLayout.BALANCED: lambda r, p: _balanced(p)[r],
}


@functools.lru_cache(maxsize=None)
def _balanced(p: int) -> tuple[list[int], ...]:
    from .balance import balanced_table  # balance.py builds on this module's tables

    per_rank = CpLayout.BALANCED.chunks_per_rank
    return tuple(balanced_table(p, per_rank, 64 * per_rank * p))


def table_for(layout: str, p: int, seq_len: int, causal: bool = True, window: int | None = None,
              documents: torch.Tensor | None = None) -> list[list[int]]:
    """The chunk table of one batch: the layout's own, or for "balanced" with documents or a
    window, the deal of this batch's chunks by their work (the same on every rank)."""
    layout = CpLayout.parse(layout, "layout")
    if layout is CpLayout.BALANCED and (documents is not None or window is not None):
        from .balance import balanced_table

        return balanced_table(p, layout.chunks_per_rank, seq_len, causal, window, documents)
    return chunk_table(layout, p)


def n_chunks(layout: str, p: int) -> int:
    return CpLayout.parse(layout, "layout").n_chunks(p)


def chunks_of(layout: str, rank: int, p: int) -> list[int]:
    """Global chunk ids rank `rank` holds, in local order."""
    return _CHUNKS[CpLayout.parse(layout, "layout")](rank, p)


def chunk_table(layout: str, p: int) -> list[list[int]]:
    return [chunks_of(layout, r, p) for r in range(p)]


def shard_sequence(x: torch.Tensor, group, dim: int = 2, layout="zigzag") -> torch.Tensor:
    """This rank's part of a global tensor along `dim` (the same global x on every rank); layout
    is a name or a chunk table."""
    axis = Axis.from_group(group, "cp")
    table = _table(layout, axis.size)
    n = len(table) * len(table[0])
    if x.shape[dim] % n:
        raise ValueError(f"sequence length {x.shape[dim]} is not divisible into {n} equal chunks for this layout "
                         f"with cp={axis.size}; use a multiple of {n}, e.g. {(-(-x.shape[dim] // n)) * n}")
    parts = x.chunk(n, dim=dim)
    return torch.cat([parts[c] for c in table[axis.rank]], dim=dim)


def check_table(table) -> list[list[int]]:
    """A chunk table as lists of ints, if it deals the global chunks 0..n-1 exactly once over the
    ranks; else ValueError."""
    table = [[int(c) for c in chunks] for chunks in table]
    flat = sorted(c for chunks in table for c in chunks)
    if not table or flat != list(range(len(flat))):
        raise ValueError(f"chunk table {table!r} must list every global chunk id 0..n-1 exactly once over the "
                         "ranks")
    return table


def _table(layout, p: int) -> list[list[int]]:
    return chunk_table(layout, p) if isinstance(layout, str) else layout


def global_order(layout, p: int) -> list[int]:
    """For the rank-ordered concatenation of all ranks' chunks, the position of each global chunk."""
    flat = [c for chunks in _table(layout, p) for c in chunks]
    return [flat.index(c) for c in range(len(flat))]


def unshard_sequence(x_local: torch.Tensor, group, dim: int = 2, layout="zigzag") -> torch.Tensor:
    """The global tensor from every rank's part (all-gather, then chunks back in global order).
    Differentiable: the backward keeps this rank's part of the gradient."""
    axis = Axis.from_group(group, "cp")
    gathered = gather_from_group(x_local, dim, axis)  # rank-ordered chunks
    order = global_order(layout, axis.size)
    if order == list(range(len(order))):
        return gathered
    parts = gathered.chunk(len(order), dim=dim)
    return torch.cat([parts[i] for i in order], dim=dim)


def local_positions(seq_len: int, layout, rank: int, p: int, device=None) -> torch.Tensor:
    """Global positions (S/p,) of this rank's tokens."""
    return shard_sequence(torch.arange(seq_len, device=device), Axis("cp", None, p, rank), 0, layout)
