"""Comparison against the single-device reference, with the tolerances reasoned once.

Parallel and reference runs do the same arithmetic in a different order (a matmul split in
column blocks then summed by an all-reduce, a softmax normaliser summed over vocab shards), so
their difference is rounding from summation order: about sqrt(K) * eps relative to the size of
the summed terms, with K the reduction length (<= a few hundred here). We therefore compare each
tensor with an absolute tolerance scaled by its own largest magnitude:
- float32 (eps 1.2e-7): rtol 1e-5, i.e. ~80 eps; measured differences are ~1e-7 to 1e-6.
- float64 (eps 2.2e-16): rtol 1e-12.
A wrong gradient (a missing replica sum, a wrong shard) is off by O(1) relative, far outside both.
"""

from __future__ import annotations

import torch

RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str = "", rtol: float | None = None) -> None:
    rtol = RTOL[expected.dtype] if rtol is None else rtol
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-30),
                               msg=lambda m: f"{name}: {m}")
