"""The local launcher: one failing rank stops the job, names itself in one line with its traceback
in a log file, and leaves no process."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from meshattn.cli.commands import _report_failure
from meshattn.launch import launch
from meshattn.outcome import WorkerFailed


def _fail_on_rank_one(pid_dir: str) -> None:
    Path(pid_dir, str(dist.get_rank())).write_text(str(os.getpid()))
    dist.barrier()
    if dist.get_rank() == 1:
        raise RuntimeError("injected failure")
    dist.all_reduce(torch.ones(1))  # the others wait here for a peer that never comes
    time.sleep(60)


def test_failing_rank_stops_the_job_and_leaves_no_process(tmp_path):
    """One line naming the rank, the exception and a log file with the traceback: without a
    log_dir, in a temporary folder that is kept."""
    t0 = time.monotonic()
    with pytest.raises(WorkerFailed, match=r"^rank 1 failed first: RuntimeError: injected failure[^\n]*; "
                                           r"full traceback in \S+rank1\.log$") as failed:
        launch(_fail_on_rank_one, 3, args=(str(tmp_path),), env={}, timeout_s=120)
    assert time.monotonic() - t0 < 60, "the launcher did not wait for the collective timeout"
    pids = [int(p.read_text()) for p in tmp_path.iterdir()]
    assert len(pids) == 3
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    log = Path(str(failed.value).rsplit(" ", 1)[1])
    try:
        assert "Traceback" in log.read_text() and "injected failure" in log.read_text()
        assert "injected failure" in failed.value.details  # what --verbose prints
    finally:
        shutil.rmtree(log.parent)


def test_verbose_prints_the_tracebacks_before_the_line(capsys):
    failure = WorkerFailed("rank 1 failed first: RuntimeError: boom; full traceback in x/rank1.log",
                           "rank 1:\nTraceback (most recent call last):\nRuntimeError: boom")
    assert _report_failure(failure, verbose=False) == 1
    assert capsys.readouterr().err == f"meshattn: error: {failure}\n"
    assert _report_failure(failure, verbose=True) == 1
    err = capsys.readouterr().err
    assert err.startswith("rank 1:\nTraceback") and err.endswith(f"meshattn: error: {failure}\n")
