"""What one rank of a mixture-of-experts layer handles, from sizes alone: the tokens it routes,
the rows its experts compute, and the load imbalance assumed between the ranks of an ep group.

Tokens: every rank of the world holds distinct tokens at an MoE layer. Without sequence
parallelism the tp ranks' replicated tokens are split evenly over tp (the output is all-gathered
over tp afterwards); under sequence parallelism they already are sequence shards. So a rank
routes n = b (S/cp) / tp tokens (b: its micro-batch rows), and sends n k rows to the experts.

Experts: ep consecutive ranks form an ep group and split the E experts, E/ep each; the world /
ep groups hold replicas of the same experts (their "expert data-parallel" group, edp, at stride
ep). With ep = 1 every rank computes every expert on its own rows: nothing is imbalanced.

Imbalance: the busiest rank of an ep group receives and computes `imbalance` x the mean n k rows
(a router is never perfectly balanced, and every rank waits for the busiest at the combine). The
default, 1.25, is an assumption, not a measurement: the headroom over an even share that Switch
Transformer (Fedus et al. 2022, sec. 2.2) gives each expert (capacity factor 1.25) with a
load-balancing loss like meshattn's, read as the busiest expert's load over the mean. A rank of
E/ep > 1 experts averages several experts, so for it the figure is, if anything, pessimistic;
give a router's measured max/mean rows per ep rank with `meshattn plan --expert-imbalance`.
With a capacity factor c (cfg.capacity_factor) an expert keeps at most c times its mean share,
so the rank computes at most c x the mean (it still receives the rows it drops).
"""

from __future__ import annotations

import math

from ..config import ConfigError, ModelConfig, ParallelConfig

EXPERT_IMBALANCE = 1.25  # busiest rank's routed rows / the mean, in an ep group (see the module doc)


def moe_layers(cfg: ModelConfig) -> int:
    """cfg.n_moe_layers without walking the layers (ModelConfig.moe_layer's rule: every layer from
    dense_layers on): the planner asks for it a few times per plan, thousands of plans a search."""
    return cfg.n_layers - cfg.dense_layers if cfg.is_moe else 0


def check_imbalance(imbalance: float) -> float:
    """The imbalance factor, refused unless a finite number >= 1 (the busiest rank / the mean)."""
    if isinstance(imbalance, bool) or not isinstance(imbalance, (int, float)) or not math.isfinite(imbalance) \
            or imbalance < 1:
        raise ConfigError(f"expert imbalance {imbalance!r} must be a number >= 1 (the busiest rank's routed rows "
                          f"over the mean; 1 = perfectly balanced, default {EXPERT_IMBALANCE})")
    return float(imbalance)


def routed_tokens(micro_batch: int, seq: int, tp: int) -> int:
    """Tokens one rank routes: its micro_batch x seq tokens (seq = S/cp) split over tp, rounded up."""
    return -(-micro_batch * seq // tp)


def dispatch_imbalance(ep: int, imbalance: float) -> float:
    """Rows the busiest rank receives, over the mean (1 without expert parallelism)."""
    return 1.0 if ep == 1 else imbalance


def compute_imbalance(cfg: ModelConfig, ep: int, imbalance: float) -> float:
    """Rows the busiest rank's experts compute, over the mean: the dispatch imbalance, capped by
    the capacity factor when the model drops tokens."""
    x = dispatch_imbalance(ep, imbalance)
    return x if cfg.capacity_factor is None else min(x, max(cfg.capacity_factor, 1.0))


def expert_rows(cfg: ModelConfig, tokens: int, ep: int, imbalance: float) -> int:
    """Rows the busiest rank's experts compute in one MoE layer: ceil(imbalance n k)."""
    return math.ceil(compute_imbalance(cfg, ep, imbalance) * tokens * cfg.top_k)


def expert_replicas(par: ParallelConfig) -> int:
    """Ranks holding the same experts (the edp group): world / ep."""
    return par.world_size // par.ep


def experts_in_ddp(par: ParallelConfig) -> bool:
    """Whether the experts' gradients travel in DDP's buckets with the rest (ep = 1 and tp = 1:
    the edp group is then the dp x cp group); otherwise they are all-reduced over edp apart,
    one all-reduce per expert weight per backward."""
    return par.ep == 1 and par.tp == 1


def check_experts(cfg: ModelConfig, ep: int) -> None:
    """ConfigError unless ep splits this model's experts evenly (ep = 1 for a dense model)."""
    if ep != 1 and not cfg.is_moe:
        raise ConfigError(f"ep={ep} splits experts, but the model is dense (n_experts=0); use ep=1")
    if cfg.is_moe and (ep < 1 or cfg.n_experts % ep):
        raise ConfigError(f"n_experts={cfg.n_experts} is not divisible by ep={ep}; legal ep: "
                          + ", ".join(str(e) for e in range(1, cfg.n_experts + 1) if cfg.n_experts % e == 0))
