"""Process-group start-up and the named dp x cp x tp DeviceMesh.

Axis order is outermost to innermost: tp is innermost so that a tensor-parallel group is made
of consecutive ranks (the ranks of one node when ranks are numbered node by node).
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .config import ParallelConfig

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


def build_mesh(cfg: ParallelConfig, device: str = "cpu") -> DeviceMesh:
    """A DeviceMesh of shape (dp, cp, tp) with axes named "dp", "cp", "tp".

    Checks the world size before creating any group, so a wrong layout fails on every rank
    with the same message and no collective is issued.
    """
    if not dist.is_initialized():
        raise RuntimeError("build_mesh needs an initialised process group; call init_distributed first")
    cfg.check_world(dist.get_world_size())
    return init_device_mesh(device, (cfg.dp, cfg.cp, cfg.tp), mesh_dim_names=AXES)
