"""Context-parallel attention memory: the exact live-tensor measurement (bench/live.py) against the
model (planner/buffers.py), per rank and byte for byte, on gloo ranks; the issue-3 ring floor."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.distributed as dist

from distributed import hybrid_context
from meshattn import context_attention, shard_sequence
from meshattn.bench.live import LiveMemory
from meshattn.comm import Axis
from meshattn.planner.buffers import context_attention_memory, context_attention_peak_bytes, context_buffer_bytes

# (B, H, G, D) and chunk length: small, so that every rank's run takes milliseconds.
SHAPE, CHUNK = (1, 4, 4, 8), 32
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float64": 8}


def _measure(rank, world, configs):
    """Per config (impl, layout, overlap, ulysses_size, dtype, (B, H, G, D)): this rank's peak
    live bytes of one context_attention call, forward and backward, q, k, v, dout included, and
    the bytes freed off this thread (0: thread timing cannot have touched the figure)."""
    results = []
    for impl, layout, overlap, ulysses_size, dtype, (B, H, G, D) in configs:
        if impl == "hybrid":
            group = hybrid_context(world, ulysses_size)
            axis = group.axis
        else:
            group = axis = Axis("cp", dist.group.WORLD, world, rank)
        S = CHUNK * world * (2 if layout == "zigzag" else 1)
        g = torch.Generator().manual_seed(0)
        dt = getattr(torch, dtype)
        q, dout = (torch.randn(B, H, S, D, generator=g).to(dt) for _ in range(2))
        k, v = (torch.randn(B, G, S, D, generator=g).to(dt) for _ in range(2))
        local = [shard_sequence(t, axis, 2, layout).clone().requires_grad_() for t in (q, k, v)]
        dout = shard_sequence(dout, axis, 2, layout).clone()
        gc.collect()
        with LiveMemory(local + [dout], record=False) as live:
            out = context_attention(*local, group, impl=impl, layout=layout, overlap=overlap, ulysses_size=ulysses_size)
            out.backward(dout)
            del out
        results.append((live.baseline_bytes + live.peak, live.foreign_frees))
    return results


def _model(world, impl, layout, overlap, ulysses_size, dtype, shape):
    B, H, G, D = shape
    S = CHUNK * world * (2 if layout == "zigzag" else 1)
    return [r.peak for r in context_attention_memory(impl, world, B, H, G, S, D, ITEMSIZE[dtype], ulysses_size,
                                                     overlap, layout)]


CONFIGS = {
    2: [("ring", "zigzag", True, None, "float32", SHAPE), ("ring", "zigzag", False, None, "float32", SHAPE),
        ("ring", "contiguous", True, None, "float32", SHAPE), ("ring", "contiguous", False, None, "float32", SHAPE),
        ("ulysses", "zigzag", True, None, "float32", SHAPE), ("allgather", "zigzag", True, None, "float32", SHAPE)],
    4: [("ring", "zigzag", True, None, "float32", SHAPE), ("ring", "zigzag", False, None, "float32", SHAPE),
        ("ring", "contiguous", True, None, "float32", SHAPE), ("ring", "contiguous", False, None, "float32", SHAPE),
        ("ring", "zigzag", True, None, "bfloat16", (1, 4, 2, 8)), ("hybrid", "zigzag", True, 2, "float32", SHAPE)],
}


@pytest.mark.parametrize("world", [2, 4])
def test_model_equals_measured_peak_on_every_rank(pools, world):
    """The issue-3 ring floor, and every impl's: the model and the measured buffers agree, byte
    for byte, on each rank (the measurement is deterministic: it counts tensors, and gloo's
    worker threads are given time to let go of a finished collective's buffers; no buffer was
    freed off the calling thread)."""
    configs = CONFIGS[world]
    measured = pools.run(world, _measure, configs=configs)
    for i, config in enumerate(configs):
        got = [m[i][0] for m in measured]
        assert [m[i][1] for m in measured] == [0] * world, config
        assert got == _model(world, *config), (config, got)


def _unit(world, layout="zigzag"):
    B, H, _, D = SHAPE
    return B * H * (CHUNK * world * (2 if layout == "zigzag" else 1) // world) * D * 4


def test_ring_floor_in_units():
    """Ring attention at cp=4 (zigzag, fp32, MHA): 18.5u with overlap, 14.5u without, plus the
    lse (u/D). Issue 3's floor of 12u (10u without overlap) leaves out three things the code
    must hold: the rank's own dk, dv (2u: its share of its own block, kept from the first step
    so that adding the others' share gives the same bits), the previous block's dK/dV sum still
    travelling to r+1 while the next block is computed (2u, overlap only), and the fused
    kernel's fresh dq, dk, dv of the block being computed (2.5u: half a block of queries, a
    whole block of keys)."""
    B, H, _, D = SHAPE
    for overlap, units, buffers in [
        (True, 18.5, {"kv_in_hand": 2, "kv_prefetch": 2, "dkv_incoming": 2, "dkv_sending": 2, "kernel_grads": 2.5}),
        (False, 14.5, {"kv_in_hand": 2, "dkv_incoming": 2, "kernel_grads": 2.5}),
    ]:
        S = CHUNK * 8
        u = _unit(4)
        peak = context_attention_peak_bytes("ring", 4, B, H, H, S, D, overlap=overlap)
        assert peak == units * u + u // D
        got = context_buffer_bytes("ring", 4, B, H, H, S, D, overlap=overlap)
        assert {k: v / u for k, v in got.items() if k != "total"} == buffers
        assert got["total"] == sum(buffers.values()) * u


def test_model_units_do_not_grow_with_the_ring():
    """Zigzag ring memory per rank is flat in cp (18.5u + lse from cp=4 on): every step holds the
    same buffers; the all-gather's grows as 2p G/H u for the gathered K/V and as much again
    for their gradients."""
    B, H, _, D = SHAPE
    peaks = {}
    for p in (4, 8, 16):
        u = B * H * CHUNK * 2 * D * 4
        peaks[p] = context_attention_peak_bytes("ring", p, B, H, H, CHUNK * 2 * p, D) / u
        ag = context_buffer_bytes("allgather", p, B, H, H, CHUNK * 2 * p, D)
        assert ag["kv_gathered"] == ag["dkv_gathered"] == 2 * p * u
    assert peaks[4] == peaks[8] == peaks[16] == 18.5 + 1 / D


def test_live_memory_counts_a_matmul_chain_exactly():
    """x = a @ b, y = x @ b, z = y @ b, backward of z.sum(): x, y, z, then the backward's dy and
    a db, then dx and the other db: 7 blocks at the peak (and the 4-byte sum and its 4-byte
    gradient); left: y, z and the two .grad."""
    a, b = (torch.randn(64, 64, requires_grad=True) for _ in range(2))
    with LiveMemory((a, b)) as live:
        x = a @ b
        y = x @ b
        z = y @ b
        del x
        z.sum().backward()
    block = 64 * 64 * 4
    assert live.baseline_bytes == 2 * block
    assert live.peak == 7 * block + 8
    assert live.current == 4 * block
    assert [t.op for t in live.at_peak].count("mm") == 7


def test_live_memory_ignores_views_of_storages_it_did_not_see_made():
    """A weight made before the stretch and viewed inside it (w.t()) is no new tensor."""
    w = torch.randn(32, 32)
    a = torch.randn(32, 32)
    with LiveMemory((a,)) as live:
        y = a @ w.t()
    assert live.peak == y.untyped_storage().nbytes() and live.untracked == {"t": w.untyped_storage().nbytes()}
