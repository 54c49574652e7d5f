"""`meshattn bench`: every layout in fresh worker processes, summarised per (sequence, layout).

Summary of one layout (all per rank, the worst rank where ranks differ):
    step_ms        median fwd+bwd step time (each step's time is its slowest rank's), with min and max
    tokens_per_s   global batch tokens / median step
    vs_single      median step / the single-process reference's at the same sequence length
    activation_bytes, peak_rss   saved-for-backward bytes of one step; peak resident memory
    comm_bytes     bytes per step by collective kind (meshattn's byte counter)
    time_imbalance max / mean of the ranks' median step times
    work_imbalance max / mean of the ranks' causal attention FLOPs (context parallelism)
    loss_delta     |first loss - the reference's| (every layout computes the same model)
For a mixture of experts (bench/moe.py):
    expert_imbalance, rank_imbalance   the busiest expert's slots over the mean (worst layer);
                   max / mean over ranks of the slots each rank's experts computed (worst layer)
    expert_counts  tokens per expert per MoE layer (the last timed step's batch)
    comm_share, experts_share   dispatch + combine, and the experts, forward and backward, as
                   shares of one profiled step (mean over ranks; meshattn layouts only)
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import tempfile
from pathlib import Path

from ..config import ConfigError, ModelConfig
from ..launch import launch
from ..parallel.balance import causal_work, imbalance
from .layouts import Layout, check_layout, layout_to_dict, parse_layout
from .moe import summary as moe_summary


def _launch(layout: Layout, cfg_dict: dict, warmup: int, steps: int, backend: str | None, timeout_s: float,
            log_dir: Path | None) -> list:
    from .worker import measure

    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        launch(measure, layout.world, args=(layout_to_dict(layout), cfg_dict, warmup, steps, f.name),
               env={}, backend=backend, timeout_s=timeout_s, log_dir=log_dir)
        return json.loads(Path(f.name).read_text())


def summarize(layout: Layout, seq_len: int, batch_size: int, rows: list[dict]) -> dict:
    per_step = [max(ts) for ts in zip(*(r["times"] for r in rows))]  # the slowest rank sets each step
    median = statistics.median(per_step)
    rank_medians = [statistics.median(r["times"]) for r in rows]
    par = layout.parallel
    work = causal_work(par.cp_layout, par.cp, seq_len) if par.cp > 1 else [1.0]
    kinds = sorted({k for r in rows for k in r["comm_bytes"]})
    return {
        "layout": layout.name, "kind": layout.kind, "world": layout.world, "seq_len": seq_len,
        "batch_size": batch_size, "threads_per_rank": rows[0]["threads"],
        "step_ms": median * 1e3, "step_ms_min": min(per_step) * 1e3, "step_ms_max": max(per_step) * 1e3,
        "tokens_per_s": batch_size * seq_len / median,
        "activation_bytes": max(r["saved_activation_bytes"] for r in rows),
        "param_bytes": max(r["param_bytes"] for r in rows),
        "peak_rss": max(r["peak_rss"] for r in rows),
        "comm_bytes": {k: max(r["comm_bytes"].get(k, 0) for r in rows) for k in kinds},
        "comm_calls": rows[0]["comm_calls"],
        "time_imbalance": max(rank_medians) / statistics.mean(rank_medians),
        "work_imbalance": imbalance(work),
        "first_loss": rows[0]["first_loss"],
        **_moe_fields(rows),
    }


def _moe_fields(rows: list[dict]) -> dict:
    """The routing and the MoE time split of a mixture of experts' rows (empty for a dense model)."""
    if "moe" not in rows[0]:
        return {}
    s = moe_summary([r["moe"] for r in rows])
    out = {"expert_imbalance": s["expert_imbalance"], "rank_imbalance": s["rank_imbalance_max"],
           "expert_counts": s["expert_counts"]}
    if "moe_time" in rows[0]:
        for key in ("comm_share", "experts_share"):
            out[key] = statistics.mean(r["moe_time"][key] for r in rows)
    return out


def add_comparisons(results: list[dict]) -> None:
    """vs_single and loss_delta against the single-process row of the same sequence length;
    vs_native for meshattn rows against their PyTorch-native peer (Layout.native_peer)."""
    by_seq: dict[int, dict[str, dict]] = {}
    for r in results:
        if "skipped" not in r:
            by_seq.setdefault(r["seq_len"], {})[r["layout"]] = r
    for rows in by_seq.values():
        single = rows.get("single")
        for r in rows.values():
            if single is not None:
                r["vs_single"] = r["step_ms"] / single["step_ms"]
                r["loss_delta"] = abs(r["first_loss"] - single["first_loss"])
            peer = parse_layout(r["layout"]).native_peer
            native = rows.get(peer) if peer else None
            if native is not None:
                r["vs_native"], r["native"] = r["step_ms"] / native["step_ms"], native["layout"]


def merge_rounds(rounds: list[list[dict]]) -> list[dict]:
    """One row per (sequence, layout): medians over rounds of the step time, of the ratios
    (each ratio taken within its round, against peers measured minutes apart at most) and of
    the MoE time shares; the min-max of the step time over every step of every round; the
    rounds' values kept."""
    merged = []
    for rows in zip(*rounds):
        first = dict(rows[0])
        if "skipped" in first or len(rows) == 1:
            merged.append(first)
            continue
        for key in ("step_ms", "vs_single", "vs_native", "tokens_per_s", "comm_share", "experts_share"):
            values = [r[key] for r in rows if key in r]
            if values:
                first[key] = statistics.median(values)
                first[f"{key}_rounds"] = values
        first["step_ms_min"] = min(r["step_ms_min"] for r in rows)
        first["step_ms_max"] = max(r["step_ms_max"] for r in rows)
        first["peak_rss"] = max(r["peak_rss"] for r in rows)
        merged.append(first)
    return merged


def run_bench(model: ModelConfig, layouts: list[Layout], seq_lens: list[int], batch_size: int, warmup: int,
              steps: int, dtype: str = "float32", backend: str | None = None, timeout_s: float = 300.0,
              progress: bool = True, data: str | None = None, rounds: int = 1,
              log_dir: Path | None = None) -> list[dict]:
    """Every (sequence length, layout) in fresh workers, `rounds` times over (alternating, so a
    drift in the machine's load hits every layout alike). A failed layout's tracebacks go to
    log_dir (see launch)."""
    from tqdm import tqdm

    jobs = [(s, layout) for s in seq_lens for layout in layouts]
    bar = tqdm(total=len(jobs) * rounds, desc="meshattn bench", unit="layout", disable=not progress,
               dynamic_ncols=True)
    per_round = []
    for round_ in range(rounds):
        results = []
        for seq_len, layout in jobs:
            bar.set_postfix_str(f"round {round_ + 1}/{rounds} S={seq_len} {layout.name}")
            try:
                cfg = dataclasses.replace(check_layout(layout, model, batch_size, seq_len), dtype=dtype, data=data)
            except ConfigError as e:
                results.append({"layout": layout.name, "seq_len": seq_len, "skipped": str(e)})
            else:
                rows = _launch(layout, cfg.to_dict(), warmup, steps, backend, timeout_s, log_dir)
                results.append(summarize(layout, seq_len, batch_size, rows))
            bar.update()
        add_comparisons(results)
        per_round.append(results)
    bar.close()
    return merge_rounds(per_round)
