"""Choose a plan: estimate every valid one, rank those that fit by predicted step time, say why
the first one wins; and the memory budget of one plan (the largest micro-batch and the longest
sequence that fit).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..config import ModelConfig
from .estimate import GIB, Estimate, Job, estimate
from .report import TIME_PARTS
from .layout import RECOMPUTE_NAMES, SHARDS, Plan, check_plan, enumerate_plans
from .stack import Stack



@dataclass
class Ranking:
    ranked: list[Estimate]  # the plans that fit, fastest first
    searched: int  # valid plans estimated
    smallest: Estimate | None  # the plan needing the least memory (to report when none fits)

    @property
    def best(self) -> Estimate | None:
        return self.ranked[0] if self.ranked else None


def search(model: ModelConfig, job: Job, cluster, stack: Stack, gpus: int, pipeline: bool = False,
           recompute=RECOMPUTE_NAMES, sequence_parallel=(False, True), shards=SHARDS,
           micro_batches=None, progress: bool = False) -> Ranking:
    """Every valid plan of `gpus` GPUs (layout.enumerate_plans, restricted as given), estimated;
    those that fit ranked by step time (_rank_key). progress: a tqdm bar on stderr."""
    from tqdm import tqdm

    plans = enumerate_plans(model, job.seq_len, job.global_batch, gpus, pipeline, recompute, sequence_parallel,
                            shards, micro_batches)
    estimates = [estimate(model, job, plan, cluster, stack)
                 for plan in tqdm(plans, desc="meshattn plan", unit="plan", disable=not progress, leave=False)]
    fit = sorted((e for e in estimates if e.fits), key=_rank_key)
    smallest = min(estimates, key=lambda e: e.memory_bytes["total"]) if estimates else None
    return Ranking(fit, len(plans), smallest)


def _rank_key(e: Estimate) -> tuple:
    """Faster first; within 0.01% (a tie: e.g. a ring whose transfers hide entirely), the plan with
    fewer parallel axes, then less memory."""
    p = e.plan
    axes = sum(n > 1 for n in (p.dp, p.cp, p.tp, p.pp, p.parallel.ep)) + (p.shard != "none") + (p.recompute != "none")
    return (float(f"{e.step_time_s:.4g}"), axes, e.memory_bytes["total"])


def why(first: Estimate, second: Estimate | None) -> str:
    """One line on why `first` beats `second`: how much faster, and the parts that make it so."""
    if second is None:
        return f"{first.plan.name} is the only plan that fits"
    lead = second.step_time_s / first.step_time_s - 1
    if lead < 1e-4:
        return (f"{first.plan.describe()} ties with {second.plan.describe()} (equal predicted step time) and is "
                f"the simpler or smaller of the two; memory {first.memory_bytes['total'] / GIB:.1f} of "
                f"{first.capacity_bytes / GIB:.1f} GiB")
    gains = sorted(((second.time_s.get(k, 0.0) - first.time_s.get(k, 0.0), k) for k in TIME_PARTS), reverse=True)
    saved = [f"{d * 1e3:.3g} ms less {k}" for d, k in gains if d > 0.01 * first.step_time_s][:2]
    costs = [f"{-d * 1e3:.3g} ms more {k}" for d, k in sorted(gains) if d < -0.01 * first.step_time_s][:1]
    because = ", ".join(saved + costs) or "nearly equal parts"
    return (f"{first.plan.describe()} wins by {lead:.1%} over {second.plan.describe()}: {because}; "
            f"memory {first.memory_bytes['total'] / GIB:.1f} of {first.capacity_bytes / GIB:.1f} GiB")


def largest_micro_batch(model: ModelConfig, job: Job, plan: Plan, cluster, stack: Stack, limit: int = 4096) -> int:
    """The largest micro-batch (any size, up to `limit`) whose memory fits; 0 if not even 1."""
    def fits(b: int) -> bool:
        p = dataclasses.replace(plan, micro_batch=b)
        return estimate(model, dataclasses.replace(job, global_batch=b * plan.dp), p, cluster, stack).fits
    return _largest(fits, 1, limit)


def longest_sequence(model: ModelConfig, job: Job, plan: Plan, cluster, stack: Stack,
                     limit: int = 1 << 24) -> int:
    """The longest sequence (a multiple of the plan's sequence unit, up to `limit` tokens) whose
    memory fits at the plan's micro-batch; 0 if not even one unit."""
    unit = plan.parallel.seq_unit

    def fits(k: int) -> bool:
        m = dataclasses.replace(model, max_seq_len=max(model.max_seq_len, k * unit))
        return estimate(m, dataclasses.replace(job, seq_len=k * unit), plan, cluster, stack).fits
    return _largest(fits, 1, limit // unit) * unit


def _largest(fits, lo: int, hi: int) -> int:
    """The largest k in [lo, hi] with fits(k), assuming fits is monotone (True then False); 0 if none."""
    if not fits(lo):
        return 0
    step = lo
    while step * 2 <= hi and fits(step * 2):
        step *= 2
    good, bad = step, min(step * 2, hi + 1)
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good


def evaluate(model: ModelConfig, job: Job, plan: Plan, cluster, stack: Stack, gpus: int) -> Estimate:
    """One given plan, checked (ConfigError saying why it cannot run) and estimated."""
    check_plan(plan, model, job.seq_len, job.global_batch, gpus)
    return estimate(model, job, plan, cluster, stack)

