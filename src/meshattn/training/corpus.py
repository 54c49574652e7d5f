"""The bundled training text and its batches.

Default data is real text every machine with Python has: the standard library's own source
files, read at run time in a fixed order and tokenised as bytes (vocabulary 256). `--data PATH`
takes any text file or folder instead. A fine-tune (--init-from) tokenises this same stream with
its folder's tokenizer, row by row (tokenized.py).

Batches are drawn from a generator seeded by (seed, step), so the *global* batch at each step
is the same whatever the layout; each dp replica then takes its rows. That is what makes a
dp x tp run's loss curve comparable to the single-device run's.
"""

from __future__ import annotations

import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst")
MAX_BYTES = 16 * 2**20  # what training reads of --data (the standard library is about this size)


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _text_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__", "dist-packages"))
        files += [Path(dirpath, f) for f in sorted(filenames) if f.endswith(TEXT_SUFFIXES)]
    return files


def load_documents(path: str | None = None, max_bytes: int = MAX_BYTES) -> list[torch.Tensor]:
    """The text files of `path` (the standard library when None) in corpus order, one uint8
    tensor each, up to max_bytes in all (the last one cut there); empty files skipped."""
    root = stdlib_dir() if path is None else Path(path)
    if not root.exists():
        raise FileNotFoundError(f"--data {root}: no such file or folder; give a text file or a folder of "
                                f"{', '.join(TEXT_SUFFIXES)} files, or leave out --data for Python's standard library")
    docs, total = [], 0
    for f in _text_files(root):
        with open(f, "rb") as fh:  # only what is still wanted: a huge file is not read whole
            text = fh.read(max_bytes - total)
        if text:
            docs.append(torch.frombuffer(bytearray(text), dtype=torch.uint8))
            total += len(text)
        if total >= max_bytes:
            break
    if total == 0:
        raise ValueError(f"--data {root}: found no text ({', '.join(TEXT_SUFFIXES)} files); give a non-empty text "
                         "file or a folder holding some")
    return docs


def load_bytes(path: str | None = None, max_bytes: int = MAX_BYTES) -> torch.Tensor:
    """Up to max_bytes of text as a uint8 tensor (the standard library when path is None): the
    documents of load_documents, concatenated."""
    return torch.cat(load_documents(path, max_bytes))


def looks_binary(path: str | Path, probe: int = 8192) -> bool:
    """Whether a file looks like binary data rather than text, judged on its first `probe` bytes:
    a NUL byte, or more than a tenth of them neither UTF-8 text nor whitespace. Any file is read
    as bytes and trains; this only lets the command line warn that it is probably not what was meant."""
    with open(path, "rb") as f:
        head = f.read(probe)
    if b"\0" in head:
        return True
    text = head.decode("utf-8", errors="replace")
    odd = sum(ch == "\ufffd" or (ch < " " and ch not in "\t\n\r\f\v\b\x1b") for ch in text)
    return odd > len(text) / 10


@dataclass
class Corpus:
    """Train/validation split of a byte stream, with seeded global batches."""

    train: torch.Tensor
    val: torch.Tensor

    @classmethod
    def from_path(cls, path: str | None = None, val_fraction: float = 0.05, max_bytes: int = MAX_BYTES) -> Corpus:
        data = load_bytes(path, max_bytes)
        n_val = max(int(len(data) * val_fraction), 1)
        return cls(train=data[:-n_val], val=data[-n_val:])

    def check(self, seq_len: int) -> None:
        """Refuse, before training, a text too short for seq_len in either split."""
        for split, data in (("train", self.train), ("validation", self.val)):
            if len(data) <= seq_len + 1:
                raise ValueError(f"the {split} split has {len(data)} bytes, not more than seq_len+1={seq_len + 1}; "
                                 "give more text or a shorter --seq-len")

    def batch(self, step: int, batch_size: int, seq_len: int, seed: int, split: str = "train"):
        """Global batch for `step`: ids and next-token targets, each (batch_size, seq_len) int64."""
        self.check(seq_len)
        data = self.train if split == "train" else self.val
        starts = window_starts(len(data), batch_size, seq_len, seed, step, split)
        rows = torch.stack([data[s: s + seq_len + 1] for s in starts.tolist()]).long()  # (B, S+1)
        return rows[:, :-1], rows[:, 1:]


def window_starts(n_bytes: int, batch_size: int, seq_len: int, seed: int, step: int, split: str) -> torch.Tensor:
    """Where the batch_size windows of `step` start in a split of n_bytes: (batch_size,) int64
    drawn from a generator seeded by (seed, step, split) alone, so every layout draws the same."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step * 2 + (split != "train"))
    return torch.randint(0, max(n_bytes - seq_len - 1, 1), (batch_size,), generator=gen)


def encode(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def decode(ids) -> str:
    return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")
