"""The outputs of bench and profile: terminal tables, a JSON file and PNG plots (matplotlib, if
installed). For a mixture of experts the bench table gains the routing imbalance and the MoE time
shares, and profile prints and plots the tokens per expert and each rank's MoE time."""

from __future__ import annotations

import json
from pathlib import Path

MiB = 2**20

_SHORT = {"all_reduce": "AR", "all_gather": "AG", "reduce_scatter": "RS", "all_to_all": "A2A", "send_recv": "P2P"}


def _comm(r: dict) -> str:
    if r["comm_bytes"]:
        return " ".join(f"{_SHORT.get(k, k)} {v / MiB:.1f}" for k, v in r["comm_bytes"].items() if v)
    calls = r.get("comm_calls") or {}
    return " ".join(f"{k} x{v}" for k, v in calls.items()) + (" (calls)" if calls else "") or "-"


def table(results: list[dict]) -> str:
    moe = any("expert_imbalance" in r for r in results)
    head = ["S", "layout", "ranks", "fwd+bwd ms (min-max)", "vs single", "tokens/s", "param MiB", "act MiB",
            "peak RSS MiB", "comm MiB/step", "imbal time/work", "|loss-ref|"]
    head += ["imbal experts/ranks", "disp+comb/experts"] if moe else []
    lines = []
    for r in results:
        if "skipped" in r:
            lines.append([str(r["seq_len"]), r["layout"], "-", "skipped: " + r["skipped"]] + [""] * (len(head) - 4))
            continue
        vs = f"{r['vs_single']:.2f}x" if "vs_single" in r else "-"
        if "vs_native" in r:
            vs += f" ({r['vs_native']:.2f}x native)"
        lines.append([
            str(r["seq_len"]), r["layout"], f"{r['world']}x{r['threads_per_rank']}t",
            f"{r['step_ms']:.0f} ({r['step_ms_min']:.0f}-{r['step_ms_max']:.0f})", vs, f"{r['tokens_per_s']:,.0f}",
            f"{r['param_bytes'] / MiB:.1f}", f"{r['activation_bytes'] / MiB:.1f}", f"{r['peak_rss'] / MiB:.0f}",
            _comm(r), f"{r['time_imbalance']:.2f}/{r['work_imbalance']:.2f}",
            f"{r['loss_delta']:.1e}" if "loss_delta" in r else "-"] + (_moe_cells(r) if moe else []))
    widths = [max(len(head[i]), *(len(row[i]) for row in lines if not row[3].startswith("skipped")))
              if lines else len(head[i]) for i in range(len(head))]
    fmt = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
    out = [fmt(head), fmt(["-" * w for w in widths])]
    out += ["  ".join(row[:3]) + "  " + row[3] if row[3].startswith("skipped") else fmt(row) for row in lines]
    return "\n".join(out)


def _moe_cells(r: dict) -> list[str]:
    """imbalance of experts / of ranks; the step's shares in dispatch+combine / in the experts."""
    if "expert_imbalance" not in r:
        return ["-", "-"]
    shares = f"{r['comm_share']:.0%}/{r['experts_share']:.0%}" if "comm_share" in r else "-"
    return [f"{r['expert_imbalance']:.2f}/{r['rank_imbalance']:.2f}", shares]


def native_ratios(results: list[dict]) -> list[str]:
    return [f"S={r['seq_len']}: meshattn {r['layout']} / PyTorch {r['native']} (DTensor) fwd+bwd step time = "
            f"{r['vs_native']:.2f}" + (" (rounds: " + ", ".join(f"{v:.2f}" for v in r["vs_native_rounds"]) + ")"
                                       if "vs_native_rounds" in r else "")
            for r in results if "vs_native" in r]


def write_json(results: list[dict], meta: dict, path: Path) -> None:
    path.write_text(json.dumps({"meta": meta, "results": results}, indent=2))


def plot(results: list[dict], out: Path, title: str) -> list[Path]:
    """bench_S<seq>.png per sequence length (time and memory per layout) and, with several
    sequence lengths, bench_scaling.png (step time against sequence length per layout)."""
    try:
        import matplotlib
    except ImportError:
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results if "skipped" not in r]
    written = []
    for seq in sorted({r["seq_len"] for r in rows}):
        sel = [r for r in rows if r["seq_len"] == seq]
        names = [r["layout"] for r in sel]
        x = range(len(sel))
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(max(8, 1.1 * len(sel) + 4), 4.5))
        colors = ["tab:gray" if r["kind"] == "single" else "tab:orange" if r["kind"] == "native" else "tab:blue"
                  for r in sel]
        err = [[r["step_ms"] - r["step_ms_min"] for r in sel], [r["step_ms_max"] - r["step_ms"] for r in sel]]
        ax_t.bar(x, [r["step_ms"] for r in sel], yerr=err, color=colors, capsize=3)
        ax_t.set_ylabel("fwd+bwd step, ms (median, min-max)")
        ax_t.set_title("step time (gray: one process, orange: PyTorch DTensor TP)", fontsize=9)
        w = 0.4
        ax_m.bar([i - w / 2 for i in x], [r["activation_bytes"] / MiB for r in sel], w, label="saved activations")
        ax_m.bar([i + w / 2 for i in x], [r["peak_rss"] / MiB for r in sel], w, label="peak resident (total)")
        ax_m.set_ylabel("MiB per rank")
        ax_m.set_title("memory per rank", fontsize=9)
        ax_m.legend(fontsize=8)
        for ax in (ax_t, ax_m):
            ax.set_xticks(list(x), names, rotation=35, ha="right", fontsize=8)
        fig.suptitle(f"{title}, sequence {seq}", fontsize=10)
        fig.tight_layout()
        path = out / f"bench_S{seq}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    seqs = sorted({r["seq_len"] for r in rows})
    if len(seqs) > 1:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name in dict.fromkeys(r["layout"] for r in rows):
            pts = sorted((r["seq_len"], r["step_ms"]) for r in rows if r["layout"] == name)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name,
                    linestyle="--" if name == "single" or name.startswith("native") else "-")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_ylabel("fwd+bwd step, ms")
        ax.set_title(f"{title}: scaling with sequence length", fontsize=10)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = out / "bench_scaling.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# -- profile

def profile_text(s: dict) -> str:
    """profile.json's per-rank compute/communication split, and the MoE section if there is one."""
    lines = ["rank  step ms  compute ms  comm ms  hidden  exposed comm ms  other ms  load"]
    for r, load in zip(s["ranks"], s["relative_load"]):
        lines.append(f"{r['rank']:>4}  {r['step_s'] * 1e3:7.1f}  {r['compute_s'] * 1e3:10.1f}  "
                     f"{r['comm_s'] * 1e3:7.1f}  {r['hidden_share']:6.0%}  {r['exposed_comm_s'] * 1e3:15.1f}  "
                     f"{r['other_s'] * 1e3:8.1f}  {load:4.2f}")
    lines.append(f"load imbalance (max-min)/mean {s['load_imbalance']:.3f}, parallel efficiency min/max "
                 f"{s['efficiency']:.3f}, slowest rank {s['slowest_rank']}")
    return "\n".join(lines + (moe_profile_text(s) if "moe" in s else []))


def moe_profile_text(s: dict) -> list[str]:
    """Tokens per expert per MoE block (last profiled step), the slots each rank's experts
    computed, and each rank's time in dispatch, experts and combine (forward/backward)."""
    m = s["moe"]
    blocks = m["blocks"]
    lines = [f"MoE blocks {', '.join(map(str, blocks))}: {m['n_experts']} experts, top-{m['top_k']}, "
             f"{m['tokens']} tokens per step; tokens per expert (last step; the busiest over the mean "
             f"{m['expert_imbalance']:.2f}, worst block):"]
    lines += [f"  block {b}: " + " ".join(f"{c:>4}" for c in counts) for b, counts in zip(blocks, m["expert_counts"])]
    lines.append("rank  slots its experts computed, per block  (max/mean over ranks: "
                 + " ".join(f"{x:.2f}" for x in m["rank_imbalance"]) + ")")
    lines += [f"{rank:>4}  " + " ".join(f"{c:>5}" for c in got) for rank, got in enumerate(m["received"])]
    timed = [r for r in s["ranks"] if "moe" in r]
    if timed:
        lines.append("rank  dispatch ms fwd/bwd  experts ms fwd/bwd  combine ms fwd/bwd  rest ms  dispatch+combine")
        for r in timed:
            t = r["moe"]
            cells = [f"{t[f'{k}_s'] * 1e3:.1f}/{t[f'{k}_bwd_s'] * 1e3:.1f}" for k in ("dispatch", "experts", "combine")]
            lines.append(f"{r['rank']:>4}  {cells[0]:>19}  {cells[1]:>18}  {cells[2]:>18}  {t['rest_s'] * 1e3:7.1f}  "
                         f"{t['comm_share']:16.0%}")
    return lines


def plot_moe_profile(s: dict, path: Path) -> Path | None:
    """profile_moe.png: tokens per expert per MoE block, the slots each rank's experts computed
    per block, and each rank's step split into dispatch+combine, experts (forward, backward) and
    the rest. None without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m, ranks = s["moe"], [r for r in s["ranks"] if "moe" in r]
    fig, axes = plt.subplots(1, 3 if ranks else 2, figsize=(15 if ranks else 10, 4.5))
    _grouped(axes[0], m["expert_counts"], [f"block {b}" for b in m["blocks"]], "expert",
             "tokens routed (slots)", f"tokens per expert (top-{m['top_k']})")
    axes[0].axhline(m["tokens"] * m["top_k"] / m["n_experts"], color="k", linestyle=":", linewidth=1,
                    label="uniform")
    axes[0].legend(fontsize=7)
    _grouped(axes[1], [list(c) for c in zip(*m["received"])], [f"block {b}" for b in m["blocks"]], "rank",
             "slots computed", "slots each rank's experts computed")
    if ranks:
        _moe_time_bars(axes[2], ranks)
    fig.suptitle(f"{s['layout']}: mixture of experts, {s['steps']} profiled steps", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _grouped(ax, series: list[list[float]], labels: list[str], xlabel: str, ylabel: str, title: str) -> None:
    """One bar group per x position (0..n-1), one bar per series."""
    w = 0.8 / len(series)
    for i, (values, label) in enumerate(zip(series, labels)):
        ax.bar([x - 0.4 + w * (i + 0.5) for x in range(len(values))], values, w, label=label)
    ax.set_xticks(range(len(series[0])))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)


def _moe_time_bars(ax, ranks: list[dict]) -> None:
    """Per rank, a stacked bar of the step (ms): dispatch+combine fwd/bwd, experts fwd/bwd, the rest."""
    parts = [("dispatch+combine fwd", lambda t: t["dispatch_s"] + t["combine_s"], "tab:red"),
             ("dispatch+combine bwd", lambda t: t["dispatch_bwd_s"] + t["combine_bwd_s"], "salmon"),
             ("experts fwd", lambda t: t["experts_s"], "tab:blue"),
             ("experts bwd", lambda t: t["experts_bwd_s"], "lightsteelblue"),
             ("rest of the step", lambda t: t["rest_s"], "lightgray")]
    x = [r["rank"] for r in ranks]
    bottom = [0.0] * len(ranks)
    for label, value, color in parts:
        heights = [value(r["moe"]) * 1e3 for r in ranks]
        ax.bar(x, heights, 0.6, bottom=bottom, label=label, color=color)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_xticks(x)
    ax.set_xlabel("rank")
    ax.set_ylabel("ms per step")
    ax.set_title("where each rank's step goes", fontsize=9)
    ax.legend(fontsize=7)
