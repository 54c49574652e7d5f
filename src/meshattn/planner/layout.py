"""A candidate plan: how one training step is laid out on the GPUs, and every valid one.

A plan is the mesh dp x cp x tp (as meshattn runs it: ParallelConfig) plus what the planner also
decides: pipeline stages pp (modelled analytically; the library itself has no pipeline), the
activation checkpointing, the sharding of parameters, gradients and optimizer state over the
data axis, and the micro-batch (the accumulation follows from the global batch).

Names use `meshattn bench`'s layout grammar (bench/layouts.py) extended with pipeline stages:
`dp4xtp8xpp4`, `dp2xcp4:ring`, `cp4:hybrid2:zigzag`, `tp8+sp`, `tp2@block` (@attention = selective
recomputation, @block = full), and for mixture-of-experts models the expert-parallel size and
dispatch, `dp4xep4`, `dp2xtp2xep4:gather` (ep borrows the dp x cp x tp ranks); axes in any order.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from ..bench.layouts import parse_layout
from ..config import ConfigError, CpImpl, ModelConfig, MoeDispatch, ParallelConfig, divisors
from .flops import recompute_mode
from .memory import SHARD_MODES

RECOMPUTE_NAMES = ("none", "selective", "full")
_CHECKPOINT = {"none": "none", "selective": "attention", "full": "block"}  # planner name -> bench's
SHARDS = ("none", "zero1", "zero3")  # what `meshattn plan --shard` offers (memory.SHARD_MODES also has zero2)


@dataclass(frozen=True)
class Plan:
    parallel: ParallelConfig  # dp x cp x tp, cp impl and layout, sequence parallelism, vocabulary split
    pp: int = 1  # pipeline stages
    recompute: str = "none"  # none | selective (the attention core) | full (whole blocks)
    shard: str = "none"  # none | zero1 | zero3 over the data axis (dp; parameters are replicated over cp too)
    micro_batch: int = 1  # sequences per micro-batch per data-parallel replica
    interleave: int = 1  # virtual pipeline stages per rank (Narayanan et al.'s interleaved schedule)

    def __post_init__(self) -> None:
        object.__setattr__(self, "recompute", recompute_mode(self.recompute))
        if self.shard not in SHARD_MODES:
            raise ConfigError(f"shard={self.shard!r} is unknown; choose one of {', '.join(SHARDS)}")
        for name in ("pp", "micro_batch", "interleave"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} must be a positive integer")

    @property
    def dp(self) -> int:
        return self.parallel.dp

    @property
    def cp(self) -> int:
        return self.parallel.cp

    @property
    def tp(self) -> int:
        return self.parallel.tp

    @property
    def gpus(self) -> int:
        return self.parallel.world_size * self.pp

    @property
    def name(self) -> str:
        p = self.parallel
        parts = [f"dp{p.dp}"] if p.dp > 1 else []
        if p.cp > 1:
            impl = f"hybrid{p.ulysses_size}" if p.cp_impl == "hybrid" else p.cp_impl
            parts.append(f"cp{p.cp}:{impl}" + ("" if p.cp_layout == "zigzag" else f":{p.cp_layout}"))
        if p.tp > 1:
            parts.append(f"tp{p.tp}" + ("+sp" if p.sequence_parallel else ""))
        if p.ep > 1:
            parts.append(f"ep{p.ep}" + ("" if p.moe_dispatch == "all_to_all" else f":{p.moe_dispatch}"))
        if self.pp > 1:
            parts.append(f"pp{self.pp}")
        name = "x".join(parts) or "dp1"
        return name if self.recompute == "none" else f"{name}@{_CHECKPOINT[self.recompute]}"

    def describe(self) -> str:
        """The name plus the choices the grammar does not carry."""
        extra = [f"micro-batch {self.micro_batch}"]
        if self.shard != "none":
            extra.append(self.shard + (" = train --shard dp" if self.shard == "zero3" else ""))
        if self.interleave > 1:
            extra.append(f"{self.interleave} virtual stages")
        return f"{self.name} ({', '.join(extra)})"

    def to_dict(self) -> dict:
        return {"name": self.name, "dp": self.dp, "cp": self.cp, "tp": self.tp, "pp": self.pp,
                "cp_impl": self.parallel.cp_impl if self.cp > 1 else None,
                "cp_layout": self.parallel.cp_layout if self.cp > 1 else None,
                "ulysses_size": self.parallel.ulysses_size, "sequence_parallel": self.parallel.sequence_parallel,
                "recompute": self.recompute, "shard": self.shard, "micro_batch": self.micro_batch,
                "interleave": self.interleave, "ep": self.parallel.ep,
                "moe_dispatch": self.parallel.moe_dispatch if self.parallel.ep > 1 else None}


def parse_plan(text: str, recompute: str | None = None, sequence_parallel: bool = False, shard: str = "none",
               micro_batch: int = 1) -> Plan:
    """'dp4xtp8xpp4', 'dp2xcp4:ring@block', ... -> Plan (ConfigError naming the grammar).

    recompute, sequence_parallel: the command line's --recompute and --sequence-parallel; they
    must not contradict the name's @attention/@block and +sp."""
    parts = text.strip().lower().split("@")
    axes, pp = [], 1
    for part in parts[0].split("x"):
        m = re.fullmatch(r"pp(\d+)", part)
        if m:
            pp = int(m.group(1))
        else:
            axes.append(part)
    bench_name = "x".join(axes) or "dp1"
    if len(parts) > 1:
        bench_name += "@" + "@".join(parts[1:])
    try:
        layout = parse_layout(bench_name)
    except ConfigError as e:
        raise ConfigError(f"{e}; pipeline stages: add ppN (e.g. dp4xtp8xpp4)") from None
    if layout.kind != "meshattn":
        raise ConfigError(f"layout {text!r}: the planner plans meshattn layouts (dp/cp/tp/pp axes), not {text!r}")
    named = {"none": "none", "attention": "selective", "block": "full"}[layout.checkpoint]
    if recompute is not None and layout.checkpoint != "none" and recompute_mode(recompute) != named:
        raise ConfigError(f"layout {text!r} says @{layout.checkpoint} but --recompute {recompute}; give one")
    par = layout.parallel
    if sequence_parallel and not par.sequence_parallel:
        par = dataclasses.replace(par, sequence_parallel=True)
    return Plan(par, pp=pp, recompute=recompute or named, shard=shard, micro_batch=micro_batch)


def check_plan(plan: Plan, model: ModelConfig, seq_len: int, global_batch: int, gpus: int) -> None:
    """ConfigError unless the plan can run this model and batch on `gpus` GPUs."""
    if plan.gpus != gpus:
        raise ConfigError(f"{plan.name} uses {plan.gpus} GPUs, not {gpus}; choose sizes whose product is {gpus}")
    plan.parallel.check_model(model)
    shared = model.n_shared_experts * model.expert_ffn  # the shared expert's columns, split over tp
    if model.is_moe and shared % plan.tp:
        raise ConfigError(f"{plan.name}: the shared expert's {shared} columns are not divisible by tp={plan.tp}; "
                          f"legal tp: {', '.join(str(t) for t in divisors(model.n_heads) if shared % t == 0)}")
    if model.n_layers % (plan.pp * plan.interleave):
        raise ConfigError(f"{plan.name}: n_layers={model.n_layers} is not divisible by pp={plan.pp}"
                          + (f" x {plan.interleave} virtual stages" if plan.interleave > 1 else ""))
    if plan.parallel.sequence_parallel and plan.tp == 1:
        raise ConfigError(f"{plan.name}: sequence parallelism needs tp > 1")
    unit = plan.parallel.seq_unit
    if seq_len % unit:
        raise ConfigError(f"{plan.name}: seq_len={seq_len} is not a multiple of {unit} (the cp layout's chunks"
                          + (", each split over tp" if plan.parallel.sequence_sharded else "") + ")")
    per_step = plan.dp * plan.micro_batch
    if global_batch % per_step:
        raise ConfigError(f"{plan.name}: global batch {global_batch} is not a multiple of dp x micro-batch = "
                          f"{plan.dp} x {plan.micro_batch}")


def enumerate_plans(model: ModelConfig, seq_len: int, global_batch: int, gpus: int, pipeline: bool = False,
                    recompute=RECOMPUTE_NAMES, sequence_parallel=(False, True), shards=SHARDS,
                    micro_batches=None, eps=None, dispatches=MoeDispatch.names()) -> list[Plan]:
    """Every valid plan for `gpus` GPUs: dp x cp x tp x pp = gpus (pp only where pipeline=True);
    each cp impl with the zigzag layout (causal balance; contiguous is never faster for causal
    attention) and every Ulysses group size of the hybrid; sequence parallelism where tp > 1;
    for an MoE model every expert-parallel size ep dividing both dp x cp x tp and n_experts (ep = 1:
    every rank holds every expert), each dispatch where ep > 1; each checkpointing mode and
    sharding; micro-batches dividing the batch per replica (default: powers of two up to 16, and
    the whole replica batch). eps: the ep sizes to consider (default: all)."""
    plans = []
    for tp in divisors(gpus):
        for cp in divisors(gpus // tp):
            for pp in divisors(gpus // (tp * cp)) if pipeline else [1]:
                dp = gpus // (tp * cp * pp)
                if global_batch % dp:
                    continue
                per_replica = global_batch // dp
                mbs = micro_batches or sorted({b for b in (1, 2, 4, 8, 16) if b <= per_replica} | {per_replica})
                meshes = _meshes(dp, cp, tp, sequence_parallel)
                for par in [e for m in meshes for e in _experts(model, m, eps, dispatches)]:
                    for rc in recompute:
                        for shard in shards if dp > 1 else ["none"]:
                            for mb in mbs:
                                plan = Plan(par, pp=pp, recompute=rc, shard=shard, micro_batch=mb)
                                try:
                                    check_plan(plan, model, seq_len, global_batch, gpus)
                                except ConfigError:
                                    continue
                                plans.append(plan)
    return plans


def _meshes(dp: int, cp: int, tp: int, sequence_parallel) -> list[ParallelConfig]:
    out = []
    impls = [(None, None)] if cp == 1 else [
        (impl.value, u) for impl in CpImpl
        for u in ([u for u in divisors(cp) if 1 < u < cp] if impl.needs_ulysses_size else [None])]
    for impl, u in impls:
        for sp in sequence_parallel if tp > 1 else [False]:
            extra = {} if impl is None else {"cp_impl": impl, "ulysses_size": u}
            out.append(ParallelConfig(dp=dp, cp=cp, tp=tp, sequence_parallel=sp, **extra))
    return out


def _experts(model: ModelConfig, par: ParallelConfig, eps, dispatches) -> list[ParallelConfig]:
    """`par` with each expert-parallel size and dispatch an MoE model allows (`par` itself for a
    dense model): ep dividing the world and n_experts (and in `eps`, if given); the dispatch only
    matters where ep > 1."""
    if not model.is_moe:
        return [par]
    sizes = [e for e in divisors(par.world_size) if model.n_experts % e == 0 and (eps is None or e in eps)]
    return [dataclasses.replace(par, ep=ep, moe_dispatch=d) for ep in sizes
            for d in (dispatches if ep > 1 else ["all_to_all"])]
