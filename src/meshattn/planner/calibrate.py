"""Measure this machine for the planner's cost model (`meshattn plan --calibrate`).

What is measured, all float32 on the CPU:

- `matmul_flops[t]`: FLOP/s of a linear layer's forward + backward (y = x W^T, then dx and dW),
  with torch.set_num_threads(t), for t = 1..cores (powers of two and `cores` above 8 cores).
  The model is trained, so this is the representative rate; `matmul_forward_flops[t]` is the
  forward alone. A multiply-add is 2 FLOPs: forward 2 m k n, forward + backward 3x that.
- `attention_flops[t]`: FLOP/s of causal scaled_dot_product_attention forward + backward, counted
  as the planner counts (planner/flops.py): forward 4 B H D pairs, pairs = S(S+1)/2 (causal),
  backward 2x forward, so forward + backward = 12 B H D pairs.
  A rate over several shapes (Settings) is their total FLOPs over their total median seconds.
- `memory_bw_threads[t]`: bytes/s of copying a large tensor (larger than the caches), read + write
  bytes counted (2 x its size): the rate of elementwise work (norms, activations, residual adds,
  softmax outside the kernel). `memory_bw` is the figure at all cores: the machine's bandwidth.
- `concurrent_flops[kind][world]`: the per-rank rate when `world` local ranks compute at once, each
  at the thread count `meshattn.launch` gives it (cores // world): what a rank of `meshattn bench`
  gets, on the bench model's shapes ("copy": the copy bandwidth in bytes/s, read + write). The
  slowest rank's rate (a step ends when the last rank does); the ranks start together after one
  barrier and then run back to back for `sustain_s` (a second), as in a training step.
- `collectives[kind][world]`: an alpha-beta fit `seconds = latency_s + payload_bytes / bandwidth`
  of each gloo collective over payloads from ~1 KiB to ~16 MiB, `world` local ranks. Payload is the
  byte counter's convention (comm.py): the size of the full tensor the collective is about, i.e.
  the reduced tensor of an all-reduce, the gathered output of an all-gather, the unscattered input
  of a reduce-scatter, the exchanged tensor of an all-to-all, the tensor each rank sends in a
  send/recv (ring-style: every rank isends to the next while it irecvs from the previous, as the
  ring attention does). Each timed call follows a barrier; a call's time is the slowest rank's.
  The fit minimises *relative* squared error, so the small payloads (latency) weigh as much as
  the large ones (bandwidth); latency is kept >= 0. The medians per payload are kept in
  `collective_samples` to judge the fit.

The host is shared and noisy: every figure is the median of several repeats after a warm-up
(more repeats for payloads under 1 MiB, whose times vary most), and rates of different thread
counts need not be monotone. On a small VM gloo's latency is milliseconds, not microseconds:
each call waits for the other processes to be scheduled. Nothing here keeps global state; the
thread count and the autograd mode are restored, and random inputs use their own generator.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from ..comm import KINDS
from ..launch import launch

FORMAT = "meshattn-calibration/1"
ENV_VAR = "MESHATTN_CALIBRATION"
DEFAULT_PATH = Path.home() / ".cache" / "meshattn" / "calibration.json"
COMPUTE_KINDS = ("matmul", "matmul_forward", "attention")
SMALL_PAYLOAD = 1 << 20  # collective payloads below this get Settings.small_repeats
_THREAD_RATES = ("matmul_flops", "matmul_forward_flops", "attention_flops", "memory_bw_threads")  # keyed by threads

# torch 2.13 renamed the tensor-in/tensor-out collectives (as in comm.py); older releases only have the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass(frozen=True)
class Settings:
    """What one calibration runs: shapes, payloads and repeats (each after one warm-up call)."""

    linear: tuple  # (m, k, n): x (m, k) times W^T, W (n, k); first the bench's small model's fc (B=2, S=1024)
    attention: tuple  # (B, H, S, D); first the bench's small model at S = 1024
    copy_numel: int  # float32 elements of the copied tensor
    payloads: tuple  # collective payload bytes
    repeats: int  # timed repeats of each compute shape and of each collective payload from SMALL_PAYLOAD up
    small_repeats: int  # timed repeats of each smaller payload: cheap, and their times vary most (scheduling)
    sustain_s: float  # how long each rank computes when all ranks compute at once (the concurrent rates)


NORMAL = Settings(linear=((2048, 256, 1024), (4096, 1024, 256), (2048, 1024, 1024)),
                  attention=((2, 8, 1024, 32), (1, 4, 2048, 64)), copy_numel=1 << 24,
                  payloads=tuple(1 << i for i in range(10, 25, 2)), repeats=5, small_repeats=15,  # 1 KiB..16 MiB
                  sustain_s=1.0)
QUICK = Settings(linear=((512, 256, 256),), attention=((1, 2, 256, 32),), copy_numel=1 << 20,
                 payloads=(1 << 10, 1 << 16, 1 << 20), repeats=2, small_repeats=3, sustain_s=0.05)


def default_path() -> Path:
    """Where `meshattn plan --calibrate` stores the calibration: $MESHATTN_CALIBRATION, else
    ~/.cache/meshattn/calibration.json."""
    return Path(os.environ[ENV_VAR]) if os.environ.get(ENV_VAR) else DEFAULT_PATH


def _nearest(keys, value: int) -> int:
    """The measured key nearest to value (ties: the larger one)."""
    return min(keys, key=lambda k: (abs(k - value), -k))


def _interpolate(rates: dict[int, float], threads: int) -> float:
    """The rate at `threads`, linear between the measured thread counts, clamped to their range."""
    keys = sorted(rates)
    t = min(max(threads, keys[0]), keys[-1])
    lo = max(k for k in keys if k <= t)
    hi = min(k for k in keys if k >= t)
    if lo == hi:
        return rates[lo]
    return rates[lo] + (rates[hi] - rates[lo]) * (t - lo) / (hi - lo)


def _positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"calibration: {name}={value!r} must be a positive finite number")


@dataclass(frozen=True)
class Calibration:
    """This machine as measured by `measure` (see the module docstring for what each figure is).

    Rates are keyed by thread count (int); collective fits and concurrent rates by world size
    (str, as in JSON): collectives[kind][world] = {"latency_s": s, "bandwidth": payload bytes/s}.
    """

    cores: int
    torch: str
    host: str
    measured_at: str  # ISO 8601, UTC
    quick: bool  # measured with the quick settings (fewer, smaller shapes): a smoke test, not a calibration
    matmul_flops: dict  # threads -> FLOP/s, linear forward + backward
    matmul_forward_flops: dict  # threads -> FLOP/s, linear forward only
    attention_flops: dict  # threads -> FLOP/s, causal SDPA forward + backward
    memory_bw: float  # bytes/s (read + write) of a large copy at all cores
    memory_bw_threads: dict  # threads -> bytes/s (read + write) of a large copy
    concurrent_flops: dict  # "matmul" | "attention" | "copy" -> world -> per-rank FLOP/s (copy: bytes/s), all at once
    collectives: dict  # kind -> world -> {"latency_s", "bandwidth"}
    collective_samples: dict  # kind -> world -> [[payload_bytes, median seconds], ...]

    def __post_init__(self) -> None:
        _positive("cores", self.cores)
        _positive("memory_bw", self.memory_bw)
        for name in _THREAD_RATES:
            rates = getattr(self, name)
            if not rates:
                raise ValueError(f"calibration: {name} is empty")
            for threads, rate in rates.items():
                _positive(f"{name}[{threads}]", rate)
        for kind, by_world in self.concurrent_flops.items():
            for world, rate in by_world.items():
                _positive(f"concurrent_flops[{kind}][{world}]", rate)
        for kind, by_world in self.collectives.items():
            if kind not in KINDS:
                raise ValueError(f"calibration: unknown collective {kind!r}; expected one of {KINDS}")
            for world, fit in by_world.items():
                latency = fit["latency_s"]
                if not (isinstance(latency, (int, float)) and math.isfinite(latency) and latency >= 0):
                    raise ValueError(f"calibration: collectives[{kind}][{world}].latency_s={latency!r} must be >= 0")
                _positive(f"collectives[{kind}][{world}].bandwidth", fit["bandwidth"])

    # -- evaluation ------------------------------------------------------------------------------

    def compute_seconds(self, flops: float, threads: int, kind: str = "matmul") -> float:
        """Seconds for `flops` FLOPs of `kind` ("matmul": linear forward + backward, "matmul_forward",
        "attention": causal SDPA forward + backward) in one process at `threads` threads, clamped to
        1..cores; between measured thread counts the rate is interpolated linearly."""
        rates = {"matmul": self.matmul_flops, "matmul_forward": self.matmul_forward_flops,
                 "attention": self.attention_flops}.get(kind)
        if rates is None:
            raise ValueError(f"unknown compute kind {kind!r}; choose one of {COMPUTE_KINDS}")
        return flops / _interpolate(rates, min(max(int(threads), 1), self.cores))

    def rank_compute_seconds(self, flops: float, world: int, kind: str = "matmul") -> float:
        """Seconds for `flops` FLOPs of `kind` ("matmul" or "attention"; or bytes of "copy") on one
        rank of a `world`-rank local job, all ranks computing at once at cores // world threads each
        (as `meshattn bench` runs); a world not measured uses the nearest measured one, and none
        measured falls back to compute_seconds at cores // world threads."""
        by_world = self.concurrent_flops.get(kind, {})
        if not by_world:
            return self.compute_seconds(flops, max(1, self.cores // world), kind)
        return flops / by_world[str(_nearest([int(w) for w in by_world], world))]

    def memory_seconds(self, nbytes: float, threads: int) -> float:
        """Seconds to move `nbytes` (read + write counted) at `threads` threads, clamped to 1..cores."""
        return nbytes / _interpolate(self.memory_bw_threads, min(max(int(threads), 1), self.cores))

    def collective_seconds(self, kind: str, world: int, payload_bytes: float) -> float:
        """latency_s + payload_bytes / bandwidth of the fit for `kind` on `world` ranks (payload as in
        comm.py). A world not measured uses the nearest measured world (ties: the larger); a world of
        1 costs nothing (comm.py's collectives are the identity there)."""
        if kind not in KINDS:
            raise ValueError(f"unknown collective {kind!r}; choose one of {KINDS}")
        if world <= 1:
            return 0.0
        by_world = self.collectives.get(kind)
        if not by_world:
            raise ValueError(f"calibration has no fit for {kind!r}")
        fit = by_world[str(_nearest([int(w) for w in by_world], world))]
        return fit["latency_s"] + payload_bytes / fit["bandwidth"]

    # -- JSON --------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """Plain JSON types; thread counts become string keys."""
        d = dataclasses.asdict(self)
        for name in _THREAD_RATES:
            d[name] = {str(t): r for t, r in sorted(d[name].items())}
        return {"format": FORMAT, **d}

    @classmethod
    def from_dict(cls, d: dict) -> Calibration:
        """The inverse of to_dict; ValueError naming what is wrong when `d` is not a calibration."""
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ValueError(f"not a meshattn calibration (expected \"format\": \"{FORMAT}\"); "
                             "run `meshattn plan --calibrate` to make one")
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in d]
        if missing:
            raise ValueError(f"calibration is missing {', '.join(missing)}; run `meshattn plan --calibrate` again")
        try:
            values = {n: d[n] for n in names}
            for name in _THREAD_RATES:
                values[name] = {int(t): float(r) for t, r in d[name].items()}
            values["memory_bw"] = float(d["memory_bw"])
            values["concurrent_flops"] = {k: {str(w): float(r) for w, r in v.items()}
                                          for k, v in d["concurrent_flops"].items()}
            values["collectives"] = {k: {str(w): {"latency_s": float(f["latency_s"]),
                                                  "bandwidth": float(f["bandwidth"])} for w, f in v.items()}
                                     for k, v in d["collectives"].items()}
            values["collective_samples"] = {k: {str(w): [[int(p), float(s)] for p, s in pts] for w, pts in v.items()}
                                            for k, v in d["collective_samples"].items()}
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise ValueError(f"calibration is malformed: {type(e).__name__}: {e}") from None
        return cls(**values)


def summary(cal: Calibration) -> str:
    """A few lines for people: the rates per thread count and each collective's fit per world."""
    def per_threads(rates: dict, unit: float) -> str:
        return ", ".join(f"{t}t {r / unit:.1f}" for t, r in sorted(rates.items()))

    def by_world(d: dict) -> list:
        return sorted(d.items(), key=lambda item: int(item[0]))

    lines = [f"{cal.host}: {cal.cores} cores, torch {cal.torch}, measured {cal.measured_at}"
             + (" (quick: not for planning)" if cal.quick else ""),
             f"  linear fwd+bwd GFLOP/s     {per_threads(cal.matmul_flops, 1e9)}",
             f"  linear fwd GFLOP/s         {per_threads(cal.matmul_forward_flops, 1e9)}",
             f"  attention fwd+bwd GFLOP/s  {per_threads(cal.attention_flops, 1e9)}",
             f"  copy GB/s (read + write)   {per_threads(cal.memory_bw_threads, 1e9)}"]
    for kind, rates in cal.concurrent_flops.items():
        lines.append(f"  {kind} {'GB/s' if kind == 'copy' else 'GFLOP/s'} per rank, all ranks at once: "
                     + ", ".join(f"world {w} {r / 1e9:.1f}" for w, r in by_world(rates)))
    for kind, fits in cal.collectives.items():
        lines.append(f"  gloo {kind:<14} " + ", ".join(
            f"world {w}: {f['latency_s'] * 1e3:.2f} ms + payload / {f['bandwidth'] / 1e9:.2f} GB/s"
            for w, f in by_world(fits)))
    return "\n".join(lines)


def save(cal: Calibration, path: Path | str) -> Path:
    """Write cal as JSON to path (parents created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cal.to_dict(), indent=1) + "\n")
    return path


def load(path: Path | str) -> Calibration:
    """The calibration saved at path. FileNotFoundError when there is none; ValueError when the file
    is not JSON, not a calibration, or is missing fields."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not a meshattn calibration (not JSON: {e})") from None
    try:
        return Calibration.from_dict(d)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


# -- compute ---------------------------------------------------------------------------------------

def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of fn over `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _randn(*shape: int, gen: torch.Generator, grad: bool = False) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).requires_grad_(grad)


def _sustained_seconds(fn: Callable[[], object], seconds: float) -> float:
    """Mean wall time of fn over back-to-back calls for at least `seconds` (after one warm-up): the
    rate a process sustains while others share its cores. The OS scheduler is fair over a second,
    not over one short call, so short calls' medians misjudge a shared core."""
    fn()
    calls, t0 = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return elapsed / calls


def _linear_rate(shapes, timer: Callable[[Callable[[], object]], float], backward: bool) -> float:
    """FLOP/s of F.linear over `shapes` (m, k, n): total FLOPs / total median seconds. Forward
    2 m k n; with backward (dx = g W and dW = g^T x) 3x that."""
    gen = torch.Generator().manual_seed(0)
    flops = seconds = 0.0
    for m, k, n in shapes:
        x, w = _randn(m, k, gen=gen, grad=backward), _randn(n, k, gen=gen, grad=backward)  # (m, k), (n, k)
        g = _randn(m, n, gen=gen)  # (m, n): the output's gradient

        def step():
            if not backward:
                with torch.no_grad():
                    return F.linear(x, w)
            x.grad = w.grad = None
            F.linear(x, w).backward(g)

        seconds += timer(step)
        flops += (3 if backward else 1) * 2 * m * k * n
    return flops / seconds


def _attention_rate(shapes, timer: Callable[[Callable[[], object]], float]) -> float:
    """FLOP/s of causal SDPA forward + backward over `shapes` (B, H, S, D), counted as the planner
    does: 3 x 4 B H D S(S+1)/2."""
    gen = torch.Generator().manual_seed(0)
    flops = seconds = 0.0
    for b, h, s, d in shapes:
        q, k, v = (_randn(b, h, s, d, gen=gen, grad=True) for _ in range(3))  # (B, H, S, D)
        g = _randn(b, h, s, d, gen=gen)

        def step():
            q.grad = k.grad = v.grad = None
            F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(g)

        seconds += timer(step)
        flops += 3 * 4 * b * h * d * (s * (s + 1) // 2)
    return flops / seconds


def _copy_rate(numel: int, timer: Callable[[Callable[[], object]], float]) -> float:
    """Bytes/s of dst.copy_(src), float32, read + write counted."""
    src = torch.ones(numel)
    dst = torch.empty(numel)
    return 2 * src.nbytes / timer(lambda: dst.copy_(src))


def _thread_counts(cores: int) -> list[int]:
    """1..cores up to 8 cores; beyond, the powers of two and cores itself."""
    if cores <= 8:
        return list(range(1, cores + 1))
    return sorted({1 << i for i in range(cores.bit_length()) if 1 << i <= cores} | {cores})


# -- collectives -------------------------------------------------------------------------------------

def _collective_call(kind: str, payload: int, rank: int, world: int) -> tuple[int, Callable[[], None]]:
    """(actual payload bytes, a call of `kind` on that payload); float32, numel a multiple of world."""
    numel = max(world, round(payload / 4 / world) * world)
    full = torch.ones(numel)  # the payload tensor
    part = torch.ones(numel // world)  # one rank's shard
    out = torch.empty(numel)
    peer_next, peer_prev = (rank + 1) % world, (rank - 1) % world
    calls = {
        "all_reduce": lambda: dist.all_reduce(full),
        "all_gather": lambda: _all_gather_single(out, part),
        "reduce_scatter": lambda: _reduce_scatter_single(part, full),
        "all_to_all": lambda: dist.all_to_all_single(out, full),
        "send_recv": lambda: [r.wait() for r in (dist.isend(full, peer_next), dist.irecv(out, peer_prev))],
    }
    return numel * 4, calls[kind]


def _collectives_worker(settings: Settings, out: str) -> None:
    """Every rank of one world size: the concurrent compute rates (the first, bench-like, shape of
    each kind, and the copy bandwidth, every rank at once after one barrier), then each collective kind at
    each payload. Rank 0 writes {"concurrent": {kind: rate}, "samples": {kind: [[payload, s], ...]}}
    to `out`, taking the slowest rank's rate and, per repeat, the slowest rank's time."""
    rank, world = dist.get_rank(), dist.get_world_size()
    rates = {}
    sustained = functools.partial(_sustained_seconds, seconds=settings.sustain_s)
    for kind, job in (("matmul", lambda: _linear_rate(settings.linear[:1], sustained, backward=True)),
                      ("attention", lambda: _attention_rate(settings.attention[:1], sustained)),
                      ("copy", lambda: _copy_rate(settings.copy_numel, sustained))):
        dist.barrier()  # start together, then back to back for a while, as a training step runs (a
        rates[kind] = job()  # barrier per short call would let an early rank's wait steal a late one's core)
    times: dict[str, list] = {}
    for kind in KINDS:
        for payload in settings.payloads:
            nbytes, call = _collective_call(kind, payload, rank, world)
            call()  # warm-up: connections, buffers
            runs = []
            for _ in range(settings.small_repeats if payload < SMALL_PAYLOAD else settings.repeats):
                dist.barrier()
                t0 = time.perf_counter()
                call()
                runs.append(time.perf_counter() - t0)
            times.setdefault(kind, []).append((nbytes, runs))
    rows = [None] * world
    dist.all_gather_object(rows, {"rates": rates, "times": times})
    if rank == 0:
        concurrent = {k: min(r["rates"][k] for r in rows) for k in rates}
        samples = {kind: [[nbytes, statistics.median(map(max, zip(*(r["times"][kind][i][1] for r in rows))))]
                          for i, (nbytes, _) in enumerate(times[kind])] for kind in KINDS}
        Path(out).write_text(json.dumps({"concurrent": concurrent, "samples": samples}))


def fit_alpha_beta(samples) -> dict:
    """{"latency_s", "bandwidth"} minimising sum(((latency + x / bandwidth - t) / t)^2) over
    samples [(payload_bytes x, seconds t), ...]: relative error, so that small payloads count.
    A negative latency is refitted as 0; a non-positive slope (noise: flat times) falls back to
    the largest payload's payload / time as the bandwidth."""
    w = [1.0 / t**2 for _, t in samples]
    s0 = sum(w)
    s1 = sum(wi * x for wi, (x, _) in zip(w, samples))
    s2 = sum(wi * x * x for wi, (x, _) in zip(w, samples))
    t0 = sum(wi * t for wi, (_, t) in zip(w, samples))
    t1 = sum(wi * x * t for wi, (x, t) in zip(w, samples))
    det = s0 * s2 - s1 * s1
    a, b = ((s2 * t0 - s1 * t1) / det, (s0 * t1 - s1 * t0) / det) if det > 0 else (0.0, 0.0)
    if a < 0:
        a, b = 0.0, t1 / s2
    if b <= 0:
        x_max, t_max = max(samples)
        b = t_max / x_max
        a = max(0.0, (t0 - b * s1) / s0)
    return {"latency_s": a, "bandwidth": 1.0 / b}


# -- the whole calibration -----------------------------------------------------------------------------

def measure(world_sizes=(2, 4), quick: bool = False, progress: bool = True) -> Calibration:
    """Measure this machine (see the module docstring). quick=True: one small shape, three payloads,
    two repeats: seconds, for tests, not for planning. A tqdm bar on stderr when progress. Each
    world size in world_sizes (>= 2) is one local gloo job of that many spawned ranks."""
    if any(w < 2 for w in world_sizes):
        raise ValueError(f"world_sizes={tuple(world_sizes)}: collectives need at least 2 ranks")
    settings = QUICK if quick else NORMAL
    cores = os.cpu_count() or 1
    counts = _thread_counts(cores)
    rates: dict[str, dict[int, float]] = {k: {} for k in ("matmul", "matmul_forward", "attention", "memory")}
    threads_before = torch.get_num_threads()
    steps = 4 * len(counts) + len(world_sizes)
    median = functools.partial(_median_seconds, repeats=settings.repeats)
    jobs = {"matmul": lambda: _linear_rate(settings.linear, median, backward=True),
            "matmul_forward": lambda: _linear_rate(settings.linear, median, backward=False),
            "attention": lambda: _attention_rate(settings.attention, median),
            "memory": lambda: _copy_rate(settings.copy_numel, median)}
    with tqdm(total=steps, desc="calibrate", file=sys.stderr, disable=not progress, leave=False) as bar:
        try:
            with torch.enable_grad():
                for t in counts:
                    torch.set_num_threads(t)
                    for kind, job in jobs.items():
                        bar.set_postfix_str(f"{kind}, {t} thread{'s' * (t > 1)}")
                        rates[kind][t] = job()
                        bar.update()
        finally:
            torch.set_num_threads(threads_before)
        concurrent: dict[str, dict[str, float]] = {"matmul": {}, "attention": {}, "copy": {}}
        collectives: dict[str, dict[str, dict]] = {k: {} for k in KINDS}
        samples: dict[str, dict[str, list]] = {k: {} for k in KINDS}
        with tempfile.TemporaryDirectory(prefix="meshattn-calibrate-") as tmp:
            for world in world_sizes:
                bar.set_postfix_str(f"gloo collectives, world {world}")
                out = Path(tmp, f"world{world}.json")
                launch(_collectives_worker, world, args=(settings, str(out)), env={}, backend="gloo",
                       timeout_s=120.0)
                got = json.loads(out.read_text())
                for kind, rate in got["concurrent"].items():
                    concurrent[kind][str(world)] = rate
                for kind, pts in got["samples"].items():
                    samples[kind][str(world)] = pts
                    collectives[kind][str(world)] = fit_alpha_beta(pts)
                bar.update()
    return Calibration(cores=cores, torch=torch.__version__, host=platform.node(),
                       measured_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       quick=quick, matmul_flops=rates["matmul"], matmul_forward_flops=rates["matmul_forward"],
                       attention_flops=rates["attention"], memory_bw=rates["memory"][max(counts)],
                       memory_bw_threads=rates["memory"], concurrent_flops=concurrent,
                       collectives=collectives, collective_samples=samples)
