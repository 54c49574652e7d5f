"""Causal attention work per context-parallel rank under packed documents: contiguous, zigzag and
balanced chunk tables (parallel/balance.py), as imbalance = max / mean of the ranks' query-key
pairs (1.00 is perfect; the slowest rank sets the step time). Counted, not timed.

See MIXES for the documents. Reported per mix and cp: the mean imbalance over rows and the worst
row's.

    python benchmarks/balance.py --seq-len 8192 --cp 2 4 8 --rows 2048
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from meshattn.parallel.balance import balance_chunks, token_work
from meshattn.parallel.balance import imbalance
from meshattn.parallel.layout import chunk_table
from meshattn.training.corpus import load_documents
from meshattn.training.packing import pack_lengths

RESULTS = Path(__file__).parent / "results" / "balance.md"
MIXES = """Each row of seq_len tokens is one global sequence with its own tables (balanced: computed from
that row's document ids). Length mixes, each packed in order into rows (training/packing.py:
pack_lengths; a document cut by a row boundary continues the next row):
  corpus     the bundled corpus's files (load_documents(): lengths in bytes = tokens)
  lognormal  synthetic long tail: round(exp(N(ln 1024, 1.5^2))) tokens clipped to [1, 65536],
             seeded (--seed): at seed 0 mean 2,942, 1.0% of documents over 33,000
  single     one causal document per row (zigzag's design case)
and the corpus mix again under a causal sliding window (--window)."""


def lognormal_lengths(n_tokens: int, seed: int) -> list[int]:
    """Synthetic document lengths summing to at least n_tokens."""
    gen = torch.Generator().manual_seed(seed)
    lengths = []
    while sum(lengths) < n_tokens:
        draw = torch.exp(torch.randn(1024, generator=gen, dtype=torch.float64) * 1.5 + torch.log(torch.tensor(1024.0)))
        lengths += draw.round().clamp(1, 65536).long().tolist()
    return lengths


def row_imbalances(per_token: torch.Tensor, p: int, tables: dict) -> dict[str, list[float]]:
    """Per layout name, the imbalance of each row: per_token (R, S) keys each query sees; tables
    maps a name to a chunk table, or to chunks per rank for a balanced table computed per row."""
    R, S = per_token.shape
    out = {}
    for name, table in tables.items():
        n = p * table if isinstance(table, int) else sum(map(len, table))
        chunks = per_token.view(R, n, S // n).sum(-1).tolist()  # (R, n) pairs per chunk
        out[name] = []
        for work in chunks:
            t = balance_chunks(work, p) if isinstance(table, int) else table
            out[name].append(imbalance([sum(work[c] for c in ranks) for ranks in t]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__ + "\n" + MIXES,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--cp", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--rows", type=int, default=2048, help="rows per mix (the corpus gives about 2048 at 8192)")
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--balanced", type=int, nargs="+", default=[2, 4, 8], help="chunks per rank")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args()
    t0 = time.perf_counter()
    S = a.seq_len
    corpus = pack_lengths([len(d) for d in load_documents()], S)[: a.rows]
    synthetic = pack_lengths(lognormal_lengths(a.rows * S, a.seed), S)[: a.rows]
    mixes = [("corpus", torch.stack(corpus), None), ("lognormal", torch.stack(synthetic), None),
             ("single", torch.zeros(1, S, dtype=torch.long), None),
             (f"corpus, window {a.window}", torch.stack(corpus), a.window)]
    names = ["contiguous", "zigzag"] + [f"balanced k={k}" for k in a.balanced]
    lines = ["| mix | rows | cp | stat | " + " | ".join(names) + " |", "|---|---:|---:|---|" + "---:|" * len(names)]
    for mix, documents, window in mixes:
        per_token = token_work(S, True, window, documents).double()  # (R, S)
        for p in a.cp:
            tables = {"contiguous": chunk_table("contiguous", p), "zigzag": chunk_table("zigzag", p)}
            tables |= {f"balanced k={k}": k for k in a.balanced}
            res = row_imbalances(per_token, p, tables)
            for stat, f in (("mean", lambda v: sum(v) / len(v)), ("worst", max))[: 1 if len(documents) == 1 else 2]:
                lines.append(f"| {mix} | {len(documents)} | {p} | {stat} | "
                             + " | ".join(f"{f(res[n]):.3f}" for n in names) + " |")
    table = "\n".join(lines)
    elapsed = time.perf_counter() - t0
    print(table)
    print(f"\n{elapsed:.1f} s")
    command = "python benchmarks/balance.py " + " ".join(sys.argv[1:])
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(
        "# Causal attention work per cp rank under packed documents\n\n"
        "Imbalance = max / mean over ranks of the query-key pairs the mask lets through (counted, not timed); "
        "balanced k = `parallel.balance.balanced_table` with k chunks per rank. The counts are what a kernel "
        "that skips every masked pair costs; one that works in tiles pays for partly masked tiles too.\n\n"
        f"```\n{MIXES}\n```\n\n"
        f"Command: `{command}`  \nMachine: {os.cpu_count()} cores, CPU; torch {torch.__version__}; "
        f"{elapsed:.0f} s\n\n{table}\n")


if __name__ == "__main__":
    main()
