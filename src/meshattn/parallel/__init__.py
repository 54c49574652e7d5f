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
from .data import local_batch, no_sync, unwrap, wrap_data_parallel
from .shard import Shard, check_shards, collect_shards, gather_full, load_full_state_dict
from .tensor import TensorParallelTransformer

__all__ = ["parallelize", "ParallelModel", "gather_state_dict", "load_state_dict", "local_batch", "no_sync",
           "unwrap", "mesh_axes"]


@dataclass(frozen=True)
class MeshAxes:
    dp: Axis
    cp: Axis
    tp: Axis
    kv: Axis  # replicas of one KV head inside tp (size 1 unless n_kv_heads < tp)


def mesh_axes(mesh: DeviceMesh, n_kv_heads: int, counter: CommCounter | None = None) -> MeshAxes:
    """Axis handles for the named mesh, plus the KV-head replica groups when n_kv_heads < tp.

    The replica groups come from a second DeviceMesh over the same ranks with tp split into
    (kv shards, replicas); every rank builds it, as group creation requires.
    """
    tp = mesh["tp"].size()
    kv = Axis.single("kv")
    if n_kv_heads < tp:
        reps = tp // n_kv_heads
        grid = mesh.mesh.reshape(*mesh.mesh.shape[:-1], n_kv_heads, reps)
        kv_mesh = DeviceMesh(mesh.device_type, grid, mesh_dim_names=("dp", "cp", "kv_shard", "kv"))
        kv = Axis.of(kv_mesh, "kv", counter)
    return MeshAxes(*(Axis.of(mesh, name, counter) for name in ("dp", "cp", "tp")), kv)


class ParallelModel(nn.Module):
    """The parallel model: forward(ids, targets) -> (vocab-sharded logits, global-mean loss).

    `ids` are this rank's rows of the global batch (see `local_batch`); the loss is this replica's
    mean, and gradients after backward are averaged over dp, so they equal the reference model's
    gradients of the global-mean loss.
    """

    def __init__(self, inner: TensorParallelTransformer, axes: MeshAxes, shards: dict[str, Shard],
                 counter: CommCounter | None):
        super().__init__()
        self.axes, self.shards, self.counter = axes, shards, counter
        self.inner = wrap_data_parallel(inner, axes.dp)

    @property
    def tp_model(self) -> TensorParallelTransformer:
        return unwrap(self.inner)

    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None):
        return self.inner(ids, targets)

    def no_sync(self, skip: bool = True):
        return no_sync(self.inner, skip)


def parallelize(model: Transformer, mesh: DeviceMesh, cfg: ParallelConfig,
                counter: CommCounter | None = None) -> ParallelModel:
    """Split a reference model (with its weights) over the mesh. The reference is not modified.

    Validates the layout against the model before creating any group.
    """
    cfg.check_model(model.cfg)
    for name in ("dp", "cp", "tp"):
        if mesh[name].size() != getattr(cfg, name):
            raise ValueError(f"mesh axis {name} has size {mesh[name].size()} but the config says {getattr(cfg, name)}")
    axes = mesh_axes(mesh, model.cfg.n_kv_heads, counter)
    ref = next(model.parameters())
    inner = TensorParallelTransformer(model.cfg, axes.tp, axes.kv, cfg.sequence_parallel)
    inner.to(device=ref.device, dtype=ref.dtype)
    shards = collect_shards(inner)
    check_shards(inner, shards)
    load_full_state_dict(inner, shards, model.state_dict(), axes.tp.rank, axes.tp.size)
    return ParallelModel(inner, axes, shards, counter)


def gather_state_dict(model: ParallelModel, grads: bool = False) -> dict[str, torch.Tensor]:
    """The full single-device state dict (or its gradients), on every rank. Collective over tp."""
    return gather_full(model.tp_model, model.shards, model.axes.tp, grads=grads)


def load_state_dict(model: ParallelModel, state: dict[str, torch.Tensor]) -> None:
    """Load a full single-device state dict into any layout."""
    load_full_state_dict(model.tp_model, model.shards, state, model.axes.tp.rank, model.axes.tp.size)
