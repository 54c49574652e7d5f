"""A mask seen at the level of sequence tiles: which tile pairs are empty, full, causal or partial.

The global sequence (length S) is cut into n equal chunks, and every context-parallel layout
hands ranks whole chunks. Under a mask other than plain causal, each chunk is cut further into
f tiles of about TILE tokens, so that a block the mask mostly empties is mostly skipped: with
documents of length L, the work left grows as S * L, not S^2. For query tile i and key tile j
the mask (model/mask.py: causality, a window, document ids, padding) makes the block

    EMPTY    no query sees any key: neither computed nor, when a whole ring hop is empty, sent;
    FULL     every query sees every key: the fused kernel without a mask;
    DIAG     i == j and exactly the causal triangle: the fused kernel's causal mode;
    PARTIAL  anything else: the fused kernel with this block's additive mask (B, 1, t, t).

Causal attention of one document is the special case FULL below the diagonal, DIAG on it,
EMPTY above (and keeps f = 1). Classification is vectorised over all tile pairs from per-tile
summaries (document id ranges, padding) and tile distances, so no S x S mask is built; each
PARTIAL candidate's block mask is built once to confirm it is not empty. The result is the same
on every rank. Callers speak in layout chunk ids; `refine` maps them to tile ids.
"""

from __future__ import annotations

import torch

from ..model.mask import check_window, visible

EMPTY, FULL, DIAG, PARTIAL = 0, 1, 2, 3
TILE = 256  # target tokens per tile of a masked sequence
MIN_TILE = 32  # below this a tile costs more in calls than it saves in skipped work


def _tile_factor(chunk_len: int) -> int:
    """Tiles per chunk: the largest tile length <= TILE dividing the chunk (1 if that is < MIN_TILE)."""
    t = max(d for d in range(1, min(chunk_len, TILE) + 1) if chunk_len % d == 0)
    return chunk_len // t if t >= MIN_TILE else 1


class ChunkMask:
    """The mask of one batch over n layout chunks (n * f tiles). documents: global ids (B, S) or None."""

    def __init__(self, n_chunks: int, seq_len: int, causal: bool = True, window: int | None = None,
                 documents: torch.Tensor | None = None):
        if seq_len % n_chunks:
            raise ValueError(f"sequence length {seq_len} is not divisible into {n_chunks} chunks")
        self.causal, self.window, self.documents = causal, check_window(window), documents  # documents (B, S)
        self.trivial = documents is None and self.window is None  # plain causal or full attention
        self.chunks = n_chunks  # layout chunks
        self.factor = 1 if self.trivial else _tile_factor(seq_len // n_chunks)
        self.n = n_chunks * self.factor  # tiles
        self.c = seq_len // self.n  # tokens per tile
        self._kinds: torch.Tensor | None = None  # (n, n) int8
        self._biases: dict[tuple[int, int, torch.dtype], torch.Tensor] = {}

    def refine(self, chunks: list[int]) -> list[int]:
        """Tile ids of layout chunks, in the same order."""
        f = self.factor
        return list(chunks) if f == 1 else [c * f + t for c in chunks for t in range(f)]

    # -- classification -------------------------------------------------------------------------

    def kind(self, i: int, j: int) -> int:
        """The kind of query tile i against key tile j."""
        if self.trivial:
            if not self.causal or j < i:
                return FULL
            return DIAG if j == i else EMPTY
        return int(self.kinds()[i, j])

    def kinds(self) -> torch.Tensor:
        if self._kinds is None:
            kinds = self._classify()
            for i, j in (kinds == PARTIAL).nonzero().tolist():  # confirm: a candidate may see nothing
                if not bool(self.block(i, j).any()):
                    kinds[i, j] = EMPTY
            self._kinds = kinds
        return self._kinds

    def kind_matrix(self, q_tiles: list[int], k_tiles: list[int]) -> torch.Tensor:
        """(len(q_tiles), len(k_tiles)) int8 kinds of these tile pairs."""
        if self.trivial:
            d = torch.tensor(q_tiles)[:, None] - torch.tensor(k_tiles)[None, :]
            if not self.causal:
                return torch.full(d.shape, FULL, dtype=torch.int8)
            return torch.where(d > 0, FULL, torch.where(d == 0, DIAG, EMPTY)).to(torch.int8)
        return self.kinds()[q_tiles][:, k_tiles]

    def _position_kinds(self) -> torch.Tensor:
        """(n, n) kinds from causality and the window alone (tile distance d = i - j)."""
        n, c, w = self.n, self.c, self.window
        d = torch.arange(n)[:, None] - torch.arange(n)[None, :]  # (n, n)
        kinds = torch.full((n, n), FULL, dtype=torch.int8)
        if self.causal:
            kinds[d == 0] = DIAG
            if w is not None:
                kinds[d * c + (c - 1) >= w] = PARTIAL  # the farthest pair is out of the window: a band
                kinds[d * c - (c - 1) >= w] = EMPTY  # the nearest pair is already out
            kinds[d < 0] = EMPTY
        elif w is not None:
            near, far = (d.abs() * c - (c - 1)).clamp(min=0), d.abs() * c + (c - 1)
            kinds[far >= w] = PARTIAL
            kinds[near >= w] = EMPTY
        return kinds

    def _classify(self) -> torch.Tensor:
        """(n, n) kinds before PARTIAL candidates are confirmed. Documents: EMPTY where no row
        shares an id between the tiles; unmasked only where every row is one document across
        both tiles with no padding."""
        kinds = self._position_kinds()
        if self.documents is None:
            return kinds
        B, S = self.documents.shape
        docs = self.documents.long().view(B, self.n, self.c).cpu()
        real = docs >= 0
        lo = torch.where(real, docs, torch.iinfo(torch.int64).max).amin(-1)  # (B, n); all padding: +big
        hi = torch.where(real, docs, -1).amax(-1)  # all padding: -1, below any lo
        shared = ((lo[:, :, None] <= hi[:, None, :]) & (lo[:, None, :] <= hi[:, :, None])).any(0)  # (n, n)
        single = (lo == hi) & real.all(-1)  # (B, n): one document, no padding
        one = (single[:, :, None] & single[:, None, :] & (lo[:, :, None] == lo[:, None, :])).all(0)  # (n, n)
        kinds = torch.where(one, kinds, torch.where(kinds == EMPTY, kinds, torch.full_like(kinds, PARTIAL)))
        return torch.where(shared, kinds, torch.full_like(kinds, EMPTY))

    def block(self, i: int, j: int) -> torch.Tensor:
        """bool (B or 1, 1, t, t): which queries of tile i see which keys of tile j."""
        c = self.c
        device = None if self.documents is None else self.documents.device
        qp = torch.arange(i * c, (i + 1) * c, device=device)
        kp = torch.arange(j * c, (j + 1) * c, device=device)
        docs = self.documents
        qd = None if docs is None else docs[:, i * c:(i + 1) * c]
        kd = None if docs is None else docs[:, j * c:(j + 1) * c]
        return visible(qp, kp, qd, kd, self.causal, self.window)[:, None]

    def bias(self, i: int, j: int, dtype: torch.dtype) -> torch.Tensor:
        """The block's additive mask (B or 1, 1, t, t): 0 where visible, -inf elsewhere (kept for
        the forward and backward of every layer)."""
        key = (i, j, dtype)
        if key not in self._biases:
            blk = self.block(i, j)
            self._biases[key] = torch.zeros(blk.shape, dtype=dtype, device=blk.device).masked_fill(~blk, float("-inf"))
        return self._biases[key]

    # -- what sets of layout chunks need ----------------------------------------------------------

    def needs(self, q_chunks: list[int], k_chunks: list[int]) -> bool:
        """Whether any query of these layout chunks sees any key of those."""
        if not q_chunks or not k_chunks:
            return False
        if self.trivial:
            return not self.causal or min(k_chunks) <= max(q_chunks)
        return bool((self.kinds()[self.refine(q_chunks)][:, self.refine(k_chunks)] != EMPTY).any())

    def seen(self, q_chunks: list[int], k_chunks: list[int]) -> list[bool]:
        """For each tile of `k_chunks` (refine order): whether any query of `q_chunks` sees it."""
        qt, kt = self.refine(q_chunks), self.refine(k_chunks)
        if self.trivial:
            return [not self.causal or j <= max(qt) for j in kt]
        return (self.kinds()[qt][:, kt] != EMPTY).any(0).tolist()

    def pairs(self, q_chunks: list[int], k_chunks: list[int]) -> int:
        """Visible query-key pairs between two sets of layout chunks, summed over the batch (work)."""
        rows = 1 if self.documents is None else self.documents.shape[0]
        total = 0
        for i in self.refine(q_chunks):
            for j in self.refine(k_chunks):
                k = self.kind(i, j)
                if k == FULL:
                    total += self.c * self.c * rows
                elif k == DIAG:
                    total += self.c * (self.c + 1) // 2 * rows
                elif k == PARTIAL:
                    blk = self.block(i, j)
                    total += int(blk.sum()) * (rows // blk.shape[0])
        return total
