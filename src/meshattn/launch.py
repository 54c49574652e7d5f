"""Run a function on every rank: under torchrun, in this process; otherwise in local workers.

Local workers are spawned processes joined into a gloo (or NCCL) group over a free localhost
port. If one worker fails, the others are terminated and the error is raised here, naming the
rank: a dead rank never leaves the rest hanging.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .mesh import init_distributed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def under_torchrun(env: dict) -> bool:
    return "RANK" in env and "WORLD_SIZE" in env and "MASTER_ADDR" in env


def _set_threads(local_world: int) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))


def _worker(rank: int, world: int, init_method: str, backend: str | None, timeout_s: float,
            fn: Callable, args: tuple) -> None:
    """A spawned local worker: all ranks share this machine's cores."""
    _set_threads(world)
    _init_and_run(rank, world, init_method, backend, timeout_s, fn, args)


def _init_and_run(rank: int, world: int, init_method: str, backend: str | None, timeout_s: float,
                  fn: Callable, args: tuple) -> None:
    init_distributed(rank, world, init_method, backend, timeout_s)
    try:
        fn(*args)
    finally:
        dist.destroy_process_group()


class WorkerFailed(RuntimeError):
    pass


def launch(fn: Callable, world: int, args: tuple = (), env: dict | None = None, backend: str | None = None,
           timeout_s: float = 300.0) -> None:
    """Call fn(*args) on `world` ranks with the default process group initialised."""
    env = dict(os.environ) if env is None else env
    if under_torchrun(env):
        if int(env["WORLD_SIZE"]) != world:
            raise WorkerFailed(f"torchrun started {env['WORLD_SIZE']} processes but the layout needs {world}; "
                               f"use --nproc-per-node/--nnodes with a product of {world}")
        _set_threads(int(env.get("LOCAL_WORLD_SIZE", world)))
        _init_and_run(int(env["RANK"]), world, "env://", backend, timeout_s, fn, args)
        return
    init_method = f"tcp://127.0.0.1:{free_port()}"
    ctx = mp.start_processes(_worker, args=(world, init_method, backend, timeout_s, fn, args), nprocs=world,
                             join=False, start_method="spawn")
    try:
        while not ctx.join():
            pass
    except mp.ProcessRaisedException as e:
        raise WorkerFailed(f"rank {e.error_index} failed:\n{e}") from None
    except mp.ProcessExitedException as e:
        raise WorkerFailed(f"rank {e.error_index} exited with code {e.exit_code} "
                           f"({'killed by a signal' if e.signal_name else 'error'}); the other ranks were stopped") from None
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*a, **k) -> None:
    if is_main_process():
        print(*a, **k, file=k.pop("file", sys.stdout), flush=True)
