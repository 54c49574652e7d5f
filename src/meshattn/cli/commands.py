"""What each command does in the parent process: check, launch the workers, report.

Bad input is refused here, before any worker starts (checks.py); what can only fail inside the
workers comes back from the launcher as one line naming the rank and the cause.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from ..config import ConfigError
from ..launch import launch, under_torchrun
from ..outcome import Stopped, WorkerFailed
from ..training.worker import run_training
from .checks import check_bench, check_profile, check_train, first_process
from .options import layout_name


def train_command(a: argparse.Namespace) -> int:
    cfg = check_train(a)
    if first_process():
        model = f"init-from={cfg.init_from}" if cfg.init_from is not None else f"preset={a.preset}"
        print(f"meshattn train: {model} ({cfg.model.num_params() / 1e6:.2f}M params), "
              f"{layout_name(cfg.parallel)}, "
              f"{cfg.steps} steps of {cfg.batch_size}x{cfg.seq_len} tokens", flush=True)
    try:
        launch(run_training, cfg.parallel.world_size, args=(cfg.to_dict(), not a.no_progress), env=dict(os.environ),
               backend=a.backend, timeout_s=a.timeout, log_dir=Path(a.out) / "logs")
    except Stopped as e:
        return _report_stop(e, Path(a.out) / "checkpoint")
    except (WorkerFailed, ConfigError) as e:
        return _report_failure(e, a.verbose)
    return 0


def bench_command(a: argparse.Namespace) -> int:
    from ..bench import default_layouts, run_bench
    from ..bench.layouts import peer_notes
    from ..bench.report import native_ratios, plot, table, write_json

    if under_torchrun(os.environ):
        raise ConfigError("meshattn bench starts fresh worker processes for every layout; run it directly, "
                          "not under torchrun")
    model, layouts = check_bench(a)
    notes = [] if layouts else peer_notes(a.world, model, a.batch_size, max(a.seq_len))
    layouts = layouts or default_layouts(a.world, model, a.batch_size, max(a.seq_len))
    experts = f", {model.n_experts} experts top-{model.top_k}" if model.is_moe else ""
    print(f"meshattn bench: d_model={model.d_model} heads={model.n_heads}/{model.n_kv_heads} layers={model.n_layers} "
          f"d_ff={model.d_ff}{experts}, batch {a.batch_size}, {a.dtype}, {a.warmup} warm-up + {a.steps} timed fwd+bwd "
          f"steps; {len(layouts)} layouts x {len(a.seq_len)} sequence lengths", flush=True)
    for note in notes:
        print(f"meshattn bench: {note}", flush=True)
    try:
        results = run_bench(model, layouts, a.seq_len, a.batch_size, a.warmup, a.steps, a.dtype, a.backend,
                            a.timeout, progress=not a.no_progress, data=a.data, rounds=a.rounds,
                            log_dir=Path(a.out) / "logs")
    except Stopped as e:
        return _report_stop(e)
    except WorkerFailed as e:
        return _report_failure(e, a.verbose)
    print(table(results))
    for line in native_ratios(results):
        print(line)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"command": "meshattn bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else None,
            "model": dataclasses.asdict(model), "cpu_count": os.cpu_count(), "torch": torch_version()}
    write_json(results, meta, out / "bench.json")
    written = [] if a.no_plots else plot(results, out, f"d_model {model.d_model}, batch {a.batch_size}")
    print(f"wrote {out / 'bench.json'}" + "".join(f", {p}" for p in written), flush=True)
    return 0


def profile_command(a: argparse.Namespace) -> int:
    from ..bench.layouts import layout_to_dict
    from ..bench.report import plot_moe_profile, profile_text
    from ..bench.worker import profile_layout

    layout, cfg = check_profile(a)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"meshattn profile: {layout.name}{'' if layout.parallel.overlap else ' (no overlap)'} on {layout.world} "
          f"ranks, {a.warmup} warm-up + {a.steps} profiled fwd+bwd steps of {a.batch_size}x{a.seq_len} tokens",
          flush=True)
    try:
        launch(profile_layout, layout.world, args=(layout_to_dict(layout), cfg.to_dict(), a.warmup, a.steps, str(out)),
               env={}, backend=a.backend, timeout_s=a.timeout, log_dir=out / "logs")
    except Stopped as e:
        return _report_stop(e)
    except WorkerFailed as e:
        return _report_failure(e, a.verbose)
    s = json.loads((out / "profile.json").read_text())
    print(profile_text(s))
    plot = None if a.no_plots or "moe" not in s else plot_moe_profile(s, out / "profile_moe.png")
    print(f"wrote {out / 'profile.json'}" + (f", {plot}" if plot else "") + f" and {layout.world} traces "
          f"{out / 'trace_rank*.json'} (open in https://ui.perfetto.dev or chrome://tracing)", flush=True)
    return 0


def _report_failure(e: Exception, verbose: bool) -> int:
    """A failure inside the workers: its one line (after every failed rank's traceback, with
    --verbose); exit status 1."""
    details = getattr(e, "details", "")
    if verbose and details:
        print(details, file=sys.stderr)
    print(f"meshattn: error: {e}", file=sys.stderr)
    return 1


def _report_stop(e: Stopped, checkpoints: Path | None = None) -> int:
    """A job stopped by SIGTERM/SIGINT: one line (from rank 0 only under torchrun); exit status
    128 + the signal's number. If the workers did not get to save, name the last complete
    checkpoint under `checkpoints`, if there is one."""
    line = f"meshattn: {e}"
    if e.checkpoint is None:  # the workers did not stop by themselves: a progress bar may be left open
        line = "\n" + line
        if checkpoints is not None and (checkpoints / "latest").is_file():
            last = checkpoints / (checkpoints / "latest").read_text().strip()
            line += f"; the last complete checkpoint is {last}; continue with --resume {checkpoints}"
    if first_process():
        print(line, file=sys.stderr, flush=True)
    return e.exit_code


def torch_version() -> str:
    import torch

    return torch.__version__
