"""Context (sequence) parallel attention: the public entry point and its table of impls.

    out_local = context_attention(q, k, v, group, impl="ring", layout="zigzag", causal=True)

q (B, Hq, S/cp, D), k and v (B, Hkv, S/cp, D) are this rank's chunks of the sequence (see
`layout.shard_sequence`); the result is this rank's chunks of softmax(q k^T * scale + mask) v,
equal to single-device attention on the whole sequence.

Impls (names defined by config.CpImpl), one function each with one signature in `IMPLS`:
- "allgather": K and V all-gathered once (backward: reduce-scatter of dK, dV); the local queries
  attend to every earlier chunk under the chunk-level causal rule.
- "ring":      K/V blocks passed around the ring, merged by log-sum-exp (ring.py).
- "ulysses":   all-to-all to head shards, full-sequence attention, all-to-all back (ulysses.py).
- "hybrid":    composed from the two: Ulysses inside groups of `ulysses_size` consecutive ranks,
               ring across the groups (USP); needs a `ContextGroup` built with that ulysses_size.

Every check runs before any collective, so bad input fails on every rank with the same message.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..comm import Axis, all_gather
from ..config import ConfigError, CpImpl, CpLayout, check_head_split
from ..mesh import ContextGroup, context_group
from ..model.attention import KERNELS, default_scale
from .blocks import ChunkAttention
from .layout import chunk_table, local_positions, shard_sequence, unshard_sequence
from .ring import ring_attention
from .ulysses import ulysses_attention

__all__ = ["ContextGroup", "SequenceSplit", "context_attention", "context_group"]


@dataclass(frozen=True)
class SequenceSplit:
    """How a model's sequence is split over cp: the group, the impl and the layout."""

    group: ContextGroup
    impl: str
    layout: str
    overlap: bool = True

    @property
    def size(self) -> int:
        return self.group.axis.size

    def positions(self, local_len: int, device=None) -> torch.Tensor:
        """Global positions (S/cp,) of this rank's tokens."""
        return local_positions(local_len * self.size, self.layout, self.group.axis.rank, self.size, device)

    def shard(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return shard_sequence(x, self.group.axis, dim, self.layout)

    def unshard(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return unshard_sequence(x, self.group.axis, dim, self.layout)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention over the split sequence: (B, H, S/cp, D) -> (B, H, S/cp, D)."""
        return context_attention(q, k, v, self.group, self.impl, self.layout, causal=True,
                                 ulysses_size=self.group.ulysses_size, overlap=self.overlap)


def _as_context_group(group) -> ContextGroup:
    return group if isinstance(group, ContextGroup) else ContextGroup(Axis.from_group(group, "cp"))


def check_inputs(q, k, v, cg: ContextGroup, impl: CpImpl, layout: CpLayout, ulysses_size: int | None,
                 attn_mask, kernel: str) -> None:
    """Every refusal, with the fix named; raised before any communication."""
    if kernel not in KERNELS:
        raise ConfigError(f"kernel={kernel!r} is unknown; choose one of {KERNELS}")
    if attn_mask is not None:
        raise ConfigError("context_attention honours exactly two masks, causal=True and causal=False; an explicit "
                          "attn_mask (padding, sliding window, document masks) is not supported by any impl and "
                          "will not be approximated. Drop padding or pack sequences instead")
    if not (q.dim() == k.dim() == v.dim() == 4):
        raise ConfigError(f"q, k, v must be (B, heads, S_local, D); got {tuple(q.shape)}, {tuple(k.shape)}, "
                          f"{tuple(v.shape)}")
    if k.shape != v.shape:
        raise ConfigError(f"k and v must have the same shape; got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3]:
        raise ConfigError(f"q {tuple(q.shape)} and k/v {tuple(k.shape)} must agree in batch, local sequence "
                          "length and head dim")
    if not (q.dtype == k.dtype == v.dtype):
        raise ConfigError(f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); cast them to one dtype")
    if not (q.device == k.device == v.device):
        raise ConfigError(f"q, k, v are on different devices ({q.device}, {k.device}, {v.device})")
    H, G, S_local, p = q.shape[1], k.shape[1], q.shape[2], cg.axis.size
    if H % G:
        raise ConfigError(f"query heads {H} are not a multiple of KV heads {G}")
    if S_local % layout.chunks_per_rank:
        raise ConfigError(f"local sequence length {S_local} is not divisible by {layout.chunks_per_rank} ({layout} "
                          f"holds {layout.chunks_per_rank} chunks per rank): the global sequence length must be a "
                          f"multiple of {layout.n_chunks(p)}")
    if impl.needs_ulysses_size and (cg.ulysses is None or (ulysses_size is not None and ulysses_size != cg.ulysses_size)):
        raise ConfigError(f"impl='hybrid' with ulysses_size={ulysses_size} needs the cp group split into ring x "
                          "ulysses sub-groups: build it with context_group(mesh, 'cp', ulysses_size=...)"
                          + ("" if cg.ulysses is None else f" (this one has ulysses_size={cg.ulysses_size})"))
    if impl.splits_heads:
        group = cg.ulysses_size if impl.needs_ulysses_size else p
        check_head_split(H, G, group, "Ulysses" if impl is CpImpl.ULYSSES else "the hybrid's Ulysses groups")


def _sorted_order(chunks: list[int]) -> list[int]:
    return [chunks.index(c) for c in sorted(chunks)]


# -- the impls: (q, k, v, cg, table, causal, scale, kernel, overlap) -> out ------------------------
# `table[r]` lists the global chunk ids cp rank r holds (layout.chunk_table).

def _allgather(q, k, v, cg: ContextGroup, table, causal, scale, kernel, overlap):
    axis = cg.axis
    k_all, v_all = all_gather(k, 2, axis), all_gather(v, 2, axis)  # (B, G, S, D), rank order
    k_chunks = [c for chunks in table for c in chunks]
    return ChunkAttention.apply(q, k_all, v_all, table[axis.rank], k_chunks, causal, scale, kernel)


def _ring(q, k, v, cg: ContextGroup, table, causal, scale, kernel, overlap):
    return ring_attention(q, k, v, cg.axis, table, causal, scale, kernel, overlap)


def _ulysses(q, k, v, cg: ContextGroup, table, causal, scale, kernel, overlap):
    order = _sorted_order([c for chunks in table for c in chunks])
    return ulysses_attention(q, k, v, cg.axis, order, causal, scale, kernel)


def _hybrid(q, k, v, cg: ContextGroup, table, causal, scale, kernel, overlap):
    """Ulysses over u consecutive ranks, whose head-sharded attention over the group's chunks is
    ring attention across the p/u groups (each group's chunks, sorted, one ring step)."""
    u, p = cg.ulysses_size, cg.axis.size
    groups = [sorted(c for rank in range(g * u, (g + 1) * u) for c in table[rank]) for g in range(p // u)]
    mine = [c for rank in range(cg.ring.rank * u, (cg.ring.rank + 1) * u) for c in table[rank]]

    def across_groups(qh, kh, vh):
        return ring_attention(qh, kh, vh, cg.ring, groups, causal, scale, kernel, overlap)

    return ulysses_attention(q, k, v, cg.ulysses, _sorted_order(mine), causal, scale, kernel, inner=across_groups)


IMPLS = {CpImpl.ALLGATHER: _allgather, CpImpl.RING: _ring, CpImpl.ULYSSES: _ulysses, CpImpl.HYBRID: _hybrid}
assert set(IMPLS) == set(CpImpl), "every config.CpImpl needs an implementation here"


def context_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group=None, impl: str = "ring",
                      layout: str = "zigzag", causal: bool = True, scale: float | None = None,
                      ulysses_size: int | None = None, attn_mask=None, kernel: str = "auto",
                      overlap: bool = True) -> torch.Tensor:
    """Exact attention over a sequence split across the ranks of `group` (see the module doc).

    group: a ProcessGroup, an Axis, or a ContextGroup (required for impl="hybrid"); None = WORLD.
    overlap: the ring posts each block's transfer before computing on the block in hand (True),
    or completes it first (False: the same result, for measuring what overlap hides).
    """
    cg = _as_context_group(group)
    impl, layout = CpImpl.parse(impl, "impl"), CpLayout.parse(layout, "layout")
    check_inputs(q, k, v, cg, impl, layout, ulysses_size, attn_mask, kernel)
    scale = default_scale(q.shape[-1], scale)
    table = chunk_table(layout, cg.axis.size)
    if cg.axis.size == 1:
        return ChunkAttention.apply(q, k, v, table[0], table[0], causal, scale, kernel)
    return IMPLS[impl](q, k, v, cg, table, causal, scale, kernel, overlap)
