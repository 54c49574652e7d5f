"""Attention masks as data: document ids, a sliding window, causality, and padding.

A mask is never stored as an S x S tensor except by the oracle (`dense_mask`). It is described by

    causal     key position j is visible from query position i only if j <= i;
    window     w >= 1 or None: causal, i - w < j <= i; not causal, |i - j| < w;
    documents  (B, S) int64 per-token document ids of the global sequence, non-decreasing along
               it; a query sees only keys with its own id. A negative id marks padding: a padded
               token neither sees nor is seen, so its output is 0 and its gradient 0.

`visible(...)` is the one statement of that rule; the dense oracle, the block masks of context
parallelism (parallel/chunkmask.py) and the work counts all call it.
"""

from __future__ import annotations

import torch

PAD = -1  # any negative document id is padding


def check_window(window) -> int | None:
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window={window!r} must be None or an int >= 1 (a query sees the last w keys, itself "
                         "included)")
    return window


def check_documents(documents: torch.Tensor, batch: int, seq_len: int, what: str = "documents") -> None:
    """Shape, dtype and order of global document ids (B, S); raises ValueError naming the fix."""
    if documents.dtype.is_floating_point or documents.dtype.is_complex or documents.dtype == torch.bool:
        raise ValueError(f"{what} must be an integer tensor of document ids; got {documents.dtype}")
    if documents.dim() != 2 or documents.shape != (batch, seq_len):
        raise ValueError(f"{what} must be (B, S) = ({batch}, {seq_len}) like the tokens; got {tuple(documents.shape)}")
    real = documents.masked_fill(documents < 0, torch.iinfo(torch.int64).min).long()
    running = torch.cummax(real, dim=1).values  # the largest id seen so far, padding ignored
    if bool(((documents >= 0) & (documents < running)).any()):
        raise ValueError(f"{what} ids must be non-decreasing along the sequence (negative ids, padding, may sit "
                         "anywhere); number documents in the order they are packed")


def visible(q_pos: torch.Tensor, k_pos: torch.Tensor, q_doc: torch.Tensor | None, k_doc: torch.Tensor | None,
            causal: bool, window: int | None) -> torch.Tensor:
    """Whether each query sees each key: q_pos (Sq,), k_pos (Sk,) global positions; q_doc (B, Sq)
    and k_doc (B, Sk) document ids or None. -> bool (B or 1, Sq, Sk)."""
    d = q_pos[:, None] - k_pos[None, :]  # (Sq, Sk): i - j
    ok = torch.ones(d.shape, dtype=torch.bool, device=d.device)
    if causal:
        ok &= d >= 0
    if window is not None:
        ok &= (d < window) if causal else (d.abs() < window)
    ok = ok[None]  # (1, Sq, Sk)
    if q_doc is not None:
        ok = ok & (q_doc[:, :, None] == k_doc[:, None, :]) & (q_doc[:, :, None] >= 0) & (k_doc[:, None, :] >= 0)
    return ok


def dense_mask(seq_len: int, causal: bool = True, window: int | None = None, documents: torch.Tensor | None = None,
               device=None) -> torch.Tensor:
    """The oracle: bool (B or 1, 1, S, S), True where query i may attend key j."""
    pos = torch.arange(seq_len, device=device)
    return visible(pos, pos, documents, documents, causal, window)[:, None]


def document_positions(documents: torch.Tensor) -> torch.Tensor:
    """(B, S) position of each token within its document (0 at every document's first token;
    padding counts as its own run)."""
    B, S = documents.shape
    idx = torch.arange(S, device=documents.device).expand(B, S)
    start = torch.ones_like(documents, dtype=torch.bool)
    start[:, 1:] = documents[:, 1:] != documents[:, :-1]
    first = torch.where(start, idx, torch.zeros_like(idx))
    return idx - torch.cummax(first, dim=1).values


def visible_counts(seq_len: int, causal: bool = True, window: int | None = None,
                   documents: torch.Tensor | None = None, tile: int = 1024) -> torch.Tensor:
    """Keys each query sees, (B or 1, S) int64, in tiles of query rows (never S x S at once)."""
    pos = torch.arange(seq_len, device=None if documents is None else documents.device)
    out = []
    for a in range(0, seq_len, tile):
        b = min(a + tile, seq_len)
        qd = None if documents is None else documents[:, a:b]
        out.append(visible(pos[a:b], pos, qd, documents, causal, window).sum(-1))
    return torch.cat(out, dim=1)


def boundary_targets(targets: torch.Tensor, documents: torch.Tensor, target_documents: torch.Tensor,
                     ignore_index: int = -100) -> torch.Tensor:
    """Next-token targets (B, S) with every position whose target token lies in another document
    than its input token, or either is padding, set to `ignore_index`: no prediction crosses a
    boundary. documents (B, S) are the input tokens' ids, target_documents (B, S) the targets'."""
    cross = (documents != target_documents) | (documents < 0) | (target_documents < 0)
    return targets.masked_fill(cross, ignore_index)
