"""A pool of gloo worker processes per world size, kept for the whole test session.

Starting processes and joining a group costs seconds per rank on two cores, so each world size
gets one pool; a test sends it a function (by reference: it must live at module level in a test
module) and gets every rank's return value back. A failure on any rank fails the test with that
rank's traceback; the pool is then rebuilt, since the failing job may have left collectives
unmatched. Collectives time out (COLLECTIVE_TIMEOUT_S) so nothing hangs.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import queue
import socket
import time
import traceback

COLLECTIVE_TIMEOUT_S = 60
JOB_TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(rank: int, world: int, port: int, jobs, results) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    while True:
        job = jobs.get()
        if job is None:
            break
        fn, kwargs = job
        try:
            results.put((rank, True, fn(rank=rank, world=world, **kwargs)))
        except BaseException:  # noqa: BLE001 - report everything, including assertion errors
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class Pool:
    def __init__(self, world: int):
        ctx = mp.get_context("spawn")
        self.world = world
        self.jobs = [ctx.Queue() for _ in range(world)]
        self.results = ctx.Queue()
        port = _free_port()
        self.procs = [ctx.Process(target=_serve, args=(r, world, port, self.jobs[r], self.results), daemon=True)
                      for r in range(world)]
        for p in self.procs:
            p.start()
        self.broken = False

    def run(self, fn, timeout: float = JOB_TIMEOUT_S, **kwargs) -> list:
        for q in self.jobs:
            q.put((fn, kwargs))
        out, errors = {}, {}
        deadline = time.monotonic() + timeout
        while len(out) + len(errors) < self.world:
            remaining = deadline - time.monotonic()
            if errors:  # others may be stuck in a collective the failed rank never joined
                remaining = min(remaining, 5.0)
            try:
                rank, ok, value = self.results.get(timeout=max(remaining, 0.01))
            except queue.Empty:
                self.broken = True
                break
            (out if ok else errors)[rank] = value
        if errors or self.broken:
            self.broken = True
            first = min(errors) if errors else None
            detail = errors[first] if errors else "no error reported"
            missing = sorted(set(range(self.world)) - out.keys() - errors.keys())
            raise AssertionError(f"{fn.__name__} failed on ranks {sorted(errors)} (no answer from {missing});"
                                 f" rank {first}:\n{detail}")
        return [out[r] for r in range(self.world)]

    def stop(self) -> None:
        """Ask every worker to leave (they tear their group down together)."""
        for q in self.jobs:
            try:
                q.put(None)
            except (ValueError, OSError):
                pass

    def reap(self, deadline: float) -> None:
        """Wait for the workers until `deadline` (monotonic), then kill what is left."""
        for p in self.procs:
            p.join(timeout=max(deadline - time.monotonic(), 0.0) if not self.broken else 0.1)
            if p.is_alive():
                p.kill()

    def close(self) -> None:
        self.stop()
        self.reap(time.monotonic() + 5)


class Pools:
    """One live pool per world size."""

    def __init__(self):
        self.pools: dict[int, Pool] = {}

    def run(self, world: int, fn, **kwargs) -> list:
        pool = self.pools.get(world)
        if pool is None or pool.broken:
            if pool is not None:
                pool.close()
            pool = self.pools[world] = Pool(world)
        return pool.run(fn, **kwargs)

    def close(self) -> None:
        """Stop every pool at once, then give them one shared 2 s to leave (they are daemons
        holding nothing worth a graceful exit)."""
        for pool in self.pools.values():
            pool.stop()
        deadline = time.monotonic() + 2
        for pool in self.pools.values():
            pool.reap(deadline)


# -- helpers for code running inside the workers ---------------------------------------------

_DIMS: dict = {}


def mesh_for(par):
    """ParallelDims for a layout, cached per group structure: creating groups is slow and they
    are reusable. Configs that differ only in how the groups are used (overlap, vocabulary,
    impl, layout) share the groups under their own config."""
    import copy

    from meshattn.mesh import ParallelDims

    key = (par.dp, par.cp, par.tp, par.node_size, par.ulysses_size if par.cp_impl == "hybrid" else None)
    if key not in _DIMS:
        _DIMS[key] = ParallelDims(par)
    dims = copy.copy(_DIMS[key])
    dims.cfg = par
    return dims


def hybrid_context(world: int, ulysses_size: int, counter=None):
    """The cp axis of `world` ranks split into ring x Ulysses groups of ulysses_size, from the cached
    ParallelDims (calling context_group directly would create new groups each time: every gloo
    group keeps a polling thread on every rank for the rest of the session)."""
    from meshattn import ParallelConfig

    dims = mesh_for(ParallelConfig(cp=world, cp_impl="hybrid", ulysses_size=ulysses_size))
    return dims.axes(None, counter).context
