"""Exact live tensor memory of a stretch of work: every storage an op creates, from its creation
until it is freed, in bytes. Deterministic, unlike the resident set (memory.PeakMemory).

    with LiveMemory(baseline=(q, k, v, dout)) as live:
        out = f(q, k, v)
        out.backward(dout)
    live.peak        # bytes above the baseline at the worst moment
    live.current     # bytes above the baseline now (what the stretch left alive)
    live.at_peak     # the storages alive at that moment (LiveTensor: op, shape, dtype, bytes)

How: a TorchDispatchMode sees every aten (and c10d) op run on this thread while it is active,
forward and backward alike (CPU autograd runs the backward on the calling thread, under the same
mode; the Python backward of a custom Function calls ops like any code). A storage is counted
when it first appears among an op's outputs, at `untyped_storage().nbytes()` (a view counts its
whole storage, once), and uncounted when the storage dies (`weakref.finalize` on the storage
object, which PyTorch keeps alive exactly as long as the C++ storage). Resizes by `out=` ops are
followed. The peak is taken after each op's outputs are counted, so an op's inputs and outputs
are alive together, as they are.

What counts: tensors. The buffers collectives receive into are made by ops (`new_empty`,
`empty_like`), so they count; workspace an op frees before returning (the fused attention
kernel's per-thread scratch) and what a backend allocates on its own threads (gloo's staging)
do not. Storages alive on entry count only when passed as `baseline` (reported apart, in
`baseline_bytes`); one met later as an op input (a weight, a backend's staging buffer) is listed
in `untracked` (bytes by op) and never counted, nor are the views an op makes of it.

Collectives: gloo runs them on worker threads, which let go of the tensors of a finished
collective a few microseconds after the caller's wait returns; a buffer the caller has dropped
by then would die late, on that thread, and a peak taken meanwhile would count it. So after a
collective (not a point-to-point send or receive, which run on the caller's thread) has
completed, the next op first sleeps `settle_s` (default 5 ms) to let the worker finish. Frees
that still happen on another thread are summed in `foreign_frees` (bytes): 0 means the figure
cannot have been raised by thread timing.
"""

from __future__ import annotations

import sys
import threading
import time
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["LiveMemory", "LiveTensor", "live_peak"]

_P2P = ("send", "recv_", "recv_any_source_")  # c10d ops completed on the caller's thread
_LIFTS = ("lift_fresh", "lift_fresh_copy")  # how torch.tensor(data) hands its new tensor to the dispatcher


@dataclass(frozen=True)
class LiveTensor:
    """One live storage: the op that created it ("baseline" for those given on entry), the shape
    and dtype of the tensor it was created as, its bytes, and (with `where`) the lines that ran
    the op."""

    op: str
    shape: tuple
    dtype: torch.dtype
    nbytes: int
    where: str = ""

    def __str__(self) -> str:
        at = f" at {self.where}" if self.where else ""
        return f"{self.op} {tuple(self.shape)} {str(self.dtype).removeprefix('torch.')} {self.nbytes} B{at}"


class LiveMemory(TorchDispatchMode):
    """Peak and current bytes of the storages created by ops while active (see the module doc).

    baseline: tensors alive before the stretch, counted in `baseline_bytes` (each storage once),
    not in peak/current. record: keep `at_peak`, the live set at the peak (a copy of the live set
    at every new peak). where: a path fragment (e.g. "meshattn/"): each storage also records the
    innermost Python lines, in files whose paths hold it, that ran its op (slow; for explaining a
    peak). timeline: keep `events`, (op, bytes counted (+) or freed (-), current, where) per change."""

    def __init__(self, baseline=(), record: bool = True, where: str | None = None, timeline: bool = False,
                 settle_s: float = 0.005):
        super().__init__()
        self.record, self.where, self.settle_s = record, where, settle_s
        self.current = 0
        self.peak = 0
        self.at_peak: list[LiveTensor] = []
        self.untracked: dict[str, int] = {}
        self.foreign_frees = 0
        self.events: list[tuple[str, int, int, str]] | None = [] if timeline else None
        self._live: dict[int, list] = {}  # id(storage) -> [LiveTensor, counted?]
        self._lock = threading.RLock()  # a finalizer may run inside, from the GC
        self._thread = threading.get_ident()
        self._collectives: list = []  # works of collectives not yet seen completed
        self._closed = False
        for t in baseline:
            self._track(t, "baseline", counted=False)
        self.baseline_bytes = sum(e[0].nbytes for e in self._live.values())

    # -- bookkeeping ---------------------------------------------------------------------------

    def _track(self, t: torch.Tensor, op: str, counted: bool = True) -> None:
        storage = t.untyped_storage()
        key, nbytes = id(storage), storage.nbytes()
        with self._lock:
            entry = self._live.get(key)
            if entry is None:
                where = self._where() if self.where and counted else ""
                self._live[key] = [LiveTensor(op, tuple(t.shape), t.dtype, nbytes, where), counted]
                weakref.finalize(storage, self._free, key)
                if counted:
                    self._add(nbytes, op, where)
            elif entry[0].nbytes != nbytes:  # resized in place by an out= op
                old = entry[0]
                entry[0] = LiveTensor(old.op, tuple(t.shape), old.dtype, nbytes, old.where)
                if entry[1]:
                    self._add(nbytes - old.nbytes, op, old.where)

    def _where(self, depth: int = 4) -> str:
        """The innermost `depth` Python lines, in files whose path holds `where`, that led here."""
        lines, frame = [], sys._getframe(2)
        while frame is not None and len(lines) < depth:
            name = frame.f_code.co_filename
            line = f"{name.rsplit('/', 1)[-1]}:{frame.f_lineno}"
            if self.where in name and name != __file__ and line not in lines:  # a generator shows its line twice
                lines.append(line)
            frame = frame.f_back
        return " < ".join(lines) or "?"

    def _add(self, nbytes: int, op: str, where: str) -> None:
        self.current += nbytes
        if self.events is not None:
            self.events.append((op, nbytes, self.current, where))
        if self.current > self.peak:
            self.peak = self.current
            if self.record:
                self.at_peak = self.live()

    def _free(self, key: int) -> None:
        with self._lock:
            entry = self._live.pop(key, None)
            if entry is None or not entry[1] or self._closed:  # after exit the figures stay as they were
                return
            self.current -= entry[0].nbytes
            if threading.get_ident() != self._thread:
                self.foreign_frees += entry[0].nbytes
            if self.events is not None:
                self.events.append((entry[0].op, -entry[0].nbytes, self.current, entry[0].where))

    def live(self) -> list[LiveTensor]:
        """The storages counted now (baseline first, then in creation order)."""
        entries = list(self._live.values())
        return [e[0] for e in entries if e[0].op == "baseline"] + [e[0] for e in entries if e[1]]

    def _settle(self) -> None:
        """Give gloo's worker threads time to let go of the tensors of completed collectives."""
        done = [w for w in self._collectives if w.is_completed()]
        if done:
            time.sleep(self.settle_s)
            self._collectives = [w for w in self._collectives if not any(w is d for d in done)]

    # -- the mode --------------------------------------------------------------------------------

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._collectives:
            self._settle()
        out = func(*args, **kwargs)
        name = str(func.overloadpacket).removeprefix("aten.")
        # An input storage met for the first time was made outside any op: by torch.tensor, which
        # lifts it (count it), or before the stretch, or by a backend on its own thread (do not).
        if name not in _LIFTS:
            for t in tree_leaves((args, kwargs)):
                if _dense(t) and id(t.untyped_storage()) not in self._live:
                    self._track(t, f"untracked {name}", counted=False)
                    self.untracked[name] = self.untracked.get(name, 0) + t.untyped_storage().nbytes()
        leaves = tree_leaves(out)
        for t in leaves:
            if _dense(t):
                self._track(t, name)
        if func.namespace == "c10d" and func.overloadpacket.__name__ not in _P2P:
            self._collectives += [_work(w) for w in leaves if isinstance(w, torch.ScriptObject)]
        return out

    def __exit__(self, *exc):
        for w in self._collectives:
            w.wait()
        if self._collectives:
            time.sleep(self.settle_s)
            self._collectives = []
        self._closed = True
        return super().__exit__(*exc)

    def report(self, unit: int | None = None) -> str:
        """The live set at the peak, one storage a line, in bytes or in multiples of `unit`."""
        def size(n):
            return f"{n} B" if unit is None else f"{n / unit:.3f} u"
        lines = [f"baseline {size(self.baseline_bytes)}, peak {size(self.peak)} above it, now {size(self.current)}"]
        lines += [f"  {t.op[:32]:<32} {str(tuple(t.shape)):<20} {size(t.nbytes):>10} {t.where}" for t in self.at_peak]
        return "\n".join(lines)


def _dense(t) -> bool:
    """A tensor with a storage of its own to count (not meta, sparse or nested)."""
    return isinstance(t, torch.Tensor) and not t.is_meta and t.layout == torch.strided and not t.is_nested


def _work(obj):
    """The c10d Work a collective op returned (as a TorchBind object)."""
    return torch._C._distributed_c10d.Work.unbox(obj)


def live_peak(fn, *args, baseline=(), **kwargs) -> tuple[object, LiveMemory]:
    """(fn(*args, **kwargs), the LiveMemory of the call); every tensor among args, kwargs and
    `baseline` is counted in the baseline."""
    tensors = [t for t in tree_leaves((args, kwargs, baseline)) if isinstance(t, torch.Tensor)]
    with LiveMemory(tensors) as live:
        result = fn(*args, **kwargs)
    return result, live
