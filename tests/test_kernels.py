"""The local attention kernels: which one runs where, the exact kernel's precision under autocast,
the CUDA kernels' calls (against the ops' own shape rules, on the meta device), and the GPU check
script's CPU run. CPU only."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from meshattn.model import attention
from meshattn.model.attention import (auto_kernel, block_backward, block_forward, cuda_kernel, merge_, pick_kernel,
                                      resolve_kernel)
from meshattn.parallel.blocks import chunk_attention
from meshattn.parallel.layout import chunk_table

ROOT = Path(__file__).parents[1]
BF16_ULP = 2.0 ** -8  # bf16 keeps 8 significant bits: a rounding moves a value by at most half of this, relatively


def _qkv(B=2, H=4, G=2, S=64, D=16, dtype=torch.bfloat16, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, H, S, D, generator=g) * scale).to(dtype)
    k = (torch.randn(B, G, S, D, generator=g) * scale).to(dtype)
    v, dout = torch.randn(B, G, S, D, generator=g).to(dtype), torch.randn(B, H, S, D, generator=g).to(dtype)
    return q, k, v, dout


# -- the exact kernel under autocast ------------------------------------------------------------

def test_math_kernel_ignores_cpu_autocast():
    """Under CPU bf16 autocast the math kernel's scores, lse, out and gradients are the fp32 ones
    bit for bit. (Before it ran its matmuls under the autocast, in bf16: lse off by 2.4e-2 here.)"""
    q, k, v, dout = _qkv()
    out, lse = block_forward(q, k, v, True, 0.25, "math")
    grads = block_backward(dout, q, k, v, out, lse, True, 0.25, "math")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_ac, lse_ac = block_forward(q, k, v, True, 0.25, "math")
        grads_ac = block_backward(dout, q, k, v, out, lse, True, 0.25, "math")
    assert out_ac.dtype == lse_ac.dtype == torch.float32
    assert torch.equal(lse_ac, lse) and torch.equal(out_ac, out)
    for a, b in zip(grads_ac, grads):
        assert torch.equal(a, b)


def test_merge_keeps_fp32_accumulators_under_autocast():
    out, lse = torch.zeros(1, 2, 3, 4), torch.full((1, 2, 3), float("-inf"))
    block = torch.randn(1, 2, 3, 4).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        merge_(out, lse, block.clone(), torch.zeros(1, 2, 3))
    assert out.dtype == lse.dtype == torch.float32
    assert torch.equal(out, block.float()) and torch.equal(lse, torch.zeros(1, 2, 3))


def _take(t, chunks, n):
    parts = t.chunk(n, dim=2)
    return torch.cat([parts[c] for c in chunks], dim=2)


def _context_parallel(kernel, q, k, v, dout, p, layout):
    """The ranks of a cp=p split in one process: each rank's query chunks against every key chunk
    (chunk_attention: its blocks merged by log-sum-exp), under bf16 autocast; the global out and
    the gradients of the global q, k, v (autograd sums the ranks' dK, dV)."""
    table = chunk_table(layout, p)
    n = sum(len(c) for c in table)
    flat = [c for chunks in table for c in chunks]
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    parts: list = [None] * n
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for chunks in table:
            out = chunk_attention(_take(q, chunks, n), _take(k, flat, n), _take(v, flat, n), chunks, flat,
                                  kernel=kernel)
            for piece, c in zip(out.chunk(len(chunks), dim=2), chunks):
                parts[c] = piece
    out = torch.cat(parts, dim=2)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def _reference(q, k, v, dout):
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), is_causal=True)
    out.backward(dout.double())
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("p,layout", [(4, "zigzag"), (2, "contiguous")])
def test_context_parallel_math_kernel_under_bf16_autocast_is_no_worse_than_fused(p, layout):
    """bf16 inputs, CPU bf16 autocast, cp ranks emulated in one process: the error against float64
    of the math kernel is no worse than the fused CPU kernel's.

    out: the math kernel hands the merge unrounded fp32 partial outputs where the fused kernel's
    are rounded to bf16, so its error may not exceed the fused one at all. Gradients: both
    kernels round each block's dq, dk, dv to bf16 and the sums once more at the end; those
    roundings, up to half a bf16 ulp of the largest gradient, dominate both errors and fall
    differently on the largest one, so the math kernel may exceed the fused one by that much.
    (Before the math kernel disabled autocast it ran in bf16 here: 8-10x the fused error.)"""
    q, k, v, dout = _qkv(S=128)
    ref = _reference(q, k, v, dout)
    errs = {}
    for kernel in ("math", "auto"):
        got = _context_parallel(kernel, q, k, v, dout, p, layout)
        assert got[0].dtype == torch.bfloat16
        errs[kernel] = [((a.double() - b).abs().max() / b.abs().max()).item() for a, b in zip(got, ref)]
    math_err, fused_err = errs["math"], errs["auto"]
    assert all(e < 3e-2 for e in math_err + fused_err), errs  # bf16 rounding of the result (test_context)
    assert math_err[0] <= fused_err[0], errs
    for m, f in zip(math_err[1:], fused_err[1:]):
        assert m <= f + BF16_ULP / 2, errs


# -- which kernel runs --------------------------------------------------------------------------

def test_auto_kernel_per_device_and_dtype():
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        assert auto_kernel("cpu", dt, 64) == "flash" and auto_kernel("cpu", dt, 64, has_bias=True) == "flash"
    for device in ("cpu", "cuda", "mps", "xpu"):
        assert auto_kernel(device, torch.float64, 64) == "math"
    assert auto_kernel("mps", torch.bfloat16, 64) == "math"
    assert auto_kernel("cuda", torch.bfloat16, 128) == "flash"


def test_cuda_kernel_choice():
    for dt in (torch.bfloat16, torch.float16):
        for d in (8, 64, 128, 256):
            assert cuda_kernel(dt, d, has_bias=False) == "flash"
            assert cuda_kernel(dt, d, has_bias=True) == "efficient"  # flash takes no mask
        assert cuda_kernel(dt, 12, False) == "math"  # not a multiple of 8: neither fused kernel takes it
        assert cuda_kernel(dt, 264, False) == "math"  # above 256
        assert cuda_kernel(dt, 64, False, capability=(7, 5)) == "efficient"  # flash needs sm80
        assert cuda_kernel(dt, 256, False, capability=(8, 6)) == "efficient"  # head dim > 192 only on sm80/90
        assert cuda_kernel(dt, 256, False, capability=(8, 0)) == "flash"
        assert cuda_kernel(dt, 64, False, capability=(4, 0)) == "math"
    for d in (4, 12, 64, 128):
        assert cuda_kernel(torch.float32, d, False) == cuda_kernel(torch.float32, d, True) == "efficient"
    assert cuda_kernel(torch.float32, 6, False) == "math"
    assert cuda_kernel(torch.float64, 64, False) == "math"


def test_kernel_asked_for():
    assert resolve_kernel("math", "cuda", torch.bfloat16, 64) == "math"
    assert resolve_kernel("math", "cpu", torch.float32, 64) == "math"
    assert resolve_kernel("flash", "cpu", torch.float64, 64) == "flash"  # the CPU kernel takes fp64 when asked
    assert resolve_kernel("flash", "cuda", torch.bfloat16, 64) == "flash"
    assert resolve_kernel("flash", "cuda", torch.bfloat16, 64, has_bias=True) == "efficient"
    assert resolve_kernel("efficient", "cuda", torch.float32, 64) == "efficient"
    assert resolve_kernel("efficient", "cuda", torch.bfloat16, 64) == "efficient"
    for args, match in [(("flash", "cuda", torch.float32, 64), "does not take"),
                        (("flash", "cuda", torch.bfloat16, 12), "does not take"),
                        (("efficient", "cuda", torch.float64, 64), "does not take"),
                        (("efficient", "cpu", torch.float32, 64), "CUDA kernel"),
                        (("flash", "mps", torch.float32, 64), "no fused kernel"),
                        (("tiled", "cpu", torch.float32, 64), "unknown")]:
        with pytest.raises(ValueError, match=match):
            resolve_kernel(*args)


def test_pick_kernel_on_cpu_tensors():
    q32, q64 = torch.zeros(1, 1, 4, 8), torch.zeros(1, 1, 4, 8, dtype=torch.float64)
    assert pick_kernel("auto", q32) == "flash" and pick_kernel("auto", q32, torch.zeros(1, 1, 4, 4)) == "flash"
    assert pick_kernel("auto", q64) == "math" and pick_kernel("math", q32) == "math"
    assert pick_kernel("flash", q64) == "flash"
    assert attention.KERNELS == ("auto", "flash", "efficient", "math")


def test_rows_without_keys_on_cpu_kernels():
    """A block mask row of -inf: out 0, lse -inf, zero gradients, whatever the kernel."""
    q, k, v, dout = _qkv(S=16, dtype=torch.float32)
    bias = torch.zeros(1, 1, 16, 16).masked_fill(torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(1))
                                                 < 0.5, float("-inf"))
    bias[:, :, 3] = float("-inf")
    for kernel in ("flash", "math"):
        out, lse = block_forward(q, k, v, False, 0.25, kernel, bias)
        assert torch.isneginf(lse[:, :, 3]).all() and (out[:, :, 3] == 0).all()
        assert torch.isfinite(lse[:, :, torch.arange(16) != 3]).all()
        dq, dk, dv = block_backward(dout, q, k, v, out, lse, False, 0.25, kernel, bias)
        assert (dq[:, :, 3] == 0).all() and all(torch.isfinite(g).all() for g in (dq, dk, dv))


# -- the CUDA kernels' calls, checked on the meta device ------------------------------------------
# The meta kernels of these aten ops state the ops' schemas and output shapes; what they cannot
# check (the numbers) gpu_check.py checks on a GPU.

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_kernel_calls_match_the_op_schemas(dtype):
    meta = torch.device("meta")
    B, H, Sq, Sk, D = 2, 4, 40, 72, 64
    q = torch.empty(B, H, Sq, D, dtype=dtype, device=meta)
    k, v = (torch.empty(B, H, Sk, D, dtype=dtype, device=meta) for _ in range(2))
    dout = torch.empty(B, H, Sq, D, dtype=dtype, device=meta)
    bias = torch.zeros(1, 1, Sq, Sk, dtype=dtype, device=meta)
    runs = [("efficient", False, None), ("efficient", False, bias)]
    if dtype == torch.bfloat16:
        runs.append(("flash", False, None))
    for name, causal, b in runs:
        kk, vv = (k, v) if not causal else (k[:, :, :Sq], v[:, :, :Sq])
        if name == "flash":
            out, lse = attention._flash_cuda_forward(q, kk, vv, causal, 0.125)
            grads = attention._flash_cuda_backward(dout, q, kk, vv, out.float(), lse, causal, 0.125)
        else:
            out, lse = attention._efficient_cuda_forward(q, kk, vv, causal, 0.125, b)
            grads = attention._efficient_cuda_backward(dout, q, kk, vv, out.float(), lse, causal, 0.125, b)
        assert out.shape == q.shape and out.dtype == dtype
        assert lse.shape == (B, H, Sq) and lse.dtype == torch.float32  # the efficient kernel's padding cut off
        assert [g.shape for g in grads] == [q.shape, kk.shape, vv.shape] and all(g.dtype == dtype for g in grads)
    # (B, H, Sq, Sk) as the kernel checks it, broadcast by stride 0, rows padded to 16 elements
    assert attention._attn_bias(bias, q, k).shape == (B, H, Sq, Sk)
    assert attention._attn_bias(bias, q, k).stride() == (0, 0, 80, 1)
    assert attention._attn_bias(bias.expand(B, 1, Sq, Sk), q, k).stride() == (Sq * 80, 0, 80, 1)


# -- the GPU check script -------------------------------------------------------------------------

def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_runs_on_cpu(tmp_path, capsys):
    """Every section of benchmarks/gpu_check.py, tiny, on CPU: all its checks pass, the reports
    are written; and one section through the child process the GPU run isolates each section in."""
    gpu_check = _gpu_check()
    out = tmp_path / "check.json"
    assert gpu_check.main(["--device", "cpu", "--quick", "--in-process", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["ok"] and {c["section"] for c in report["checks"]} == {"blocks", "train", "perf"}
    names = [c["name"] for c in report["checks"]]
    assert all(f"{impl} {layout} {mask} {dtype}" in names for impl in gpu_check.IMPLS for layout in gpu_check.LAYOUTS
               for mask in gpu_check.MASKS for dtype in gpu_check.DTYPES)
    assert "| blocks | ring zigzag documents bfloat16 | PASS |" in (tmp_path / "check.md").read_text()
    rows = gpu_check.run_child("perf", "cpu", True, 120)
    assert [r["ok"] for r in rows] == [True] * len(rows) and len(rows) == 3  # two shapes and the timing
    assert "PASS" in capsys.readouterr().out
