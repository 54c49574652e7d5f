"""Choosing the next token from logits: greedy, or seeded sampling with temperature, top-k, top-p.

Sampling is deterministic given the logits: request i draws from its own generator seeded by
(seed, i), one uniform number per token, mapped through the cumulative distribution in float64.
The draw therefore depends neither on the batch a request shares nor on the dp group serving
it, and every rank of a tp x cp group (holding the same logits) draws the same token.

Filters follow the usual order: divide by the temperature, keep the top_k largest logits (0: all),
then the smallest set of the most likely tokens whose probability reaches top_p (1.0: all; the
most likely token is always kept).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.greedy:
            if not self.temperature > 0:
                raise ValueError(f"temperature={self.temperature} must be > 0 (greedy decoding is its limit at 0)")
            if self.top_k < 0:
                raise ValueError(f"top_k={self.top_k} must be >= 0 (0 keeps every token)")
            if not 0 < self.top_p <= 1:
                raise ValueError(f"top_p={self.top_p} must be in (0, 1]")

    def generators(self, requests: list[int]) -> list[torch.Generator]:
        """One generator per request, seeded by (seed, its index among all requests)."""
        return [torch.Generator().manual_seed(self.seed * 2**20 + i) for i in requests]


def filtered_probs(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """Probabilities (B, V) in float64 after temperature, top-k and top-p."""
    x = logits.double() / s.temperature  # (B, V)
    if 0 < s.top_k < x.shape[-1]:
        kth = torch.topk(x, s.top_k, dim=-1).values[:, -1:]  # (B, 1)
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if s.top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # probability of the more likely tokens
        drop = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, before >= s.top_p)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def pick(logits: torch.Tensor, s: Sampling, generators: list[torch.Generator]) -> torch.Tensor:
    """The next token of each row (B,) from logits (B, V)."""
    if s.greedy:
        return logits.argmax(dim=-1)  # the first of equal maxima
    probs = filtered_probs(logits.cpu(), s)
    u = torch.stack([torch.rand((), dtype=torch.float64, generator=g) for g in generators])  # (B,)
    cdf = probs.cumsum(-1)  # (B, V)
    token = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], side="right").squeeze(1)  # first cdf above u
    return token.clamp(max=probs.shape[-1] - 1).to(logits.device)
