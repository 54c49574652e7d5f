"""Compute vs communication on one rank's profiler timeline.

From torch.profiler events of one rank: communication intervals are the process group's work
items ("gloo:*" / "nccl:*" events, which span a collective from start to completion, on
whichever thread runs it); compute intervals are the aten operators on the training thread.
Both are merged into disjoint intervals, so nested or parallel events count once.

    comm_s     time some collective was in flight
    compute_s  time the training thread spent inside aten operators
    hidden_s   comm time during which the training thread was computing (overlapped)
    hidden_share = hidden_s / comm_s
"""

from __future__ import annotations

COMM_PREFIXES = ("gloo:", "nccl:")


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
