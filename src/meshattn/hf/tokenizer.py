"""Tokenizers with one interface: encode(text) -> ids, decode(ids) -> text, bos_token_id and
eos_token_ids. `ByteTokenizer` is the byte-level one meshattn's own presets train with;
`load_tokenizer(folder)` wraps a Hugging Face tokenizer.json (the `tokenizers` library, imported
here only) with the special ids of the folder's generation_config.json / config.json."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import ConfigError


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255; no special tokens."""

    vocab_size = 256
    bos_token_id = None
    eos_token_ids: tuple[int, ...] = ()

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids) -> str:
        """Ids outside 0..255 (a model whose vocabulary is larger) are dropped; invalid UTF-8 is replaced."""
        return bytes(i for i in map(int, ids) if 0 <= i < 256).decode(errors="replace")


class HFTokenizer:
    """A tokenizers.Tokenizer. encode adds the special tokens its post-processor defines (a BOS,
    as transformers' tokenizers do by default); decode skips special tokens."""

    def __init__(self, tokenizer, bos_token_id: int | None, eos_token_ids: tuple[int, ...]):
        self.tokenizer = tokenizer
        self.bos_token_id = bos_token_id
        self.eos_token_ids = eos_token_ids
        self.vocab_size = tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"{path} is not readable JSON ({e}); restore it from the model's source") from None
    return data if isinstance(data, dict) else {}


def _ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, int) else tuple(int(v) for v in value)


def special_ids(folder, tokenizer=None) -> tuple[int | None, tuple[int, ...]]:
    """(bos_token_id, eos_token_ids) of a model folder: generation_config.json first (what
    generate() uses), then config.json, then tokenizer_config.json's eos_token looked up in
    `tokenizer`. An eos id may be an int or a list."""
    folder = Path(folder)
    gen, cfg = _json(folder / "generation_config.json"), _json(folder / "config.json")
    bos = gen.get("bos_token_id", cfg.get("bos_token_id"))
    eos = _ids(gen.get("eos_token_id", cfg.get("eos_token_id")))
    if not eos and tokenizer is not None:
        token = _json(folder / "tokenizer_config.json").get("eos_token")
        token = token.get("content") if isinstance(token, dict) else token
        found = tokenizer.token_to_id(token) if isinstance(token, str) else None
        eos = () if found is None else (found,)
    return bos, eos


def load_tokenizer(folder) -> HFTokenizer:
    """The tokenizer of a Hugging Face folder (its tokenizer.json), with its special ids."""
    path = Path(folder) / "tokenizer.json"
    if not path.exists():
        raise ConfigError(f"{folder} has no tokenizer.json; meshattn reads fast (tokenizers) tokenizers: save one "
                          "with tokenizer.save_pretrained, or use the byte-level tokenizer")
    from tokenizers import Tokenizer  # a runtime dependency of meshattn.hf only

    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on a bad file
        raise ConfigError(f"{path} is not a readable tokenizer ({e}); restore it from the model's source") from None
    return HFTokenizer(tokenizer, *special_ids(folder, tokenizer))
