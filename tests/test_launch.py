"""The local launcher: one failing rank stops the job, names itself, and leaves no process."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from meshattn.launch import WorkerFailed, launch


def _fail_on_rank_one(pid_dir: str) -> None:
    Path(pid_dir, str(dist.get_rank())).write_text(str(os.getpid()))
    dist.barrier()
    if dist.get_rank() == 1:
        raise RuntimeError("injected failure")
    dist.all_reduce(torch.ones(1))  # the others wait here for a peer that never comes
    time.sleep(60)


def test_failing_rank_stops_the_job_and_leaves_no_process(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(WorkerFailed, match=r"rank 1 failed first(.|\n)*injected failure"):
        launch(_fail_on_rank_one, 3, args=(str(tmp_path),), env={}, timeout_s=120)
    assert time.monotonic() - t0 < 60, "the launcher did not wait for the collective timeout"
    pids = [int(p.read_text()) for p in tmp_path.iterdir()]
    assert len(pids) == 3
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
