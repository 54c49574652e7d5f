"""HFSource: a Hugging Face safetensors folder read lazily, under reference (meshattn) names.

The TensorSource the parallel loader (parallel/shard.py) reads: `names()`, `shape(name)` and
`read(name, dim, start, stop)`, the slice [start, stop) along `dim` of the full reference
tensor. A read touches only the HF tensors (and, inside them, only the rows) that the slice
covers: a slice of the fused QKV weight inside the Q rows reads only q_proj's rows; a slice of
stacked experts reads only those experts' tensors. Bytes come through safetensors'
`safe_open(...).get_slice(...)`, which maps the file and copies just the requested region.

Construction reads config.json and every file's safetensors header (a few KB each, without
mapping the data) and refuses, with one line naming the file and tensor, a tensor that is
missing, whose shape disagrees with config.json, or whose bytes lie past the end of its file (a
truncated download). Each file is then opened on its first read, once.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ConfigError, ModelConfig
from .config import read_config
from .names import Piece, Recipe, recipes

SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"
_MAX_HEADER = 100 * 2 ** 20  # safetensors' own limit on the JSON header
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors header."""

    file: str
    dtype: str
    shape: tuple[int, ...]


def read_header(path: Path) -> dict[str, Entry]:
    """The tensors a safetensors file declares, checked against the file's size.

    Layout: 8 bytes little-endian header length n, n bytes of JSON {name: {dtype, shape,
    data_offsets: [begin, end]}} (offsets relative to the data after the header), the data."""
    try:
        with open(path, "rb") as f:
            size = path.stat().st_size
            (n,) = struct.unpack("<Q", f.read(8).ljust(8, b"\0"))
            if size < 8 or n > min(size - 8, _MAX_HEADER):
                raise ValueError(f"header length {n} does not fit in a file of {size} bytes")
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise ConfigError(f"{path}: not a readable safetensors file ({e}); download it again") from None
    header.pop("__metadata__", None)
    data = size - 8 - n
    entries = {}
    for key, info in header.items():
        try:
            begin, end = info["data_offsets"]
            entries[key] = Entry(path.name, info["dtype"], tuple(info["shape"]))
        except (TypeError, KeyError, ValueError):
            raise ConfigError(f"{path}: tensor {key} has a malformed header entry; download the file again") from None
        if end > data:
            raise ConfigError(f"{path}: tensor {key} ends at byte {end} of data but the file holds {data}: the file is "
                              "truncated or corrupt; download it again")
    return entries


def _files(folder: Path) -> list[str]:
    """The safetensors files of a folder: the index's shards, or the single file."""
    if (folder / INDEX).exists():
        try:
            weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
            return sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"{folder / INDEX} is not a readable safetensors index ({e!r}); "
                              "download it again") from None
    if (folder / SINGLE).exists():
        return [SINGLE]
    raise ConfigError(f"{folder} has neither {SINGLE} nor {INDEX}; meshattn reads safetensors weights (save them "
                      "with save_pretrained(..., safe_serialization=True))")


class HFSource:
    """Reference-named tensors of a Hugging Face folder, read slice by slice (see the module doc).

    Tensors come back in the dtype the file stores; `bytes_read` counts the bytes requested from
    the files and `opened` names the files opened so far (both for tests and reports)."""

    def __init__(self, folder, cfg: ModelConfig | None = None):
        self.folder = Path(folder)
        self.cfg = read_config(self.folder) if cfg is None else cfg
        self.entries: dict[str, Entry] = {}
        for name in _files(self.folder):
            self.entries.update(read_header(self.folder / name))
        self.recipes: dict[str, Recipe] = recipes(self.cfg, self.entries)
        for recipe in self.recipes.values():
            for piece in recipe.pieces:
                self._check(piece)
        self._handles: dict[str, object] = {}
        self.bytes_read = 0
        self.opened: list[str] = []

    def _check(self, piece: Piece) -> None:
        entry = self.entries.get(piece.key)
        if entry is None:
            raise ConfigError(f"{self.folder}: no tensor {piece.key} in its safetensors files, although config.json "
                              "needs it; the config and the weights disagree")
        if entry.shape != piece.hf_shape:
            raise ConfigError(f"{self.folder / entry.file}: tensor {piece.key} has shape {list(entry.shape)} but "
                              f"config.json implies {list(piece.hf_shape)}; the config and the weights disagree")
        if entry.dtype not in DTYPES:
            raise ConfigError(f"{self.folder / entry.file}: tensor {piece.key} is stored as {entry.dtype}; meshattn "
                              f"reads unquantised float tensors ({', '.join(DTYPES)})")

    def names(self) -> set[str]:
        return set(self.recipes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.recipes[name].shape

    def read(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """The slice [start, stop) along `dim` of the full reference tensor `name`, reading only
        the pieces (and the rows inside them) it covers."""
        recipe = self.recipes[name]
        if not 0 <= dim < len(recipe.shape) or not 0 <= start <= stop <= recipe.shape[dim]:
            raise IndexError(f"{name}: slice [{start}, {stop}) along dim {dim} is outside its shape {recipe.shape}")
        parts, offset = [], 0
        for piece in recipe.pieces:
            n = piece.extent(recipe.dim)
            lo, hi = start, stop
            if dim == recipe.dim:  # the part of [start, stop) inside this piece, in its own coordinates
                lo, hi = max(start, offset) - offset, min(stop, offset + n) - offset
            if lo < hi:
                parts.append(self._read_piece(piece, dim, lo, hi))
            offset += n
        if not parts:
            shape = list(recipe.shape)
            shape[dim] = 0
            return torch.empty(shape, dtype=DTYPES[self.entries[recipe.pieces[0].key].dtype])
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=recipe.dim)

    def _read_piece(self, piece: Piece, dim: int, lo: int, hi: int) -> torch.Tensor:
        box = piece.sub_box(dim, lo, hi)
        region = self._handle(piece.key).get_slice(piece.key)[tuple(slice(a, b) for a, b in box)]
        self.bytes_read += region.numel() * region.element_size()
        return region.unsqueeze(0) if piece.stacked else region

    def _handle(self, key: str):
        file = self.entries[key].file
        if file not in self._handles:
            from safetensors import safe_open  # a runtime dependency of meshattn.hf only

            try:
                self._handles[file] = safe_open(str(self.folder / file), framework="pt")
            except Exception as e:  # safetensors raises its own SafetensorError
                why = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise ConfigError(f"{self.folder / file}: safetensors cannot open it ({why}); "
                                  "download it again") from None
            self.opened.append(file)
        return self._handles[file]

    def full(self, name: str) -> torch.Tensor:
        """The whole reference tensor."""
        return self.read(name, 0, 0, self.shape(name)[0])

    def close(self) -> None:
        """Drop the open files (their mappings go with the last reference)."""
        self._handles.clear()

    def __enter__(self) -> HFSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
