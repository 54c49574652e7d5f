"""Context (sequence) parallel attention: the public entry point and its four implementations.

    out_local = context_attention(q, k, v, group, impl="ring", layout="zigzag", causal=True)

q (B, Hq, S/cp, D), k and v (B, Hkv, S/cp, D) are this rank's chunks of the sequence (see
`layout.shard_sequence`); the result is this rank's chunks of softmax(q k^T * scale + mask) v,
equal to single-device attention on the whole sequence.

impl:
- "allgather": K and V all-gathered once (backward: reduce-scatter of dK, dV); the local queries
  attend to every earlier chunk under the chunk-level causal rule.
- "ring":      K/V blocks passed around the ring, merged by log-sum-exp (ring.py).
- "ulysses":   all-to-all to head shards, full-sequence attention, all-to-all back (ulysses.py).
- "hybrid":    Ulysses inside groups of `ulysses_size` consecutive ranks, ring across the groups
               (USP); needs a `ContextGroup` built with that ulysses_size.

Every check runs before any collective, so bad input fails on every rank with the same message.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import DeviceMesh

from ..attention import KERNELS, default_scale
from ..comm import Axis, CommCounter, all_gather
from .blocks import ChunkAttention
from .layout import chunk_table, chunks_of, local_positions, n_chunks, shard_sequence, unshard_sequence
from .ring import ring_attention
from .ulysses import check_heads, ulysses_attention

IMPLS = ("allgather", "ring", "ulysses", "hybrid")


@dataclass(frozen=True)
class ContextGroup:
    """The cp axis, and for the hybrid its split into ring (across groups) x ulysses (inside)."""

    axis: Axis
    ring: Axis | None = None
    ulysses: Axis | None = None

    @property
    def ulysses_size(self) -> int | None:
        return None if self.ulysses is None else self.ulysses.size


def context_group(mesh: DeviceMesh, axis: str = "cp", ulysses_size: int | None = None,
                  counter: CommCounter | None = None) -> ContextGroup:
    """The cp axis of `mesh`, split for the hybrid when ulysses_size is given.

    Every rank must call this (it creates process groups, as DeviceMesh does).
    """
    cp = Axis.of(mesh, axis, counter)
    if ulysses_size is None or cp.size == 1:
        return ContextGroup(cp)
    if ulysses_size < 1 or cp.size % ulysses_size:
        legal = [u for u in range(1, cp.size + 1) if cp.size % u == 0]
        raise ValueError(f"ulysses_size={ulysses_size} does not divide cp={cp.size}; legal: {legal}")
    names = list(mesh.mesh_dim_names)
    i = names.index(axis)
    shape = list(mesh.mesh.shape)
    grid = mesh.mesh.reshape(*shape[:i], cp.size // ulysses_size, ulysses_size, *shape[i + 1:])
    split = DeviceMesh(mesh.device_type, grid, mesh_dim_names=(*names[:i], "cp_ring", "cp_ulysses", *names[i + 1:]))
    return ContextGroup(cp, Axis.of(split, "cp_ring", counter), Axis.of(split, "cp_ulysses", counter))


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


def check_inputs(q, k, v, cg: ContextGroup, impl: str, layout: str, ulysses_size: int | None,
                 attn_mask, kernel: str) -> None:
    """Every refusal, with the fix named; raised before any communication."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is unknown; choose one of {IMPLS}")
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r} is unknown; choose one of {KERNELS}")
    if attn_mask is not None:
        raise ValueError("context_attention honours exactly two masks, causal=True and causal=False; an explicit "
                         "attn_mask (padding, sliding window, document masks) is not supported by any impl and "
                         "will not be approximated. Drop padding or pack sequences instead")
    if not (q.dim() == k.dim() == v.dim() == 4):
        raise ValueError(f"q, k, v must be (B, heads, S_local, D); got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k/v {tuple(k.shape)} must agree in batch, local sequence "
                         "length and head dim")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); cast them to one dtype")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v are on different devices ({q.device}, {k.device}, {v.device})")
    H, G, S_local, p = q.shape[1], k.shape[1], q.shape[2], cg.axis.size
    if H % G:
        raise ValueError(f"query heads {H} are not a multiple of KV heads {G}")
    per_rank = n_chunks(layout, p) // p
    if S_local % per_rank:
        raise ValueError(f"local sequence length {S_local} is not divisible by {per_rank} ({layout} holds "
                         f"{per_rank} chunks per rank): the global sequence length must be a multiple of "
                         f"{n_chunks(layout, p)}")
    if impl == "ulysses":
        check_heads(H, G, p)
    if impl == "hybrid":
        if cg.ulysses is None or (ulysses_size is not None and ulysses_size != cg.ulysses_size):
            raise ValueError(f"impl='hybrid' with ulysses_size={ulysses_size} needs the cp group split into ring x "
                             "ulysses sub-groups: build it with context_group(mesh, 'cp', ulysses_size=...)"
                             + ("" if cg.ulysses is None else f" (this one has ulysses_size={cg.ulysses_size})"))
        check_heads(H, G, cg.ulysses_size, "the hybrid's Ulysses groups")


def _sorted_order(chunks: list[int]) -> list[int]:
    return [chunks.index(c) for c in sorted(chunks)]


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
    check_inputs(q, k, v, cg, impl, layout, ulysses_size, attn_mask, kernel)
    scale = default_scale(q.shape[-1], scale)
    axis, p = cg.axis, cg.axis.size
    table = chunk_table(layout, p)
    if p == 1:
        return ChunkAttention.apply(q, k, v, table[0], table[0], causal, scale, kernel)
    if impl == "ring":
        return ring_attention(q, k, v, axis, table, causal, scale, kernel, overlap)
    if impl == "allgather":
        k_all, v_all = all_gather(k, 2, axis), all_gather(v, 2, axis)  # (B, G, S, D), rank order
        k_chunks = [c for chunks in table for c in chunks]
        return ChunkAttention.apply(q, k_all, v_all, chunks_of(layout, axis.rank, p), k_chunks, causal, scale, kernel)
    if impl == "ulysses":
        return ulysses_attention(q, k, v, axis, _sorted_order([c for chunks in table for c in chunks]), causal,
                                 scale, kernel)
    # hybrid: Ulysses over u consecutive ranks, then ring over the p/u groups' sorted chunk sets.
    u = cg.ulysses_size
    groups = [sorted(c for rank in range(g * u, (g + 1) * u) for c in table[rank]) for g in range(p // u)]
    mine = [c for rank in range(cg.ring.rank * u, (cg.ring.rank + 1) * u) for c in table[rank]]

    def ring(qh, kh, vh):
        return ring_attention(qh, kh, vh, cg.ring, groups, causal, scale, kernel, overlap)

    return ulysses_attention(q, k, v, cg.ulysses, _sorted_order(mine), causal, scale, kernel, ring=ring)
