"""What every rank of one benchmark layout runs (module level, so spawned workers import it).

The same global batch (the corpus' step-0 batch) every step; the timed step is forward +
backward (no optimizer step), so every layout, the peers included, does the same work.
Per rank: the next-token loss of the first step (before any update, so layouts can be compared;
a rank's objective holds only its share of an MoE model's balance and z-losses), the time of
each timed step (barrier before each), the bytes autograd saves for backward in one step, the
peak resident memory during the timed steps, and the bytes each collective kind moved per step
(from the byte counter; PyTorch-native TP reports call counts from CommDebugMode).
For a mixture of experts, also the routing of the last timed step (bench/moe.py) and, from one
more step under torch.profiler after the timed ones, the time in the MoE layers' dispatch,
experts and combine (timeline.moe_split).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from ..comm import CommCounter, all_reduce_
from ..config import ParallelConfig, TrainConfig
from ..training.corpus import Corpus
from .memory import PeakMemory, SavedActivations, tensor_bytes
from .moe import layer_view, summary as moe_summary
from .timeline import analyse, balance, moe_split
from ..mesh import ParallelDims, current_device
from ..model import Transformer
from ..training.step import DTYPES, autocast, build_model
from .layouts import Layout, layout_from_dict
from .native import native_tensor_parallel


TEXT_BYTES = 1 << 22  # what a benchmarked layout reads of --data: its batches need far less than training
STEP_EVENT = "meshattn.step"  # the profiler range around each profiled step


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
    work every layout is timed and profiled on; and the stats dict the last forward filled
    ("moe": the MoE layers' entries)."""
    params = list(model.parameters())
    stats: dict = {}

    def forward() -> torch.Tensor:
        with autocast(cfg, ids.device):
            return model(ids, targets, stats=stats)[1]

    def step() -> torch.Tensor:
        for p in params:
            p.grad = None
        loss = forward()
        loss.backward()
        return loss

    return forward, step, stats


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
    forward, step, stats = _steps(model, ids, targets, cfg)
    step()
    first_loss = global_loss(stats["lm_loss"])  # the next-token loss, comparable across layouts
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
    if cfg.model.is_moe:
        row["moe"] = layer_view(stats["moe"])
        if layout.kind == "meshattn":  # the reference layer marks no ranges
            row["moe_time"] = moe_split(_events(_profiled(step, 1, ids.device)), STEP_EVENT)
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(rows))


def _profiled(step, steps: int, device: torch.device, each=None):
    """`steps` steps under torch.profiler, each in a STEP_EVENT range after a barrier; each(),
    if given, runs after every step, outside the range. Returns the profiler."""
    from torch.profiler import ProfilerActivity, profile, record_function  # imported here: slow to import

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prof = profile(activities=activities)
    dist.barrier()
    with _quiet_stderr():
        prof.start()
    try:
        for _ in range(steps):
            dist.barrier()
            with record_function(STEP_EVENT):
                step()
            if each is not None:
                each()
    finally:
        with _quiet_stderr():
            prof.stop()
    return prof


@contextlib.contextmanager
def _quiet_stderr():
    """Kineto writes a line to file descriptor 2 as a profiler starts and stops ("USDT: ...
    profiler_start"); keep it out of the command's output."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _events(prof) -> list[tuple]:
    """(name, thread, start_us, end_us, autograd sequence number, forward thread of a backward
    event) of every profiled event (timeline.py)."""
    return [(e.name, e.thread, e.time_range.start, e.time_range.end, e.sequence_nr, e.fwd_thread)
            for e in prof.events()]


def profile_layout(layout_dict: dict, cfg_dict: dict, warmup: int, steps: int, out_dir: str) -> None:
    """A few fwd+bwd steps under torch.profiler on every rank: a Chrome/Perfetto trace per rank
    (trace_rank<r>.json) and, from rank 0, profile.json with each rank's compute/communication
    split (see timeline.py) and the load balance over ranks; for a mixture of experts also each
    rank's time in dispatch, experts and combine ("moe" per rank) and the routing of every
    profiled step ("moe": bench/moe.py's summary of the last, with "expert_counts_per_step")."""
    layout = layout_from_dict(layout_dict)
    cfg = TrainConfig.from_dict(cfg_dict)
    model, ids, targets, _ = _build(layout, cfg, CommCounter())
    _, step, stats = _steps(model, ids, targets, cfg)
    for _ in range(warmup):
        step()
    views: list[dict] = []
    each = (lambda: views.append(layer_view(stats["moe"]))) if cfg.model.is_moe else None
    prof = _profiled(step, steps, ids.device, each)
    rank = dist.get_rank()
    out = Path(out_dir)
    prof.export_chrome_trace(str(out / f"trace_rank{rank}.json"))
    events = _events(prof)
    row = {"rank": rank, **analyse([e[:4] for e in events], STEP_EVENT)}
    if views and layout.kind == "meshattn":
        row["moe"] = moe_split(events, STEP_EVENT)
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, (row, views))
    if rank == 0:
        summary = {"layout": layout.name, "steps": steps, "ranks": [r for r, _ in rows],
                   **balance([r["compute_s"] for r, _ in rows])}
        if views:
            summary["moe"] = _moe_summary(cfg, [v for _, v in rows])
        (out / "profile.json").write_text(json.dumps(summary, indent=2))


def _moe_summary(cfg: TrainConfig, views: list[list[dict]]) -> dict:
    """views[rank][step] -> the routing summary of the last step, the tokens per expert of every
    step, and the model's MoE sizes (which blocks are MoE layers)."""
    m = cfg.model
    return {**moe_summary([v[-1] for v in views]), "expert_counts_per_step": [v["counts"] for v in views[0]],
            "blocks": [i for i in range(m.n_layers) if m.moe_layer(i)], "n_experts": m.n_experts,
            "top_k": m.top_k, "tokens": cfg.batch_size * cfg.seq_len}
