"""Data parallelism over the dp axis: replicas, gradient averaging, gradient accumulation.

Gradients are averaged with torch's DistributedDataParallel on the dp axis's process group,
which buckets parameters and overlaps each bucket's all-reduce with the rest of backward.
Gradient accumulation skips that all-reduce on all but the last micro-batch (`no_sync`).

Hierarchical all-reduce (when the ranks of a replica group span several nodes): each bucket is
reduce-scattered inside the node, the 1/local shard is all-reduced across nodes, and the result
all-gathered inside the node. Inter-node traffic falls by the number of local ranks; the sum is
the same as the flat all-reduce's (up to summation order).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from ..comm import Axis, all_gather_raw, all_reduce_, reduce_scatter_raw
from ..mesh import Hierarchy


def _counted_allreduce(axis, bucket):
    """DDP's default bucket all-reduce (average), recorded in the axis's byte counter.

    (No annotations: DDP compares them to dist.GradBucket, and postponed annotations are strings.)
    """
    axis.record("all_reduce", "bwd", bucket.buffer())
    return default_hooks.allreduce_hook(axis.group, bucket)


def _hierarchical_allreduce(h, bucket):
    """Average a bucket by reduce-scatter (local) -> all-reduce (node) -> all-gather (local).

    (No annotations: see _counted_allreduce.)
    """
    buf = bucket.buffer()  # flat (n,)
    n, L = buf.numel(), h.local.size
    padded = torch.nn.functional.pad(buf, (0, (-n) % L))  # (n rounded up to L,)
    shard = reduce_scatter_raw(padded, 0, h.local, "bwd")  # (n/L,) summed inside the node
    all_reduce_(shard, h.node, "bwd")  # (n/L,) summed across nodes
    full = all_gather_raw(shard, 0, h.local, "bwd")  # (n rounded up,)
    buf.copy_(full[:n].div_(h.world))
    fut = torch.futures.Future()
    fut.set_result(buf)
    return fut


def wrap_data_parallel(module: nn.Module, dp_axis: Axis, bucket_cap_mb: float = 25.0,
                       hierarchy: Hierarchy | None = None, ignore: list[str] = ()) -> nn.Module:
    """DDP over the dp group; the module itself when dp == 1 (there is nothing to average).
    `ignore`: names of parameters whose gradients are reduced elsewhere (expert-parallel ones)."""
    if dp_axis.size == 1:
        return module
    if ignore:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, list(ignore))
    # The model has no buffers (rotary tables are recomputed), so DDP has none to broadcast.
    ddp = DistributedDataParallel(module, process_group=dp_axis.group, bucket_cap_mb=bucket_cap_mb)
    if hierarchy is not None:
        ddp.register_comm_hook(hierarchy, _hierarchical_allreduce)
    elif dp_axis.counter is not None:
        ddp.register_comm_hook(dp_axis, _counted_allreduce)
    return ddp


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def no_sync(model: nn.Module, skip: bool = True):
    """Context in which backward accumulates gradients locally without the dp all-reduce."""
    if skip and isinstance(model, DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def local_batch(batch: torch.Tensor, dp_axis: Axis) -> torch.Tensor:
    """This dp replica's rows of a global batch (B, ...) -> (B/dp, ...)."""
    if batch.shape[0] % dp_axis.size:
        raise ValueError(f"global batch of {batch.shape[0]} rows is not divisible by dp={dp_axis.size}")
    return batch.chunk(dp_axis.size, dim=0)[dp_axis.rank]
