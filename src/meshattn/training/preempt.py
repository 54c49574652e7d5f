"""Preemption: SIGTERM (a scheduler) or SIGINT (Ctrl-C) caught on a rank while it trains, and
the ranks' agreement on the step after which they all stop (training/loop.py then saves).
"""

from __future__ import annotations

import os
import signal
import time

import torch
import torch.distributed as dist

from ..launch import STOP_SIGNALS
from ..mesh import current_device


class StopSignals:
    """SIGTERM and SIGINT on this rank, caught while training (a context manager).

    The handler only records the first signal: the step in progress and any collective in it
    finish, and the loop reads `signum` between steps. Another signal more than REPEAT_S later
    ends this process at once with the signal's default action (the last complete checkpoint
    stays: saving is atomic). Copies of one signal that arrive together (a terminal's Ctrl-C,
    or a scheduler's SIGTERM reaching every process, and the launcher passing it on) count once.
    """

    REPEAT_S = 1.0

    def __init__(self):
        self.signum = 0
        self._first_at = 0.0
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        if not self.signum:
            self.signum, self._first_at = signum, time.monotonic()
        elif time.monotonic() - self._first_at > self.REPEAT_S:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)


def agreed_stop(stop: StopSignals | None) -> int:
    """The signal any rank has caught (0: none), the same on every rank: one all-reduce (MAX) of
    one int over the world group, outside meshattn's byte counter (it is no model traffic)."""
    if stop is None:
        return 0
    flag = torch.tensor([stop.signum], dtype=torch.int32, device=current_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())
