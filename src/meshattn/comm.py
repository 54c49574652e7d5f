"""Differentiable collectives over one mesh axis, and the byte counter that audits them.

Each collective is a small autograd.Function whose docstring states its forward and its
backward. All of them take an `Axis` (process group + name + counter) as an argument; nothing
here keeps global state. On an axis of size 1 every collective is the identity and records
nothing.

Byte accounting: for every call the counter records the *payload*, the size of the full tensor
the collective is about (the reduced tensor of an all-reduce, the gathered output of an
all-gather, the unscattered input of a reduce-scatter, the exchanged tensor of an all-to-all),
keyed by (axis, kind, phase). Phases: "fwd" and "bwd" for the model's forward and backward,
"step" for the optimizer step and metrics. `wire_bytes` converts payloads to per-rank ring traffic.
"""

from __future__ import annotations

import collections
import dataclasses
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.autograd import Function

# torch 2.13 renamed the tensor-in/tensor-out collectives; older releases only have the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

KINDS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv")
# Per-rank traffic of a ring algorithm, as a multiple of the payload, for a group of size p.
_WIRE_FACTOR = {
    "all_reduce": lambda p: 2 * (p - 1) / p,
    "all_gather": lambda p: (p - 1) / p,
    "reduce_scatter": lambda p: (p - 1) / p,
    "all_to_all": lambda p: (p - 1) / p,
    "send_recv": lambda p: 1.0,
}


@dataclass
class CommCounter:
    """Calls and payload bytes per (axis, kind, phase); phase is "fwd", "bwd" or "step"."""

    calls: collections.Counter = field(default_factory=collections.Counter)
    nbytes: collections.Counter = field(default_factory=collections.Counter)
    group_size: dict = field(default_factory=dict)

    def record(self, axis: str, size: int, kind: str, phase: str, numel: int, itemsize: int) -> None:
        key = (axis, kind, phase)
        self.calls[key] += 1
        self.nbytes[key] += numel * itemsize
        self.group_size[axis] = size

    def reset(self) -> None:
        self.calls.clear()
        self.nbytes.clear()

    def total(self, axis: str | None = None, kind: str | None = None, phase: str | None = None,
              what: str = "bytes") -> int:
        source = self.nbytes if what == "bytes" else self.calls
        return sum(v for (a, k, p), v in source.items()
                   if (axis is None or a == axis) and (kind is None or k == kind) and (phase is None or p == phase))

    def wire_bytes(self, axis: str | None = None) -> float:
        """Bytes each rank sends under ring algorithms, summed over recorded calls."""
        return sum(v * _WIRE_FACTOR[k](self.group_size[a]) for (a, k, _), v in self.nbytes.items()
                   if axis is None or a == axis)

    def as_dict(self) -> dict:
        return {f"{a}/{k}/{p}": {"calls": self.calls[(a, k, p)], "bytes": b}
                for (a, k, p), b in sorted(self.nbytes.items())}


@dataclass(frozen=True)
class Axis:
    """One mesh axis as the collectives see it: its group, its name, and where to count bytes."""

    name: str
    group: dist.ProcessGroup | None
    size: int
    rank: int
    counter: CommCounter | None = None

    @classmethod
    def of(cls, mesh, name: str, counter: CommCounter | None = None) -> Axis:
        sub = mesh[name]
        return cls(name, sub.get_group(), sub.size(), sub.get_local_rank(), counter)

    @classmethod
    def from_group(cls, group, name: str) -> Axis:
        """An Axis from an Axis (returned as is), a ProcessGroup, or None (the default group)."""
        if isinstance(group, Axis):
            return group
        group = group if group is not None else dist.group.WORLD
        return cls(name, group, dist.get_world_size(group), dist.get_rank(group), None)

    @classmethod
    def single(cls, name: str = "none") -> Axis:
        return cls(name, None, 1, 0, None)

    def with_counter(self, counter: CommCounter | None) -> Axis:
        """The same group counting into `counter` (None: traffic that is not the model's, such
        as checkpoints and sampling)."""
        return dataclasses.replace(self, counter=counter)

    def record(self, kind: str, phase: str, t: torch.Tensor) -> None:
        if self.counter is not None:
            self.counter.record(self.name, self.size, kind, phase, t.numel(), t.element_size())


# -- raw collectives (not differentiable); each records itself ---------------------------------

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


def all_reduce_(t: torch.Tensor, axis: Axis, phase: str, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (op "sum" or "max") of a contiguous tensor."""
    if axis.size > 1:
        axis.record("all_reduce", phase, t)
        dist.all_reduce(t, op=_OPS[op], group=axis.group)
    return t


def all_reduce_start(t: torch.Tensor, axis: Axis, phase: str):
    """Post an in-place sum all-reduce of a contiguous tensor; returns the work to wait for."""
    axis.record("all_reduce", phase, t)
    return dist.all_reduce(t, group=axis.group, async_op=True)


def all_gather_raw(x: torch.Tensor, dim: int, axis: Axis, phase: str) -> torch.Tensor:
    work, finish = all_gather_start(x, dim, axis, phase)
    work.wait()
    return finish()


def reduce_scatter_raw(x: torch.Tensor, dim: int, axis: Axis, phase: str) -> torch.Tensor:
    work, out = reduce_scatter_start(x, dim, axis, phase)
    work.wait()
    return out


def all_gather_start(x: torch.Tensor, dim: int, axis: Axis, phase: str):
    """Post an all-gather of x along `dim`; returns (work, finish): wait for the work, then
    finish() gives the gathered tensor (x.shape with dim scaled by p)."""
    x = x.contiguous()
    flat = x.new_empty((axis.size * x.numel(),))  # p copies of x, flat, rank order
    axis.record("all_gather", phase, flat)
    work = _all_gather_single(flat, x.view(-1), group=axis.group, async_op=True)
    return work, lambda: torch.cat(flat.view(axis.size, *x.shape).unbind(0), dim=dim)


def reduce_scatter_start(x: torch.Tensor, dim: int, axis: Axis, phase: str):
    """Post a reduce-scatter (sum) of x along `dim`; returns (work, out): out holds this rank's
    reduced chunk once the work is waited for."""
    chunks = torch.stack(x.chunk(axis.size, dim=dim))  # (p, *chunk): slot j is reduced onto rank j
    out = x.new_empty(chunks.shape[1:])
    axis.record("reduce_scatter", phase, chunks)
    return _reduce_scatter_single(out.view(-1), chunks.view(-1), group=axis.group, async_op=True), out


def send_recv_start(sends: list[tuple[torch.Tensor, int, int]], recvs: list[tuple[torch.Tensor, int, int]],
                    axis: Axis, phase: str) -> list:
    """Post point-to-point transfers as one batch: sends are (tensor, peer, tag), recvs are
    (buffer, peer, tag), peers given as ranks of the axis. Returns the works to wait for, each
    once (none when there is nothing to move).

    One batch per call: NCCL needs a two-way exchange grouped (a ring of two ranks has one peer
    both ways); gloo matches messages by peer and tag, in the order they were posted."""
    ops = []
    for t, peer, tag in sends:
        axis.record("send_recv", phase, t)
        ops.append(dist.P2POp(dist.isend, t, dist.get_global_rank(axis.group, peer), axis.group, tag))
    for t, peer, tag in recvs:
        ops.append(dist.P2POp(dist.irecv, t, dist.get_global_rank(axis.group, peer), axis.group, tag))
    return dist.batch_isend_irecv(ops) if ops else []


def _split(x: torch.Tensor, dim: int, axis: Axis) -> torch.Tensor:
    return x.chunk(axis.size, dim=dim)[axis.rank].contiguous()


def _all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, axis: Axis, phase: str) -> torch.Tensor:
    send = torch.stack(x.chunk(axis.size, dim=scatter_dim))  # (p, *chunk): slot j goes to rank j
    recv = torch.empty_like(send)  # slot j came from rank j
    axis.record("all_to_all", phase, send)
    dist.all_to_all_single(recv, send, group=axis.group)
    return torch.cat(recv.unbind(0), dim=gather_dim)


def _check_divisible(x: torch.Tensor, dim: int, axis: Axis, what: str) -> None:
    if x.shape[dim] % axis.size:
        raise ValueError(f"{what}: dim {dim} of size {x.shape[dim]} is not divisible by the "
                         f"{axis.name} axis size {axis.size}")


# -- differentiable collectives ----------------------------------------------------------------

class _Adjoint(Function):
    """y = forward(x) in forward; dx = backward(dy) in backward. Every differentiable collective
    below is this one shell with a collective and its adjoint; each function's docstring says
    which pair it is."""

    @staticmethod
    def forward(ctx, x, forward, backward):
        ctx.backward_fn = backward
        return forward(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.backward_fn(grad), None, None


def copy_to_group(x: torch.Tensor, axis: Axis) -> torch.Tensor:
    """Identity forward; all-reduce (sum) backward. Megatron's `f`: the input of a column-parallel
    layer, whose every rank's gradient contribution must be summed."""
    if axis.size == 1:
        return x
    return _Adjoint.apply(x, lambda t: t.view_as(t), lambda g: all_reduce_(g.contiguous().clone(), axis, "bwd"))


def reduce_from_group(x: torch.Tensor, axis: Axis) -> torch.Tensor:
    """All-reduce (sum) forward; identity backward. Megatron's `g`: the partial sums of a
    row-parallel layer."""
    if axis.size == 1:
        return x
    return _Adjoint.apply(x, lambda t: all_reduce_(t.contiguous().clone(), axis, "fwd"), lambda g: g)


def gather_from_group(x: torch.Tensor, dim: int, axis: Axis) -> torch.Tensor:
    """All-gather along `dim` forward; keep this rank's chunk (split) backward."""
    if axis.size == 1:
        return x
    return _Adjoint.apply(x, lambda t: all_gather_raw(t, dim, axis, "fwd"), lambda g: _split(g, dim, axis))


def scatter_to_group(x: torch.Tensor, dim: int, axis: Axis) -> torch.Tensor:
    """Keep this rank's chunk along `dim` (split) forward; all-gather backward."""
    if axis.size == 1:
        return x
    _check_divisible(x, dim, axis, "scatter_to_group")
    return _Adjoint.apply(x, lambda t: _split(t, dim, axis), lambda g: all_gather_raw(g, dim, axis, "bwd"))


def all_gather(x: torch.Tensor, dim: int, axis: Axis) -> torch.Tensor:
    """All-gather along `dim` forward; reduce-scatter backward. The entry of a sequence-parallel
    region: each rank's full-size output gradient is partial and is summed into its chunk."""
    if axis.size == 1:
        return x
    return _Adjoint.apply(x, lambda t: all_gather_raw(t, dim, axis, "fwd"),
                          lambda g: reduce_scatter_raw(g, dim, axis, "bwd"))


def reduce_scatter(x: torch.Tensor, dim: int, axis: Axis) -> torch.Tensor:
    """Reduce-scatter along `dim` forward; all-gather backward. The exit of a row-parallel layer
    under sequence parallelism."""
    if axis.size == 1:
        return x
    _check_divisible(x, dim, axis, "reduce_scatter")
    return _Adjoint.apply(x, lambda t: reduce_scatter_raw(t, dim, axis, "fwd"),
                          lambda g: all_gather_raw(g, dim, axis, "bwd"))


def all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, axis: Axis) -> torch.Tensor:
    """All-to-all forward (split `scatter_dim`, concatenate received chunks along `gather_dim`);
    the inverse all-to-all backward."""
    if axis.size == 1:
        return x
    _check_divisible(x, scatter_dim, axis, "all_to_all")
    return _Adjoint.apply(x, lambda t: _all_to_all(t, scatter_dim, gather_dim, axis, "fwd"),
                          lambda g: _all_to_all(g, gather_dim, scatter_dim, axis, "bwd"))


# -- variable-size collectives (tokens routed to experts) ----------------------------------------

def all_to_all_counts(counts: torch.Tensor, axis: Axis, phase: str = "fwd") -> torch.Tensor:
    """Exchange integer counts: counts (p * c,) whose block j goes to rank j -> (p * c,) whose
    block j came from rank j. Not differentiable."""
    if axis.size == 1:
        return counts
    counts = counts.contiguous()
    out = torch.empty_like(counts)
    axis.record("all_to_all", phase, counts)
    dist.all_to_all_single(out, counts, group=axis.group)
    return out


def _all_to_all_rows(x: torch.Tensor, send: list[int], recv: list[int], axis: Axis, phase: str) -> torch.Tensor:
    out = x.new_empty((sum(recv), *x.shape[1:]))
    axis.record("all_to_all", phase, x)
    dist.all_to_all_single(out, x.contiguous(), recv, send, group=axis.group)
    return out


def all_to_all_rows(x: torch.Tensor, send: list[int], recv: list[int], axis: Axis, phase: str = "fwd") -> torch.Tensor:
    """Rows with variable split sizes: x (sum(send), ...) whose next send[j] rows go to rank j ->
    (sum(recv), ...) whose next recv[j] rows came from rank j. Every rank takes part, with zero
    sizes where it has nothing to move. Backward: the same exchange with the sizes swapped.
    Differentiable when x requires grad; records the rank's send tensor."""
    if axis.size == 1:
        return x
    if not x.requires_grad:
        return _all_to_all_rows(x, send, recv, axis, phase)
    return _Adjoint.apply(x, lambda t: _all_to_all_rows(t, send, recv, axis, phase),
                          lambda g: _all_to_all_rows(g, recv, send, axis, "bwd"))


def row_sizes(n: int, axis: Axis) -> list[int]:
    """How n rows split over the axis by split_rows: the first n % p ranks take one more."""
    return [len(part) for part in torch.arange(n).tensor_split(axis.size)]


def _gather_rows(x: torch.Tensor, sizes: list[int], axis: Axis, phase: str) -> torch.Tensor:
    most = max(sizes)
    padded = torch.nn.functional.pad(x, (0, 0) * (x.dim() - 1) + (0, most - x.shape[0]))  # (most, ...)
    every = all_gather_raw(padded, 0, axis, phase).view(axis.size, most, *x.shape[1:])
    return torch.cat([every[r, :n] for r, n in enumerate(sizes)])


def split_rows(x: torch.Tensor, axis: Axis) -> torch.Tensor:
    """This rank's rows of x (n, ...), the same on every rank: tensor_split over the axis (any n).
    Backward all-gathers the parts' gradients (the adjoint of taking a part of a replicated x)."""
    if axis.size == 1:
        return x
    sizes = row_sizes(x.shape[0], axis)
    start = sum(sizes[:axis.rank])
    return _Adjoint.apply(x, lambda t: t[start:start + sizes[axis.rank]].contiguous(),
                          lambda g: _gather_rows(g, sizes, axis, "bwd"))


def gather_rows(x: torch.Tensor, n: int, axis: Axis) -> torch.Tensor:
    """The n rows that split_rows split, from every rank's part x: all-gather (padded to the
    largest part) forward; this rank's part of the gradient backward."""
    if axis.size == 1:
        return x
    sizes = row_sizes(n, axis)
    start = sum(sizes[:axis.rank])
    return _Adjoint.apply(x, lambda t: _gather_rows(t, sizes, axis, "fwd"),
                          lambda g: g[start:start + sizes[axis.rank]].contiguous())
