"""Context-parallel attention vs one process running SDPA on the whole sequence.

For each layout (impl, layout, cp) the attention forward + backward runs in fresh local worker
processes (gloo) with the same total number of threads as the single process. Reported per
layout: the median fwd+bwd time of the slowest rank, its ratio to single-process SDPA measured
in the same run, and the peak attention memory per rank: the bytes of its inputs (q, k, v and
the output gradient) plus the peak resident memory added during one fwd+bwd, as a fraction of the
single process's. Large allocations are forced through mmap (MALLOC_MMAP_THRESHOLD_) so the
resident set follows live memory.

    python benchmarks/context_attention.py --seq 8192 --cp 2 4
    python benchmarks/context_attention.py --bf16-error --seq 4096

--bf16-error instead measures the error of each impl in bf16 against a float64 reference as a
function of the ring (cp) size.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 16))  # before torch allocates anything

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from meshattn import context_attention, context_group, shard_sequence  # noqa: E402
from meshattn.comm import Axis  # noqa: E402
from meshattn.config import ParallelConfig  # noqa: E402
from meshattn.launch import launch  # noqa: E402
from meshattn.bench.memory import PeakMemory, tensor_bytes  # noqa: E402
from meshattn.mesh import ParallelDims  # noqa: E402


def _inputs(B, H, G, S, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, S, D, generator=g).to(dtype)
    k, v = (torch.randn(B, G, S, D, generator=g).to(dtype) for _ in range(2))
    dout = torch.randn(B, H, S, D, generator=g).to(dtype)
    return q, k, v, dout


def _time(fn, iters: int) -> tuple[float, int]:
    fn()  # warm-up
    with PeakMemory("cpu") as mem:
        fn()
    times = []
    for _ in range(iters):
        if dist.is_initialized():
            dist.barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), mem.delta


def single(shape, iters, out):
    q, k, v, dout = _inputs(*shape, torch.float32)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    rep = shape[1] // shape[2]

    def step():
        o = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1) if rep > 1 else k,
                                           v.repeat_interleave(rep, 1) if rep > 1 else v, is_causal=True)
        o.backward(dout)
        for t in (q, k, v):
            t.grad = None

    t, mem = _time(step, iters)
    Path(out).write_text(json.dumps([{"time": t, "mem": mem + tensor_bytes((q, k, v, dout)), "added": mem,
                                      "threads": torch.get_num_threads()}]))


def _cp_group(impl: str, ulysses_size: int | None):
    """(group for context_attention, the plain cp axis for sharding) over all ranks."""
    p = dist.get_world_size()
    if impl == "hybrid":
        group = context_group(ParallelDims(ParallelConfig(cp=p, cp_impl="hybrid", ulysses_size=ulysses_size)).mesh, "cp",
                              ulysses_size)
        return group, group.axis
    axis = Axis("cp", dist.group.WORLD, p, dist.get_rank())
    return axis, axis


def parallel(shape, impl, layout, ulysses_size, iters, out):
    p, rank = dist.get_world_size(), dist.get_rank()
    group, axis = _cp_group(impl, ulysses_size)
    q, k, v, dout = (shard_sequence(t, axis, 2, layout) for t in _inputs(*shape, torch.float32))
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def step():
        context_attention(q, k, v, group, impl=impl, layout=layout, ulysses_size=ulysses_size).backward(dout)
        for t in (q, k, v):
            t.grad = None

    t, mem = _time(step, iters)
    rows = [None] * p
    dist.all_gather_object(rows, {"time": t, "mem": mem + tensor_bytes((q, k, v, dout)), "added": mem,
                                  "threads": torch.get_num_threads()})
    if rank == 0:
        Path(out).write_text(json.dumps(rows))


def bf16_error(shape, impl, ulysses_size, out):
    p, rank = dist.get_world_size(), dist.get_rank()
    group, axis = _cp_group(impl, ulysses_size)
    q, k, v, dout = _inputs(*shape, torch.float64)
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    rep = shape[1] // shape[2]
    o_ref = F.scaled_dot_product_attention(ref[0], ref[1].repeat_interleave(rep, 1), ref[2].repeat_interleave(rep, 1),
                                           is_causal=True)
    o_ref.backward(dout)
    local = [shard_sequence(t, axis, 2, "zigzag").bfloat16().requires_grad_() for t in (q, k, v)]
    o = context_attention(*local, group, impl=impl, layout="zigzag", ulysses_size=ulysses_size)
    o.backward(shard_sequence(dout, axis, 2, "zigzag").bfloat16())
    errs = {}
    for name, got, want in [("out", o, o_ref)] + [(f"d{n}", t.grad, r.grad) for n, t, r in zip("qkv", local, ref)]:
        want = shard_sequence(want.detach(), axis, 2, "zigzag")
        e = (got.detach().double() - want).abs().max()
        dist.all_reduce(e, op=dist.ReduceOp.MAX)
        errs[name] = (e / want.abs().max()).item()  # max error relative to the tensor's scale
    if rank == 0:
        Path(out).write_text(json.dumps(errs))


def _run(fn, world, args) -> list:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        launch(fn, world, args=(*args, f.name), env={})
        return json.loads(Path(f.name).read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--cp", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--impls", nargs="+", default=["ring:zigzag", "ring:contiguous", "ulysses:zigzag",
                                                   "allgather:zigzag", "hybrid:zigzag"])
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat the single process and every layout this many times, alternating, and report "
                         "the median ratio per layout (the machine's load drifts between runs)")
    ap.add_argument("--bf16-error", action="store_true")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    shape = (a.batch, a.heads, a.kv_heads, a.seq, a.head_dim)
    results = []
    if a.bf16_error:
        print(f"bf16 error relative to each tensor's max |value|, vs float64 SDPA; shape B,H,G,S,D={shape}")
        for impl in ("ring", "ulysses", "allgather"):
            for p in [1] + a.cp:
                errs = _run(bf16_error, p, (shape, impl, None))
                results.append({"impl": impl, "cp": p, **errs})
                print(f"  {impl:9s} cp={p}: " + "  ".join(f"{k} {v:.2e}" for k, v in errs.items()), flush=True)
    else:
        ratios: dict[str, list[float]] = {}
        for round_ in range(a.rounds):
            base = _run(single, 1, (shape, a.iters))[0]
            print(f"[round {round_ + 1}/{a.rounds}] single process SDPA, {base['threads']} threads, B,H,G,S,D={shape}: "
                  f"fwd+bwd {base['time'] * 1e3:.0f} ms, attention memory {base['mem'] / 2**20:.0f} MiB "
                  f"(inputs + {base['added'] / 2**20:.0f} MiB added)", flush=True)
            results.append({"impl": "sdpa", "cp": 1, "round": round_, **base})
            for p in a.cp:
                for spec in a.impls:
                    impl, layout = spec.split(":")
                    if impl == "hybrid" and p < 4:
                        continue
                    rows = _run(parallel, p, (shape, impl, layout, 2 if impl == "hybrid" else None, a.iters))
                    t = max(r["time"] for r in rows)
                    mem = max(r["mem"] for r in rows)
                    results.append({"impl": impl, "layout": layout, "cp": p, "round": round_, "time": t, "mem": mem,
                                    "ratio": t / base["time"], "mem_fraction": mem / base["mem"],
                                    "threads": rows[0]["threads"]})
                    ratios.setdefault(f"cp={p} {impl} {layout}", []).append(t / base["time"])
                    print(f"  cp={p} {impl:9s} {layout:10s} threads/rank {rows[0]['threads']}: fwd+bwd {t * 1e3:6.0f} ms "
                          f"= {t / base['time']:.2f}x single; attention memory per rank {mem / 2**20:6.0f} MiB "
                          f"= {mem / base['mem']:.2f} of single (1/p = {1 / p:.2f})", flush=True)
        if a.rounds > 1:
            print("median time ratio over rounds (min - max):")
            for name, r in ratios.items():
                print(f"  {name:28s} {statistics.median(r):.2f}x ({min(r):.2f} - {max(r):.2f})")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
