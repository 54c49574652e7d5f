"""What `meshattn plan` prints and draws: the ranked table with each candidate's breakdown, one
plan's memory budget, and stacked time and memory bars for the top candidates (PNG)."""

from __future__ import annotations

from pathlib import Path

from .estimate import GIB, Estimate

TIME_PARTS = ("compute", "tp", "cp", "ep", "pipeline", "dp", "optimizer")  # "ep": MoE models only
MEMORY_PARTS = ("weights", "gradients", "optimizer", "activations", "buffers")
_TIME_HEADS = {"pipeline": "pipe", "optimizer": "optim"}  # table headings where shorter than the part


def _ms(s: float) -> str:
    return f"{s * 1e3:.4g}"


def ranking_text(estimates: list[Estimate], top: int, cluster: str, searched: int | None = None) -> str:
    """The table of the first `top` estimates; an MoE model's adds the ep column (dispatch and
    combine) and a line on what its figures assume."""
    moe = any(e.moe for e in estimates[:top])
    parts = [k for k in TIME_PARTS if k != "ep" or moe]
    head = ["#", "layout", "step ms", *(_TIME_HEADS.get(k, k) for k in parts), "TFLOP/s/GPU", "MFU",
            "W+G+O GiB", "act GiB", "buf GiB", "total GiB", "fits"]
    rows = []
    for i, e in enumerate(estimates[:top], 1):
        m, t = e.memory_bytes, e.time_s
        rows.append([str(i), e.plan.describe(), _ms(e.step_time_s), *(_ms(t.get(k, 0.0)) for k in parts),
                     f"{e.tflops_per_gpu:.1f}", f"{e.mfu:.1%}",
                     f"{(m['weights'] + m['gradients'] + m['optimizer']) / GIB:.2f}", f"{m['activations'] / GIB:.2f}",
                     f"{m['buffers'] / GIB:.2f}", f"{m['total'] / GIB:.2f}/{e.capacity_bytes / GIB:.0f}",
                     "yes" if e.fits else "NO"])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    fmt = lambda row: "  ".join(c.rjust(w) if i != 1 else c.ljust(w)  # noqa: E731
                                for i, (c, w) in enumerate(zip(row, widths))).rstrip()
    title = f"meshattn plan on {cluster}" + (f": {searched} valid plans, {len(estimates)} fit" if searched else "")
    lines = [title, fmt(head), fmt(["-" * w for w in widths]), *map(fmt, rows)]
    return "\n".join(lines + ([moe_note(estimates[0])] if moe else []))


def moe_note(e: Estimate) -> str:
    """What an MoE plan's figures assume: the imbalance, and where the expert traffic is counted."""
    x = e.moe["expert_imbalance"]
    return (f"MoE: epN = N consecutive ranks split the experts (ep1: every rank holds all); column ep = dispatch and "
            f"combine (:gather = all-gather/reduce-scatter) with the expert counts' all-reduce; expert gradients over "
            f"the world/ep replicas are in dp. The busiest ep rank is assumed to receive and compute {x:g}x the mean "
            f"routed rows (--expert-imbalance; 1 = balanced)")


def budget_text(e: Estimate, largest_micro_batch: int, longest_seq: int) -> str:
    m = e.memory_bytes
    lines = [f"memory per GPU of {e.plan.describe()} (capacity {e.capacity_bytes / GIB:.2f} GiB usable):"]
    for k in MEMORY_PARTS:
        lines.append(f"  {k:<12} {m[k] / GIB:10.3f} GiB  {m[k] / e.capacity_bytes:6.1%}")
    lines.append(f"  {'total':<12} {m['total'] / GIB:10.3f} GiB  {m['total'] / e.capacity_bytes:6.1%}"
                 f"  {'fits' if e.fits else 'DOES NOT FIT'}")
    if e.moe:
        lines.append(f"of weights, gradients and optimizer state, {e.moe['expert_state_bytes'] / GIB:.3f} GiB are the "
                     f"routed experts ({e.moe['experts_per_rank']} per MoE layer on this GPU)")
    lines.append(f"largest micro-batch that fits: {largest_micro_batch or 'none'}; longest sequence at micro-batch "
                 f"{e.plan.micro_batch}: {longest_seq or 'none'} tokens")
    lines.append(f"predicted step {_ms(e.step_time_s)} ms, {e.tflops_per_gpu:.1f} TFLOP/s per GPU, MFU {e.mfu:.1%}")
    if e.moe:
        lines.append(moe_note(e))
    return "\n".join(lines)


def plot(estimates: list[Estimate], path: Path) -> Path | None:
    """Stacked step-time parts and memory parts per candidate, the memory capacity as a line."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [e.plan.describe().replace(" (", "\n(") for e in estimates]
    x = list(range(len(estimates)))
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(max(9, 1.6 * len(estimates) + 5), 5))
    for ax, parts, value, unit in ((ax_t, TIME_PARTS, lambda e, k: e.time_s.get(k, 0.0) * 1e3, "ms per step"),
                                   (ax_m, MEMORY_PARTS, lambda e, k: e.memory_bytes[k] / GIB, "GiB per GPU")):
        bottom = [0.0] * len(estimates)
        for k in parts:
            heights = [value(e, k) for e in estimates]  # (0 where a part does not apply)
            if any(heights):
                ax.bar(x, heights, bottom=bottom, label=k)
                bottom = [b + h for b, h in zip(bottom, heights)]
        ax.set_ylabel(unit)
        ax.set_xticks(x, names, rotation=30, ha="right", fontsize=7)
        ax.legend(fontsize=8)
    ax_m.axhline(estimates[0].capacity_bytes / GIB, color="red", linestyle="--", linewidth=1, label="capacity")
    ax_t.set_title("predicted step time", fontsize=9)
    ax_m.set_title("predicted memory per GPU (dashed: usable capacity)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
