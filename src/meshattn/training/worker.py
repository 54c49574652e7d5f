"""The body of every rank of `meshattn train` (module level, so spawned workers can import it)."""

from __future__ import annotations

import torch.distributed as dist

from ..config import TrainConfig
from ..mesh import ParallelDims
from .loop import TrainResult, train
from .preempt import StopSignals


def run_training(cfg_dict: dict, progress: bool) -> None:
    """Train, with SIGTERM/SIGINT caught for the whole run (a signal inside a collective must not
    unwind this rank alone: the ranks agree on a step to stop after); the handlers that were there
    before come back when training ends, however it ends."""
    with StopSignals() as stop:
        cfg = TrainConfig.from_dict(cfg_dict)
        result = train(cfg, ParallelDims(cfg.parallel), progress=progress, stop=stop)
        if dist.get_rank() == 0:
            _report(result)


def _report(result: TrainResult) -> None:
    """Rank 0's summary of a finished run on stdout."""
    first, last = result.losses[0], result.losses[-1]
    print(f"loss {first:.3f} -> {last:.3f} over {len(result.losses)} steps; "
          f"validation loss {result.val_loss:.3f}; {result.tokens_per_s:,.0f} tokens/s; "
          f"median step {sorted(result.step_times)[len(result.step_times) // 2] * 1e3:.0f} ms", flush=True)
    if result.sample:
        print("sample:\n" + "-" * 60 + f"\ndef {result.sample}\n" + "-" * 60, flush=True)
    print(f"checkpoint: {result.checkpoint}", flush=True)
    if result.hf is not None:
        print(f"hugging face folder: {result.hf} (transformers' from_pretrained loads it)", flush=True)
