"""Ulysses: all-to-all from sequence shards to head shards, full-sequence attention, and back.

Each rank holds (B, H, S/p, D) for its chunks; the all-to-all gives it (B, H/p, S, D): H/p heads
for the whole sequence, whose chunks arrive in rank order (rank 0's chunks, then rank 1's...).
That order is permuted into global order so the causal mask is one fused causal call, then
permuted back. Four all-to-alls forward (q, k, v, out) and four backward, each of 1/p of a tensor.

Grouped KV heads: G % p == 0 splits them like query heads (rank r's query heads read exactly the
KV heads it receives); G < p with p % G == 0 first repeats each KV head p/G times (autograd sums
their gradients back); anything else is refused before any collective (config.check_head_split).
"""

from __future__ import annotations

import torch

from ..comm import Axis, all_to_all
from .blocks import ChunkAttention


def kv_repeats(n_kv_heads: int, p: int) -> int:
    """How many times each KV head is repeated before the head split (1 when G % p == 0)."""
    return 1 if n_kv_heads % p == 0 else p // n_kv_heads


def ulysses_attention(q, k, v, axis: Axis, order: list[int], mask, scale: float, kernel: str,
                      inner=None) -> torch.Tensor:
    """q (B, H, S/p, D), k and v (B, G, S/p, D) -> (B, H, S/p, D).

    `order[g]` is the position, in the rank-ordered concatenation of the group's chunks, of the
    g-th chunk in sorted order; `mask` is the ChunkMask over all chunks. With `inner(q, k, v)`,
    the head-sharded attention over the group's chunks is done by it instead of locally (the
    hybrid passes ring attention across groups).
    """
    rep = kv_repeats(k.shape[1], axis.size)
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, p, S/p, D)
    q, k, v = (all_to_all(t, 1, 2, axis) for t in (q, k, v))  # (B, H/p | G/p, S_group, D), rank order
    n = len(order)
    if order != list(range(n)):
        q, k, v = (_reorder(t, order) for t in (q, k, v))  # chunks in sorted order
    if inner is None:
        out = ChunkAttention.apply(q, k, v, list(range(n)), list(range(n)), mask, scale, kernel)
    else:
        out = inner(q, k, v)
    if order != list(range(n)):
        out = _reorder(out, _inverse(order))
    return all_to_all(out, 2, 1, axis)  # (B, H, S/p, D)


def _reorder(t: torch.Tensor, order: list[int]) -> torch.Tensor:
    parts = t.chunk(len(order), dim=2)
    return torch.cat([parts[i] for i in order], dim=2)


def _inverse(order: list[int]) -> list[int]:
    inv = [0] * len(order)
    for new, old in enumerate(order):
        inv[old] = new
    return inv
