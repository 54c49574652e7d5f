"""Compute vs communication on one rank's profiler timeline.

From torch.profiler events of one rank: communication intervals are the process group's work
items ("gloo:*" / "nccl:*" events, which span a collective from start to completion, on
whichever thread runs it); compute intervals are the aten operators on the training thread.
Both are merged into disjoint intervals, so nested or parallel events count once.

    comm_s     time some collective was in flight
    compute_s  time the training thread spent inside aten operators
    hidden_s   comm time during which the training thread was computing (overlapped)
    hidden_share = hidden_s / comm_s

For a mixture of experts (`moe_split`), the time inside the MoE layer's profiler ranges
moe.dispatch, moe.experts and moe.combine (parallel/moe.py), in forward and in backward. The
ranges mark forward code only; backward work is found through autograd's sequence numbers: an op
that records an autograd node in forward carries the node's number, and the backward event
`autograd::engine::evaluate_function: <Node>` carries it too (backward events name the forward
thread, `fwd_thread`; forward ops do not). The node belongs to the range that holds the last
forward op with its number (the op that created it: ops before it with the same number created
nothing), so the dispatch's backward is the adjoint of its all-to-all (or the reduce-scatter of
its all-gather) and the backward of its row gather; the experts' backward includes the sum of
their weight gradients over the experts' copies (edp). Under activation checkpointing the
recomputed forward counts as forward.
"""

from __future__ import annotations

import bisect

COMM_PREFIXES = ("gloo:", "nccl:")
MOE_RANGES = ("moe.dispatch", "moe.experts", "moe.combine")
BACKWARD_PREFIX = "autograd::engine::evaluate_function:"


def union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Disjoint, sorted intervals covering the same time."""
    merged: list[tuple[float, float]] = []
    for a, b in sorted(intervals):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def length(intervals: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in intervals)


def intersect(x: list[tuple[float, float]], y: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Intersection of two disjoint sorted interval lists."""
    out, i, j = [], 0, 0
    while i < len(x) and j < len(y):
        a, b = max(x[i][0], y[j][0]), min(x[i][1], y[j][1])
        if a < b:
            out.append((a, b))
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return out


def covers(intervals: list[tuple[float, float]], t: float) -> bool:
    """Whether time t lies in one of the disjoint sorted intervals."""
    i = bisect.bisect_right(intervals, (t, float("inf"))) - 1
    return i >= 0 and intervals[i][0] <= t <= intervals[i][1]


def analyse(events, step_name: str) -> dict:
    """events: (name, thread, start_us, end_us) tuples of one rank -> seconds per step."""
    steps = [(s, e) for n, _, s, e in events if n == step_name]
    if not steps:
        raise ValueError(f"no {step_name!r} events in the trace")
    main = next(t for n, t, _, _ in events if n == step_name)
    window = union(steps)
    comm = intersect(union([(s, e) for n, _, s, e in events if n.startswith(COMM_PREFIXES)]), window)
    compute = intersect(union([(s, e) for n, t, s, e in events
                               if t == main and n.startswith("aten::")]), window)
    n = len(steps)
    comm_s, compute_s = length(comm) / 1e6 / n, length(compute) / 1e6 / n
    hidden_s = length(intersect(comm, compute)) / 1e6 / n
    step_s = length(window) / 1e6 / n
    return {"step_s": step_s, "compute_s": compute_s, "comm_s": comm_s, "hidden_s": hidden_s,
            "exposed_comm_s": comm_s - hidden_s, "hidden_share": hidden_s / comm_s if comm_s else 0.0,
            "other_s": max(step_s - compute_s - (comm_s - hidden_s), 0.0)}


def balance(compute_s: list[float]) -> dict:
    """Load balance over ranks' compute times (seed 002's analysis): imbalance (max - min) / mean,
    parallel efficiency min / max, each rank's load relative to the mean, and the slowest rank."""
    mean = sum(compute_s) / len(compute_s)
    return {"load_imbalance": (max(compute_s) - min(compute_s)) / mean, "efficiency": min(compute_s) / max(compute_s),
            "relative_load": [c / mean for c in compute_s], "slowest_rank": max(range(len(compute_s)),
                                                                               key=compute_s.__getitem__)}


def moe_split(events, step_name: str) -> dict:
    """events: (name, thread, start_us, end_us, sequence_nr, fwd_thread) tuples of one rank ->
    seconds per step in each MoE range, forward (<range>_s) and backward (<range>_bwd_s), the
    step (step_s), the rest of it (rest_s), and comm_share / experts_share: dispatch + combine
    and the experts, forward and backward, over the step."""
    steps = union([(s, e) for n, _, s, e, _, _ in events if n == step_name])
    if not steps:
        raise ValueError(f"no {step_name!r} events in the trace")
    backward = [(s, e, q) for n, _, s, e, q, _ in events if n.startswith(BACKWARD_PREFIX)]
    created: dict[int, float] = {}  # autograd node number -> start of the last forward op carrying it
    for n, _, s, _, q, fwd_thread in sorted(events, key=lambda ev: ev[2]):
        if q is not None and q >= 0 and not fwd_thread and not n.startswith(BACKWARD_PREFIX):
            created[q] = s
    n_steps = len(steps)
    out: dict[str, float] = {"step_s": length(steps) / 1e6 / n_steps}
    for name in MOE_RANGES:
        spans = union([(s, e) for n, _, s, e, _, _ in events if n == name])
        bwd = union([(s, e) for s, e, q in backward if q in created and covers(spans, created[q])])
        key = name.removeprefix("moe.")
        out[f"{key}_s"] = length(intersect(spans, steps)) / 1e6 / n_steps
        out[f"{key}_bwd_s"] = length(intersect(bwd, steps)) / 1e6 / n_steps
    comm = sum(out[f"{k}_s"] + out[f"{k}_bwd_s"] for k in ("dispatch", "combine"))
    experts = out["experts_s"] + out["experts_bwd_s"]
    out["rest_s"] = max(out["step_s"] - comm - experts, 0.0)
    out["comm_share"], out["experts_share"] = comm / out["step_s"], experts / out["step_s"]
    return out
