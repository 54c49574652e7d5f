"""The training loop on every rank: resume, steps with a progress bar, periodic checkpoints,
validation, a generated sample and the final checkpoint and metrics (rank 0 writes); a
fine-tune (--init-from) also exports the final weights as a Hugging Face folder, OUT/hf.

Stopping on request (preempt.py): after each step the ranks agree whether any of them caught a
SIGTERM or SIGINT; if so all of them stop after that step, write a checkpoint as --save-every
does, and raise `Stopped`.
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from .. import hf
from ..comm import all_reduce_
from ..config import ConfigError, TrainConfig
from ..outcome import Stopped, signal_name
from ..mesh import ParallelDims
from ..parallel import ParallelModel, gather_state_dict
from . import checkpoint
from .corpus import Corpus
from .generate import generate
from .preempt import StopSignals, agreed_stop
from .scaler import LossScaler
from .tokenized import TokenizedCorpus
from .step import (NonFiniteError, autocast, build_model, global_batch, load_corpus, local_batch, make_optimizer,
                   train_step)


def check_same_config(cfg: TrainConfig) -> None:
    """Every rank must run the same configuration: compare fingerprints with one small collective
    before any training collective, and name the fields that differ."""
    mine = (cfg.fingerprint(), cfg.to_dict())
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    odd = [r for r, (fp, _) in enumerate(everyone) if fp != everyone[0][0]]
    if odd:
        first, other = _flatten(everyone[0][1]), _flatten(everyone[odd[0]][1])
        fields = sorted(k for k in first.keys() | other.keys() if first.get(k) != other.get(k))
        raise ConfigError(f"ranks disagree on the configuration: rank(s) {odd} differ from rank 0 in "
                          + ", ".join(f"{k} ({first.get(k)!r} vs {other.get(k)!r})" for k in fields))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    skipped_steps: list[int] = field(default_factory=list)
    first_step: int = 0
    val_loss: float | None = None
    sample: str = ""
    checkpoint: str | None = None
    hf: str | None = None  # the Hugging Face folder a fine-tune exports (--init-from)
    tokens: int = 0
    moe: list[dict] = field(default_factory=list)  # per step: aux_loss, z_loss, imbalance, expert_counts

    @property
    def tokens_per_s(self) -> float:
        return 0.0 if not self.step_times else self.tokens / sum(self.step_times)


@torch.no_grad()
def evaluate(model: ParallelModel, corpus: Corpus, cfg: TrainConfig, batches: int = 4) -> float:
    model.eval()
    device = next(model.parameters()).device
    total = torch.zeros(1, dtype=torch.float64, device=device)
    for i in range(batches):
        ids, targets, documents = global_batch(corpus, i, cfg, split="val")
        ids, targets, documents = local_batch(model, ids, targets, documents, device)  # (B/dp, S/cp)
        stats: dict = {}
        with autocast(cfg, device):
            model.local(ids, targets, documents, stats)
        total += stats["lm_loss"].double()
    model.train()
    batch = model.axes.batch
    return all_reduce_(total / (batches * batch.size), batch, "step").item()  # (1,) mean over dp x cp


def _nonfinite(step: int, loss: float, norm: float, cfg: TrainConfig, scaler: LossScaler | None,
               result: TrainResult, where: str = "") -> None:
    """A step whose loss or gradient norm was not finite (no optimizer step was taken): with a
    loss scaler an overflow just lowers the scale; otherwise stop (or skip, by option)."""
    if scaler is not None and math.isfinite(loss) and not scaler.exhausted:
        return  # fp16 overflow: the scaler halved its scale, the step was skipped
    result.skipped_steps.append(step)
    what = f"step {step}: loss {loss}, global gradient norm {norm}; the optimizer step was not taken on any rank"
    if where:
        what += f" ({where})"
    if scaler is not None and scaler.exhausted:
        what += f" (the fp16 loss scale fell to {scaler.scale:g})"
    if cfg.nonfinite == "stop":
        raise NonFiniteError(what + ". Lower --lr, train in float32 or bfloat16, or pass --on-nonfinite skip")
    if dist.get_rank() == 0:
        print(f"meshattn: warning: {what}; skipped (--on-nonfinite skip)", flush=True)


def _progress_bar(total: int, initial: int):
    """Rank 0's progress bar. Its lock is a thread lock: tqdm's default one holds a named semaphore,
    which a worker killed at once (a second signal) would leak, and the launcher's resource
    tracker would warn about it at exit."""
    from tqdm import tqdm

    class Bar(tqdm):
        _lock = threading.RLock()

    return Bar(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)


def _write_metrics(out: Path, start: int, result: TrainResult, cfg: TrainConfig, **extra) -> None:
    """OUT/metrics.json (rank 0): the steps run so far, at the end of a run or when it stops."""
    metrics = {"first_step": start, "losses": result.losses, "grad_norms": result.grad_norms,
               "skipped_steps": result.skipped_steps, "val_loss": result.val_loss,
               "step_times": result.step_times, "tokens_per_s": result.tokens_per_s, "sample": result.sample,
               "config": cfg.to_dict(), **({"moe": result.moe} if result.moe else {}), **extra}
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))


def train(cfg: TrainConfig, dims: ParallelDims, progress: bool = True, prompt: str = "def ",
          stop: StopSignals | None = None) -> TrainResult:
    """Train from scratch (or from --resume) on every rank; rank 0 shows a progress bar and writes
    the outputs. With `stop` (every rank passes one, or none does), a signal caught on any rank
    stops every rank after the same step: checkpoint, metrics so far, then `Stopped` is raised."""
    rank0 = dist.get_rank() == 0
    check_same_config(cfg)
    corpus = load_corpus(cfg)
    model = build_model(cfg, dims)
    opt = make_optimizer(model, cfg)
    scaler = LossScaler() if cfg.dtype == "float16" else None
    result = TrainResult()
    out = Path(cfg.out)
    start = 0
    if cfg.resume:
        meta = checkpoint.load(model, opt, cfg, Path(cfg.resume))
        start = meta["step"]
        if scaler is not None and "scaler" in meta["extra"]:
            scaler.load_state_dict(meta["extra"]["scaler"])
        if start >= cfg.steps:
            raise ConfigError(f"the checkpoint is at step {start}; ask for more --steps than that to continue")
    result.first_step = start

    def save(step: int) -> Path:
        extra = {"scaler": scaler.state_dict()} if scaler is not None else {}
        return checkpoint.save(model, opt, cfg, step, out / "checkpoint", extra)

    bar = _progress_bar(cfg.steps, start) if progress and rank0 else None
    tokens_per_step = cfg.batch_size * cfg.seq_len
    try:
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            report: dict = {}
            loss, norm = train_step(model, opt, corpus, step, cfg, scaler, report)
            if not (math.isfinite(loss) and math.isfinite(norm)):
                _nonfinite(step, loss, norm, cfg, scaler, result, report.get("where", ""))
            result.step_times.append(time.perf_counter() - t0)
            result.losses.append(loss)
            result.grad_norms.append(norm)
            result.tokens += tokens_per_step
            if "aux_loss" in report:
                result.moe.append({k: report[k] for k in ("aux_loss", "z_loss", "imbalance", "expert_counts")})
            if bar is not None:
                moe = {} if "aux_loss" not in report else {"aux": f"{report['aux_loss']:.3f}",
                                                          "load": f"{report['imbalance']:.2f}"}
                bar.set_postfix(loss=f"{loss:.3f}", **moe, tok_s=f"{tokens_per_step / result.step_times[-1]:,.0f}")
                bar.update(1)
            last = step + 1 == cfg.steps  # the end of the run saves anyway
            saved = save(step + 1) if cfg.save_every and (step + 1) % cfg.save_every == 0 and not last else None
            signum = 0 if last else agreed_stop(stop)
            if signum:
                _stop(signum, step + 1, saved or save(step + 1), out, start, result, cfg)
    finally:
        if bar is not None:
            bar.close()
    result.val_loss = evaluate(model, corpus, cfg)
    if cfg.sample_tokens > 0:
        tokenizer = corpus.tokenizer if isinstance(corpus, TokenizedCorpus) else None
        result.sample = generate(model, prompt, cfg.sample_tokens, seed=cfg.seed, tokenizer=tokenizer)
    path = save(cfg.steps)
    folder = export_hf(model, cfg, out / "hf") if cfg.init_from is not None else None
    if rank0:
        result.checkpoint = str(path)
        result.hf = None if folder is None else str(folder)
        _write_metrics(out, start, result, cfg, **({"hf": result.hf} if folder is not None else {}))
    return result


def export_hf(model: ParallelModel, cfg: TrainConfig, folder: Path) -> Path:
    """The model as a Hugging Face folder with the tokenizer of cfg.init_from: every rank joins
    the gather of the full weights, rank 0 writes, and every rank waits for it."""
    state = gather_state_dict(model)  # collective: the full reference-named tensors on every rank
    if dist.get_rank() == 0:
        hf.save(cfg.model, folder, state_dict=state, tokenizer_from=cfg.init_from)
    dist.barrier()
    return folder


def _stop(signum: int, step: int, path: Path, out: Path, start: int, result: TrainResult, cfg: TrainConfig) -> None:
    """After the checkpoint of `step` is complete on every rank: rank 0 writes the metrics so far,
    every rank waits for that, then raises the one line that says where to continue from."""
    if dist.get_rank() == 0:
        _write_metrics(out, start, result, cfg, stopped_by=signal_name(signum), stopped_after=step)
    dist.barrier()  # nobody exits (and so ends the launcher's wait) while rank 0 still writes
    raise Stopped(f"stopped by {signal_name(signum)} after step {step}; checkpoint at {path}; "
                  f"continue with --resume {out / 'checkpoint'}", signum, str(path))
