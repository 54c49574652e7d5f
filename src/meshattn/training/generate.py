"""The training run's sample: a continuation of a prompt through the KV cache (meshattn.inference).

Every rank calls it; the dp groups share the one request as `meshattn generate` shares many (the
others run an idle row), and every rank returns the same text.
"""

from __future__ import annotations

import torch

from ..inference import Sampling, run
from ..parallel import ParallelModel
from .corpus import decode, encode


@torch.no_grad()
def generate(model: ParallelModel, prompt: str, n_tokens: int, temperature: float = 0.8, top_k: int = 40,
             seed: int = 0, tokenizer=None) -> str:
    """Sample up to n_tokens (fewer if the prompt and they would pass max_seq_len, or at the
    tokenizer's end-of-sequence id) after `prompt`; temperature <= 0 is greedy. The text is
    byte-level unless `tokenizer` (encode(text) -> ids, decode(ids), eos_token_ids) is given."""
    ids = encode(prompt).tolist() if tokenizer is None else list(tokenizer.encode(prompt))
    n = min(n_tokens, model.local.cfg.max_seq_len - len(ids))
    if n < 1:
        return ""
    sampling = Sampling(greedy=True) if temperature <= 0 else Sampling(False, temperature, top_k, 1.0, seed)
    eos = () if tokenizer is None else tuple(tokenizer.eos_token_ids)
    tokens = run(model.without_sequence_parallel(), [ids], n, sampling, eos_token_ids=eos).tokens[0]
    model.local.train()
    return decode(tokens) if tokenizer is None else tokenizer.decode(tokens)
