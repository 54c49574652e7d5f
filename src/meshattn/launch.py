"""Run a function on every rank: under torchrun, in this process; otherwise in local workers.

Local workers are spawned processes joined into a gloo (or NCCL) group over a free localhost
port. If one worker fails, the others are terminated and the error is raised here, naming the
rank: a dead rank never leaves the rest hanging.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

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


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGKILL this worker when the launcher dies, however it dies."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return  # not Linux: the launcher's own clean-up still applies
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)


def _worker(rank: int, world: int, parent_pid: int, report_dir: str, init_method: str, backend: str | None,
            timeout_s: float, fn: Callable, args: tuple) -> None:
    """A spawned local worker: all ranks share this machine's cores. A failure is written to
    report_dir with its time, so the launcher can name the rank that failed first (the others
    usually fail after it, on a closed connection)."""
    _die_with_parent(parent_pid)
    _set_threads(world)
    _init_and_run(rank, world, init_method, backend, timeout_s, fn, args, rank, world, report_dir)


def _init_and_run(rank: int, world: int, init_method: str, backend: str | None, timeout_s: float,
                  fn: Callable, args: tuple, local_rank: int, local_world: int, report_dir: str | None = None) -> None:
    try:
        init_distributed(rank, world, init_method, backend, timeout_s, local_rank, local_world)
        fn(*args)
        # Nobody tears the group down while a peer may still be in a collective or its connection
        # threads are busy: without this, gloo can abort a peer at exit ("terminate called
        # without an active exception", SIGABRT) after a run that succeeded.
        dist.barrier()
    except BaseException:
        if report_dir is not None:  # before the group is torn down, which makes the peers fail too
            Path(report_dir, f"{rank}.json").write_text(json.dumps({"rank": rank, "time": time.time(),
                                                                     "error": traceback.format_exc()}))
        raise
    finally:
        if dist.is_initialized():
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
        local_world = int(env.get("LOCAL_WORLD_SIZE", world))
        _set_threads(local_world)
        _init_and_run(int(env["RANK"]), world, "env://", backend, timeout_s, fn, args,
                      int(env.get("LOCAL_RANK", env["RANK"])), local_world)
        return
    with tempfile.TemporaryDirectory(prefix="meshattn-") as report_dir:
        _spawn_and_join(fn, world, args, backend, timeout_s, report_dir)


def _spawn_and_join(fn: Callable, world: int, args: tuple, backend: str | None, timeout_s: float,
                    report_dir: str) -> None:
    init_method = f"tcp://127.0.0.1:{free_port()}"
    # SIGTERM (e.g. from a job scheduler) unwinds through the clean-up below like Ctrl-C does.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt) if in_main_thread else None
    ctx = mp.start_processes(_worker, args=(world, os.getpid(), report_dir, init_method, backend, timeout_s, fn, args),
                             nprocs=world, join=False, start_method="spawn")
    try:
        while not ctx.join():
            pass
    except mp.ProcessExitedException as e:
        if e.signal_name:  # killed from outside: that is the cause, whatever the others reported
            raise WorkerFailed(f"rank {e.error_index} was killed by {e.signal_name}; "
                               "the other ranks were stopped") from None
        raise WorkerFailed(_first_failure(report_dir) or f"rank {e.error_index} exited with code {e.exit_code}; "
                           "the other ranks were stopped") from None
    except mp.ProcessRaisedException as e:
        raise WorkerFailed(_first_failure(report_dir) or f"rank {e.error_index} failed:\n{e}") from None
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
        for p in ctx.processes:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()


def _first_failure(report_dir: str) -> str | None:
    reports = [json.loads(f.read_text()) for f in Path(report_dir).glob("*.json")]
    if not reports:
        return None
    first = min(reports, key=lambda r: r["time"])
    later = sorted(r["rank"] for r in reports if r is not first)
    also = f" (then rank(s) {later} failed too; the other ranks were stopped)" if later else ""
    return f"rank {first['rank']} failed first{also}:\n{first['error']}"


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")

