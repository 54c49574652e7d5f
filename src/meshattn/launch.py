"""Run a function on every rank: under torchrun, in this process; otherwise in local workers.

Local workers are spawned processes joined into a gloo (or NCCL) group over a free localhost
port. If one worker fails, the others are stopped and the failure comes back as one line naming
the rank and the cause (`WorkerFailed`); every failed rank's full traceback goes to a log file
the line names. A dead rank never leaves the rest hanging.

Stopping on request: the first SIGTERM or SIGINT to the launcher is passed on to the workers,
which may finish their step and save (training does, see `training/loop.py`); the launcher waits
for them, at most `stop_grace_s`, and raises `Stopped`. A second signal kills them at once.
"""

from __future__ import annotations

import ctypes
import multiprocessing.connection
import os
import signal
import socket
import sys
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
from .outcome import Stopped, WorkerFailed, outcome, summary, write_logs, write_report

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
FAIL_GRACE_S = 2.0  # after a rank fails, how long the others get to fail by themselves (and report why)


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
    usually fail after it, on a closed connection); so is a stop on request."""
    _die_with_parent(parent_pid)
    _set_threads(world)
    _init_and_run(rank, world, init_method, backend, timeout_s, fn, args, rank, world, report_dir)
    # Done, and the group is torn down: leave without the interpreter's teardown of torch (seconds
    # per process on a loaded machine, which the launcher would wait for). Nothing is left to
    # flush but the standard streams; a failure raised above still exits through multiprocessing.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _init_and_run(rank: int, world: int, init_method: str, backend: str | None, timeout_s: float,
                  fn: Callable, args: tuple, local_rank: int, local_world: int, report_dir: str | None = None,
                  log_dir: Path | None = None) -> None:
    """fn on this rank inside the default group. Spawned (report_dir given): a stop or a failure is
    written to report_dir for the launcher, and a stop ends the process normally. Under torchrun
    (no report_dir): a stop is raised to the command; a failure is logged to log_dir and raised
    as a one-line WorkerFailed."""
    try:
        init_distributed(rank, world, init_method, backend, timeout_s, local_rank, local_world)
        fn(*args)
        # Nobody tears the group down while a peer may still be in a collective or its connection
        # threads are busy: without this, gloo can abort a peer at exit ("terminate called
        # without an active exception", SIGABRT) after a run that succeeded.
        dist.barrier()
    except Stopped as e:  # every rank stops after the same step (fn agreed on it and synchronised)
        if report_dir is None:
            raise
        write_report(report_dir, rank, stopped=str(e), signum=e.signum, checkpoint=e.checkpoint)
    except BaseException as e:
        if report_dir is not None:  # before the group is torn down, which makes the peers fail too
            write_report(report_dir, rank, type=type(e).__name__, summary=summary(e),
                          error=traceback.format_exc())
            raise
        if isinstance(e, WorkerFailed) or not isinstance(e, Exception):
            raise
        log = write_logs({rank: traceback.format_exc()}, log_dir)[rank]
        raise WorkerFailed(f"rank {rank} failed: {type(e).__name__}: {summary(e)}; full traceback in {log}",
                           traceback.format_exc()) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(fn: Callable, world: int, args: tuple = (), env: dict | None = None, backend: str | None = None,
           timeout_s: float = 300.0, log_dir: Path | str | None = None, stop_grace_s: float = 120.0) -> None:
    """Call fn(*args) on `world` ranks with the default process group initialised.

    Raises WorkerFailed (one line; tracebacks under log_dir, or a kept temporary folder) when a
    rank fails, and Stopped when the job was stopped by SIGTERM/SIGINT. After the first signal the
    launcher waits for the workers at most stop_grace_s seconds, then kills them.
    """
    env = dict(os.environ) if env is None else env
    if under_torchrun(env):
        if int(env["WORLD_SIZE"]) != world:
            raise WorkerFailed(f"torchrun started {env['WORLD_SIZE']} processes but the layout needs {world}; "
                               f"use --nproc-per-node/--nnodes with a product of {world}")
        local_world = int(env.get("LOCAL_WORLD_SIZE", world))
        _set_threads(local_world)
        _init_and_run(int(env["RANK"]), world, "env://", backend, timeout_s, fn, args,
                      int(env.get("LOCAL_RANK", env["RANK"])), local_world, log_dir=log_dir)
        return
    with tempfile.TemporaryDirectory(prefix="meshattn-") as report_dir:
        _spawn_and_join(fn, world, args, backend, timeout_s, report_dir, log_dir, stop_grace_s)


class _Forwarder:
    """The launcher's SIGTERM/SIGINT handlers. They only record; `act`, called from the wait loop,
    passes the first signal on to the workers and starts the grace period, and kills them on a
    second signal or when the grace period is over."""

    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self.signum = 0  # the first signal received
        self.repeated = False  # a second one came
        self.deadline: float | None = None
        self.forwarded = False
        self.killed = False
        self._previous: dict = {}

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():  # Python handles signals there only
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        if self.signum:
            self.repeated = True
        else:
            self.signum = signum
            self.deadline = time.monotonic() + self.grace_s

    def act(self, procs: list) -> None:
        if self.signum and not self.forwarded:
            self.forwarded = True
            _signal_all(procs, self.signum)
        if self.signum and not self.killed and (self.repeated or time.monotonic() > self.deadline):
            self.killed = True
            _signal_all(procs, signal.SIGKILL)


def _signal_all(procs: list, signum: int) -> None:
    for p in procs:
        if p.exitcode is None:  # not yet reaped, so the pid is still ours
            try:
                os.kill(p.pid, signum)
            except ProcessLookupError:
                pass


def _spawn_and_join(fn: Callable, world: int, args: tuple, backend: str | None, timeout_s: float,
                    report_dir: str, log_dir: Path | str | None, stop_grace_s: float) -> None:
    init_method = f"tcp://127.0.0.1:{free_port()}"
    forwarder = _Forwarder(stop_grace_s)
    forwarder.install()
    procs: list = []
    try:
        ctx = mp.start_processes(_worker, args=(world, os.getpid(), report_dir, init_method, backend, timeout_s, fn,
                                                args), nprocs=world, join=False, start_method="spawn")
        procs = ctx.processes
        first = _wait(procs, forwarder, report_dir)
    finally:
        forwarder.restore()
        _signal_all(procs, signal.SIGKILL)  # left only if the launcher itself was interrupted
        for p in procs:
            p.join(timeout=10)
    ended = outcome(procs, first, forwarder, report_dir, log_dir)
    if ended is not None:
        raise ended


def _wait(procs: list, forwarder: _Forwarder, report_dir: str) -> int | None:
    """Wait until every worker has exited; returns the rank that failed first (None: none did).
    After a failure the others get FAIL_GRACE_S to fail by themselves (a closed connection) and
    report why; then, or once every one left has reported, they are killed. SIGTERM is not used
    for that, as it asks a training worker to save."""
    live = {p.sentinel: rank for rank, p in enumerate(procs)}
    first, failed_at = None, 0.0
    while live:
        forwarder.act(procs)
        for sentinel in multiprocessing.connection.wait(list(live), timeout=0.1 if first is not None else 0.25):
            rank = live.pop(sentinel)
            procs[rank].join()
            if procs[rank].exitcode != 0 and first is None:
                first, failed_at = rank, time.monotonic()
        if first is not None and (time.monotonic() - failed_at > FAIL_GRACE_S
                                  or all(Path(report_dir, f"{r}.json").exists() for r in live.values())):
            _signal_all(procs, signal.SIGKILL)
    return first
