"""The bench's outputs: a terminal table, a JSON file and PNG plots (matplotlib, if installed)."""

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
    head = ["S", "layout", "ranks", "fwd+bwd ms (min-max)", "vs single", "tokens/s", "act MiB", "peak RSS MiB",
            "comm MiB/step", "imbal time/work", "|loss-ref|"]
    lines = []
    for r in results:
        if "skipped" in r:
            lines.append([str(r["seq_len"]), r["layout"], "-", "skipped: " + r["skipped"]] + [""] * 7)
            continue
        vs = f"{r['vs_single']:.2f}x" if "vs_single" in r else "-"
        if "vs_native" in r:
            vs += f" ({r['vs_native']:.2f}x native)"
        lines.append([
            str(r["seq_len"]), r["layout"], f"{r['world']}x{r['threads_per_rank']}t",
            f"{r['step_ms']:.0f} ({r['step_ms_min']:.0f}-{r['step_ms_max']:.0f})", vs, f"{r['tokens_per_s']:,.0f}",
            f"{r['activation_bytes'] / MiB:.1f}", f"{r['peak_rss'] / MiB:.0f}", _comm(r),
            f"{r['time_imbalance']:.2f}/{r['work_imbalance']:.2f}",
            f"{r['loss_delta']:.1e}" if "loss_delta" in r else "-"])
    widths = [max(len(head[i]), *(len(row[i]) for row in lines if not row[3].startswith("skipped")))
              if lines else len(head[i]) for i in range(len(head))]
    fmt = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
    out = [fmt(head), fmt(["-" * w for w in widths])]
    out += ["  ".join(row[:3]) + "  " + row[3] if row[3].startswith("skipped") else fmt(row) for row in lines]
    return "\n".join(out)


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
