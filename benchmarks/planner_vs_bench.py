"""Predicted vs measured on this machine: the planner (after calibration) against `meshattn bench`
for every layout bench runs at world 2 and 4.

    python benchmarks/planner_vs_bench.py [--rounds 2] [--seq-len 512] [--batch-size 4]

Each of `--rounds` rounds (the host is shared: its speed drifts by 2x within minutes, so a
prediction is only compared with measurements taken next to its calibration):
1. calibrate this machine (planner/calibrate.py);
2. `meshattn bench`'s default layouts at world 2 and world 4 (every valid dp x cp x tp, each cp
   impl, zigzag) on its default model;
3. for each meshattn layout, the planner's estimate of the same step on HostCluster(world):
   forward + backward time (the optimizer is not in bench's timed step), the activations saved
   for backward (bench counts them exactly, per rank), the weights (exact).
4. The planner's first choice among the layouts bench ran, against the measured top two.
Per layout the table gives the medians over rounds of the measured time and of the round's ratio.

Writes benchmarks/results/planner_vs_bench.json and prints Markdown tables for BENCHMARKS.md.
Thresholds (issue 12): memory within 15%, step time within 30%, first choice in the measured top two.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
from pathlib import Path

from meshattn.bench import default_layouts, run_bench
from meshattn.config import PRESETS
from meshattn.planner import calibrate
from meshattn.planner.cluster import HostCluster
from meshattn.planner.estimate import Job, estimate
from meshattn.planner.layout import parse_plan
from meshattn.planner.stack import MESHATTN_FP32

OUT = Path(__file__).parent / "results" / "planner_vs_bench.json"


def compare(results: list[dict], cal, model, batch: int, seq: int, world: int) -> list[dict]:
    cluster = HostCluster(cal, world)
    rows = []
    for r in results:
        if r.get("kind") != "meshattn" or "skipped" in r:
            continue
        plan = parse_plan(r["layout"])
        plan = type(plan)(plan.parallel, micro_batch=batch // plan.dp)
        e = estimate(model, Job(seq, batch), plan, cluster, MESHATTN_FP32)
        predicted_s = e.step_time_s - e.time_s["optimizer"]
        rows.append({
            "world": world, "layout": r["layout"], "measured_ms": r["step_ms"],
            "measured_ms_rounds": r.get("step_ms_rounds", [r["step_ms"]]), "predicted_ms": predicted_s * 1e3,
            "time_ratio": predicted_s * 1e3 / r["step_ms"],
            "measured_activation_bytes": r["activation_bytes"],
            "predicted_activation_bytes": e.memory_bytes["activations"],
            "activation_ratio": e.memory_bytes["activations"] / r["activation_bytes"],
            "measured_param_bytes": r["param_bytes"], "predicted_weight_bytes": e.memory_bytes["weights"],
            "predicted_buffer_bytes": e.memory_bytes["buffers"],
            "parts_ms": {k: v * 1e3 for k, v in e.time_s.items()},
        })
    by_measured = sorted(rows, key=lambda x: x["measured_ms"])
    by_predicted = sorted(rows, key=lambda x: x["predicted_ms"])
    for x in rows:
        x["measured_rank"] = by_measured.index(x) + 1
        x["predicted_rank"] = by_predicted.index(x) + 1
    return rows


def merge(per_round: list[list[dict]]) -> list[dict]:
    """One row per (world, layout): medians over rounds of the times and of each round's ratio."""
    rows = []
    for same in zip(*per_round):
        row = dict(same[0])
        for key in ("measured_ms", "predicted_ms", "time_ratio"):
            row[key] = statistics.median(r[key] for r in same)
            row[key + "_rounds"] = [r[key] for r in same]
        rows.append(row)
    for world in {r["world"] for r in rows}:
        sel = [r for r in rows if r["world"] == world]
        for key in ("measured", "predicted"):
            ordered = sorted(sel, key=lambda x: x[f"{key}_ms"])
            for x in sel:
                x[f"{key}_rank"] = ordered.index(x) + 1
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    a = ap.parse_args()
    model = dataclasses.replace(PRESETS["small"], max_seq_len=max(PRESETS["small"].max_seq_len, a.seq_len))
    per_round, cals = [], []
    for round_ in range(a.rounds):
        cal = calibrate.measure(world_sizes=(2, 4))
        print(f"round {round_ + 1}:\n{calibrate.summary(cal)}", flush=True)
        cals.append(cal.to_dict())
        rows = []
        for world in (2, 4):
            layouts = [x for x in default_layouts(world, model, a.batch_size, a.seq_len) if x.kind == "meshattn"]
            results = run_bench(model, layouts, [a.seq_len], a.batch_size, warmup=2, steps=a.steps)
            rows += compare(results, cal, model, a.batch_size, a.seq_len, world)
        per_round.append(rows)
    rows = merge(per_round)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python benchmarks/planner_vs_bench.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items()),
        "host": platform.node(), "cores": os.cpu_count(), "load_avg": os.getloadavg(), "calibrations": cals}
    OUT.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print("| world | layout | measured ms | predicted ms | pred/meas (rounds) | measured rank | predicted rank | "
          "saved act. MiB meas | pred | pred/meas |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for x in rows:
        rounds = ", ".join(f"{v:.2f}" for v in x["time_ratio_rounds"])
        print(f"| {x['world']} | {x['layout']} | {x['measured_ms']:.1f} | {x['predicted_ms']:.1f} | "
              f"{x['time_ratio']:.2f} ({rounds}) | {x['measured_rank']} | {x['predicted_rank']} | "
              f"{x['measured_activation_bytes'] / 2**20:.2f} | {x['predicted_activation_bytes'] / 2**20:.2f} | "
              f"{x['activation_ratio']:.3f} |")
    for world in (2, 4):
        sel = [x for x in rows if x["world"] == world]
        if not sel:
            continue
        first = min(sel, key=lambda x: x["predicted_ms"])
        print(f"world {world}: planner's first choice {first['layout']} is measured #{first['measured_rank']} of "
              f"{len(sel)}; time within 30%: {sum(abs(x['time_ratio'] - 1) <= 0.3 for x in sel)}/{len(sel)}; "
              f"memory within 15%: {sum(abs(x['activation_ratio'] - 1) <= 0.15 for x in sel)}/{len(sel)}")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
