"""How a job of worker processes ended, told in one line: success, a stop on request
(`Stopped`: SIGTERM or SIGINT, after the workers saved, or not) or a failure (`WorkerFailed`:
the rank that failed first and why, or the rank killed from outside).

Workers leave a small report file each (`write_report`); the launcher reads them once every
worker has exited (`outcome`). Every failed rank's full traceback goes to a log file the line
names (`write_logs`), never to the terminal unless asked (--verbose).
"""

from __future__ import annotations

import json
import re
import signal
import tempfile
import time
from pathlib import Path


class WorkerFailed(RuntimeError):
    """A rank failed. The message is one line naming the rank and the cause; `details` holds the
    full traceback of every failed rank (shown with --verbose)."""

    def __init__(self, message: str, details: str = ""):
        super().__init__(message)
        self.details = details


class Stopped(Exception):
    """The job stopped on request (SIGTERM or SIGINT). The message is the one line to show;
    `checkpoint` is where the workers saved before stopping (None: they did not get to save).
    The exit status is 128 + the signal's number, as a shell reports a process the signal killed:
    143 for SIGTERM, 130 for SIGINT."""

    def __init__(self, message: str, signum: int, checkpoint: str | None = None):
        super().__init__(message)
        self.signum = signum
        self.checkpoint = checkpoint

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def write_report(report_dir: str, rank: int, **fields) -> None:
    """Written whole, then renamed into place: once the launcher sees it, the rank may be killed."""
    tmp = Path(report_dir, f".{rank}.tmp")
    tmp.write_text(json.dumps({"rank": rank, "time": time.time(), **fields}))
    tmp.replace(Path(report_dir, f"{rank}.json"))


def summary(e: BaseException) -> str:
    """The first line of an exception's message, without a C++ source location prefix such as
    gloo's `[../gloo/transport/tcp/unbound_buffer.cc:78] `."""
    lines = [line for line in str(e).splitlines() if line.strip()]
    first = lines[0].strip() if lines else "(no message)"
    return re.sub(r"^\[[^\]]*\.(?:cc|cpp|h|hpp):\d+\]\s*", "", first)


def write_logs(tracebacks: dict[int, str], log_dir: Path | str | None, replace: bool = False) -> dict[int, Path]:
    """Each rank's traceback in `log_dir/rank<R>.log`; without a log_dir, in a fresh temporary
    folder that is kept (its name goes into the one-line message). `replace`: first remove the
    rank logs of an earlier run (the launcher writes every rank's; under torchrun each rank
    writes its own and leaves the others')."""
    folder = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="meshattn-logs-"))
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("rank*.log") if replace else []:
        old.unlink()
    paths = {}
    for rank, text in tracebacks.items():
        paths[rank] = folder / f"rank{rank}.log"
        paths[rank].write_text(text)
    return paths


def outcome(procs: list, first: int | None, signals, report_dir: str,
            log_dir: Path | str | None) -> Exception | None:
    """What the ended job amounts to: Stopped, WorkerFailed, or None for success. `signals` is
    what the launcher received: .signum (the first SIGTERM/SIGINT, 0: none), .repeated,
    .killed (it killed the workers), .grace_s."""
    reports = [json.loads(f.read_text()) for f in sorted(Path(report_dir).glob("*.json"))]
    stops = sorted((r for r in reports if "stopped" in r), key=lambda r: r["rank"])
    failures = [r for r in reports if "stopped" not in r]
    if stops:  # the workers agreed on a step, saved and reported the same line (a kill may have come after)
        return Stopped(stops[0]["stopped"], stops[0]["signum"], stops[0].get("checkpoint"))
    if signals.killed:
        how = ("a second signal killed the workers at once" if signals.repeated else
               f"the workers had not stopped within {signals.grace_s:.0f} s and were killed")
        return Stopped(f"stopped by {signal_name(signals.signum)}; {how}, so no checkpoint was written after the "
                       "last complete one", signals.signum)
    if signals.signum and (first is not None or failures):
        return Stopped(f"stopped by {signal_name(signals.signum)}; the workers exited before saving",
                       signals.signum)
    if first is None and not failures:
        return None
    return _failure(procs, first, failures, log_dir)


def _failure(procs: list, first: int | None, failures: list[dict], log_dir: Path | str | None) -> WorkerFailed:
    """One line naming the cause: a rank killed from outside (whatever the others reported, as
    they fail on its closed connection), else the rank whose report is earliest. Every failed
    rank's traceback goes to its log file, the earliest first in `details`."""
    failures = sorted(failures, key=lambda r: r["time"])
    logs = write_logs({r["rank"]: r["error"] for r in failures}, log_dir, replace=True) if failures else {}
    details = "\n".join(f"rank {r['rank']}:\n{r['error']}" for r in failures)
    if first is not None and procs[first].exitcode < 0:
        where = f"; tracebacks of rank(s) {sorted(logs)} in {next(iter(logs.values())).parent}" if logs else ""
        return WorkerFailed(f"rank {first} was killed by {signal_name(-procs[first].exitcode)}; "
                            f"the other ranks were stopped{where}", details)
    if failures:
        head, later = failures[0], sorted(r["rank"] for r in failures[1:])
        also = f" (then rank(s) {later} failed too)" if later else ""
        rest = "; the other ranks were stopped" if len(failures) < len(procs) else ""
        return WorkerFailed(f"rank {head['rank']} failed first: {head['type']}: {head['summary']}{also}{rest}; "
                            f"full traceback in {logs[head['rank']]}", details)
    return WorkerFailed(f"rank {first} exited with code {procs[first].exitcode}; the other ranks were stopped")
