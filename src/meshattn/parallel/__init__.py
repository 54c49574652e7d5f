"""parallelize(model, mesh, cfg): the reference model split over a dp x cp x tp DeviceMesh.

Order matters and is fixed: tensor parallelism first (it changes which parameters exist),
then data parallelism (it wraps the result and averages gradients over dp).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh

from ..comm import Axis, CommCounter
from ..config import ParallelConfig
from ..model import Transformer
from .data import Hierarchy, local_batch, no_sync, unwrap, wrap_data_parallel
from .shard import Shard, check_shards, collect_shards, gather_full, load_full_state_dict
from .context import SequenceSplit, context_group
from .tensor import TensorParallelTransformer

__all__ = ["parallelize", "ParallelModel", "gather_state_dict", "load_state_dict", "local_batch", "no_sync",
           "unwrap", "mesh_axes"]


@dataclass(frozen=True)
class MeshAxes:
    dp: Axis
    cp: Axis
    tp: Axis
    kv: Axis  # replicas of one KV head inside tp (size 1 unless n_kv_heads < tp)
    batch: Axis  # dp x cp together: the ranks holding different tokens, over which gradients average
    hierarchy: Hierarchy | None = None  # the batch axis split into (node, local) for gradient all-reduce


def _split_axis(mesh: DeviceMesh, grid: torch.Tensor, names: tuple[str, ...], name: str,
                counter: CommCounter | None) -> Axis:
    """An axis of a second DeviceMesh over the same ranks (every rank builds it, as group creation
    requires)."""
    return Axis.of(DeviceMesh(mesh.device_type, grid, mesh_dim_names=names), name, counter)


def mesh_axes(mesh: DeviceMesh, n_kv_heads: int, counter: CommCounter | None = None,
              node_size: int | None = None) -> MeshAxes:
    """Axis handles for the named dp x cp x tp mesh, plus derived ones: the KV-head replica
    groups inside tp when n_kv_heads < tp, the flattened dp x cp batch axis, and, with node_size
    (ranks per node), that batch axis split into nodes x local ranks."""
    dp, cp, tp = (Axis.of(mesh, name, counter) for name in ("dp", "cp", "tp"))
    kv = Axis.single("kv")
    if n_kv_heads < tp.size:
        grid = mesh.mesh.reshape(dp.size, cp.size, n_kv_heads, tp.size // n_kv_heads)
        kv = _split_axis(mesh, grid, ("dp", "cp", "kv_shard", "kv"), "kv", counter)
    if dp.size > 1 and cp.size > 1:
        batch = _split_axis(mesh, mesh.mesh.reshape(dp.size * cp.size, tp.size), ("dpcp", "tp"), "dpcp", counter)
    else:
        batch = cp if cp.size > 1 else dp
    hierarchy = None
    local = (node_size or 0) // tp.size
    if local > 1 and batch.size > local and batch.size % local == 0:
        grid = mesh.mesh.reshape(batch.size // local, local, tp.size)
        names = ("node", "local", "tp")
        hierarchy = Hierarchy(_split_axis(mesh, grid, names, "node", counter),
                              _split_axis(mesh, grid, names, "local", counter), batch.size)
    return MeshAxes(dp, cp, tp, kv, batch, hierarchy)


class ParallelModel(nn.Module):
    """The parallel model: forward(ids, targets) -> (logits, vocab-sharded unless the vocabulary is
    whole on every tp rank (ParallelConfig.splits_vocab), loss).

    `ids` and `targets` are this rank's part of the global batch: its dp rows and its cp chunks of
    the sequence (see `shard_batch`). Averaged over dp x cp, the loss is the global mean, and the
    gradients after backward (averaged by DDP over dp x cp) equal the reference model's.
    """

    def __init__(self, inner: TensorParallelTransformer, axes: MeshAxes, shards: dict[str, Shard],
                 counter: CommCounter | None, split: SequenceSplit | None):
        super().__init__()
        self.axes, self.shards, self.counter, self.split = axes, shards, counter, split
        self.inner = wrap_data_parallel(inner, axes.batch, hierarchy=axes.hierarchy)

    @property
    def tp_model(self) -> TensorParallelTransformer:
        return unwrap(self.inner)

    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None):
        return self.inner(ids, targets)

    def no_sync(self, skip: bool = True):
        return no_sync(self.inner, skip)

    def shard_batch(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """This rank's part of global (B, S, ...) tensors: rows for dp, sequence chunks for cp."""
        out = [local_batch(t, self.axes.dp) for t in tensors]
        return out if self.split is None else [self.split.shard(t, 1) for t in out]


def parallelize(model: Transformer, mesh: DeviceMesh, cfg: ParallelConfig,
                counter: CommCounter | None = None) -> ParallelModel:
    """Split a reference model (with its weights) over the mesh. The reference is not modified.

    Order: tensor parallelism (which parameters exist), context parallelism (how attention
    crosses the sequence split), data parallelism (DDP over dp x cp). Validates the layout
    against the model before creating any group.
    """
    cfg.check_model(model.cfg)
    for name in ("dp", "cp", "tp"):
        if mesh[name].size() != getattr(cfg, name):
            raise ValueError(f"mesh axis {name} has size {mesh[name].size()} but the config says {getattr(cfg, name)}")
    axes = mesh_axes(mesh, model.cfg.n_kv_heads, counter, cfg.node_size)
    split = None
    if cfg.cp > 1:
        group = context_group(mesh, "cp", cfg.ulysses_size if cfg.cp_impl == "hybrid" else None, counter)
        split = SequenceSplit(group, cfg.cp_impl, cfg.cp_layout, cfg.overlap)
    ref = next(model.parameters())
    inner = TensorParallelTransformer(model.cfg, axes.tp, axes.kv, cfg.sequence_parallel, split, axes.batch,
                                      cfg.overlap, cfg.splits_vocab(model.cfg))
    inner.to(device=ref.device, dtype=ref.dtype)
    shards = collect_shards(inner)
    check_shards(inner, shards)
    load_full_state_dict(inner, shards, model.state_dict(), axes.tp.rank, axes.tp.size)
    return ParallelModel(inner, axes, shards, counter, split)


def gather_state_dict(model: ParallelModel, grads: bool = False) -> dict[str, torch.Tensor]:
    """The full single-device state dict (or its gradients), on every rank. Collective over tp."""
    return gather_full(model.tp_model, model.shards, model.axes.tp, grads=grads)


def load_state_dict(model: ParallelModel, state: dict[str, torch.Tensor]) -> None:
    """Load a full single-device state dict into any layout."""
    load_full_state_dict(model.tp_model, model.shards, state, model.axes.tp.rank, model.axes.tp.size)
