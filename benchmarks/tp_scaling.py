"""Tensor-parallel step time, memory per rank and communication volume at tp = 1, 2, 4.

Each tp size runs in fresh local worker processes (gloo on CPU): warm-up steps, then timed
optimizer steps of the real training step (forward, backward, clip, AdamW). Per rank it reports
the median step time, tokens/s, parameter + gradient + optimizer-state bytes, the peak resident
resident memory during the timed steps, the bytes autograd saves for backward in one step (the
activation memory, deterministic), and the communication bytes of one step from the byte
counter next to the planner's analytic figure (the planner covers forward + backward; the
8-byte "grad_norm" all-reduce is the optimizer step's gradient-norm sum).

    python benchmarks/tp_scaling.py --preset small --batch-size 8 --seq-len 256 --tp 1 2 4
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

from meshattn import CommCounter, ParallelConfig, TrainConfig, preset
from meshattn.training.corpus import Corpus
from meshattn.launch import launch
from meshattn.bench.memory import PeakMemory, SavedActivations, optimizer_state_bytes, tensor_bytes
from meshattn.mesh import ParallelDims
from meshattn.planner import tensor_parallel_comm
from meshattn.training.step import build_model, make_optimizer, train_step


def worker(cfg_dict: dict, warmup: int, out: str) -> None:
    cfg = TrainConfig.from_dict(cfg_dict)
    counter = CommCounter()
    corpus = Corpus.from_path(None, max_bytes=1 << 22)
    model = build_model(cfg, ParallelDims(cfg.parallel), counter)
    opt = make_optimizer(model, cfg)
    for step in range(warmup):
        train_step(model, opt, corpus, step, cfg)
    ids, targets = corpus.batch(0, cfg.batch_size, cfg.seq_len, cfg.seed)
    with SavedActivations(model.parameters()) as saved:
        model(ids, targets)[1].backward()
    counter.reset()
    times = []
    with PeakMemory("cpu") as mem:
        for step in range(warmup, cfg.steps):
            dist.barrier()
            t0 = time.perf_counter()
            train_step(model, opt, corpus, step, cfg)
            times.append(time.perf_counter() - t0)
    steps = cfg.steps - warmup
    row = {
        "rank": dist.get_rank(),
        "threads": torch.get_num_threads(),
        "median_step_s": statistics.median(times),
        "min_step_s": min(times),
        "max_step_s": max(times),
        "param_bytes": tensor_bytes(model.parameters()),
        "grad_bytes": tensor_bytes(p.grad for p in model.parameters() if p.grad is not None),
        "optimizer_bytes": optimizer_state_bytes(opt),
        "saved_activation_bytes": saved.nbytes,
        "peak_rss_above_baseline": mem.delta,
        "peak_rss": mem.peak,
        "rss_resettable": mem.resettable,
        "comm_per_step": {"/".join(k): v // steps for k, v in counter.nbytes.items()},
    }
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(rows, default=str))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--sp", action="store_true", help="sequence parallelism")
    ap.add_argument("--checkpoint", default="none", choices=["none", "attention", "block"])
    ap.add_argument("--json", default=None, help="write all results here")
    a = ap.parse_args()
    model = preset(a.preset)
    results = {}
    for tp in a.tp:
        cfg = TrainConfig(model=model, parallel=ParallelConfig(tp=tp, sequence_parallel=a.sp), steps=a.warmup + a.steps,
                          batch_size=a.batch_size, seq_len=a.seq_len, warmup=1, sample_tokens=0,
                          checkpoint=a.checkpoint)
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            launch(worker, tp, args=(cfg.to_dict(), a.warmup, f.name))
            rows = json.loads(Path(f.name).read_text())
        results[tp] = rows
        analytic = {k: v.nbytes for k, v in tensor_parallel_comm(model, cfg.parallel, a.batch_size, a.seq_len).items()}
        measured = rows[0]["comm_per_step"]
        step = max(r["median_step_s"] for r in rows)
        tokens = a.batch_size * a.seq_len
        print(f"tp={tp} threads/rank={rows[0]['threads']} median step {step * 1e3:.0f} ms "
              f"({tokens / step:,.0f} tokens/s)")
        for r in rows:
            print(f"  rank {r['rank']}: params+grads+adam {(r['param_bytes'] + r['grad_bytes'] + r['optimizer_bytes']) / 2**20:.1f} MiB, "
                  f"saved activations {r['saved_activation_bytes'] / 2**20:.1f} MiB, peak RSS {r['peak_rss'] / 2**20:.0f} MiB")
        for key in sorted(set(measured) | set(analytic)):
            print(f"  {key:24s} measured {measured.get(key, 0):>12,} B   analytic {analytic.get(key, 0):>12,} B")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
