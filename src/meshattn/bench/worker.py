"""What every rank of one benchmark layout runs (module level, so spawned workers import it).

The same global batch (the corpus' step-0 batch) every step; the timed step is forward +
backward (no optimizer step), so every layout, the peers included, does the same work.
Per rank: the loss of the first step (before any update, so layouts can be compared), the time
of each timed step (barrier before each), the bytes autograd saves for backward in one step,
the peak resident memory during the timed steps, and the bytes each collective kind moved per
step (from the byte counter; PyTorch-native TP reports call counts from CommDebugMode).
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from ..comm import CommCounter, all_reduce_
from ..config import ParallelConfig, TrainConfig
from ..training.corpus import Corpus
from .memory import PeakMemory, SavedActivations, tensor_bytes
from ..mesh import ParallelDims, current_device
from ..model import Transformer
from ..training.step import DTYPES, autocast, build_model
from .layouts import Layout, layout_from_dict
from .native import native_tensor_parallel


TEXT_BYTES = 1 << 22  # what a benchmarked layout reads of --data: its batches need far less than training


def _build(layout: Layout, cfg: TrainConfig, counter: CommCounter):
    """(model, local ids, local targets, mean-loss function) for this rank."""
    corpus = Corpus.from_path(cfg.data, max_bytes=TEXT_BYTES)
    ids, targets = corpus.batch(0, cfg.batch_size, cfg.seq_len, cfg.seed)  # (B, S) global
    device = current_device()
    if layout.kind == "meshattn":
        model = build_model(cfg, ParallelDims(cfg.parallel), counter)
        ids, targets = model.shard_batch(ids, targets)
        batch = model.axes.batch
        return model, ids.to(device), targets.to(device), lambda loss: (
            all_reduce_(loss.detach().double().reshape(1), batch, "step") / batch.size).item()
    torch.manual_seed(cfg.seed)
    model = Transformer(cfg.model).to(device=device, dtype=DTYPES[cfg.dtype])
    if layout.kind == "native":
        native_tensor_parallel(model, ParallelDims(ParallelConfig(tp=layout.parallel.tp)).mesh["tp"])
    return model, ids.to(device), targets.to(device), lambda loss: loss.item()


def _steps(model, ids: torch.Tensor, targets: torch.Tensor, cfg: TrainConfig):
    """forward() -> loss and step() -> loss (forward + backward from cleared gradients): the
    work every layout is timed and profiled on."""
    params = list(model.parameters())

    def forward() -> torch.Tensor:
        with autocast(cfg, ids.device):
            return model(ids, targets)[1]

    def step() -> torch.Tensor:
        for p in params:
            p.grad = None
        loss = forward()
        loss.backward()
        return loss

    return forward, step


def _by_kind(per_key) -> dict:
    """CommCounter totals keyed (axis, kind, phase) -> totals per collective kind."""
    out: dict[str, float] = {}
    for (_, kind, _), n in per_key.items():
        out[kind] = out.get(kind, 0) + n
    return out


def _native_comm_counts(step) -> dict:
    from torch.distributed.tensor.debug import CommDebugMode

    mode = CommDebugMode()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook")  # CommDebugMode's module tracker
        with mode:
            step()
    return {str(getattr(op, "__name__", op)).split(".")[-1]: n for op, n in mode.get_comm_counts().items()}


def measure(layout_dict: dict, cfg_dict: dict, warmup: int, steps: int, out: str) -> None:
    layout = layout_from_dict(layout_dict)
    cfg = TrainConfig.from_dict(cfg_dict)
    counter = CommCounter()
    model, ids, targets, global_loss = _build(layout, cfg, counter)
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]  # DTensor: this rank's
    forward, step = _steps(model, ids, targets, cfg)
    first_loss = global_loss(step())
    for _ in range(max(warmup - 1, 0)):
        step()
    with SavedActivations(local) as saved:
        loss = forward()
    loss.backward()
    del loss
    comm_calls = _native_comm_counts(step) if layout.kind == "native" else {}
    counter.reset()
    times = []
    with PeakMemory(current_device().type) as mem:
        for _ in range(steps):
            dist.barrier()
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    comm = {kind: n / steps for kind, n in _by_kind(counter.nbytes).items()}
    if not comm_calls:
        comm_calls = {kind: n / steps for kind, n in _by_kind(counter.calls).items()}
    row = {"rank": dist.get_rank(), "threads": torch.get_num_threads(), "times": times, "first_loss": first_loss,
           "saved_activation_bytes": saved.nbytes, "param_bytes": tensor_bytes(local),
           "peak_rss": mem.peak, "peak_above_baseline": mem.delta, "comm_bytes": comm, "comm_calls": comm_calls}
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(rows))


STEP_EVENT = "meshattn.step"


def profile_layout(layout_dict: dict, cfg_dict: dict, warmup: int, steps: int, out_dir: str) -> None:
    """A few fwd+bwd steps under torch.profiler on every rank: a Chrome/Perfetto trace per rank
    (trace_rank<r>.json) and, from rank 0, profile.json with each rank's compute/communication
    split (see timeline.py) and the load balance over ranks."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from .timeline import analyse, balance

    layout = layout_from_dict(layout_dict)
    cfg = TrainConfig.from_dict(cfg_dict)
    model, ids, targets, _ = _build(layout, cfg, CommCounter())
    _, step = _steps(model, ids, targets, cfg)
    for _ in range(warmup):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ids.device.type == "cuda" else [])
    dist.barrier()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            dist.barrier()
            with record_function(STEP_EVENT):
                step()
    rank = dist.get_rank()
    out = Path(out_dir)
    prof.export_chrome_trace(str(out / f"trace_rank{rank}.json"))
    events = [(e.name, e.thread, e.time_range.start, e.time_range.end) for e in prof.events()]
    row = {"rank": rank, **analyse(events, STEP_EVENT)}
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    if rank == 0:
        summary = {"layout": layout.name, "steps": steps, "ranks": rows, **balance([r["compute_s"] for r in rows])}
        (out / "profile.json").write_text(json.dumps(summary, indent=2))
