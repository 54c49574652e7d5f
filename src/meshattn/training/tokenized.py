"""The corpus tokenised by a Hugging Face tokenizer, one batch row at a time (for --init-from).

The text and its train/validation split are corpus.py's byte stream; a batch draws the same
(seed, step)-seeded window starts as `Corpus.batch`, so the global batch is the same whatever the
layout. Each row is then tokenised on its own, on demand: from its start (moved to the next line
start when one is near, so a row does not begin inside a word or a UTF-8 character), the first
seq_len+1 ids of `tokenizer.encode(text)`. Nothing is tokenised up front: the default corpus is
16 MB, which a subword tokenizer takes tens of seconds per rank to encode whole, while a step
encodes batch_size windows of a few KB (milliseconds).

A row is what the tokenizer makes of a text: with a tokenizer that adds a BOS (Llama's), every
row starts with one, as the training sample's prompt does. The last id of a window is never used
(the window's end may cut a word), and a window too short for seq_len+1 ids is widened, then
moved back from the split's end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from .corpus import MAX_BYTES, Corpus, window_starts

BYTES_PER_ID = 4  # the first window's width per wanted id: code and prose run 3-4 bytes per subword id
LINE_SEARCH = 256  # bytes after a drawn start searched for a line start


class Tokenizer(Protocol):
    """What a corpus needs of a tokenizer (meshattn.hf.load_tokenizer's, or ByteTokenizer)."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids) -> str: ...


@dataclass
class TokenizedCorpus:
    """The byte stream's split (text), tokenised window by window by `tokenizer`."""

    text: Corpus
    tokenizer: Tokenizer

    @classmethod
    def from_path(cls, path: str | None, tokenizer: Tokenizer, val_fraction: float = 0.05,
                  max_bytes: int = MAX_BYTES) -> TokenizedCorpus:
        return cls(Corpus.from_path(path, val_fraction, max_bytes), tokenizer)

    def check(self, seq_len: int) -> None:
        """Refuse, before training, a split that tokenises to seq_len+1 ids or fewer (it is
        tokenised only as far as needed to tell)."""
        for split, data in (("train", self.text.train), ("validation", self.text.val)):
            n = len(self.row(data, 0, seq_len + 2))
            if n <= seq_len + 1:
                raise ValueError(f"the {split} split tokenises to {n} ids, not more than seq_len+1={seq_len + 1}; "
                                 "give more text or a shorter --seq-len")

    def row(self, data: torch.Tensor, start: int, n: int) -> list[int]:
        """The first n ids of the text from byte `start` (moved to a nearby line start), not
        counting the window's last id; fewer only if the whole split has fewer."""
        newline = (data[start: start + LINE_SEARCH] == ord("\n")).nonzero()
        if len(newline) and start + int(newline[0]) + 1 < len(data):
            start += int(newline[0]) + 1
        width = BYTES_PER_ID * n + 64
        while True:
            stop = min(start + width, len(data))
            ids = self.tokenizer.encode(data[start:stop].numpy().tobytes().decode(errors="ignore"))
            if len(ids) > n or (start == 0 and stop == len(data)):
                return ids[:n]
            if stop == len(data):  # the split ends first: begin earlier
                start = max(stop - 2 * width, 0)
            width *= 2

    def batch(self, step: int, batch_size: int, seq_len: int, seed: int, split: str = "train"):
        """Global batch for `step`: ids and next-token targets, each (batch_size, seq_len) int64."""
        data = self.text.train if split == "train" else self.text.val
        starts = window_starts(len(data), batch_size, seq_len, seed, step, split)
        rows = [self.row(data, s, seq_len + 1) for s in starts.tolist()]
        if any(len(r) < seq_len + 1 for r in rows):
            self.check(seq_len)  # raises, naming the split
        ids = torch.tensor(rows, dtype=torch.long)  # (B, S+1)
        return ids[:, :-1], ids[:, 1:]
