"""Faults injected into running jobs: a rank killed, a rank stalled. The job must end with a
message naming the cause, within a bounded time, leaving no process behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from meshattn.launch import launch
from meshattn.outcome import WorkerFailed

ROOT = Path(__file__).parents[1]


def _children(pid: int) -> list[int]:
    """Direct children of pid, oldest first (Linux /proc)."""
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry.name))
    return sorted(kids)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead, only not yet reaped by its parent
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _workers(launcher: int) -> list[int]:
    """The rank processes, in rank order: spawned interpreters (meshattn's own launcher) or
    `-m meshattn` children (torchrun's agent)."""
    out = []
    for pid in _children(launcher):
        try:
            cmd = (Path("/proc") / str(pid) / "cmdline").read_bytes()
        except OSError:
            continue
        if (b"multiprocessing" in cmd or b"meshattn" in cmd) and b"resource_tracker" not in cmd:
            out.append(pid)
    return out


TRAIN = ["-m", "meshattn", "train", "--dp", "2", "--tp", "2", "--steps", "2000", "--batch-size", "4", "--seq-len",
         "64"]
LAUNCHERS = {
    "meshattn": ([sys.executable, *TRAIN], r"rank 2 was killed by SIGKILL"),
    "torchrun": ([str(Path(sys.executable).with_name("torchrun")), "--nproc-per-node", "4", *TRAIN],
                 r"Root Cause(.|\n)*rank\s*: 2 \(local_rank: 2\)(.|\n)*SIGKILL"),
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_sigkill_of_one_rank_ends_the_training_command(tmp_path, launcher):
    """4 ranks (dp2 x tp2) training; rank 2 gets SIGKILL after a few steps."""
    command, message = LAUNCHERS[launcher]
    proc = subprocess.Popen([*command, "--out", str(tmp_path)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    stderr: list[str] = []
    started = threading.Event()

    def read():
        for chunk in iter(lambda: proc.stdout.read(64), ""):
            stderr.append(chunk)
            if "/2000 [" in "".join(stderr[-4:]) and "  0/2000" not in chunk:
                started.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert started.wait(120), "training did not start: " + "".join(stderr)[-2000:]
        ranks = _workers(proc.pid)
        assert len(ranks) == 4, ranks
        everyone = ranks + [k for r in ranks for k in _children(r)]
        t0 = time.monotonic()
        os.kill(ranks[2], signal.SIGKILL)
        code = proc.wait(timeout=30)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(0.5)
    text = "".join(stderr)
    assert code != 0 and elapsed < 30, (code, elapsed)
    assert re.search(message, text), text[-2000:]
    assert not [p for p in everyone if _alive(p)], "processes of the job remain"
    if launcher == "meshattn":  # one line; the other ranks' tracebacks, if they had any, in OUT/logs
        assert code == 1 and "Traceback" not in text, text[-3000:]
        logs = re.search(r"tracebacks of rank\(s\) \[[\d, ]+\] in (\S+)$", text, re.M)
        assert not logs or all("Traceback" in f.read_text() for f in Path(logs.group(1)).glob("rank*.log"))
    print(f"{launcher}: SIGKILL of rank 2, the command exited with {code} after {elapsed:.1f} s")  # for RELIABILITY.md


def _stall_rank_one() -> None:
    if dist.get_rank() == 1:
        time.sleep(120)  # never joins the collective below
    dist.all_reduce(torch.ones(1))


def test_a_stalled_rank_times_out_every_other_rank(tmp_path):
    timeout = 5.0
    t0 = time.monotonic()
    with pytest.raises(WorkerFailed, match=r"(?i)^rank [02] failed first: \w+: [^\n]*timed out[^\n]*; "
                                           r"full traceback in \S+$") as failed:
        launch(_stall_rank_one, 3, env={}, timeout_s=timeout, log_dir=tmp_path / "logs")
    elapsed = time.monotonic() - t0
    assert elapsed < timeout + 20
    log = Path(str(failed.value).rsplit(" ", 1)[1])
    assert log.parent == tmp_path / "logs" and "Traceback" in log.read_text() and "Timed out" in log.read_text()
    print(f"stalled rank 1, timeout {timeout:.0f} s: the job ended after {elapsed:.1f} s")  # for RELIABILITY.md
