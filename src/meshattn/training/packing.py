"""Packed documents: the bundled corpus with a document id per token.

The corpus (corpus.py) is a stream of text files, one after another. Here each file is a
document: a batch row is the same random window of the stream as `Corpus.batch` draws, with
the file index of each token, renumbered from 0 in each row, as its document id (mask.py), and
no next-token target across a file boundary. `pack_lengths` builds such rows from document
lengths alone, for measuring work (benchmarks/balance.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model.mask import boundary_targets
from .corpus import MAX_BYTES, Corpus, load_documents


@dataclass
class PackedCorpus:
    """The corpus stream (text: its train/validation split) and where each split's documents end."""

    text: Corpus
    train_ends: torch.Tensor  # (documents in train,) int64: end offset of each file in the train split
    val_ends: torch.Tensor

    @classmethod
    def from_path(cls, path: str | None = None, val_fraction: float = 0.05, max_bytes: int = MAX_BYTES
                  ) -> PackedCorpus:
        docs = load_documents(path, max_bytes)
        data = torch.cat(docs)
        n_val = max(int(len(data) * val_fraction), 1)
        ends = torch.tensor([len(d) for d in docs]).cumsum(0)  # (files,) in the whole stream
        cut = len(data) - n_val  # a file cut here is a document in each split
        train_ends = torch.cat([ends[ends < cut], torch.tensor([cut])])
        val_ends = ends[ends > cut] - cut
        return cls(Corpus(train=data[:cut], val=data[cut:]), train_ends, val_ends)

    def check(self, seq_len: int) -> None:
        """Refuse, before training, a text too short for seq_len in either split."""
        self.text.check(seq_len)

    def batch(self, step: int, batch_size: int, seq_len: int, seed: int, split: str = "train"):
        """Global batch for `step`, the windows `Corpus.batch` draws: ids (B, S) int64, targets
        (B, S) int64 (-100 where the next token is in another file) and documents (B, S) int64
        (each token's file, numbered from 0 in each row)."""
        self.check(seq_len)
        data, ends = (self.text.train, self.train_ends) if split == "train" else (self.text.val, self.val_ends)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step * 2 + (split != "train"))
        starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=gen)
        pos = starts[:, None] + torch.arange(seq_len + 1)  # (B, S+1) stream offsets
        rows = data[pos].long()
        files = torch.searchsorted(ends, pos, right=True)  # (B, S+1) file index of each token
        files -= files[:, :1].clone()
        documents = files[:, :-1]
        return rows[:, :-1], boundary_targets(rows[:, 1:], documents, files[:, 1:]), documents


def pack_lengths(lengths: list[int], seq_len: int) -> list[torch.Tensor]:
    """Document-id rows, each (seq_len,) int64 numbered from 0: documents of these lengths
    concatenated in order and cut every seq_len tokens (a document cut by a row boundary is the
    first document of the next row; a last, partial row is dropped)."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len={seq_len!r} must be an int >= 1")
    if any(n < 0 for n in lengths):
        raise ValueError(f"document lengths must be >= 0; got {min(lengths)}")
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths, dtype=torch.long))
    rows = ids[: len(ids) // seq_len * seq_len].view(-1, seq_len)  # (rows, S)
    return list(rows - rows[:, :1])
