"""Sampling a continuation from the parallel model, the same tokens on every rank.

Recomputes the whole context for each token (a KV cache comes with `meshattn generate`).
"""

from __future__ import annotations

import torch

from ..comm import all_gather_raw
from ..parallel import ParallelModel
from .corpus import decode, encode


@torch.no_grad()
def generate(model: ParallelModel, prompt: str, n_tokens: int, temperature: float = 0.8, top_k: int = 40,
             seed: int = 0) -> str:
    """Sample a continuation. Every rank runs the same forward passes and draws the same tokens:
    vocab-sharded logits are gathered over tp and sampled with an identically seeded generator."""
    local = model.local
    local.eval()
    tp = model.axes.tp.with_counter(None)  # not training traffic
    gen = torch.Generator().manual_seed(seed)
    device = next(local.parameters()).device
    ids = encode(prompt)
    # The context length must split into cp chunks (and tp shards under sequence parallelism):
    # pad on the right, which causal attention cannot see from the last real position, and keep
    # the padded context within max_seq_len.
    unit, max_len = model.seq_unit, local.cfg.max_seq_len
    max_ctx = max_len // unit * unit
    if max_ctx == 0:
        raise ValueError(f"max_seq_len={max_len} is shorter than one token per sequence shard "
                         f"({unit}); generation needs max_seq_len >= {unit}")
    for _ in range(n_tokens):
        ctx = ids[-max_ctx:]
        n = len(ctx)
        padded = torch.nn.functional.pad(ctx, (0, (-n) % unit))[None].to(device)  # (1, n rounded up)
        local_ids = padded if model.split is None else model.split.shard(padded, 1)  # (1, n'/cp)
        logits = model.unshard_sequence(local(local_ids)[0], 1)  # (1, n', V/tp | V) in global order
        last = logits[0, n - 1].float()  # (V/tp,) or (V,)
        full = (all_gather_raw(last, 0, tp, "fwd") if model.vocab_parallel else last).cpu()  # (V,)
        if temperature <= 0:  # greedy
            ids = torch.cat([ids, full.argmax().reshape(1)])
            continue
        top = torch.topk(full / temperature, min(top_k, full.numel()))
        probs = torch.softmax(top.values, dim=-1)
        ids = torch.cat([ids, top.indices[torch.multinomial(probs, 1, generator=gen)]])
    local.train()
    return decode(ids[len(encode(prompt)):].tolist())
