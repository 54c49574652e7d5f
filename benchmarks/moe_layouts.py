"""Mixture-of-experts layouts side by side: `meshattn bench` on moe-tiny at world 4, and
`meshattn profile` of each expert-parallel layout for the share of the step spent moving tokens.

    python benchmarks/moe_layouts.py [--seq-len 512] [--batch-size 4] [--rounds 3]

Layouts (world 4): single (one process, all cores), dp4 (experts replicated: plain DDP),
dp4xep4 (experts split 2 per rank, all-to-all dispatch), dp4xep4:gather (all-gather dispatch,
reduce-scatter combine), dp2xtp2xep4 and dp2xcp2:ringxep4 (attention split over tp or cp, the
experts over all 4 ranks). bench runs the list `--rounds` times, alternating (the host is shared
and its speed drifts), and reports medians; ratios to single and to dp4 are taken within each
round, then the median over rounds.

Per layout, per rank (the worst rank): parameter bytes, activation bytes saved for backward,
peak resident memory; the experts' imbalance (busiest expert / mean, worst layer: a property of
the model and batch, alike in every layout) and the ranks' (busiest rank's computed slots / mean);
the share of the step in dispatch + combine and in the experts (forward and backward) from
bench's one profiled step per round, and from `meshattn profile` (--profile-steps steps, mean
over ranks) for the ep layouts.

Writes benchmarks/results/moe_layouts.md (and the raw bench.json and profile.json under --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

LAYOUTS = ["single", "dp4", "dp4xep4", "dp4xep4:gather", "dp2xtp2xep4", "dp2xcp2:ringxep4"]
OUT = Path(__file__).parent / "results" / "moe_layouts.md"
MiB = 2**20


def meshattn(*args: str) -> None:
    """Run the meshattn CLI (this interpreter), streaming its output; stop on failure."""
    cmd = [sys.executable, "-m", "meshattn", *args]
    print("$ meshattn " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True)


def bench(a, out: Path) -> list[dict]:
    meshattn("bench", "--preset", "moe-tiny", "--world", "4", "--layouts", *a.layouts, "--seq-len", str(a.seq_len),
             "--batch-size", str(a.batch_size), "--warmup", str(a.warmup), "--steps", str(a.steps), "--rounds",
             str(a.rounds), "--out", str(out), "--no-progress", "--no-plots")
    return json.loads((out / "bench.json").read_text())["results"]


def profile(a, layout: str, out: Path) -> dict:
    """Mean over ranks of the dispatch + combine and expert shares of a profiled step."""
    meshattn("profile", "--preset", "moe-tiny", "--layout", layout, "--seq-len", str(a.seq_len), "--batch-size",
             str(a.batch_size), "--warmup", str(a.warmup), "--steps", str(a.profile_steps), "--out", str(out))
    ranks = [r["moe"] for r in json.loads((out / "profile.json").read_text())["ranks"]]
    return {key: statistics.mean(t[key] for t in ranks) for key in ("comm_share", "experts_share")}


def ratio(row: dict, peer: dict | None) -> str:
    """Median over rounds of row / peer step time, each round against itself."""
    if peer is None:
        return "-"
    mine, theirs = row.get("step_ms_rounds", [row["step_ms"]]), peer.get("step_ms_rounds", [peer["step_ms"]])
    return f"{statistics.median(m / t for m, t in zip(mine, theirs)):.2f}x"


def table(results: list[dict], profiled: dict[str, dict]) -> list[str]:
    by_name = {r["layout"]: r for r in results if "skipped" not in r}
    single, dp4 = by_name.get("single"), by_name.get("dp4")
    lines = ["| layout | ranks | fwd+bwd ms, median (rounds) | min-max ms | vs single | vs dp4 | param MiB | "
             "act MiB | peak RSS MiB | imbalance experts / ranks | dispatch+combine / experts (bench) | "
             "dispatch+combine / experts (profile) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {r['layout']} | skipped: {r['skipped']} |" + " |" * 10)
            continue
        rounds = ", ".join(f"{v:.0f}" for v in r.get("step_ms_rounds", [r["step_ms"]]))
        shares = f"{r['comm_share']:.0%} / {r['experts_share']:.0%}" if "comm_share" in r else "-"
        p = profiled.get(r["layout"])
        prof = f"{p['comm_share']:.0%} / {p['experts_share']:.0%}" if p else "-"
        lines.append(f"| {r['layout']} | {r['world']}x{r['threads_per_rank']}t | {r['step_ms']:.0f} ({rounds}) | "
                     f"{r['step_ms_min']:.0f}-{r['step_ms_max']:.0f} | {ratio(r, single)} | {ratio(r, dp4)} | "
                     f"{r['param_bytes'] / MiB:.2f} | {r['activation_bytes'] / MiB:.1f} | {r['peak_rss'] / MiB:.0f} | "
                     f"{r['expert_imbalance']:.2f} / {r['rank_imbalance']:.2f} | {shares} | {prof} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layouts", nargs="+", default=LAYOUTS)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per layout per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profile-steps", type=int, default=2, help="profiled steps per ep layout (0: no profile runs)")
    ap.add_argument("--out", default="runs/moe_layouts", help="folder for bench.json and the profiles")
    ap.add_argument("--md", default=str(OUT), help="where the Markdown table goes")
    a = ap.parse_args()
    out = Path(a.out)
    start, load = time.time(), os.getloadavg()[0]
    results = bench(a, out / "bench")
    profiled = {}
    if a.profile_steps:
        for name in (n for n in a.layouts if "ep" in n):
            profiled[name] = profile(a, name, out / ("profile-" + name.replace(":", "-")))
    command = "python benchmarks/moe_layouts.py " + " ".join(sys.argv[1:])
    md = [f"Command: `{command.strip()}`  ",
          f"Machine: {os.cpu_count()} CPU cores ({platform.machine()}), gloo, torch {torch.__version__}; load "
          f"average {load:.1f} at the start; {time.time() - start:.0f} s in all  ",
          f"moe-tiny (8 experts of 128, top-2, one shared expert; blocks 1-3 MoE), batch {a.batch_size} x "
          f"{a.seq_len} tokens, float32; {a.warmup} warm-up + {a.steps} timed fwd+bwd steps per layout per round, "
          f"{a.rounds} rounds alternating; memory per rank (the worst rank)", "",
          *table(results, profiled)]
    Path(a.md).parent.mkdir(parents=True, exist_ok=True)
    Path(a.md).write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"wrote {a.md}")


if __name__ == "__main__":
    main()
