"""Ring attention over packed documents: does its cost follow S x L (documents of length L) or S^2?

Per sequence length S (--seq-lens), forward + backward of attention, B,H,S,D float32, one thread
per process, causal, under three masks:

  one doc     the whole sequence is one document: plain causal attention (documents=None)
  docs L      documents of L tokens, boundaries at multiples of L (they fall on the layout's
              chunk boundaries whenever a chunk holds a whole number of documents)
  docs L, +L/2  the same documents shifted by L/2: the first and last are L/2 long, and a chunk
              boundary at a multiple of L cuts a document in two (the ring must send a block)

Measured:
  ring        context_attention(impl="ring") in cp fresh local gloo processes (1 thread each),
              contiguous and zigzag layouts. All (layout, mask) cases run in the same processes,
              one fwd+bwd each per round, the order rotating every round; time = median over rounds
              of the slowest rank's time. Bytes: CommCounter total of kind send_recv (K/V blocks
              and dK/dV accumulators) for one fwd+bwd, summed over ranks (the all-gather of the
              int64 document ids is kind all_gather and not included). The output and the q, k, v
              gradients are checked against per-document SDPA at the smallest S (max abs error).
  single      one process, one thread: SDPA with the dense (1,1,S,S) boolean mask of docs L
              (mask.dense_mask); SDPA is_causal=True on each document's slice in a loop (docs L);
              SDPA is_causal=True on the whole sequence (one doc). Alternating the same way.

Kernel work: query-key pairs the fused kernel computes on the busiest rank, from the ChunkMask's
plan (tiles of c tokens; FULL and PARTIAL tile pairs cost c^2, DIAG c(c+1)/2, EMPTY nothing),
next to the pairs the mask lets through. Ratios t(S)/t(S/2) of about 2 mean linear in S, about 4
quadratic; "rounds ms" is the min-max over rounds (the machine's load drifts).

    python benchmarks/packed_attention.py                       # S = 2048 4096 8192, L = 512, cp 2
    python benchmarks/packed_attention.py --cp 2 4
    python benchmarks/packed_attention.py --seq-lens 256 512 --doc-len 32 --rounds 1   # smoke, ~10 s

Results go to benchmarks/results/packed_attention.md, except from a run whose largest S is under
2048 (a smoke run), which writes no file unless --out is given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from meshattn import context_attention, shard_sequence, unshard_sequence
from meshattn.comm import Axis, CommCounter
from meshattn.launch import launch
from meshattn.model.mask import dense_mask
from meshattn.parallel.chunkmask import DIAG, EMPTY, FULL, ChunkMask
from meshattn.parallel.layout import chunk_table

RESULTS = Path(__file__).parent / "results" / "packed_attention.md"
LAYOUTS = ("contiguous", "zigzag")
ONE = "one doc"  # plain causal attention: the ring gets documents=None
SMOKE_MAX_S = 2048  # runs whose largest S is below this write no results file unless --out is given


def masks(S: int, L: int, B: int) -> dict[str, torch.Tensor]:
    """Global document ids (B, S) of each mask, by name."""
    pos = torch.arange(S)
    return {ONE: torch.zeros(B, S, dtype=torch.long),
            f"docs {L}": (pos // L).expand(B, S).contiguous(),
            f"docs {L}, +{L // 2}": ((pos + L // 2) // L).expand(B, S).contiguous()}


def inputs(B, H, S, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, S, D, generator=g) for _ in range(4))  # q, k, v, dout


def doc_lengths(documents: torch.Tensor) -> list[int]:
    """Run lengths of the (1-row) document ids: one per document, in order."""
    return torch.unique_consecutive(documents[0], return_counts=True)[1].tolist()


def per_document(q, k, v, lengths: list[int]) -> torch.Tensor:
    """Fused SDPA document by document (is_causal on each document's slice): the single-process
    way to skip every cross-document pair."""
    outs, a = [], 0
    for n in lengths:
        outs.append(F.scaled_dot_product_attention(q[:, :, a:a + n], k[:, :, a:a + n], v[:, :, a:a + n],
                                                   is_causal=True))
        a += n
    return torch.cat(outs, dim=2)


def kernel_work(S: int, layout: str, p: int, documents: torch.Tensor | None) -> tuple[int, int]:
    """(pairs the fused kernel computes, pairs the mask lets through) on the busiest rank, per
    batch row and head, for the ring's plan: the ChunkMask's tile pairs (tiles of mask.c tokens;
    a layout chunk is one tile under plain causal attention), FULL and PARTIAL costing c^2, DIAG
    c(c+1)/2, EMPTY nothing."""
    table = chunk_table(layout, p)
    n = sum(map(len, table))
    mask = ChunkMask(n, S, True, None, None if documents is None else documents[:1])
    c = mask.c
    cost = {EMPTY: 0, FULL: c * c, DIAG: c * (c + 1) // 2}
    computed = [sum(cost.get(mask.kind(i, j), c * c) for i in mask.refine(mine) for j in range(mask.n))
                for mine in table]
    visible = [mask.pairs(mine, list(range(n))) for mine in table]
    busiest = max(range(p), key=lambda r: computed[r])
    return computed[busiest], visible[busiest]


def _rotated(cases: list, round_: int) -> list:
    s = round_ % len(cases)
    return cases[s:] + cases[:s]


# -- ring: one set of worker processes for every S, layout and mask ------------------------------

def ring_worker(a: dict, out: str) -> None:
    torch.set_num_threads(1)
    p, rank = dist.get_world_size(), dist.get_rank()
    counter = CommCounter()
    counted = Axis("cp", dist.group.WORLD, p, rank, counter)
    plain = Axis("cp", dist.group.WORLD, p, rank)  # for the correctness check: not counted
    B, H, D, L = a["batch"], a["heads"], a["head_dim"], a["doc_len"]
    results = []
    for S in a["seq_lens"]:
        q, k, v, dout = inputs(B, H, S, D)
        docs = masks(S, L, B)
        local = {}
        for layout in LAYOUTS:
            qkv = [shard_sequence(t, plain, 2, layout).requires_grad_() for t in (q, k, v)]
            local[layout] = (qkv, shard_sequence(dout, plain, 2, layout),
                             {m: shard_sequence(d, plain, 1, layout) for m, d in docs.items()})
        cases = [(layout, m) for layout in LAYOUTS for m in docs]

        def step(case, axis=counted):
            layout, m = case
            (ql, kl, vl), dl, dd = local[layout]
            o = context_attention(ql, kl, vl, axis, impl="ring", layout=layout, causal=True,
                                  documents=None if m == ONE else dd[m])
            o.backward(dl)
            return o

        def clear(case):
            for t in local[case[0]][0]:
                t.grad = None

        first = S == a["seq_lens"][0]
        for case in cases:  # warm-up at every S (a first call at a new size can take several times longer)
            step(case)
            clear(case)
        times, nbytes = {case: [] for case in cases}, {}
        for r in range(a["rounds"]):
            for case in _rotated(cases, r):
                counter.reset()
                dist.barrier()
                t0 = time.perf_counter()
                step(case)
                times[case].append(time.perf_counter() - t0)
                clear(case)
                nbytes[case] = counter.total(kind="send_recv")  # the same every round
        # correctness, at the smallest S (the same chunk plans as every S): out, dq, dk, dv against
        # per-document SDPA on the whole sequence
        refs, errors = {}, {}
        for case in cases if first else []:
            layout, m = case
            o = step(case, plain)
            got = [unshard_sequence(t.detach(), plain, 2, layout) for t in [o] + [t.grad for t in local[layout][0]]]
            clear(case)
            if rank == 0:
                if m not in refs:
                    ref = [t.clone().requires_grad_() for t in (q, k, v)]
                    ro = per_document(*ref, doc_lengths(docs[m]))
                    ro.backward(dout)
                    refs[m] = [ro.detach()] + [t.grad for t in ref]
                errors[case] = max((g - w).abs().max().item() for g, w in zip(got, refs[m]))
        gathered = [None] * p
        dist.all_gather_object(gathered, {"times": {f"{l}|{m}": t for (l, m), t in times.items()},
                                          "bytes": {f"{l}|{m}": b for (l, m), b in nbytes.items()}})
        if rank == 0:
            for case in cases:
                key = f"{case[0]}|{case[1]}"
                slowest = [max(g["times"][key][r] for g in gathered) for r in range(a["rounds"])]
                results.append({"S": S, "cp": p, "layout": case[0], "mask": case[1],
                                "time": statistics.median(slowest), "rounds": slowest,
                                "bytes": sum(g["bytes"][key] for g in gathered), "error": errors.get(case)})
    if rank == 0:
        Path(out).write_text(json.dumps(results))


def run_ring(a: dict, p: int) -> list[dict]:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        launch(ring_worker, p, args=(a, f.name), env={})
        return json.loads(Path(f.name).read_text())


# -- single process ------------------------------------------------------------------------------

def run_single(a: dict) -> list[dict]:
    torch.set_num_threads(1)
    B, H, D, L = a["batch"], a["heads"], a["head_dim"], a["doc_len"]
    results = []
    for S in a["seq_lens"]:
        q, k, v, dout = (t.clone() for t in inputs(B, H, S, D))
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        docs = masks(S, L, B)[f"docs {L}"]
        dense = dense_mask(S, True, None, docs)  # (B, 1, S, S) bool
        lengths = doc_lengths(docs)
        cases = {
            (f"docs {L}", "SDPA, dense bool mask"): lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense),
            (f"docs {L}", "SDPA is_causal per document (loop)"): lambda: per_document(q, k, v, lengths),
            (ONE, "SDPA is_causal"): lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        }
        loop_pairs = sum(n * (n + 1) // 2 for n in lengths)
        work = {"SDPA, dense bool mask": (S * S, loop_pairs),  # (computed, visible) pairs
                "SDPA is_causal per document (loop)": (loop_pairs, loop_pairs),
                "SDPA is_causal": (S * (S + 1) // 2, S * (S + 1) // 2)}

        def step(fn):
            o = fn()
            o.backward(dout)
            for t in (q, k, v):
                t.grad = None
            return o

        for fn in cases.values():  # warm-up
            step(fn)
        times, outs = {case: [] for case in cases}, {}
        for r in range(a["rounds"]):
            for case in _rotated(list(cases), r):
                t0 = time.perf_counter()
                o = step(cases[case])
                times[case].append(time.perf_counter() - t0)
                outs[case] = o.detach()
        dense_case, loop_case = list(cases)[:2]
        err = (outs[dense_case] - outs[loop_case]).abs().max().item()
        del outs
        for (m, method), t in times.items():
            computed, visible = work[method]
            results.append({"S": S, "mask": m, "method": method, "time": statistics.median(t), "rounds": t,
                            "computed": computed, "visible": visible,
                            "error": err if m != ONE else None})
    return results


# -- report --------------------------------------------------------------------------------------

def _ratio(rows: list[dict], row: dict, key: str, same: tuple) -> str:
    """row[key] over the same configuration's value at S/2 ('' when absent or zero)."""
    prev = [r for r in rows if r["S"] * 2 == row["S"] and all(r[f] == row[f] for f in same)]
    if not prev or not prev[0][key] or not row[key]:
        return ""
    return f"{row[key] / prev[0][key]:.2f}"


def _spread(row: dict) -> str:
    return f"{min(row['rounds']) * 1e3:.0f}-{max(row['rounds']) * 1e3:.0f}"


def report(a: dict, ring: list[dict], single: list[dict]) -> str:
    L = a["doc_len"]
    lines = ["Ring attention, fwd+bwd per step (median over rounds of the slowest rank); bytes = send_recv "
             "payload of one fwd+bwd, all ranks; work = query-key pairs per (batch row, head) on the busiest "
             "rank, computed by the kernel / let through by the mask (M = 2^20); max err: out, dq, dk, dv vs "
             "per-document SDPA, checked at the smallest S.", "",
             "| S | cp | layout | mask | fwd+bwd ms | rounds ms | vs one doc | t(S)/t(S/2) | send_recv MiB "
             "| b(S)/b(S/2) | kernel work M | visible M | max err |",
             "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    same = ("cp", "layout", "mask")
    for row in ring:
        base = next(r for r in ring if r["S"] == row["S"] and r["cp"] == row["cp"] and r["layout"] == row["layout"]
                    and r["mask"] == ONE)
        docs = None if row["mask"] == ONE else masks(row["S"], L, 1)[row["mask"]]
        computed, visible = kernel_work(row["S"], row["layout"], row["cp"], docs)
        lines.append(f"| {row['S']} | {row['cp']} | {row['layout']} | {row['mask']} | {row['time'] * 1e3:.0f} | "
                     f"{_spread(row)} | {row['time'] / base['time']:.2f} | {_ratio(ring, row, 'time', same)} | "
                     f"{row['bytes'] / 2**20:.2f} | {_ratio(ring, row, 'bytes', same)} | "
                     f"{computed / 2**20:.3g} | {visible / 2**20:.3g} | "
                     f"{'' if row['error'] is None else format(row['error'], '.1e')} |")
    lines += ["", "Single process, one thread, fwd+bwd (median over rounds); max err = dense mask vs per-document "
              "loop (outputs).", "",
              "| S | mask | method | fwd+bwd ms | rounds ms | vs one doc | t(S)/t(S/2) | kernel work M | visible M "
              "| max err |",
              "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in single:
        base = next(r for r in single if r["S"] == row["S"] and r["mask"] == ONE)
        err = "" if row["error"] is None else f"{row['error']:.1e}"
        lines.append(f"| {row['S']} | {row['mask']} | {row['method']} | {row['time'] * 1e3:.0f} | {_spread(row)} | "
                     f"{row['time'] / base['time']:.2f} | {_ratio(single, row, 'time', ('method',))} | "
                     f"{row['computed'] / 2**20:.3g} | {row['visible'] / 2**20:.3g} | {err} |")
    # the ring against the single-process ways, at each S, for docs L
    lines += ["", f"docs {L}: ring time over single-process time at the same S (slowest rank; the ring has cp "
              "processes of one thread).", "",
              "| S | cp | layout | / SDPA dense mask | / SDPA per document | ring one doc / SDPA is_causal |",
              "|---:|---:|---|---:|---:|---:|"]
    for row in ring:
        if row["mask"] != f"docs {L}":
            continue
        s = {r["method"]: r["time"] for r in single if r["S"] == row["S"]}
        one = next(r for r in ring if r["S"] == row["S"] and r["cp"] == row["cp"] and r["layout"] == row["layout"]
                   and r["mask"] == ONE)
        lines.append(f"| {row['S']} | {row['cp']} | {row['layout']} | "
                     f"{row['time'] / s['SDPA, dense bool mask']:.2f} | "
                     f"{row['time'] / s['SDPA is_causal per document (loop)']:.2f} | "
                     f"{one['time'] / s['SDPA is_causal']:.2f} |")
    return "\n".join(lines)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def code_state() -> str:
    """The commit, and whether src/ differs from it (the tree may hold uncommitted work)."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "src"], cwd=root, capture_output=True, text=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"
    return f"commit {head}" + (" + uncommitted changes in src/" if dirty else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--doc-len", type=int, default=512)
    ap.add_argument("--cp", type=int, nargs="+", default=[2])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None,
                    help="markdown results file (default benchmarks/results/packed_attention.md; "
                         f"a run whose largest S is under {SMOKE_MAX_S} writes none unless --out is given)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    for S in args.seq_lens:
        for p in args.cp:
            if S % (2 * p) or args.doc_len % 2 or S < args.doc_len:
                ap.error(f"S={S} must be a multiple of 2*cp={2 * p} and at least --doc-len (an even number)")
    a = {"seq_lens": sorted(args.seq_lens), "doc_len": args.doc_len, "batch": args.batch, "heads": args.heads,
         "head_dim": args.head_dim, "rounds": args.rounds}
    t0 = time.perf_counter()
    ring = []
    for p in args.cp:
        ring += run_ring(a, p)
        print(f"ring cp={p} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    single = run_single(a)
    elapsed = time.perf_counter() - t0
    table = report(a, ring, single)
    print(table)
    print(f"\n{elapsed:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"ring": ring, "single": single}, indent=2))
    out = args.out if args.out is not None else (RESULTS if max(args.seq_lens) >= SMOKE_MAX_S else None)
    if out is not None:
        command = "python benchmarks/packed_attention.py " + " ".join(sys.argv[1:])
        shape = f"B={args.batch}, H={args.heads}, D={args.head_dim}, float32, L={args.doc_len}"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("# Ring attention over packed documents: time and bytes against S\n\n"
                       f"```\n{__doc__.strip()}\n```\n\n"
                       f"Command: `{command}`  \nMachine: {os.cpu_count()} cores ({cpu_name()}), "
                       f"CPU, shared; torch {torch.__version__}; {shape}; {args.rounds} rounds; {elapsed:.0f} s  \n"
                       f"Code: {code_state()}\n\n"
                       f"{table}\n")


if __name__ == "__main__":
    main()
