"""Each differentiable collective against a single-process emulation of the whole group.

Every rank builds all ranks' inputs and upstream gradients from fixed seeds, runs the collective
for real, and compares its own output and input gradient with what autograd gives on the
emulated global computation. Each collective has a contract on which side is replicated: a
replicated output (e.g. after an all-reduce) feeds a loss counted once, a per-rank output feeds
a loss summed over ranks; the emulation encodes exactly that.
"""

from __future__ import annotations

import pytest
import torch

from meshattn import comm
from meshattn.comm import Axis, CommCounter

SHAPE = (2, 4, 8, 3)  # divisible by 1, 2, 4 along dims 1 and 2


def _tensor(seed: int) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _emulate(kind: str, p: int):
    """(per-rank inputs, per-rank outputs, global loss) of the emulated collective."""
    xs = [_tensor(100 + r).requires_grad_() for r in range(p)]
    if kind in ("copy_to_group", "scatter_to_group"):
        xs = [xs[0]] * p  # replicated input
    if kind == "copy_to_group":
        outs = xs
    elif kind == "reduce_from_group":
        outs = [sum(xs)] * p
    elif kind == "gather_from_group":
        outs = [torch.cat(xs, dim=2)] * p
    elif kind == "scatter_to_group":
        outs = list(xs[0].chunk(p, dim=2))
    elif kind == "all_gather":
        outs = [torch.cat(xs, dim=2) for _ in range(p)]
    elif kind == "reduce_scatter":
        outs = list(sum(xs).chunk(p, dim=2))
    elif kind == "all_to_all":  # sequence shards (dim 2) -> head shards (dim 1), as Ulysses does
        outs = [torch.cat([x.chunk(p, dim=1)[r] for x in xs], dim=2) for r in range(p)]
    else:
        raise ValueError(kind)
    gen = torch.Generator().manual_seed(200)
    ws = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in outs]  # upstream gradients
    if kind in ("reduce_from_group", "gather_from_group"):  # replicated output: one loss, counted once
        ws = [ws[0]] * p
        loss = (outs[0] * ws[0]).sum()
    else:
        loss = sum((o * w).sum() for o, w in zip(outs, ws))
    return xs, outs, ws, loss


CALLS = {
    "copy_to_group": lambda x, a: comm.copy_to_group(x, a),
    "reduce_from_group": lambda x, a: comm.reduce_from_group(x, a),
    "gather_from_group": lambda x, a: comm.gather_from_group(x, 2, a),
    "scatter_to_group": lambda x, a: comm.scatter_to_group(x, 2, a),
    "all_gather": lambda x, a: comm.all_gather(x, 2, a),
    "reduce_scatter": lambda x, a: comm.reduce_scatter(x, 2, a),
    "all_to_all": lambda x, a: comm.all_to_all(x, 1, 2, a),
}
# What the counter must record: (kind, phase, payload numel in units of the local input's numel).
# Payloads are full tensors: the reduced tensor, the gathered output, the unscattered input.
RECORDS = {
    "copy_to_group": [("all_reduce", "bwd", 1)],
    "reduce_from_group": [("all_reduce", "fwd", 1)],
    "gather_from_group": [("all_gather", "fwd", "p")],
    "scatter_to_group": [("all_gather", "bwd", 1)],
    "all_gather": [("all_gather", "fwd", "p"), ("reduce_scatter", "bwd", "p")],
    "reduce_scatter": [("reduce_scatter", "fwd", 1), ("all_gather", "bwd", 1)],
    "all_to_all": [("all_to_all", "fwd", 1), ("all_to_all", "bwd", 1)],
}


def check_collective(rank, world, kind):
    import torch.distributed as dist

    xs, outs, ws, loss = _emulate(kind, world)
    loss.backward()
    counter = CommCounter()
    axis = Axis("x", dist.group.WORLD, world, rank, counter)
    x = xs[rank].detach().clone().requires_grad_()
    out = CALLS[kind](x, axis)
    torch.testing.assert_close(out, outs[rank].detach(), rtol=0, atol=1e-12)
    out.backward(ws[rank])
    torch.testing.assert_close(x.grad, xs[rank].grad, rtol=0, atol=1e-12)
    numel = torch.Size(SHAPE).numel()
    expected = {("x", k, ph): numel * (world if m == "p" else 1) * 8 for k, ph, m in RECORDS[kind]}
    assert dict(counter.nbytes) == expected, f"{dict(counter.nbytes)} != {expected}"
    assert all(v == 1 for v in counter.calls.values()), dict(counter.calls)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("kind", sorted(CALLS))
def test_collective_matches_emulation(pools, world, kind):
    pools.run(world, check_collective, kind=kind)


def test_size_one_axis_is_identity_and_silent():
    counter = CommCounter()
    axis = Axis("x", None, 1, 0, counter)
    x = _tensor(0)
    for call in CALLS.values():
        assert call(x, axis) is x
    assert not counter.nbytes


def test_undivisible_split_is_refused_before_communicating():
    axis = Axis("tp", None, 4, 0, CommCounter())
    with pytest.raises(ValueError, match="dim 2 of size 6 is not divisible by the tp axis size 4"):
        comm.reduce_scatter(torch.zeros(1, 1, 6), 2, axis)
    assert not axis.counter.nbytes


def test_wire_bytes_use_ring_factors():
    c = CommCounter()
    c.record("tp", 4, "all_reduce", "fwd", 100, 4)
    c.record("tp", 4, "all_gather", "bwd", 100, 4)
    assert c.total(axis="tp") == 800 and c.total(kind="all_reduce") == 400
    assert c.wire_bytes("tp") == pytest.approx(400 * 2 * 3 / 4 + 400 * 3 / 4)
    assert c.as_dict() == {"tp/all_gather/bwd": {"calls": 1, "bytes": 400},
                           "tp/all_reduce/fwd": {"calls": 1, "bytes": 400}}
