"""What --shard dp saves and costs: weights, gradients and AdamW state per rank, and step time,
sharded (FSDP2 over dp) against replicated (DDP), at dp = 2, 4, 8.

Every configuration runs in fresh local worker processes (gloo on CPU): warm-up steps, then timed
optimizer steps of the real training step. Per rank it records the bytes of the storages the
rank holds for weights, gradients and optimizer state after a step (bench.memory.state_bytes:
exact, padding included), the planner's formula for them (planner.memory.state_bytes: ZeRO-3
over dp, or replicated), the peak resident memory during the timed steps and the median step
time. Sharded and replicated runs alternate within each round (A B, then B A) and the step-time
ratio is taken pair by pair, since the machine is shared and noisy.

    python benchmarks/fsdp_memory.py --dp 2 4 8 --rounds 2 --out benchmarks/results/fsdp_memory
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from meshattn import ModelConfig, ParallelConfig, TrainConfig
from meshattn.bench.memory import PeakMemory, state_bytes
from meshattn.launch import launch
from meshattn.mesh import ParallelDims
from meshattn.planner.memory import state_bytes as formula
from meshattn.training.corpus import Corpus
from meshattn.training.step import build_model, make_optimizer, train_step

PARTS = ("weights", "gradients", "optimizer")


def worker(cfg_dict: dict, warmup: int, out: str) -> None:
    cfg = TrainConfig.from_dict(cfg_dict)
    corpus = Corpus.from_path(None, max_bytes=1 << 22)
    model = build_model(cfg, ParallelDims(cfg.parallel))
    opt = make_optimizer(model, cfg)
    for step in range(warmup):
        train_step(model, opt, corpus, step, cfg)
    times = []
    with PeakMemory("cpu") as mem:
        for step in range(warmup, cfg.steps):
            dist.barrier()
            t0 = time.perf_counter()
            train_step(model, opt, corpus, step, cfg)
            times.append(time.perf_counter() - t0)
    row = {"rank": dist.get_rank(), "median_step_s": statistics.median(times), "held": state_bytes(model, opt),
           "peak_rss": mem.peak, "peak_rss_above_baseline": mem.delta}
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(rows))


def run(model: ModelConfig, dp: int, shard: str, a) -> dict:
    cfg = TrainConfig(model=model, parallel=ParallelConfig(dp=dp, tp=1, shard=shard), steps=a.warmup + a.steps,
                      batch_size=a.batch_size, seq_len=a.seq_len, warmup=1, sample_tokens=0)
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        launch(worker, dp, args=(cfg.to_dict(), a.warmup, f.name))
        rows = json.loads(Path(f.name).read_text())
    predicted = formula(model, 1, dp, "zero3" if shard == "dp" else "none", False)
    worst = max(rows, key=lambda r: r["held"]["total"])
    return {"dp": dp, "shard": shard, "step_s": max(r["median_step_s"] for r in rows), "held": worst["held"],
            "predicted": {k: predicted[k] for k in (*PARTS, "total")},
            "peak_rss_mib": max(r["peak_rss"] for r in rows) / 2**20}


def table(results: list[dict], ratios: dict[int, list[float]]) -> str:
    lines = ["| dp | shard | weights MiB | gradients MiB | AdamW MiB | total MiB | formula MiB | measured/formula "
             "| x replicated | step ms | step time sharded/replicated (pairs) |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    whole = {r["dp"]: r["held"]["total"] for r in results if r["shard"] == "none"}
    for dp in sorted({r["dp"] for r in results}):
        for shard in ("none", "dp"):
            rs = [r for r in results if r["dp"] == dp and r["shard"] == shard]
            r = rs[0]
            step = statistics.median(x["step_s"] for x in rs)
            h, p = r["held"], r["predicted"]
            ratio = "" if shard == "none" else (f"{statistics.median(ratios[dp]):.2f} "
                                                f"({', '.join(f'{x:.2f}' for x in ratios[dp])})")
            lines.append(f"| {dp} | {shard} | " + " | ".join(f"{h[k] / 2**20:.1f}" for k in PARTS)
                         + f" | {h['total'] / 2**20:.1f} | {p['total'] / 2**20:.1f} | {h['total'] / p['total']:.3f} "
                         f"| {h['total'] / whole[dp]:.3f} (1/dp = {1 / dp:.3f}) | {step * 1e3:.0f} | {ratio} |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dps = sorted({r["dp"] for r in results})
    fig, ax = plt.subplots(figsize=(6, 4))
    for shard, label in (("none", "replicated (DDP)"), ("dp", "sharded (--shard dp)")):
        rows = [next(r for r in results if r["dp"] == dp and r["shard"] == shard) for dp in dps]
        ax.plot(dps, [r["held"]["total"] / 2**20 for r in rows], "o-", label=f"{label}, measured")
        ax.plot(dps, [r["predicted"]["total"] / 2**20 for r in rows], "k:", lw=1)
    ax.plot([], [], "k:", lw=1, label="formula (planner)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xticks(dps, [str(d) for d in dps])
    ax.set_xlabel("dp (ranks)")
    ax.set_ylabel("weights + gradients + AdamW per rank (MiB)")
    ax.set_title("Per-rank training state, fp32 AdamW")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dp", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="sharded/replicated pairs per dp, order alternating")
    ap.add_argument("--out", default="benchmarks/results/fsdp_memory", help="writes OUT.json, OUT.md, OUT.png")
    a = ap.parse_args()
    h = a.d_model
    model = ModelConfig(d_model=h, n_heads=h // 64, n_kv_heads=h // 128, n_layers=a.layers, d_ff=4 * h,
                        vocab_size=256, max_seq_len=a.seq_len, norm="rmsnorm", position="rope", activation="swiglu")
    print(f"model: {sum(p.numel() for p in torch.nn.Module.parameters(_meta(model))) / 1e6:.1f}M parameters")
    results, ratios = [], {}
    for dp in a.dp:
        ratios[dp] = []
        for i in range(a.rounds):
            order = ("none", "dp") if i % 2 == 0 else ("dp", "none")
            pair = {shard: run(model, dp, shard, a) for shard in order}
            results += list(pair.values())
            ratios[dp].append(pair["dp"]["step_s"] / pair["none"]["step_s"])
            print(f"dp={dp} round {i}: " + ", ".join(
                f"{s}: {pair[s]['held']['total'] / 2**20:.1f} MiB, {pair[s]['step_s'] * 1e3:.0f} ms" for s in order))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(a), "results": results, "ratios": ratios}, indent=1))
    md = table(results, ratios)
    out.with_suffix(".md").write_text(md + "\n")
    plot(results, out.with_suffix(".png"))
    print(md)


def _meta(cfg: ModelConfig):
    from meshattn import Transformer

    with torch.device("meta"):
        return Transformer(cfg)


if __name__ == "__main__":
    main()
