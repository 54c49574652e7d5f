"""Comparison against the single-device reference, with the tolerances reasoned once.

Parallel and reference runs do the same arithmetic in a different order (a matmul split in
column blocks then summed by an all-reduce, a softmax normaliser summed over vocab shards), so
their difference is rounding from summation order: about sqrt(K) * eps relative to the size of
the summed terms, with K the reduction length (<= a few hundred here). We therefore compare each
tensor with an absolute tolerance scaled by its own largest magnitude:
- float32 (eps 1.2e-7): rtol 1e-5. The largest difference measured over all parity tests on
  this machine is 8.7e-7 of the tensor's scale (a norm-weight gradient under sequence parallelism).
- float64 (eps 2.2e-16): rtol 1e-13; largest measured 1.1e-15.
A wrong gradient (a missing replica sum, a wrong shard) is off by O(1) relative (measured 0.7-0.87
for a missing KV replica sum), far outside both.
"""

from __future__ import annotations

import torch

RTOL = {torch.float32: 1e-5, torch.float64: 1e-13}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str = "", rtol: float | None = None) -> None:
    rtol = RTOL[expected.dtype] if rtol is None else rtol
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-30),
                               msg=lambda m: f"{name}: {m}")
