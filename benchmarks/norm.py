"""The parallel model's fused RMSNorm against `F.rms_norm` (what the reference model runs).

Forward + backward of one norm on a (tokens, d_model) fp32 input, one thread, the two variants
alternating within each round; reported: the median time of each and their ratio per round.

    python benchmarks/norm.py --tokens 2048 --d-model 512 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from meshattn.model.norm import rms_norm


def _time(fn, iters: int) -> float:
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--iters", type=int, default=10, help="timed calls per variant per round")
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(a.tokens, a.d_model, requires_grad=True)
    w = torch.randn(a.d_model, requires_grad=True)
    g = torch.randn(a.tokens, a.d_model)
    variants = {
        "F.rms_norm": lambda: F.rms_norm(x, (a.d_model,), w, 1e-5).backward(g),
        "meshattn.model.norm.rms_norm": lambda: rms_norm(x, w, 1e-5).backward(g),
    }
    for fn in variants.values():  # warm-up
        fn()
    ratios, medians = [], {k: [] for k in variants}
    for _ in range(a.rounds):
        t = {k: _time(fn, a.iters) for k, fn in variants.items()}
        for k, v in t.items():
            medians[k].append(v)
        ratios.append(t["meshattn.model.norm.rms_norm"] / t["F.rms_norm"])
    print(f"RMSNorm forward+backward, ({a.tokens}, {a.d_model}) fp32, 1 thread, {a.rounds} rounds x {a.iters} calls")
    for k, v in medians.items():
        print(f"  {k:24s} {statistics.median(v) * 1e3:7.2f} ms (median of round medians)")
    print(f"  ratio fused / F.rms_norm per round: {', '.join(f'{r:.2f}' for r in ratios)}; "
          f"median {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
