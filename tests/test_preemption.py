"""Preemption: SIGTERM/SIGINT stops a training job after the step in progress on every rank, with a
checkpoint and one line saying how to continue; resuming from it gives the uninterrupted run's
parameters bit for bit. A second signal kills the job at once and leaves the last checkpoint."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from meshattn.training.checkpoint import load_reference
from test_faults import _alive, _children, _workers

ROOT = Path(__file__).parents[1]
STEPS = 10
TRAIN = ["-m", "meshattn", "train", "--dp", "2", "--tp", "2", "--batch-size", "4", "--seq-len", "64",
         "--sample-tokens", "0"]
DP2 = [*TRAIN, "--tp", "1"]  # two ranks
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


class Job:
    """A `meshattn train` subprocess whose merged stdout/stderr is read as it comes."""

    def __init__(self, command: list[str]):
        self.proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.chunks: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for chunk in iter(lambda: self.proc.stdout.read(64), ""):
            self.chunks.append(chunk)

    @property
    def text(self) -> str:
        return "".join(self.chunks)

    def wait_for_step(self, step: int, total: int, timeout: float = 120) -> None:
        """Until the progress bar shows `step` of `total` done (training is under way on every rank)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end and self.proc.poll() is None:
            if any(int(n) >= step for n in re.findall(rf"(\d+)/{total} \[", self.text)):
                return
            time.sleep(0.05)
        raise AssertionError(f"training did not reach step {step}: " + self.text[-2000:])

    def processes(self) -> list[int]:
        """The job's processes below the command: the ranks and their children."""
        ranks = _workers(self.proc.pid)
        return ranks + [k for r in ranks for k in _children(r)]

    def finish(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            time.sleep(0.3)  # the reader thread takes the last output


def _train(*args: str) -> subprocess.Popen:
    """A quiet `meshattn train` run in the background; `_done` waits for it."""
    return subprocess.Popen([sys.executable, *TRAIN, "--no-progress", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _done(proc: subprocess.Popen, timeout: float = 240) -> None:
    try:
        output, _ = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    assert proc.returncode == 0, output[-3000:]


def _assert_same_parameters(a: Path, b: Path) -> None:
    (mine, meta_a), (theirs, meta_b) = load_reference(a), load_reference(b)
    assert meta_a["step"] == meta_b["step"] == STEPS
    assert mine.keys() == theirs.keys()
    different = [k for k in mine if not torch.equal(mine[k], theirs[k])]
    assert not different, f"parameters differ from the uninterrupted run's: {different}"


def test_sigterm_stops_after_a_step_saves_and_resumes_bitwise(tmp_path):
    """dp2 under meshattn's own launcher: SIGTERM to the launcher mid-run; exit 143 within 30 s
    with one line naming the checkpoint; --resume to the same --steps ends with the uninterrupted
    run's parameters and losses, bit for bit; --resume at another layout (cp=2) continues within
    fp32 rounding. (Two ranks, not four: the stop does not depend on tp, and the three runs after
    it share the two cores; checkpoints across tp layouts are tests/test_checkpoint.py's.)"""
    out, whole = tmp_path / "run", tmp_path / "whole"
    job = Job([sys.executable, *DP2, "--steps", str(STEPS), "--out", str(out)])
    job.wait_for_step(2, STEPS)
    everyone = job.processes()
    assert len(_workers(job.proc.pid)) == 2
    t0 = time.monotonic()
    job.proc.send_signal(signal.SIGTERM)
    code = job.finish(timeout=30)
    elapsed = time.monotonic() - t0
    text = job.text
    line = re.search(r"^meshattn: stopped by SIGTERM after step (\d+); checkpoint at (\S+); "
                     r"continue with --resume (\S+)$", text, re.M)
    assert code == 143 and line, (code, text[-2000:])
    assert "Traceback" not in text, text[-3000:]
    assert not [p for p in everyone if _alive(p)], "processes of the job remain"
    stopped_at = int(line.group(1))
    assert 2 <= stopped_at < STEPS and Path(line.group(3)) == out / "checkpoint"
    assert Path(line.group(2)) == out / "checkpoint" / f"step-{stopped_at:08d}"
    before = json.loads((out / "metrics.json").read_text())
    assert before["stopped_by"] == "SIGTERM" and len(before["losses"]) == stopped_at

    # Alongside (the results are bitwise whatever the load): the resumed run at the same layout,
    # the uninterrupted run, and a resume at another layout (cp=2 instead of dp2).
    # The cp=2 run reads a copy: the resumed run moves `latest` on under OUT/checkpoint meanwhile.
    other, stopped = tmp_path / "cp2", tmp_path / "stopped" / Path(line.group(2)).name
    shutil.copytree(line.group(2), stopped)
    resumed = _train("--tp", "1", "--steps", str(STEPS), "--resume", line.group(3), "--out", str(out))
    uninterrupted = _train("--tp", "1", "--steps", str(STEPS), "--out", str(whole))
    elsewhere = _train("--steps", str(STEPS), "--resume", str(stopped), "--dp", "1", "--tp", "1", "--cp", "2",
                       "--out", str(other))
    for proc in (resumed, uninterrupted, elsewhere):
        _done(proc)
    _assert_same_parameters(out / "checkpoint", whole / "checkpoint")
    want = json.loads((whole / "metrics.json").read_text())["losses"]
    after = json.loads((out / "metrics.json").read_text())
    assert after["first_step"] == stopped_at and after["losses"] == want[stopped_at:]
    assert before["losses"] == want[:stopped_at]  # two runs of one configuration: bitwise the same
    # Another layout continues within fp32 rounding (the sums run in another order).
    got = json.loads((other / "metrics.json").read_text())
    assert got["first_step"] == stopped_at
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(want[stopped_at:]), rtol=1e-5, atol=0)
    print(f"SIGTERM to the launcher: exit {code} after {elapsed:.1f} s, stopped after step {stopped_at}")


def test_a_second_signal_kills_at_once_and_keeps_the_last_checkpoint(tmp_path):
    """Two SIGTERMs in quick succession (tp2, 2 ranks): the workers are killed without saving
    again; `latest` still names a complete, verified checkpoint."""
    out = tmp_path / "run"
    job = Job([sys.executable, *TRAIN, "--dp", "1", "--steps", "400", "--save-every", "2", "--out", str(out)])
    job.wait_for_step(3, 400)  # the checkpoint of step 2 is complete
    everyone = job.processes()
    t0 = time.monotonic()
    job.proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    job.proc.send_signal(signal.SIGTERM)
    code = job.finish(timeout=30)
    elapsed = time.monotonic() - t0
    text = job.text
    killed = (r"^meshattn: stopped by SIGTERM; a second signal killed the workers at once.*; the last complete "
              r"checkpoint is \S+step-\d+; continue with --resume \S+$")
    saved_first = r"^meshattn: stopped by SIGTERM after step \d+; checkpoint at"  # the stop beat the kill (rare)
    assert code == 143 and re.search(f"{killed}|{saved_first}", text, re.M), (code, text[-2000:])
    assert "Traceback" not in text, text[-3000:]
    assert elapsed < 10, elapsed
    assert not [p for p in everyone if _alive(p)], "processes of the job remain"
    _, meta = load_reference(out / "checkpoint")  # verified against its manifest
    assert meta["step"] >= 2 and meta["step"] % 2 == 0
    print(f"two SIGTERMs: exit {code} after {elapsed:.1f} s; latest checkpoint step {meta['step']}")


def test_sigterm_to_one_rank_under_torchrun_stops_every_rank(tmp_path):
    """torchrun, tp2 (2 ranks): SIGTERM to rank 1 alone. The flag all-reduce spreads it: both ranks
    stop after the same step and the checkpoint is complete; rank 0 prints the line, the ranks
    exit 143 (torchrun then prints its own report of the exit codes, with its own traceback, and
    exits 1)."""
    out = tmp_path / "run"
    job = Job([TORCHRUN, "--nproc-per-node", "2", *TRAIN, "--dp", "1", "--steps", "400", "--out", str(out)])
    job.wait_for_step(2, 400)
    ranks = _workers(job.proc.pid)
    assert len(ranks) == 2, ranks
    everyone = job.processes()
    t0 = time.monotonic()
    os.kill(ranks[1], signal.SIGTERM)
    code = job.finish(timeout=30)
    elapsed = time.monotonic() - t0
    text = job.text
    line = re.search(r"^meshattn: stopped by SIGTERM after step (\d+); checkpoint at (\S+); continue with --resume",
                     text, re.M)
    assert code != 0 and line, (code, text[-3000:])
    assert len(re.findall(r"^meshattn: stopped", text, re.M)) == 1
    assert re.search(r"exitcode\s*: 143", text), text[-3000:]  # torchrun's report; its own traceback too
    assert not [p for p in everyone if _alive(p)], "processes of the job remain"
    _, meta = load_reference(out / "checkpoint")
    assert meta["step"] == int(line.group(1))
    print(f"torchrun, SIGTERM to rank 1: exit {code} after {elapsed:.1f} s, stopped after step {meta['step']}")
