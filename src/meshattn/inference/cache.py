"""The KV cache: each layer's keys and values, written once and attended to by every later token.

Per layer the cache holds K and V (B, G, C, D) of this rank's KV heads (under tp its G/tp heads,
or its replicated one when G < tp, as in training), and one table `pos` (B, C), shared by the
layers, of the global position each slot holds (-1: empty, or a prompt's padding).

A forward pass with the cache is a `Step`: the model asks it for the tokens' positions and, per
layer, for an attention `core(q, k, v, inner)` (LayerCache) that stores k and v in the step's
slots, then
- prefill (a fresh cache): attends with the model's own core `inner`, the training path, so
  every context-parallel impl and layout prefills as it trains; the cache keeps this rank's
  sequence chunks, sharded as the layout put them;
- decode: attends the queries to the cached slots whose position is visible (<= the query's,
  inside the sliding window): a whole cache through the fused SDPA kernel (grouped heads without
  repeating the cache); under cp one exact fp32 pass per rank that also returns the log-sum-exp:
  every rank attends to its own shard and the (B, H, S, D + 1) partial results are all-gathered
  over cp and merged by log-sum-exp (model/attention.merge_): each decode token's K and V are
  kept by one rank only, round-robin over the decode steps, so the shards stay balanced.

Prompts of different lengths are right-padded to one length: causal attention keeps padding
out of every real token's view, and the padding slots are marked -1 so no decode query sees
them. The cache never drops slots: a sliding window is applied by the mask.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..comm import Axis, all_gather_raw
from ..model.attention import default_scale, merge_
from ..parallel.blocks import acc_dtype


class KVCache:
    """K and V (n_layers, B, G, C, D) with the slot positions (B, C); `cp`: the context-parallel
    axis its shards are merged over at decode (None: the cache is whole)."""

    def __init__(self, n_layers: int, batch: int, kv_heads: int, head_dim: int, capacity: int, dtype: torch.dtype,
                 device=None, window: int | None = None, cp: Axis | None = None):
        shape = (n_layers, batch, kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.pos = torch.full((batch, capacity), -1, dtype=torch.long, device=device)
        self.used = 0  # slots written so far (the same count for every row)
        self.window, self.cp = window, cp

    @property
    def capacity(self) -> int:
        return self.pos.shape[1]

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes + self.pos.nbytes

    def _claim(self, n: int) -> slice:
        if self.used + n > self.capacity:
            raise ValueError(f"the KV cache holds {self.capacity} slots per row and {self.used} are used; "
                             f"{n} more do not fit (size it for the prompt plus the new tokens)")
        slots = slice(self.used, self.used + n)
        self.used += n
        return slots

    def prefill(self, positions: torch.Tensor, valid: torch.Tensor, mask=None, table=None,
                keep: torch.Tensor | None = None) -> Step:
        """The step of a fresh cache: positions (S,) or (B, S) of this rank's tokens, valid (B, S)
        False on padding; `mask` and `table` are what the model's own attention needs (a
        sliding-window mask, a cp chunk table); keep (B,): the one token per row whose logits
        are wanted (its index here, -1: on another rank), so the LM head runs on B tokens, not B x S."""
        if self.used:
            raise ValueError("prefill needs an empty cache; continue a filled one with decode()")
        B, S = valid.shape
        slots = self._claim(S)
        self.pos[:, slots] = torch.where(valid, positions.expand(B, S), -1)
        return Step(self, positions, None if bool(valid.all()) else valid, mask, table, slots, None, keep)

    def decode(self, positions: torch.Tensor, store: bool = True) -> Step:
        """The step of new tokens at positions (B, S) after what is cached; `store`: whether this
        rank keeps their K and V (under cp one rank does)."""
        slots = self._claim(positions.shape[1]) if store else None
        if store:
            self.pos[:, slots] = positions
        keys = self.pos[:, : self.used]  # (B, n)
        q = positions[:, :, None]  # (B, S, 1)
        allowed = (keys[:, None, :] >= 0) & (keys[:, None, :] <= q)  # (B, S, n)
        if self.window is not None:
            allowed &= keys[:, None, :] > q - self.window
        return Step(self, positions, None, None, None, slots, allowed[:, None])  # (B, 1, S, n)


@dataclass
class Step:
    """One forward pass through the cache (see the module doc); the model reads positions, mask,
    table and active (tokens that are not padding, for the experts; None: all are)."""

    cache: KVCache
    positions: torch.Tensor
    active: torch.Tensor | None
    mask: object
    table: list | None
    slots: slice | None  # where this step's K and V go on this rank (None: kept elsewhere)
    allowed: torch.Tensor | None  # decode: (B, 1, S, n) which cached slots each query sees
    keep: torch.Tensor | None = None  # (B,): the token of each row the LM head needs (-1: none here)

    @functools.cached_property
    def everything(self) -> bool:
        """Whether every query sees every cached slot (no mask needed)."""
        return self.allowed is None or bool(self.allowed.all())

    def layer(self, i: int) -> LayerCache:
        return LayerCache(self, i)

    def select(self, x: torch.Tensor) -> torch.Tensor:
        """The hidden states (B, S, h) the LM head needs: (B, 1, h) at `keep` (a row whose token
        is on another rank gets its first token's, which the engine discards), or all of them."""
        if self.keep is None:
            return x
        index = self.keep.clamp(min=0)[:, None, None].expand(-1, 1, x.shape[-1])  # (B, 1, h)
        return x.gather(1, index)


@dataclass
class LayerCache:
    step: Step
    index: int

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inner) -> torch.Tensor:
        """q (B, H, S, D), k and v (B, G, S, D) of the step's tokens -> attention output (B, H, S, D)."""
        step, cache = self.step, self.step.cache
        if step.slots is not None:
            cache.k[self.index, :, :, step.slots] = k
            cache.v[self.index, :, :, step.slots] = v
        if step.allowed is None:
            return inner(q, k, v)  # prefill: the model's own attention over the new tokens
        n = cache.used
        k, v = cache.k[self.index, :, :, :n], cache.v[self.index, :, :, :n]  # (B, G, n, D)
        if cache.cp is None or cache.cp.size == 1:  # a whole cache: the fused kernel, no lse needed
            mask = None if step.everything else step.allowed
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        out, lse = cached_attention(q, k, v, step.allowed)
        return merge_over(out, lse, cache.cp)[0].to(q.dtype)


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
                     scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of q (B, H, S, D) to cached k, v (B, G, n, D) where allowed (B, 1, S, n)
    -> (out (B, H, S, D), lse (B, H, S)) in fp32 (fp64 for fp64 inputs). A row that sees no slot
    gives out = 0 and lse = -inf (it merges as nothing).

    Grouped heads are attended without repeating the cache: the r = H/G query heads of a KV head
    are stacked as r*S rows against that head's keys.
    """
    B, H, S, D = q.shape
    G, n = k.shape[1], k.shape[2]
    r = H // G
    f = acc_dtype(q)
    qg = q.reshape(B, G, r * S, D).to(f)  # head g*r + j, query s -> row j*S + s of group g
    scores = (qg @ k.to(f).transpose(-1, -2)) * default_scale(D, scale)  # (B, G, r*S, n)
    seen = allowed.expand(B, r, S, n).reshape(B, 1, r * S, n)
    scores = scores.masked_fill(~seen, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (B, G, r*S)
    finite = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    out = torch.exp(scores - finite[..., None]) @ v.to(f)  # (B, G, r*S, D)
    return out.view(B, H, S, D), lse.view(B, H, S)


def merge_over(out: torch.Tensor, lse: torch.Tensor, axis: Axis) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine every rank's partial attention over its own keys: one all-gather of
    (B, H, S, D + 1), then the log-sum-exp merge in rank order (the same on every rank)."""
    D = out.shape[-1]
    packed = torch.cat([out, lse[..., None]], dim=-1).unsqueeze(0)  # (1, B, H, S, D+1)
    parts = all_gather_raw(packed, 0, axis.with_counter(None), "fwd")  # (cp, B, H, S, D+1)
    acc_out, acc_lse = torch.zeros_like(out), torch.full_like(lse, float("-inf"))
    for part in parts.unbind(0):
        merge_(acc_out, acc_lse, part[..., :D].clone(), part[..., D])
    return acc_out, acc_lse
