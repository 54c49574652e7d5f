"""Prefill and decode through the KV cache, for the reference model or one rank of a parallel one.

    engine = Engine(model)                         # a Transformer, or a ParallelModel on every rank
    logits = engine.prefill(prompts, max_new)      # (B, V): each prompt's next-token logits
    logits = engine.decode(tokens)                 # (B, V) after appending tokens (B,)

Prompts of different lengths are right-padded to one length (a multiple of the cp chunks). Under
cp the prefill is the layout's context-parallel forward, each rank caching its own chunks; a
prompt's last position lies on one cp rank, whose logits row reaches the others by one sum over
cp. Vocabulary-sharded logits are all-gathered over tp. Every rank of a tp x cp group therefore
holds the same (B, V) logits, bitwise, and draws the same tokens.

A rank with no request (more dp groups than requests) runs one padding row that no expert takes,
so it still joins every collective of the mixture-of-experts layers.
"""

from __future__ import annotations

import math

import torch

from ..comm import all_gather_raw, all_reduce_
from ..model.mask import dense_mask
from ..model.transformer import Transformer
from ..parallel import ParallelModel
from ..parallel.blocks import acc_dtype
from .cache import KVCache


class Engine:
    def __init__(self, model: Transformer | ParallelModel):
        self.parallel = isinstance(model, ParallelModel)
        self.model = model
        self.module = model.local if self.parallel else model
        self.cfg = self.module.cfg
        if self.parallel and model.cfg.sequence_parallel:
            raise ValueError("generation runs without sequence parallelism (a decode step has one token per "
                             "row); build the model with sequence_parallel=False")
        self.split = model.split if self.parallel else None
        self.tp = model.axes.tp.with_counter(None) if self.parallel else None
        self.cp = self.split.group.axis.with_counter(None) if self.split is not None else None
        self.cache: KVCache | None = None
        self.lengths: torch.Tensor | None = None  # (B,) prompt lengths
        self.steps = 0  # decode steps taken
        self.idle = False

    @property
    def device(self):
        return next(self.module.parameters()).device

    @property
    def unit(self) -> int:
        """A prefill length must be a multiple of this (the cp layout's chunk count)."""
        return 1 if self.split is None else self.model.cfg.seq_unit

    def padded_length(self, longest: int) -> int:
        return math.ceil(longest / self.unit) * self.unit

    @torch.no_grad()
    def prefill(self, prompts: list[list[int]], max_new_tokens: int) -> torch.Tensor:
        """Cache the prompts (at least one token each; none: this rank is idle and runs one
        padding row) and return their next-token logits (B, V) in fp32 (fp64 for fp64 models)."""
        self.module.eval()
        self.idle = not prompts
        prompts = prompts or [[0]]
        if any(not p for p in prompts):
            raise ValueError("every prompt needs at least one token")
        B, device = len(prompts), self.device
        S = self.padded_length(max(map(len, prompts)))
        ids = torch.zeros((B, S), dtype=torch.long, device=device)
        for b, p in enumerate(prompts):
            ids[b, : len(p)] = torch.tensor(p, dtype=torch.long)
        self.lengths = torch.tensor([len(p) for p in prompts], device=device)  # (B,)
        valid = torch.arange(S, device=device)[None] < self.lengths[:, None]  # (B, S)
        if self.idle:
            valid[:] = False
        self.steps = 0
        if not self.parallel:
            mask = None if self.cfg.window is None else dense_mask(S, True, self.cfg.window, None, device)
            self.cache = self._new_cache(B, S + max_new_tokens, self.cfg.n_kv_heads)
            positions = torch.arange(S, device=device)
            step = self.cache.prefill(positions, valid, mask, keep=self._keep(positions))
            logits = self.module(ids, cache=step)[0]  # (B, 1, V)
            return self._last(logits, step.keep)
        table = self.model.table_for(None, S)
        if self.split is not None:
            ids, valid = self.split.shard(ids, 1, table), self.split.shard(valid, 1, table)  # (B, S/cp)
        positions, mask, table = self.module.sequence(ids, None)
        per_rank = math.ceil(max_new_tokens / (1 if self.cp is None else self.cp.size))
        self.cache = self._new_cache(B, ids.shape[1] + per_rank, self.module.blocks[0].attn.n_kv_heads)
        step = self.cache.prefill(positions, valid, mask, table, keep=self._keep(positions))
        logits = self.module(ids, cache=step)[0]  # (B, 1, V/tp | V)
        return self._last(logits, step.keep)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row (B,) and return the next-token logits (B, V)."""
        ids = tokens.to(self.device).view(-1, 1)  # (B, 1)
        positions = (self.lengths + self.steps)[:, None]  # (B, 1)
        owner = self.cp is None or self.steps % self.cp.size == self.cp.rank  # round-robin over cp
        step = self.cache.decode(positions, store=owner)
        if self.idle:
            step.active = torch.zeros_like(ids, dtype=torch.bool)
        self.steps += 1
        logits = self.module(ids, cache=step)[0]  # (B, 1, V/tp | V)
        return self._gather_vocab(logits[:, 0])

    def _new_cache(self, batch: int, capacity: int, kv_heads: int) -> KVCache:
        p = next(self.module.parameters())
        return KVCache(self.cfg.n_layers, batch, kv_heads, self.cfg.head_dim, capacity, p.dtype, p.device,
                       self.cfg.window, self.cp)

    def _keep(self, positions: torch.Tensor) -> torch.Tensor:
        """(B,) index among this rank's positions (S',) of each row's last prompt token; -1 where
        another cp rank holds it."""
        hit = positions[None, :] == (self.lengths - 1)[:, None]  # (B, S'): at most one per row
        return torch.where(hit.any(1), hit.int().argmax(1), -1)

    def _last(self, logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The rows' next-token logits (B, V) from the head's (B, 1, V') at `keep`: each row's
        from the cp rank holding its last prompt token, by one sum over cp of zeros elsewhere."""
        last = torch.where((keep >= 0)[:, None], logits[:, 0].to(acc_dtype(logits)), 0.0)  # (B, V')
        if self.cp is not None and self.cp.size > 1:
            all_reduce_(last, self.cp, "fwd")  # one rank holds each row's position: the sum is that row
        return self._gather_vocab(last)

    def _gather_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.to(acc_dtype(logits))
        if self.parallel and self.module.vocab_parallel:
            logits = all_gather_raw(logits, 1, self.tp, "fwd")  # (B, V)
        return logits
