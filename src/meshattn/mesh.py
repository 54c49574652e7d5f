"""Process-group start-up, and `ParallelDims`: the one owner of every mesh, axis and group.

Axis order is outermost to innermost: dp, cp, tp. tp is innermost so that a tensor-parallel group
is made of consecutive ranks (the ranks of one node when ranks are numbered node by node).
Derived groups (the dp x cp batch axis, its node x local split for a hierarchical all-reduce, the
cp axis split into ring x Ulysses for the hybrid, the KV-head replica groups inside tp) are built
here and nowhere else; other code asks `ParallelDims.axes()` for them.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .comm import Axis, CommCounter
from .config import ParallelConfig, check_ulysses_size

AXES = ("dp", "cp", "tp")


def default_backend(local_world_size: int) -> str:
    """NCCL when every local rank can have a GPU of its own, else gloo (CPU)."""
    return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= local_world_size else "gloo"


def device_type(backend: str) -> str:
    return "cuda" if backend == "nccl" else "cpu"


def current_device() -> torch.device:
    """The device this rank computes on: its GPU under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(rank: int, world_size: int, init_method: str, backend: str | None = None,
                     timeout_s: float = 300.0, local_rank: int | None = None,
                     local_world_size: int | None = None) -> str:
    """Join the default process group; returns the backend used.

    `init_method` is "env://" under torchrun or "tcp://host:port" for our own launcher.
    Collectives that do not complete within `timeout_s` raise instead of hanging. Under NCCL the
    rank takes GPU `local_rank` (its index on this node).
    """
    local_rank = rank if local_rank is None else local_rank
    backend = backend or default_backend(local_world_size or world_size)
    if backend == "nccl":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
                               "start fewer processes per node or use --backend gloo")
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return backend


@dataclass(frozen=True)
class Hierarchy:
    """The batch axis split into ranks on one node (local) and the same position on every node."""

    node: Axis
    local: Axis
    world: int


@dataclass(frozen=True)
class ContextGroup:
    """The cp axis, and for the hybrid its split into ring (across groups) x ulysses (inside)."""

    axis: Axis
    ring: Axis | None = None
    ulysses: Axis | None = None

    @property
    def ulysses_size(self) -> int | None:
        return None if self.ulysses is None else self.ulysses.size


@dataclass(frozen=True)
class ExpertAxes:
    """The MoE layers' axes over the same ranks: ep (consecutive ranks splitting the experts), edp
    (the world / ep copies of one expert, over which expert gradients are summed) and the world
    (every rank holds different tokens at the MoE layer; the balance loss counts over it)."""

    ep: Axis
    edp: Axis
    world: Axis


@dataclass(frozen=True)
class MeshAxes:
    """Every axis a parallel model uses, bound to one byte counter."""

    dp: Axis
    cp: Axis
    tp: Axis
    kv: Axis  # replicas of one KV head inside tp (size 1 unless n_kv_heads < tp)
    batch: Axis  # dp x cp together: the ranks holding different tokens, over which gradients average
    context: ContextGroup  # cp, split into ring x ulysses for the hybrid
    hierarchy: Hierarchy | None = None  # the batch axis split into (node, local) for gradient all-reduce
    experts: ExpertAxes | None = None  # for a mixture-of-experts model

    def shard_axes(self) -> dict[str, Axis]:
        """The axes parameters are split over, by the name a Shard gives (parallel/shard.py)."""
        return {"tp": self.tp, "ep": self.experts.ep if self.experts else Axis.single("ep")}


def _regroup(mesh: DeviceMesh, shape: tuple[int, ...], names: tuple[str, ...]) -> DeviceMesh:
    """A second DeviceMesh over the same ranks in another shape (every rank builds it, as group
    creation requires)."""
    return DeviceMesh(mesh.device_type, mesh.mesh.reshape(*shape), mesh_dim_names=names)


def context_group(mesh: DeviceMesh, axis: str = "cp", ulysses_size: int | None = None,
                  counter: CommCounter | None = None) -> ContextGroup:
    """The `axis` of any named mesh as a ContextGroup, split into ring x ulysses sub-axes when
    ulysses_size is given (for the hybrid). Every rank must call it: it creates groups."""
    cp = Axis.of(mesh, axis, counter)
    if ulysses_size is None or cp.size == 1:
        return ContextGroup(cp)
    check_ulysses_size(cp.size, ulysses_size)
    names = list(mesh.mesh_dim_names)
    i = names.index(axis)
    shape = list(mesh.mesh.shape)
    split = _regroup(mesh, (*shape[:i], cp.size // ulysses_size, ulysses_size, *shape[i + 1:]),
                     (*names[:i], "cp_ring", "cp_ulysses", *names[i + 1:]))
    return ContextGroup(cp, Axis.of(split, "cp_ring", counter), Axis.of(split, "cp_ulysses", counter))


class ParallelDims:
    """The dp x cp x tp layout of a ParallelConfig, made real: the named DeviceMesh and every
    derived group, created once, on every rank, in the same order.

    Checks the world size before creating any group, so a wrong layout fails on every rank with
    the same message and no collective is issued. `axes(n_kv_heads, counter, moe)` hands out
    the axes a model uses, bound to a byte counter (cheap: no group is created after construction,
    except the KV replica groups of a model whose n_kv_heads < tp, once per head count, and the
    expert groups of the first mixture-of-experts model).
    """

    def __init__(self, cfg: ParallelConfig, device: str | None = None):
        if not dist.is_initialized():
            raise RuntimeError("ParallelDims needs an initialised process group; call init_distributed first")
        cfg.check_world(dist.get_world_size())
        self.cfg = cfg
        device = device or current_device().type
        self.mesh = init_device_mesh(device, (cfg.dp, cfg.cp, cfg.tp), mesh_dim_names=AXES)
        self._batch = None
        if cfg.dp > 1 and cfg.cp > 1:
            self._batch = _regroup(self.mesh, (cfg.batch_ranks, cfg.tp), ("dpcp", "tp"))
        self._nodes = None
        local = (cfg.node_size or 0) // cfg.tp
        if local > 1 and cfg.batch_ranks > local and cfg.batch_ranks % local == 0:
            self._nodes = _regroup(self.mesh, (cfg.batch_ranks // local, local, cfg.tp), ("node", "local", "tp"))
        self._context_split = None
        if cfg.cp > 1 and cfg.impl.needs_ulysses_size:
            self._context_split = context_group(self.mesh, "cp", cfg.ulysses_size)
        self._kv: dict[int, DeviceMesh] = {}
        self._experts: dict[int, DeviceMesh] = {}  # per ep size (the same dims may serve several)

    def _kv_mesh(self, n_kv_heads: int) -> DeviceMesh:
        """tp split into (n_kv_heads, tp / n_kv_heads): the ranks sharing one KV head."""
        c = self.cfg
        if n_kv_heads not in self._kv:
            self._kv[n_kv_heads] = _regroup(self.mesh, (c.dp, c.cp, n_kv_heads, c.tp // n_kv_heads),
                                            ("dp", "cp", "kv_shard", "kv"))
        return self._kv[n_kv_heads]

    def _expert_axes(self, counter: CommCounter | None) -> ExpertAxes:
        """World split into (edp, ep) with ep innermost: an ep group is consecutive ranks."""
        c = self.cfg
        if c.ep not in self._experts:
            self._experts[c.ep] = _regroup(self.mesh, (c.expert_replicas, c.ep), ("edp", "ep"))
        mesh = self._experts[c.ep]
        world = Axis.from_group(None, "world").with_counter(counter)
        return ExpertAxes(Axis.of(mesh, "ep", counter), Axis.of(mesh, "edp", counter), world)

    def axes(self, n_kv_heads: int | None = None, counter: CommCounter | None = None,
             moe: bool = False) -> MeshAxes:
        dp, cp, tp = (Axis.of(self.mesh, name, counter) for name in AXES)
        kv = Axis.single("kv")
        if n_kv_heads is not None and n_kv_heads < tp.size:
            kv = Axis.of(self._kv_mesh(n_kv_heads), "kv", counter)
        if self._batch is not None:
            batch = Axis.of(self._batch, "dpcp", counter)
        else:
            batch = cp if cp.size > 1 else dp
        hierarchy = None
        if self._nodes is not None:
            hierarchy = Hierarchy(Axis.of(self._nodes, "node", counter), Axis.of(self._nodes, "local", counter),
                                  batch.size)
        context = ContextGroup(cp)
        if self._context_split is not None:
            s = self._context_split
            context = ContextGroup(cp, s.ring.with_counter(counter), s.ulysses.with_counter(counter))
        experts = self._expert_axes(counter) if moe else None
        return MeshAxes(dp, cp, tp, kv, batch, context, hierarchy, experts)
