"""Data parallelism over the dp axis: replicas, gradient averaging, gradient accumulation.

Gradients are averaged with torch's DistributedDataParallel on the dp axis's process group,
which buckets parameters and overlaps each bucket's all-reduce with the rest of backward.
Gradient accumulation skips that all-reduce on all but the last micro-batch (`no_sync`).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from ..comm import Axis


def _counted_allreduce(axis, bucket):
    """DDP's default bucket all-reduce (average), recorded in the axis's byte counter.

    (No annotations: DDP compares them to dist.GradBucket, and postponed annotations are strings.)
    """
    axis.record("all_reduce", "bwd", bucket.buffer())
    return default_hooks.allreduce_hook(axis.group, bucket)


def wrap_data_parallel(module: nn.Module, dp_axis: Axis, bucket_cap_mb: float = 25.0) -> nn.Module:
    """DDP over the dp group; the module itself when dp == 1 (there is nothing to average)."""
    if dp_axis.size == 1:
        return module
    # The model has no buffers (rotary tables are recomputed), so DDP has none to broadcast.
    ddp = DistributedDataParallel(module, process_group=dp_axis.group, bucket_cap_mb=bucket_cap_mb)
    if dp_axis.counter is not None:
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
