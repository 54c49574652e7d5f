"""The benchmark scripts that BENCHMARKS.md quotes still run (tiny sizes; figures not checked)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def _run(args: list[str]) -> str:
    res = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_context_attention_benchmark_runs():
    out = _run(["benchmarks/context_attention.py", "--seq", "64", "--cp", "2", "--iters", "1", "--rounds", "2",
                "--heads", "2", "--kv-heads", "1", "--head-dim", "8", "--impls", "ring:zigzag", "ulysses:contiguous"])
    assert "median time ratio over rounds" in out and "cp=2 ring" in out


def test_tp_scaling_benchmark_runs():
    out = _run(["benchmarks/tp_scaling.py", "--preset", "tiny", "--batch-size", "2", "--seq-len", "32",
                "--steps", "1", "--warmup", "1", "--tp", "2", "--checkpoint", "block"])
    assert "tp=2" in out and "measured" in out


def test_norm_benchmark_runs():
    out = _run(["benchmarks/norm.py", "--tokens", "16", "--d-model", "8", "--iters", "1", "--rounds", "1"])
    assert "ratio fused / F.rms_norm" in out


def test_balance_benchmark_runs(tmp_path):
    out = _run(["benchmarks/balance.py", "--rows", "4", "--cp", "2", "--seq-len", "256", "--out",
                str(tmp_path / "balance.md")])
    assert "balanced k=4" in out and "lognormal" in out


def test_packed_attention_benchmark_runs(tmp_path):
    out = _run(["benchmarks/packed_attention.py", "--seq-lens", "256", "512", "--doc-len", "32", "--rounds", "1",
                "--out", str(tmp_path / "packed.md")])
    assert "docs 32" in out and "SDPA is_causal per document" in out
