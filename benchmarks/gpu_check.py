"""One command that checks the GPU paths on a machine with one GPU, and times the local kernels.

    python benchmarks/gpu_check.py                       # CUDA: expected 1-2 minutes on one H100/H200
    python benchmarks/gpu_check.py --out gpu_check.json  # also writes gpu_check.md
    python benchmarks/gpu_check.py --device cpu --quick  # the same checks on CPU, tiny (what the tests run)

Sections, each in a child process of its own (a crash, a hang past its time limit or a sticky CUDA
error in one is reported and the others still run):

blocks  Every context-parallel impl (allgather, ring, ulysses, hybrid) on every layout
        (contiguous, zigzag, balanced), its cp ranks emulated in this one process: the sequence
        is cut by the library's own chunk tables (parallel/layout.py, table_for), each rank's local
        blocks are computed by the library's block code (parallel/blocks.py: ChunkAttention,
        attend_chunks, attend_chunks_backward, with kernel="auto") and merged by log-sum-exp as
        the impl does (the gradient sums the collectives would do are done by autograd or by
        hand). Compared, forward out and dq/dk/dv, with float64 attention on the whole sequence
        (SDPA; an explicit softmax where padding leaves rows with no key, which SDPA leaves
        undefined) in bf16 and fp32, under a causal mask, packed documents with padding, and a
        sliding window. Single blocks (odd lengths, a mask with dead rows, GQA, each kernel forced)
        are checked the same way. Tolerance, as a fraction of each tensor's largest magnitude:
        bf16 3e-2, fp32 2e-4, or 4x what SDPA itself reaches in that dtype on the same causal
        inputs, whichever is larger (our blocks run the same fused kernels, plus an fp32 merge).
        On CUDA no block may fall back to the math kernel here (the shapes are ones the fused
        kernels take).
train   A 1-rank process group through meshattn's own start-up (mesh.init_distributed: NCCL on
        CUDA, gloo on CPU; ParallelDims), an all-reduce, and one training step of a small model on
        packed documents with a sliding window (so attention runs through the block kernels) in
        fp32 and bf16 (autocast): loss and gradient norm finite, every parameter changed.
perf    block_forward + block_backward with the kernel "auto" picks vs
        F.scaled_dot_product_attention forward + backward on the same shapes (CUDA events).
        FLOPs: forward 4*B*H*Sq*Sk*D (QK^T and PV, 2 per multiply-add), halved when causal;
        backward 2.5x the forward (5 matmuls to 2). Our out and grads are also compared with
        SDPA's (both in the working dtype: tolerance 3e-2 bf16, 2e-3 fp32).

Exit status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("meshattn") is None:  # run from a checkout without the package installed
    sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import meshattn.model.attention as attention  # noqa: E402
from meshattn.model.attention import auto_kernel, block_backward, block_forward  # noqa: E402
from meshattn.model.mask import dense_mask  # noqa: E402
from meshattn.parallel.blocks import (ChunkAttention, attend_chunks, attend_chunks_backward,  # noqa: E402
                                      empty_accumulators)
from meshattn.parallel.chunkmask import ChunkMask  # noqa: E402
from meshattn.parallel.layout import table_for  # noqa: E402
from meshattn.parallel.ulysses import kv_repeats  # noqa: E402

IMPLS = ("allgather", "ring", "ulysses", "hybrid")
LAYOUTS = ("contiguous", "zigzag", "balanced")
MASKS = ("causal", "documents", "window")
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
BASE_TOL = {"bfloat16": 3e-2, "float32": 2e-4}  # of each tensor's largest magnitude
PERF_TOL = {"bfloat16": 3e-2, "float32": 2e-3}  # ours vs SDPA, both in the working dtype
SECTIONS = ("blocks", "train", "perf")
TIME_LIMIT_S = {"cuda": {"blocks": 180, "train": 90, "perf": 120}, "cpu": {"blocks": 300, "train": 300, "perf": 300}}


# -- shapes ---------------------------------------------------------------------------------------

def shapes(device: str, quick: bool) -> dict:
    """Sizes of each section. CUDA: realistic (cp = 4, the hybrid as 2 ring groups of 2); --quick
    and CPU: tiny, cp = 2, so the CPU run takes seconds."""
    if quick:
        return dict(B=2, H=4, G=2, S=64, D=16, p=2, u=2, window=13,
                    perf=[(1, 2, 256, 32, True, "bfloat16"), (1, 2, 256, 32, False, "float32")], iters=2, warmup=1,
                    train=dict(d_model=64, n_heads=4, n_kv_heads=2, seq_len=64, window=24, batch=2))
    return dict(B=2, H=8, G=2, S=4096, D=128, p=4, u=2, window=819,
                perf=[(1, 32, 8192, 128, True, "bfloat16"), (2, 16, 4096, 128, True, "bfloat16"),
                      (4, 16, 2048, 64, True, "bfloat16"), (1, 16, 16384, 128, True, "bfloat16"),
                      (1, 16, 8192, 128, False, "bfloat16"), (2, 16, 4096, 128, True, "float32")],
                iters=10, warmup=3,
                train=dict(d_model=512, n_heads=8, n_kv_heads=2, seq_len=1024, window=384, batch=4))


# -- results --------------------------------------------------------------------------------------

class Recorder:
    """Check results of one section, appended as JSON lines to `path` as they come (a crash
    keeps what was done) and printed."""

    def __init__(self, section: str, path: str | None):
        self.section, self.path = section, path

    def add(self, name: str, ok: bool, detail: str = "", **data) -> bool:
        row = {"section": self.section, "name": name, "ok": bool(ok), "detail": detail, **data}
        print(f"[{'PASS' if ok else 'FAIL'}] {self.section}: {name}  {detail}", flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        return bool(ok)

    def guard(self, name: str, fn, *args, **kwargs):
        """fn(*args) -> None; an exception becomes a failed check of that name."""
        try:
            fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - reported, and the next check runs
            self.add(name, False, f"raised {type(e).__name__}: {e}", traceback=traceback.format_exc()[-3000:])


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (nan if got has a nan or inf)."""
    got, want = got.double(), want.double()
    if not torch.isfinite(got).all():
        return float("nan")
    scale = want.abs().max().item()
    return (got - want).abs().max().item() / max(scale, 1e-30)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def kernel_counter():
    """Counts the kernels block_forward / block_backward pick (attention.pick_kernel, looked up
    at call time) while the block is open."""
    counts: collections.Counter = collections.Counter()
    original = attention.pick_kernel

    def counting(kernel, q, bias=None):
        name = original(kernel, q, bias)
        counts[name] += 1
        return name

    attention.pick_kernel = counting
    try:
        yield counts
    finally:
        attention.pick_kernel = original


# -- one process, cp ranks: the impls' local computations -------------------------------------------

def take(t: torch.Tensor, chunks: list[int], n: int) -> torch.Tensor:
    """The chunks `chunks` (global ids, in this order) of t cut into n along the sequence dim 2."""
    parts = t.chunk(n, dim=2)
    return torch.cat([parts[c] for c in chunks], dim=2)


def place(locals_: list[torch.Tensor], table: list[list[int]], n: int) -> torch.Tensor:
    """The global tensor from every rank's part (rank r holds the chunks table[r], in that order)."""
    parts: list = [None] * n
    for t, chunks in zip(locals_, table):
        for piece, c in zip(t.chunk(len(chunks), dim=2), chunks):
            parts[c] = piece
    return torch.cat(parts, dim=2)


def _n(table) -> int:
    return sum(len(c) for c in table)


def emulate_allgather(q, k, v, table, mask, scale):
    """Each rank's local queries against the all-gathered K/V (rank order), one ChunkAttention per
    rank; autograd sums the ranks' dK/dV (the reduce-scatter)."""
    n = _n(table)
    flat = [c for chunks in table for c in chunks]
    k_all, v_all = take(k, flat, n), take(v, flat, n)
    outs = [ChunkAttention.apply(take(q, chunks, n), k_all, v_all, chunks, flat, mask, scale, "auto")
            for chunks in table]
    return place(outs, table, n)


class EmulatedRing(torch.autograd.Function):
    """Ring attention's per-rank work: rank r attends its query chunks to the K/V block of ring rank
    (r - s) mod p at step s (attend_chunks, merged by log-sum-exp into fp32 accumulators); the
    backward replays the blocks with the merged out and lse (attend_chunks_backward), dq kept per
    rank and each block's dK/dV summed over the ranks that used it (the travelling accumulators)."""

    @staticmethod
    def forward(ctx, q, k, v, table, mask, scale):
        p, n = len(table), _n(table)
        qs = [take(q, c, n) for c in table]
        ks, vs = [take(k, c, n) for c in table], [take(v, c, n) for c in table]
        outs, lses = [], []
        for r in range(p):
            out, lse = empty_accumulators(qs[r])
            for step in range(p):
                o = (r - step) % p
                attend_chunks(qs[r], table[r], ks[o], vs[o], table[o], mask, scale, "auto", out, lse)
            outs.append(out.to(q.dtype))
            lses.append(lse)
        ctx.state = (qs, ks, vs, outs, lses, table, mask, scale, (q.dtype, k.dtype, v.dtype))
        return place(outs, table, n)

    @staticmethod
    def backward(ctx, dout):
        qs, ks, vs, outs, lses, table, mask, scale, dtypes = ctx.state
        p, n = len(table), _n(table)
        dqs, dks, dvs = [None] * p, [None] * p, [None] * p
        for r in range(p):
            dout_r, dq = take(dout, table[r], n), None
            for step in range(p):
                o = (r - step) % p
                dq, dk, dv = attend_chunks_backward(dout_r, qs[r], table[r], ks[o], vs[o], table[o], outs[r], lses[r],
                                                    mask, scale, "auto", dq)
                dks[o] = dk if dks[o] is None else dks[o] + dk
                dvs[o] = dv if dvs[o] is None else dvs[o] + dv
            dqs[r] = dq
        del ctx.state
        return (place(dqs, table, n).to(dtypes[0]), place(dks, table, n).to(dtypes[1]),
                place(dvs, table, n).to(dtypes[2]), None, None, None)


def emulate_ring(q, k, v, table, mask, scale):
    return EmulatedRing.apply(q, k, v, table, mask, scale)


def _head_shards(q, k, v, group: int):
    """Ulysses' head split over `group` ranks (KV heads repeated first when fewer than the group)."""
    rep = kv_repeats(k.shape[1], group)
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    hq, hk = q.shape[1] // group, k.shape[1] // group
    return [(q[:, j * hq:(j + 1) * hq], k[:, j * hk:(j + 1) * hk], v[:, j * hk:(j + 1) * hk]) for j in range(group)]


def emulate_ulysses(q, k, v, table, mask, scale):
    """After the all-to-all each rank holds H/p heads of the whole sequence, its chunks in global
    order: one ChunkAttention over all chunks per head shard."""
    n, p = _n(table), len(table)
    chunks = list(range(n))
    outs = [ChunkAttention.apply(qh, kh, vh, chunks, chunks, mask, scale, "auto") for qh, kh, vh in
            _head_shards(q, k, v, p)]
    return torch.cat(outs, dim=1)


def emulate_hybrid(q, k, v, table, mask, scale, u: int):
    """Ulysses over groups of u consecutive ranks (H/u heads each), ring across the p/u groups,
    each group's chunks sorted (context.py: _hybrid)."""
    p = len(table)
    groups = [sorted(c for rank in range(g * u, (g + 1) * u) for c in table[rank]) for g in range(p // u)]
    outs = [emulate_ring(qh, kh, vh, groups, mask, scale) for qh, kh, vh in _head_shards(q, k, v, u)]
    return torch.cat(outs, dim=1)


def run_impl(impl, q, k, v, table, mask, scale, u):
    if impl == "allgather":
        return emulate_allgather(q, k, v, table, mask, scale)
    if impl == "ring":
        return emulate_ring(q, k, v, table, mask, scale)
    if impl == "ulysses":
        return emulate_ulysses(q, k, v, table, mask, scale)
    return emulate_hybrid(q, k, v, table, mask, scale, u)


# -- references -----------------------------------------------------------------------------------

def explicit_attention(q, k, v, scale, visible):
    """softmax(q k^T * scale, masked) v with rows that see no key giving 0 (and 0 gradients)."""
    s = (q @ k.transpose(-1, -2)) * scale
    if visible is not None:
        s = s.masked_fill(~visible, float("-inf"))
    m = s.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    z = e.sum(-1, keepdim=True)
    return (e / torch.where(z > 0, z, torch.ones_like(z))) @ v


def attention_with_grads(q, k, v, dout, scale, visible=None, causal=True, explicit=False, dtype=None):
    """(out, dq, dk, dv) of attention on the whole sequence in `dtype` (default: float64), SDPA
    unless `explicit`; K/V heads repeated for GQA (autograd sums their gradients back)."""
    dtype = dtype or torch.float64
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    ke, ve = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    if explicit:
        out = explicit_attention(q, ke, ve, scale, visible)
    elif visible is None:
        out = F.scaled_dot_product_attention(q, ke, ve, is_causal=causal, scale=scale)
    else:
        out = F.scaled_dot_product_attention(q, ke, ve, attn_mask=visible, scale=scale)
    out.backward(dout.to(dtype))
    return out.detach(), q.grad, k.grad, v.grad


def make_documents(B: int, S: int, device, seed: int = 0) -> torch.Tensor:
    """(B, S) packed document ids, documents of S/16 to S/3 tokens; the last S/20 tokens of the
    last row are padding (-1): rows that see no key."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b in range(B):
        ids, doc = [], 0
        while len(ids) < S:
            n = int(torch.randint(max(S // 16, 1), max(S // 3, 2), (1,), generator=g))
            ids += [doc] * n
            doc += 1
        rows.append(ids[:S])
    docs = torch.tensor(rows, dtype=torch.long)
    docs[-1, S - max(S // 20, 1):] = -1
    return docs.to(device)


def inputs(B, H, G, S, D, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, S, D, generator=g)
    k, v = (torch.randn(B, G, S, D, generator=g) for _ in range(2))
    dout = torch.randn(B, H, S, D, generator=g)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v, dout))


# -- section: blocks ------------------------------------------------------------------------------

def section_blocks(device: str, quick: bool, rec: Recorder, only: dict | None = None) -> None:
    only = only or {}
    z = shapes(device, quick)
    B, H, G, S, D, p, u, w = (z[x] for x in ("B", "H", "G", "S", "D", "p", "u", "window"))
    scale = D ** -0.5
    docs = make_documents(B, S, device)
    masks = {"causal": dict(window=None, documents=None), "documents": dict(window=None, documents=docs),
             "window": dict(window=w, documents=None)}
    for dtype_name in only.get("dtypes") or DTYPES:
        dtype = DTYPES[dtype_name]
        q, k, v, dout = inputs(B, H, G, S, D, dtype, device)
        # SDPA in this dtype against float64, causal: what the fused kernels themselves reach.
        causal_ref = attention_with_grads(q, k, v, dout, scale)
        own = attention_with_grads(q, k, v, dout, scale, dtype=dtype)
        sdpa_err = max(rel_err(a, b) for a, b in zip(own, causal_ref))
        tol = max(BASE_TOL[dtype_name], 4 * sdpa_err)
        rec.add(f"SDPA {dtype_name} vs float64 (sets the tolerance)", math.isfinite(sdpa_err),
                f"max err {sdpa_err:.2e} -> tol {tol:.1e}", sdpa_err=sdpa_err, tol=tol, dtype=dtype_name)
        del own
        for mask_name in only.get("masks") or MASKS:
            m, ref = masks[mask_name], None
            if mask_name == "causal":
                ref = causal_ref
            else:
                visible = dense_mask(S, True, m["window"], m["documents"], device)  # (B | 1, 1, S, S)
                ref = attention_with_grads(q, k, v, dout, scale, visible, explicit=m["documents"] is not None)
                del visible
            for layout in only.get("layouts") or LAYOUTS:
                for impl in only.get("impls") or IMPLS:
                    rec.guard(f"{impl} {layout} {mask_name} {dtype_name}", _check_impl, rec, impl, layout, mask_name,
                              dtype_name, q, k, v, dout, ref, m, p, scale, u, tol, device)
            sync(device)
        del ref, causal_ref
    if not only:
        rec.guard("single blocks", _check_single_blocks, rec, device, quick)


def _check_impl(rec, impl, layout, mask_name, dtype_name, q, k, v, dout, ref, m, p, scale, u, tol, device):
    S = q.shape[2]
    table = table_for(layout, p, S, True, m["window"], None if m["documents"] is None else m["documents"].cpu())
    n = _n(table)
    mask = ChunkMask(n, S, True, m["window"], m["documents"])
    qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
    t0 = time.perf_counter()
    with kernel_counter() as counts:
        out = run_impl(impl, qq, kk, vv, table, mask, scale, u)
        out.backward(dout)
        sync(device)
    seconds = time.perf_counter() - t0
    errs = {name: rel_err(got, want) for name, got, want in zip(("out", "dq", "dk", "dv"),
                                                                (out.detach(), qq.grad, kk.grad, vv.grad), ref)}
    ok = all(e <= tol for e in errs.values()) and out.dtype == q.dtype
    fallback = device == "cuda" and counts.get("math", 0) > 0
    detail = " ".join(f"{k_}={e:.1e}" for k_, e in errs.items()) + f" (tol {tol:.1e}); kernels {dict(counts)}"
    if fallback:
        detail += "; the math kernel ran on CUDA"
    rec.add(f"{impl} {layout} {mask_name} {dtype_name}", ok and not fallback, detail, errors=errs, tol=tol,
            kernels=dict(counts), seconds=seconds, impl=impl, layout=layout, mask=mask_name, dtype=dtype_name)


def _check_single_blocks(rec, device: str, quick: bool) -> None:
    """One block, forward then backward with its own out and lse (a block that is the whole key
    set): against float64, for each kernel the device has, odd lengths, GQA, a mask with rows
    that see no key (out 0, lse -inf, gradients 0)."""
    kernels = ["auto", "flash", "math"] + (["efficient"] if device == "cuda" else [])
    D = 16 if quick else 64
    cases = [("full 100x200 GQA", 100, 200, False, False), ("causal 77x77", 77, 77, True, False),
             ("masked 96x160 dead rows", 96, 160, False, True)]
    for dtype_name, dtype in DTYPES.items():
        for label, Sq, Sk, causal, masked in cases:
            g = torch.Generator().manual_seed(Sq)
            q = torch.randn(2, 4, Sq, D, generator=g).to(device=device, dtype=dtype)
            k, v = (torch.randn(2, 2, Sk, D, generator=g).to(device=device, dtype=dtype) for _ in range(2))
            dout = torch.randn(2, 4, Sq, D, generator=g).to(device=device, dtype=dtype)
            bias = visible = None
            if masked:
                visible = torch.rand(2, 1, Sq, Sk, generator=g) < 0.3
                visible[:, :, -7:] = False  # 7 rows that see no key
                visible = visible.to(device)
                bias = torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill(~visible, float("-inf"))
            scale = D ** -0.5
            if causal:
                visible_ref = torch.ones(Sq, Sk, dtype=torch.bool, device=device).tril()[None, None]
            else:
                visible_ref = visible
            ref = attention_with_grads(q, k, v, dout, scale, visible_ref, explicit=True)
            for kernel in kernels:
                name = f"block {label} {dtype_name} kernel={kernel}"
                try:
                    picked = attention.pick_kernel(kernel, q, bias)
                except ValueError as e:  # a kernel that cannot take this block says so
                    rec.add(name, True, f"refused as expected: {e}")
                    continue
                out, lse = block_forward(q, k, v, causal, scale, kernel, bias)
                grads = block_backward(dout, q, k, v, out, lse, causal, scale, kernel, bias)
                errs = {n_: rel_err(a, b) for n_, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), ref)}
                # fp32 fused kernels: 5e-3 leaves room for TF32-class arithmetic; a wrong lse, mask or
                # padding is off by O(1) (or nan)
                tol = BASE_TOL[dtype_name] if dtype == torch.bfloat16 or picked == "math" else 5e-3
                ok = all(e <= tol for e in errs.values()) and lse.dtype == torch.float32 and lse.shape == q.shape[:3]
                if masked:
                    dead = ~visible.any(-1).expand(2, 4, Sq)  # (B, H, Sq)
                    ok &= bool(torch.isneginf(lse[dead]).all()) and bool((out[dead] == 0).all())
                    ok &= bool((grads[0][dead] == 0).all())
                    ok &= bool(torch.isfinite(lse[~dead]).all())
                rec.add(name, ok, f"ran {picked}: " + " ".join(f"{k_}={e:.1e}" for k_, e in errs.items()) +
                        f" (tol {tol:.0e})", errors=errs, kernel=picked)


# -- section: train -------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def section_train(device: str, quick: bool, rec: Recorder) -> None:
    import torch.distributed as dist

    from meshattn.config import ModelConfig, ParallelConfig, TrainConfig
    from meshattn.mesh import ParallelDims, current_device, init_distributed
    from meshattn.training.packing import PackedCorpus
    from meshattn.training.step import build_model, make_optimizer, train_step

    backend = "nccl" if device == "cuda" else "gloo"
    t0 = time.perf_counter()
    used = init_distributed(0, 1, f"tcp://127.0.0.1:{_free_port()}", backend=backend, timeout_s=120)
    try:
        x = torch.full((4,), 2.0, device=current_device())
        dist.all_reduce(x)
        sync(device)
        rec.add(f"{used} process group (1 rank) + all-reduce", used == backend and dist.get_backend() == backend
                and current_device().type == device and bool((x == 2.0).all()),
                f"backend {dist.get_backend()}, device {current_device()}, {time.perf_counter() - t0:.1f}s")
        dims = ParallelDims(ParallelConfig())
        z = shapes(device, quick)["train"]
        corpus = PackedCorpus.from_path(None, max_bytes=1 << 18)  # the standard library's files as documents
        model_cfg = ModelConfig(d_model=z["d_model"], n_heads=z["n_heads"], n_kv_heads=z["n_kv_heads"], n_layers=2,
                                vocab_size=256, max_seq_len=z["seq_len"], norm="rmsnorm", activation="swiglu",
                                window=z["window"])
        for dtype in ("float32", "bfloat16"):
            rec.guard(f"train step {dtype}", _train_step, rec, dims, corpus, model_cfg, z, dtype, device,
                      build_model, make_optimizer, train_step, TrainConfig, ParallelConfig)
    finally:
        dist.destroy_process_group()


def _train_step(rec, dims, corpus, model_cfg, z, dtype, device, build_model, make_optimizer, train_step,
                TrainConfig, ParallelConfig) -> None:
    cfg = TrainConfig(model=model_cfg, parallel=ParallelConfig(), steps=2, batch_size=z["batch"], seq_len=z["seq_len"],
                      warmup=1, dtype=dtype, sample_tokens=0, pack_documents=True)
    model = build_model(cfg, dims)
    opt = make_optimizer(model, cfg)
    before = [t.detach().clone() for t in model.parameters()]
    t0 = time.perf_counter()
    with kernel_counter() as counts:
        loss, norm = train_step(model, opt, corpus, 0, cfg)
    sync(device)
    seconds = time.perf_counter() - t0
    after = list(model.parameters())
    changed = sum(not torch.equal(a, b.detach()) for a, b in zip(before, after))
    on_device = all(t.device.type == device for t in after)
    ok = math.isfinite(loss) and math.isfinite(norm) and changed == len(before) and on_device and counts
    if device == "cuda":
        ok = ok and counts.get("math", 0) == 0
    rec.add(f"train step {dtype}", ok, f"loss {loss:.4f}, grad norm {norm:.3f}, {changed}/{len(before)} parameters "
            f"changed, kernels {dict(counts)}, {seconds:.1f}s", loss=loss, norm=norm, kernels=dict(counts))


# -- section: perf --------------------------------------------------------------------------------

def _timer(device: str, fn, iters: int, warmup: int) -> float:
    """Seconds per call of fn (CUDA events on CUDA)."""
    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def _sdpa_backend(q, k, v, causal) -> str:
    try:
        from torch.nn.attention import SDPBackend

        return SDPBackend(torch._fused_sdp_choice(q, k, v, None, 0.0, causal)).name
    except Exception:  # noqa: BLE001 - informational only
        return "?"


def section_perf(device: str, quick: bool, rec: Recorder) -> None:
    z = shapes(device, quick)
    rows = []
    for B, H, S, D, causal, dtype_name in z["perf"]:
        rec.guard(f"perf B={B} H={H} S={S} D={D} {'causal' if causal else 'full'} {dtype_name}", _perf_shape, rec, rows,
                  device, B, H, S, D, causal, dtype_name, z["iters"], z["warmup"])
    if rows:
        print("\n" + perf_table(rows), flush=True)


def _perf_shape(rec, rows, device, B, H, S, D, causal, dtype_name, iters, warmup) -> None:
    dtype = DTYPES[dtype_name]
    q, k, v, dout = inputs(B, H, H, S, D, dtype, device, seed=1)
    scale = D ** -0.5
    kernel = attention.pick_kernel("auto", q)
    fwd_flops = 4 * B * H * S * S * D / (2 if causal else 1)
    bwd_flops = 2.5 * fwd_flops

    ours = {}
    ours["fwd"] = _timer(device, lambda: block_forward(q, k, v, causal, scale), iters, warmup)
    out, lse = block_forward(q, k, v, causal, scale)
    ours["bwd"] = _timer(device, lambda: block_backward(dout, q, k, v, out, lse, causal, scale), iters, warmup)
    grads = block_backward(dout, q, k, v, out, lse, causal, scale)

    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
    backend = _sdpa_backend(q, k, v, causal)
    sdpa = {}
    with torch.no_grad():
        sdpa["fwd"] = _timer(device, lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale),
                             iters, warmup)
    ref_out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale)
    sdpa["bwd"] = _timer(device, lambda: torch.autograd.grad(ref_out, (qs, ks, vs), dout, retain_graph=True), iters,
                         warmup)
    ref_grads = torch.autograd.grad(ref_out, (qs, ks, vs), dout)
    errs = {name: rel_err(a, b) for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads),
                                                      (ref_out.detach(), *ref_grads))}
    tflops = {f"{who}_{part}": (fwd_flops if part == "fwd" else bwd_flops) / t / 1e12
              for who, times in (("ours", ours), ("sdpa", sdpa)) for part, t in times.items()}
    total_ours = (fwd_flops + bwd_flops) / (ours["fwd"] + ours["bwd"]) / 1e12
    total_sdpa = (fwd_flops + bwd_flops) / (sdpa["fwd"] + sdpa["bwd"]) / 1e12
    row = dict(B=B, H=H, S=S, D=D, causal=causal, dtype=dtype_name, kernel=kernel, sdpa_backend=backend,
               seconds={"ours": ours, "sdpa": sdpa}, tflops=tflops, total_ours=total_ours, total_sdpa=total_sdpa,
               ratio=total_ours / total_sdpa, errors=errs)
    rows.append(row)
    tol = PERF_TOL[dtype_name]
    ok = all(e <= tol for e in errs.values())
    rec.add(f"perf B={B} H={H} S={S} D={D} {'causal' if causal else 'full'} {dtype_name}", ok,
            f"{kernel}: {_tf(total_ours)} TFLOP/s fwd+bwd vs SDPA ({backend}) {_tf(total_sdpa)} "
            f"({row['ratio']:.2f}x); max diff to SDPA " + " ".join(f"{k_}={e:.1e}" for k_, e in errs.items()),
            perf=row)


def _tf(x: float) -> str:
    return f"{x:.1f}" if x >= 10 else f"{x:.3g}"


def perf_table(rows: list[dict]) -> str:
    lines = ["| shape (B, H, S, D) | mask | dtype | our kernel | ours fwd / bwd / total TFLOP/s | SDPA (backend) "
             "fwd / bwd / total TFLOP/s | ours / SDPA |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r["tflops"]
        lines.append(f"| ({r['B']}, {r['H']}, {r['S']}, {r['D']}) | {'causal' if r['causal'] else 'full'} | "
                     f"{r['dtype']} | {r['kernel']} | {_tf(t['ours_fwd'])} / {_tf(t['ours_bwd'])} / "
                     f"{_tf(r['total_ours'])} | "
                     f"({r['sdpa_backend']}) {_tf(t['sdpa_fwd'])} / {_tf(t['sdpa_bwd'])} / {_tf(r['total_sdpa'])} | "
                     f"{r['ratio']:.2f}x |")
    return "\n".join(lines)


# -- driver ---------------------------------------------------------------------------------------

RUNNERS = {"blocks": section_blocks, "train": section_train, "perf": section_perf}


def run_section(name: str, device: str, quick: bool, result_path: str | None, only: dict | None = None) -> int:
    """Run one section in this process (what each child does)."""
    torch.manual_seed(0)
    rec = Recorder(name, result_path)
    threads = torch.get_num_threads()
    if device == "cpu" and quick:
        torch.set_num_threads(1)  # tiny ops: threads only add synchronisation (and spin on a busy machine)
    try:
        if name == "blocks":
            section_blocks(device, quick, rec, only)
        else:
            RUNNERS[name](device, quick, rec)
        sync(device)
    except Exception as e:  # noqa: BLE001 - the section could not go on; what it did is recorded
        rec.add(f"{name} section", False, f"raised {type(e).__name__}: {e}", traceback=traceback.format_exc()[-3000:])
        return 1
    finally:
        torch.set_num_threads(threads)
    return 0


def _stream(proc, tail: collections.deque) -> None:
    for line in proc.stdout:
        sys.stdout.write("    " + line)
        sys.stdout.flush()
        tail.append(line)


def _only_args(only: dict | None) -> list[str]:
    args = []
    for key, values in (only or {}).items():
        if values:
            args += [f"--{key}", *values]
    return args


def run_child(name: str, device: str, quick: bool, limit_s: float, only: dict | None = None) -> list[dict]:
    """One section in a child process, its output streamed; its recorded checks, plus a failed
    one if it crashed or ran past its time limit."""
    fd, path = tempfile.mkstemp(prefix=f"gpu_check_{name}_", suffix=".jsonl")
    os.close(fd)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--device", device, "--section", name, "--result", path]
    if quick:
        cmd.append("--quick")
    cmd += _only_args(only)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    tail: collections.deque = collections.deque(maxlen=40)
    reader = threading.Thread(target=_stream, args=(proc, tail), daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=limit_s)
        timed_out = False
    except subprocess.TimeoutExpired:
        proc.kill()
        rc, timed_out = proc.wait(), True
    reader.join(timeout=5)
    seconds = time.perf_counter() - t0
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    os.unlink(path)
    if timed_out:
        rows.append({"section": name, "name": f"{name} section", "ok": False,
                     "detail": f"killed after its time limit of {limit_s:.0f}s", "log_tail": "".join(tail)})
    elif rc != 0 and all(r["ok"] for r in rows):
        rows.append({"section": name, "name": f"{name} section", "ok": False,
                     "detail": f"exited with status {rc}", "log_tail": "".join(tail)})
    rows.append({"section": name, "name": "_timing", "ok": True, "seconds": seconds})
    return rows


def environment(device: str) -> dict:
    env = {"torch": torch.__version__, "device": device, "python": sys.version.split()[0]}
    if device == "cuda" and torch.cuda.is_available():
        try:
            props = torch.cuda.get_device_properties(0)
            cap = (props.major, props.minor)
            env.update(gpu=props.name, capability=f"{cap[0]}.{cap[1]}", memory_gib=round(props.total_memory / 2**30),
                       cuda=torch.version.cuda)
            env["auto_kernels"] = {f"{dt} D=128 {'masked' if b else 'plain'}":
                                   auto_kernel("cuda", DTYPES[dt], 128, b, cap) for dt in DTYPES for b in (False, True)}
            env["nccl"] = str(torch.cuda.nccl.version())
        except Exception as e:  # noqa: BLE001 - informational only
            env["environment_error"] = f"{type(e).__name__}: {e}"
    return env


def markdown(env: dict, rows: list[dict], timings: dict) -> str:
    checks = [r for r in rows if r["name"] != "_timing"]
    failed = [r for r in checks if not r["ok"]]
    lines = [f"# gpu_check: {'PASS' if not failed else 'FAIL'} ({len(checks) - len(failed)}/{len(checks)} checks)", "",
             "Environment: " + ", ".join(f"{k}={v}" for k, v in env.items()), "",
             "Section times: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()), "",
             "| section | check | result | detail |", "|---|---|---|---|"]
    for r in checks:
        lines.append(f"| {r['section']} | {r['name']} | {'PASS' if r['ok'] else 'FAIL'} | "
                     f"{str(r.get('detail', '')).replace('|', '/')} |")
    perf = [r["perf"] for r in checks if "perf" in r]
    if perf:
        lines += ["", "## Local kernels vs SDPA", "", "FLOPs: forward 4*B*H*S*S*D, halved when causal; backward 2.5x "
                  "the forward.", "", perf_table(perf)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (the CPU smoke run)")
    ap.add_argument("--out", help="write the results as JSON to this file and a markdown report next to it (.md)")
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    ap.add_argument("--in-process", action="store_true", help="run the sections in this process (no isolation)")
    ap.add_argument("--impls", nargs="+", choices=IMPLS, help="blocks: only these impls (and no single-block checks)")
    ap.add_argument("--layouts", nargs="+", choices=LAYOUTS, help="blocks: only these layouts")
    ap.add_argument("--masks", nargs="+", choices=MASKS, help="blocks: only these masks")
    ap.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), help="blocks: only these dtypes")
    ap.add_argument("--section", choices=SECTIONS, help=argparse.SUPPRESS)  # a child: run this one section
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    only = {key: getattr(args, key) for key in ("impls", "layouts", "masks", "dtypes") if getattr(args, key)}
    if args.section:
        return run_section(args.section, args.device, args.quick, args.result, only)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("FAIL: no CUDA device here (torch.cuda.is_available() is False); use --device cpu for the CPU run")
        return 1
    quick = args.quick or args.device == "cpu"  # CPU runs are the tiny smoke run
    env = environment(args.device)
    print("gpu_check: " + ", ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    rows, timings = [], {}
    t_all = time.perf_counter()
    for name in args.sections:
        print(f"\n== {name} ==", flush=True)
        if args.in_process:
            fd, path = tempfile.mkstemp(suffix=".jsonl")
            os.close(fd)
            t0 = time.perf_counter()
            run_section(name, args.device, quick, path, only)
            with open(path) as f:
                got = [json.loads(line) for line in f if line.strip()]
            os.unlink(path)
            got.append({"section": name, "name": "_timing", "ok": True, "seconds": time.perf_counter() - t0})
        else:
            got = run_child(name, args.device, quick, TIME_LIMIT_S[args.device][name], only)
        timings[name] = next(r["seconds"] for r in got if r["name"] == "_timing")
        rows += got
    checks = [r for r in rows if r["name"] != "_timing"]
    failed = [r for r in checks if not r["ok"]]
    print(f"\n== summary ({time.perf_counter() - t_all:.0f}s: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items())
          + ") ==")
    for name in args.sections:
        mine = [r for r in checks if r["section"] == name]
        bad = [r for r in mine if not r["ok"]]
        print(f"{'PASS' if mine and not bad else 'FAIL'} {name}: {len(mine) - len(bad)}/{len(mine)} checks passed")
        for r in bad:
            print(f"    FAIL {r['name']}: {r.get('detail', '')}")
            if r.get("log_tail"):
                print("        " + r["log_tail"].rstrip().replace("\n", "\n        "))
    ok = not failed and all(any(r["section"] == name for r in checks) for name in args.sections)
    print("PASS" if ok else "FAIL")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"ok": ok, "environment": env, "timings": timings, "checks": checks}, indent=1))
        md = out.with_suffix(".md") if out.suffix == ".json" else Path(str(out) + ".md")
        md.write_text(markdown(env, rows, timings))
        print(f"wrote {out} and {md}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
