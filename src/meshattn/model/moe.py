"""The mixture-of-experts feed-forward layer of the single-device reference, and the routing math
the parallel layer shares with it (parallel/moe.py): one owner for routing, the losses and the
drop policy.

Router: logits = x W_r^T over E experts, computed in float64 (the choice of experts is discrete:
computing it in float64 makes every layout pick the same experts unless two probabilities agree
to about 1e-15), probabilities p = softmax(logits), the top k experts per token, their gates
p_top / sum(p_top) cast back to the activations' dtype.

Output: y = sum over the token's kept experts of gate * SwiGLU_e(x), plus the shared expert's
SwiGLU(x) when there is one. Tokens that are not active (padding) are routed nowhere: their
routed output is 0 and they do not count in the losses.

Losses (per layer, over the N active tokens of the whole batch):
- load balance (Switch/GShard form): E * sum_e f_e * P_e with f_e = (assignments to e) / (N k),
  the fraction of routing slots e takes, and P_e the mean router probability of e. Its minimum is
  1, at uniform routing. f_e counts assignments before any capacity drop and has no gradient.
- z-loss: mean over tokens of logsumexp(logits)^2.

Capacity (capacity_factor c, else dropless): each expert takes at most C = ceil(c * N * k / E)
of the assignments it receives in one forward; it keeps those with the highest router
probability (ties: the earlier token) and drops the rest, whose slot then adds 0 (the gates of
the kept slots are not renormalised). N counts the tokens of the forward call, so the parallel
layer, which decides at the expert's rank over the tokens of its ep group, equals this one when
the ep group holds the whole batch.

Notation: N tokens, h = d_model, E experts, k = top_k, F = expert_ffn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig


@dataclass
class Routing:
    """The routing of N tokens: logits and probabilities (N, E) in float64, the chosen experts
    (N, k) and their gates (N, k) in the activations' dtype."""

    logits: torch.Tensor
    probs: torch.Tensor
    experts: torch.Tensor
    gates: torch.Tensor


def route(x: torch.Tensor, weight: torch.Tensor, top_k: int) -> Routing:
    """x (N, h), router weight (E, h) -> Routing. Differentiable in x and weight (through the
    gates and, for the losses, the probabilities)."""
    logits = F.linear(x.double(), weight.double())  # (N, E) float64
    probs = logits.softmax(-1)  # (N, E)
    top, experts = probs.topk(top_k, dim=-1, sorted=True)  # (N, k) each
    gates = (top / top.sum(-1, keepdim=True)).to(x.dtype)  # (N, k)
    return Routing(logits, probs, experts, gates)


def expert_counts(experts: torch.Tensor, active: torch.Tensor | None, n_experts: int) -> torch.Tensor:
    """Assignments per expert (E,) int64 of the active tokens' chosen experts (N, k)."""
    chosen = experts if active is None else experts[active]
    return torch.bincount(chosen.reshape(-1), minlength=n_experts)


def expert_imbalance(counts: list[list[int]]) -> float:
    """The busiest expert's assignments over the mean, in the worst layer; counts (layers, E)."""
    return max(max(c) / max(sum(c) / len(c), 1e-12) for c in counts)


def balance_terms(r: Routing, active: torch.Tensor | None, counts: torch.Tensor, n_tokens: int,
                  n_experts: int, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This set of tokens' share of the layer's (load-balancing loss, z-loss), float64 scalars.

    counts (E,) and n_tokens are over the *whole* batch (all ranks), so the shares of every
    rank sum to the batch's losses: aux = E/(N k N) * sum_e counts_e * sum_t p_te, z = sum_t
    lse_t^2 / N."""
    probs, logits = r.probs, r.logits
    if active is not None:
        probs, logits = probs[active], logits[active]
    n = max(n_tokens, 1)
    f = counts.to(probs.dtype) / (n * top_k)  # (E,) no gradient
    aux = n_experts * (f * probs.sum(0)).sum() / n
    z = logits.logsumexp(-1).pow(2).sum() / n
    return aux, z


def capacity(n_tokens: int, cfg: ModelConfig) -> int | None:
    """Assignments one expert keeps per forward (None: dropless)."""
    if cfg.capacity_factor is None:
        return None
    return math.ceil(cfg.capacity_factor * n_tokens * cfg.top_k / cfg.n_experts)


def keep_mask(expert_of: torch.Tensor, priority: torch.Tensor, limit: int | None) -> torch.Tensor:
    """Which of M assignments (expert_of (M,), priority (M,) float64, in order) their experts
    keep under a capacity of `limit` each: the highest priorities, ties to the earlier one."""
    keep = torch.ones_like(expert_of, dtype=torch.bool)
    if limit is None or expert_of.numel() == 0:
        return keep
    order = torch.argsort(-priority, stable=True)  # highest first, ties in arrival order
    by_expert = order[torch.argsort(expert_of[order], stable=True)]  # grouped by expert, best first
    sorted_experts = expert_of[by_expert]
    starts = torch.searchsorted(sorted_experts, sorted_experts, right=False)  # first slot of each group
    rank_in_expert = torch.arange(len(by_expert), device=expert_of.device) - starts
    keep[by_expert[rank_in_expert >= limit]] = False
    return keep


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """One expert: x (n, h), gate and up (F, h), down (h, F) -> (n, h)."""
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


class Experts(nn.Module):
    """E SwiGLU experts, stacked: gate and up (E, F, h), down (E, h, F)."""

    def __init__(self, n_experts: int, d_model: int, ffn: int):
        super().__init__()
        self.gate = nn.Parameter(torch.empty(n_experts, ffn, d_model))
        self.up = nn.Parameter(torch.empty(n_experts, ffn, d_model))
        self.down = nn.Parameter(torch.empty(n_experts, d_model, ffn))


class SharedExpert(nn.Module):
    """The shared expert: a SwiGLU MLP every token passes through (Linear layers named like the
    dense MLP's, so tensor parallelism splits it the same way)."""

    def __init__(self, d_model: int, ffn: int):
        super().__init__()
        self.fc = nn.Linear(d_model, ffn, bias=False)
        self.gate = nn.Linear(d_model, ffn, bias=False)
        self.proj = nn.Linear(ffn, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.silu(self.gate(x)) * self.fc(x))


class MoE(nn.Module):
    """Router, E routed experts and the optional shared expert (see the module doc)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.router = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        self.experts = Experts(cfg.n_experts, cfg.d_model, cfg.expert_ffn)
        shared = cfg.n_shared_experts * cfg.expert_ffn
        self.shared = SharedExpert(cfg.d_model, shared) if shared else None

    def forward(self, x: torch.Tensor, active: torch.Tensor | None = None, stats: list | None = None) -> torch.Tensor:
        """x (B, S, h), active (B, S) bool or None -> (B, S, h). Appends this layer's
        {"aux", "z", "counts"} to `stats` (the losses as float64 scalars, counts (E,))."""
        cfg, w = self.cfg, self.experts
        B, S, h = x.shape
        flat = x.reshape(B * S, h)  # (N, h)
        act = None if active is None else active.reshape(B * S)
        r = route(flat, self.router.weight, cfg.top_k)
        counts = expert_counts(r.experts, act, cfg.n_experts)  # (E,)
        n = B * S if act is None else int(act.sum())
        if stats is not None:
            aux, z = balance_terms(r, act, counts, n, cfg.n_experts, cfg.top_k)
            stats.append({"aux": aux, "z": z, "counts": counts})
        token = torch.arange(B * S, device=x.device).repeat_interleave(cfg.top_k)  # (N k,) token of each slot
        expert_of, gate = r.experts.reshape(-1), r.gates.reshape(-1)  # (N k,)
        priority = r.probs.detach().gather(1, r.experts).reshape(-1)  # (N k,) float64
        if act is not None:  # inactive tokens take no slot
            live = act[token]
            token, expert_of, gate, priority = token[live], expert_of[live], gate[live], priority[live]
        kept = keep_mask(expert_of, priority, capacity(n, cfg))
        token, expert_of, gate = token[kept], expert_of[kept], gate[kept]
        out = torch.zeros_like(flat)  # (N, h)
        for e in range(cfg.n_experts):
            rows = (expert_of == e).nonzero().squeeze(1)
            y = swiglu(flat[token[rows]], w.gate[e], w.up[e], w.down[e])  # (n_e, h)
            out = out.index_add(0, token[rows], (y * gate[rows, None]).to(out.dtype))
        out = out.view(B, S, h)
        return out if self.shared is None else out + self.shared(x)
