"""Peak memory of a stretch of work, on CPU (the process's resident set) or CUDA (the allocator).

On Linux the resident-set high-water mark (VmHWM) can be reset by writing "5" to
/proc/self/clear_refs, so the peak of one phase can be measured after set-up has run. Where that
is not allowed the figure covers the whole process life, and `resettable` says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


@dataclass
class PeakMemory:
    """with PeakMemory(device) as m: ...   then m.baseline, m.peak, m.delta in bytes."""

    device: str = "cpu"
    baseline: int = 0
    peak: int = 0
    resettable: bool = True

    def __enter__(self) -> PeakMemory:
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                self.resettable = False
            self.baseline = _status_kb("VmRSS") * 1024
        return self

    def __exit__(self, *exc) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.peak = _status_kb("VmHWM") * 1024

    @property
    def delta(self) -> int:
        return self.peak - self.baseline


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    return tensor_bytes(v for state in opt.state.values() for v in state.values() if torch.is_tensor(v))


def held_bytes(tensors) -> int:
    """Bytes of the storages behind `tensors` on this rank, each counted once; for a DTensor (a
    parameter sharded by FSDP) those of this rank's piece, padding included."""
    seen: dict[int, int] = {}
    for t in tensors:
        for storage in _storages(t):
            seen[storage.data_ptr()] = storage.nbytes()
    seen.pop(0, None)  # empty pieces (a rank past the end of a short dim 0) hold nothing
    return sum(seen.values())


def state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, int]:
    """What this rank holds between steps: weights, gradients, optimizer state (bytes) and total.
    The optimizer's per-parameter tensors only (AdamW's moments): its scalar step counters, which
    no formula counts, are left out."""
    params = list(model.parameters())
    moments = (v for state in opt.state.values() for v in state.values() if torch.is_tensor(v) and v.dim() > 0)
    out = {"weights": held_bytes(params),
           "gradients": held_bytes(p.grad for p in params if p.grad is not None),
           "optimizer": held_bytes(moments)}
    out["total"] = sum(out.values())
    return out


class SavedActivations:
    """Bytes autograd saves for backward during a forward pass, parameters excluded.

    Deterministic (unlike the resident set): each saved storage is counted once.

        with SavedActivations(model.parameters()) as saved:
            loss = model(x, y)[1]
        saved.nbytes
    """

    def __init__(self, exclude=()):
        self._exclude = {s.data_ptr() for p in exclude for s in _storages(p)}
        self._seen: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        for storage in _storages(t):
            ptr = storage.data_ptr()
            if ptr not in self._exclude:
                self._seen[ptr] = storage.nbytes()
        return t

    def __enter__(self) -> SavedActivations:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def nbytes(self) -> int:
        return sum(self._seen.values())


def _storages(t: torch.Tensor) -> list:
    """The storages holding t's data: its own, or for a wrapper subclass such as DTensor the
    storages of the tensors it wraps (this rank's shard), found through __tensor_flatten__."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        inner = (getattr(t, name) for name in names)
        return [s for x in inner if torch.is_tensor(x) for s in _storages(x)]
    return [t.untyped_storage()]
