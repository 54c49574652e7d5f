"""A mask seen at the level of sequence chunks: which chunk pairs are empty, full, causal or partial.

The global sequence (length S) is cut into n equal chunks of c tokens; every context-parallel
layout hands ranks whole chunks. For query chunk i and key chunk j the mask (model/mask.py:
causality, a window, document ids, padding) makes the block

    EMPTY    no query sees any key: neither computed nor, when a whole ring hop is empty, sent;
    FULL     every query sees every key: the fused kernel without a mask;
    DIAG     i == j and exactly the causal triangle: the fused kernel's causal mode;
    PARTIAL  anything else: the fused kernel with this block's mask (B, 1, c, c).

Causal attention of one document is the special case FULL below the diagonal, DIAG on it,
EMPTY above. Classification uses per-chunk summaries (document id ranges, padding) and the chunk
distance, so no S x S mask is built; a PARTIAL candidate's block mask is built once, and a block
that turns out to have no visible pair becomes EMPTY. The result is the same on every rank.
"""

from __future__ import annotations

import torch

from ..model.mask import check_window, visible

EMPTY, FULL, DIAG, PARTIAL = 0, 1, 2, 3


class ChunkMask:
    """The mask of one batch over n chunks. documents: global ids (B, S) or None."""

    def __init__(self, n_chunks: int, seq_len: int, causal: bool = True, window: int | None = None,
                 documents: torch.Tensor | None = None):
        if seq_len % n_chunks:
            raise ValueError(f"sequence length {seq_len} is not divisible into {n_chunks} chunks")
        self.n, self.c, self.causal, self.window = n_chunks, seq_len // n_chunks, causal, check_window(window)
        self.documents = documents  # (B, S) global ids or None
        self.trivial = documents is None and self.window is None  # plain causal or full attention
        self._kinds: list[list[int]] | None = None
        self._blocks: dict[tuple[int, int], torch.Tensor] = {}
        self._biases: dict[tuple[int, int, torch.dtype], torch.Tensor] = {}

    # -- classification -------------------------------------------------------------------------

    def kind(self, i: int, j: int) -> int:
        if self.trivial:
            if not self.causal or j < i:
                return FULL
            return DIAG if j == i else EMPTY
        return self.kinds()[i][j]

    def kinds(self) -> list[list[int]]:
        if self._kinds is None:
            self._kinds = [[self._classify(i, j) for j in range(self.n)] for i in range(self.n)]
        return self._kinds

    def _position_kind(self, i: int, j: int) -> int:
        """The block's kind from causality and the window alone (chunk distance d = i - j)."""
        c, d, w = self.c, i - j, self.window
        if self.causal:
            if d < 0:
                return EMPTY
            kind = DIAG if d == 0 else FULL
            if w is not None:
                if d * c - (c - 1) >= w:  # the nearest pair is already out of the window
                    return EMPTY
                if d * c + (c - 1) >= w:  # the farthest pair is out: a band
                    return PARTIAL
            return kind
        if w is None:
            return FULL
        near, far = max(0, abs(d) * c - (c - 1)), abs(d) * c + (c - 1)
        return EMPTY if near >= w else (FULL if far < w else PARTIAL)

    def _document_kind(self, i: int, j: int) -> int:
        """EMPTY if no batch row shares a document between the chunks, FULL if every row is one
        document across both with no padding, PARTIAL otherwise."""
        if self.documents is None:
            return FULL
        lo, hi, pad = self._summaries()
        shared = (lo[:, i] <= hi[:, j]) & (lo[:, j] <= hi[:, i])  # (B,) id ranges overlap
        if not bool(shared.any()):
            return EMPTY
        one = (lo[:, i] == hi[:, i]) & (lo[:, j] == hi[:, j]) & (lo[:, i] == lo[:, j]) & ~pad[:, i] & ~pad[:, j]
        return FULL if bool(one.all()) else PARTIAL

    def _summaries(self):
        if not hasattr(self, "_sum"):
            B, S = self.documents.shape
            d = self.documents.view(B, self.n, S // self.n)  # (B, n, c)
            real = d >= 0
            big = torch.iinfo(torch.int64).max
            lo = torch.where(real, d, torch.full_like(d, big)).amin(-1)  # (B, n); all padding: +big
            hi = torch.where(real, d, torch.full_like(d, -1)).amax(-1)  # all padding: -1 (< any lo)
            self._sum = (lo, hi, ~real.all(-1))
        return self._sum

    def _classify(self, i: int, j: int) -> int:
        pos, doc = self._position_kind(i, j), self._document_kind(i, j)
        if EMPTY in (pos, doc):
            return EMPTY
        if doc == FULL and pos in (FULL, DIAG):
            return pos
        return PARTIAL if bool(self.block(i, j).any()) else EMPTY

    def block(self, i: int, j: int) -> torch.Tensor:
        """bool (B or 1, 1, c, c): which queries of chunk i see which keys of chunk j."""
        if (i, j) not in self._blocks:
            c = self.c
            device = None if self.documents is None else self.documents.device
            qp = torch.arange(i * c, (i + 1) * c, device=device)
            kp = torch.arange(j * c, (j + 1) * c, device=device)
            docs = self.documents
            qd = None if docs is None else docs[:, i * c:(i + 1) * c]
            kd = None if docs is None else docs[:, j * c:(j + 1) * c]
            self._blocks[(i, j)] = visible(qp, kp, qd, kd, self.causal, self.window)[:, None]
        return self._blocks[(i, j)]

    def bias(self, i: int, j: int, dtype: torch.dtype) -> torch.Tensor:
        """The block's additive mask (B or 1, 1, c, c): 0 where visible, -inf elsewhere (kept for
        the forward and backward of every layer)."""
        key = (i, j, dtype)
        if key not in self._biases:
            blk = self.block(i, j)
            self._biases[key] = torch.zeros(blk.shape, dtype=dtype, device=blk.device).masked_fill(~blk, float("-inf"))
        return self._biases[key]

    # -- what a set of chunks needs ---------------------------------------------------------------

    def needs(self, q_chunks: list[int], k_chunks: list[int]) -> bool:
        """Whether any query chunk sees any key chunk."""
        return any(self.kind(i, j) != EMPTY for i in q_chunks for j in k_chunks)

    def pairs(self, q_chunks: list[int], k_chunks: list[int]) -> int:
        """Visible query-key pairs between two chunk sets, summed over the batch (work)."""
        total = 0
        for i in q_chunks:
            for j in k_chunks:
                k = self.kind(i, j)
                if k == FULL:
                    total += self.c * self.c * self._rows()
                elif k == DIAG:
                    total += self.c * (self.c + 1) // 2 * self._rows()
                elif k == PARTIAL:
                    blk = self.block(i, j)
                    total += int(blk.sum()) * (self._rows() // blk.shape[0])
        return total

    def _rows(self) -> int:
        return 1 if self.documents is None else self.documents.shape[0]
