"""Context (sequence) parallel attention: the public entry point and its table of impls.

    out_local = context_attention(q, k, v, group, impl="ring", layout="zigzag", causal=True,
                                  documents=doc_local, window=None)

q (B, Hq, S/cp, D), k and v (B, Hkv, S/cp, D) are this rank's chunks of the sequence (see
`layout.shard_sequence`); the result is this rank's chunks of softmax(q k^T * scale + mask) v,
equal to single-device attention on the whole sequence. The mask is data (model/mask.py):
causal or not, a sliding window, and per-token document ids `documents` (B, S/cp) sharded like
q (negative ids are padding); every impl and layout honours all of them, and blocks the mask
empties are skipped (chunkmask.py).

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
from ..model.mask import check_documents, check_window
from ..model.transformer import attention_core
from .blocks import ChunkAttention
from .chunkmask import ChunkMask
from .layout import check_table, chunk_table, local_positions, shard_sequence, table_for, unshard_sequence
from .ring import ring_attention
from .ulysses import ulysses_attention

__all__ = ["ContextGroup", "SequenceSplit", "context_attention", "context_group", "local_attention", "batch_mask"]


@dataclass(frozen=True)
class SequenceSplit:
    """How a model's sequence is split over cp: the group, the impl and the layout. A batch's
    chunk table (`table_for`) is the layout's, or for "balanced" with documents, dealt by work."""

    group: ContextGroup
    impl: str
    layout: str
    overlap: bool = True

    @property
    def size(self) -> int:
        return self.group.axis.size

    def table_for(self, seq_len: int, window: int | None = None,
                  documents: torch.Tensor | None = None) -> list[list[int]]:
        return table_for(self.layout, self.size, seq_len, True, window, documents)

    def positions(self, local_len: int, device=None, table=None) -> torch.Tensor:
        """Global positions (S/cp,) of this rank's tokens."""
        return local_positions(local_len * self.size, self.layout if table is None else table,
                               self.group.axis.rank, self.size, device)

    def shard(self, x: torch.Tensor, dim: int, table=None) -> torch.Tensor:
        return shard_sequence(x, self.group.axis, dim, self.layout if table is None else table)

    def unshard(self, x: torch.Tensor, dim: int, table=None) -> torch.Tensor:
        return unshard_sequence(x, self.group.axis, dim, self.layout if table is None else table)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: ChunkMask | None = None,
                  table: list[list[int]] | None = None) -> torch.Tensor:
        """Attention over the split sequence: (B, H, S/cp, D) -> (B, H, S/cp, D); causal unless
        a ChunkMask over the global chunks (and the batch's chunk table) says otherwise."""
        return context_attention(q, k, v, self.group, self.impl, self.layout if table is None else table,
                                 causal=True, ulysses_size=self.group.ulysses_size, overlap=self.overlap,
                                 chunk_mask=mask)


def batch_mask(seq_len: int, window: int | None, documents: torch.Tensor | None,
               n_chunks: int = 1) -> ChunkMask | None:
    """A causal batch's ChunkMask over n_chunks layout chunks (1: a whole, unsplit sequence),
    each cut into tiles; None for plain causal attention."""
    if documents is None and window is None:
        return None
    return ChunkMask(n_chunks, seq_len, True, window, documents)


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: ChunkMask | None = None,
                    table=None) -> torch.Tensor:
    """Attention of a whole sequence on one rank (B, H, S, D): fused causal SDPA, or the chunked
    masked path (empty blocks skipped) under a ChunkMask."""
    if mask is None:
        return attention_core(q, k, v)
    return ChunkAttention.apply(q, k, v, [0], [0], mask, default_scale(q.shape[-1], None), "auto")


def _as_context_group(group) -> ContextGroup:
    return group if isinstance(group, ContextGroup) else ContextGroup(Axis.from_group(group, "cp"))


def check_inputs(q, k, v, cg: ContextGroup, impl: CpImpl, table: list[list[int]], ulysses_size: int | None,
                 attn_mask, kernel: str, documents, window) -> None:
    """Every refusal, with the fix named; raised before any communication."""
    if kernel not in KERNELS:
        raise ConfigError(f"kernel={kernel!r} is unknown; choose one of {KERNELS}")
    if attn_mask is not None:
        raise ConfigError("context_attention takes its mask as data, never as a dense attn_mask: pass documents= "
                          "(per-token document ids, negative for padding) and window= (a sliding window)")
    try:
        check_window(window)
    except ValueError as e:
        raise ConfigError(str(e)) from None
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
    per_rank = len(table[0])
    if S_local % per_rank:
        raise ConfigError(f"local sequence length {S_local} is not divisible by {per_rank} (the layout holds "
                          f"{per_rank} chunks per rank): the global sequence length must be a multiple of "
                          f"{per_rank * p}")
    if documents is not None:
        not_ids = documents.dtype.is_floating_point or documents.dtype == torch.bool
        if documents.shape != (q.shape[0], S_local) or not_ids:
            raise ConfigError(f"documents must be this rank's integer document ids (B, S_local) = ({q.shape[0]}, "
                              f"{S_local}), sharded like q; got {documents.dtype} {tuple(documents.shape)}")
        if documents.device != q.device:
            raise ConfigError(f"documents are on {documents.device}, q on {q.device}; move them to one device")
    if impl.needs_ulysses_size and (cg.ulysses is None or (ulysses_size is not None and ulysses_size != cg.ulysses_size)):
        raise ConfigError(f"impl='hybrid' with ulysses_size={ulysses_size} needs the cp group split into ring x "
                          "ulysses sub-groups: build it with context_group(mesh, 'cp', ulysses_size=...)"
                          + ("" if cg.ulysses is None else f" (this one has ulysses_size={cg.ulysses_size})"))
    if impl.splits_heads:
        group = cg.ulysses_size if impl.needs_ulysses_size else p
        check_head_split(H, G, group, "Ulysses" if impl is CpImpl.ULYSSES else "the hybrid's Ulysses groups")


def _check_table(table, p: int) -> list[list[int]]:
    """An explicit chunk table (layout.check_table) giving each of the p ranks as many chunks."""
    try:
        table = check_table(table)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if len(table) != p or len({len(c) for c in table}) != 1:
        raise ConfigError(f"a chunk table must give each of the {p} cp ranks the same number of chunks and cover "
                          f"chunks 0..n-1 once; got {table}")
    return table


def _sorted_order(chunks: list[int]) -> list[int]:
    return [chunks.index(c) for c in sorted(chunks)]


# -- the impls: (q, k, v, cg, table, mask, scale, kernel, overlap) -> out --------------------------
# `table[r]` lists the global chunk ids cp rank r holds (layout.chunk_table); `mask` is the
# ChunkMask over all chunks.

def _allgather(q, k, v, cg: ContextGroup, table, mask, scale, kernel, overlap):
    axis = cg.axis
    k_all, v_all = all_gather(k, 2, axis), all_gather(v, 2, axis)  # (B, G, S, D), rank order
    k_chunks = [c for chunks in table for c in chunks]
    return ChunkAttention.apply(q, k_all, v_all, table[axis.rank], k_chunks, mask, scale, kernel)


def _ring(q, k, v, cg: ContextGroup, table, mask, scale, kernel, overlap):
    return ring_attention(q, k, v, cg.axis, table, mask, scale, kernel, overlap)


def _ulysses(q, k, v, cg: ContextGroup, table, mask, scale, kernel, overlap):
    order = _sorted_order([c for chunks in table for c in chunks])
    return ulysses_attention(q, k, v, cg.axis, order, mask, scale, kernel)


def _hybrid(q, k, v, cg: ContextGroup, table, mask, scale, kernel, overlap):
    """Ulysses over u consecutive ranks, whose head-sharded attention over the group's chunks is
    ring attention across the p/u groups (each group's chunks, sorted, one ring step)."""
    u, p = cg.ulysses_size, cg.axis.size
    groups = [sorted(c for rank in range(g * u, (g + 1) * u) for c in table[rank]) for g in range(p // u)]
    mine = [c for rank in range(cg.ring.rank * u, (cg.ring.rank + 1) * u) for c in table[rank]]

    def across_groups(qh, kh, vh):
        return ring_attention(qh, kh, vh, cg.ring, groups, mask, scale, kernel, overlap)

    return ulysses_attention(q, k, v, cg.ulysses, _sorted_order(mine), mask, scale, kernel, inner=across_groups)


IMPLS = {CpImpl.ALLGATHER: _allgather, CpImpl.RING: _ring, CpImpl.ULYSSES: _ulysses, CpImpl.HYBRID: _hybrid}
assert set(IMPLS) == set(CpImpl), "every config.CpImpl needs an implementation here"


def context_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group=None, impl: str = "ring",
                      layout="zigzag", causal: bool = True, scale: float | None = None,
                      ulysses_size: int | None = None, attn_mask=None, kernel: str = "auto",
                      overlap: bool = True, documents: torch.Tensor | None = None, window: int | None = None,
                      chunk_mask: ChunkMask | None = None) -> torch.Tensor:
    """Exact attention over a sequence split across the ranks of `group` (see the module doc).

    group: a ProcessGroup, an Axis, or a ContextGroup (required for impl="hybrid"); None = WORLD.
    layout: "zigzag", "contiguous", or an explicit chunk table (p lists of global chunk ids, the
    same number each), such as a per-batch balanced one (balance.py).
    documents: this rank's (B, S/p) document ids, sharded like q; window: None or w >= 1.
    chunk_mask: a prebuilt ChunkMask over the global chunks (what the model passes once per
    batch), instead of causal/documents/window.
    overlap: the ring posts each block's transfer before computing on the block in hand (True),
    or completes it first (False: the same result, for measuring what overlap hides).
    """
    cg = _as_context_group(group)
    impl = CpImpl.parse(impl, "impl")
    p = cg.axis.size
    table = chunk_table(CpLayout.parse(layout, "layout"), p) if isinstance(layout, str) else _check_table(layout, p)
    check_inputs(q, k, v, cg, impl, table, ulysses_size, attn_mask, kernel, documents, window)
    scale = default_scale(q.shape[-1], scale)
    n, S = len(table) * len(table[0]), q.shape[2] * p
    if chunk_mask is None:
        if documents is not None:
            documents = unshard_sequence(documents.long(), cg.axis, 1, table)  # (B, S): one all-gather of ints
            try:
                check_documents(documents, q.shape[0], S)
            except ValueError as e:  # the same global ids on every rank: the same refusal everywhere
                raise ConfigError(str(e)) from None
        chunk_mask = ChunkMask(n, S, causal, window, documents)
    if p == 1:
        return ChunkAttention.apply(q, k, v, table[0], table[0], chunk_mask, scale, kernel)
    return IMPLS[impl](q, k, v, cg, table, chunk_mask, scale, kernel, overlap)
