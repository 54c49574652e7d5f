"""Training: one step, the loop, sampling and the final checkpoint. Runs on every rank.

The global batch at each step is fixed by (seed, step) and split over dp; tp ranks of one
replica see the same rows. The reported loss is the global mean (averaged over dp), not rank
0's local value.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from . import checkpoint
from .comm import CommCounter, all_gather_raw, all_reduce_
from .config import ConfigError, TrainConfig
from .corpus import Corpus, decode, encode
from .mesh import current_device
from .model import Transformer
from .parallel import ParallelModel, gather_state_dict, parallelize
from .parallel.layout import n_chunks
from .parallel.recompute import apply_checkpointing
from .parallel.tensor import check_token_ids
from .scaler import LossScaler

# Parameter dtype per --dtype; bfloat16 keeps fp32 weights (and optimizer state) and runs the
# forward under autocast, with softmax statistics, merges and the loss in fp32.
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.float32, "float16": torch.float32}


def autocast(cfg: TrainConfig, device: torch.device):
    if cfg.dtype in ("bfloat16", "float16"):
        return torch.autocast(device.type, dtype=getattr(torch, cfg.dtype))
    return contextlib.nullcontext()


def build_model(cfg: TrainConfig, mesh: DeviceMesh, counter: CommCounter | None = None) -> ParallelModel:
    """Every rank builds the same seeded reference model and keeps its own slices of it."""
    torch.manual_seed(cfg.seed)
    ref = Transformer(cfg.model).to(device=current_device(), dtype=DTYPES[cfg.dtype])
    return apply_checkpointing(parallelize(ref, mesh, cfg.parallel, counter), cfg.checkpoint)


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


def make_optimizer(model: ParallelModel, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (embeddings and linear weights), as nanoGPT does."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), foreach=True)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay from lr to min_lr over the remaining steps."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


@torch.no_grad()
def grad_norm(model: ParallelModel) -> torch.Tensor:
    """The global L2 norm of the gradient, equal to the reference model's.

    A parameter split into `parts` over tp ranks appears tp/parts times across the tp group, so
    each rank weights its local sum of squares by parts/tp before the sum over tp.
    """
    tp = model.axes.tp
    total = torch.zeros(1, dtype=torch.float64, device=next(model.parameters()).device)  # (1,)
    seen = set()
    for name, p in model.tp_model.named_parameters(remove_duplicate=False):
        if p.grad is None or id(p) in seen:
            continue
        seen.add(id(p))
        total += p.grad.double().pow(2).sum() * (model.shards[name].parts / tp.size)
    return all_reduce_(total, tp, "step").sqrt()[0]  # (1,) summed over tp


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient norm: raised on every rank at the same step."""


def clip_grads(model: ParallelModel, max_norm: float, norm: torch.Tensor | None = None) -> torch.Tensor:
    norm = grad_norm(model) if norm is None else norm
    if max_norm > 0:
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(scale.to(p.grad.dtype))
    return norm


def locate_nonfinite(model: ParallelModel, loss_finite: bool) -> str:
    """Where a non-finite step showed first, the same text on every rank (one all_gather_object,
    only on this path): the ranks whose own loss was not finite, else the ranks and parameters
    whose gradients (after the data-parallel average, before the tp-wide norm) were not finite."""
    bad = [model.shards[n].name for n, p in model.tp_model.named_parameters()
           if p.grad is not None and not torch.isfinite(p.grad).all()]
    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, (loss_finite, bad))
    losses = [r for r, (ok, _) in enumerate(seen) if not ok]
    if losses:
        return f"first seen in the loss on rank(s) {losses}"
    grads = {r: names for r, (_, names) in enumerate(seen) if names}
    if not grads:
        return "first seen in the gradient norm (every gradient finite on its own rank)"
    names = sorted({n for ns in grads.values() for n in ns})
    return (f"first seen in the gradients of {', '.join(names[:4])}{' ...' if len(names) > 4 else ''} on rank(s) "
            f"{sorted(grads)}; the loss was finite on every rank")


def train_step(model: ParallelModel, opt: torch.optim.Optimizer, corpus: Corpus, step: int,
               cfg: TrainConfig, scaler: LossScaler | None = None, report: dict | None = None) -> tuple[float, float]:
    """One optimizer step over the global batch of `step`; returns (global mean loss, grad norm).

    The global gradient norm (identical on every rank: gradients are averaged over dp x cp and
    the norm summed over tp) is checked before the optimizer step: if it is not finite, every
    rank skips the step together and the returned norm says so (nan or inf). With a loss scaler
    (float16) the loss is scaled before backward and the gradients unscaled before the step."""
    ids, targets = corpus.batch(step, cfg.batch_size, cfg.seq_len, cfg.seed)  # (B, S) global
    check_token_ids(ids, cfg.model.vocab_size)  # on the global batch, before sharding: every rank agrees
    device = next(model.parameters()).device
    ids, targets = (t.to(device) for t in model.shard_batch(ids, targets))  # (B/dp, S/cp)
    for group in opt.param_groups:
        group["lr"] = lr_at(step, cfg)
    opt.zero_grad(set_to_none=True)
    loss_sum = torch.zeros(1, dtype=torch.float64, device=device)
    micro_ids, micro_targets = ids.chunk(cfg.grad_accum), targets.chunk(cfg.grad_accum)
    for i, (x, y) in enumerate(zip(micro_ids, micro_targets)):
        with model.no_sync(skip=i < cfg.grad_accum - 1):
            with autocast(cfg, device):
                _, loss = model(x, y)
            (loss * ((scaler.scale if scaler else 1.0) / cfg.grad_accum)).backward()
        loss_sum += loss.detach().double()
    norm = grad_norm(model)  # (,) global; the scaled norm under a loss scaler
    if torch.isfinite(norm):
        if scaler is not None:
            scaler.unscale_(model.parameters())
            norm = norm / scaler.scale
            scaler.update(True)
        clip_grads(model, cfg.grad_clip, norm)
        opt.step()
    else:  # the same decision on every rank: no optimizer step
        if report is not None:
            report["where"] = locate_nonfinite(model, bool(torch.isfinite(loss_sum).all()))
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.update(False)
    batch = model.axes.batch
    mean = all_reduce_(loss_sum / (cfg.grad_accum * batch.size), batch, "step")  # (1,) mean over dp x cp
    return mean.item(), norm.item()


@torch.no_grad()
def generate(model: ParallelModel, prompt: str, n_tokens: int, temperature: float = 0.8, top_k: int = 40,
             seed: int = 0) -> str:
    """Sample a continuation. Every rank runs the same forward passes and draws the same tokens:
    vocab-sharded logits are gathered over tp and sampled with an identically seeded generator."""
    tp_model, tp = model.tp_model, model.axes.tp
    tp_model.eval()
    plain_tp = type(tp)(tp.name, tp.group, tp.size, tp.rank, None)  # not training traffic
    gen = torch.Generator().manual_seed(seed)
    device = next(tp_model.parameters()).device
    ids = encode(prompt)
    # The context length must split into cp chunks (and tp shards under sequence parallelism):
    # pad on the right, which causal attention cannot see from the last real position, and keep
    # the padded context within max_seq_len.
    split = model.split
    unit = (tp.size if tp_model.region.sp else 1) * (1 if split is None else n_chunks(split.layout, split.size))
    max_ctx = tp_model.cfg.max_seq_len // unit * unit
    if max_ctx == 0:
        raise ValueError(f"max_seq_len={tp_model.cfg.max_seq_len} is shorter than one token per sequence shard "
                         f"({unit}); generation needs max_seq_len >= {unit}")
    for _ in range(n_tokens):
        ctx = ids[-max_ctx:]
        n = len(ctx)
        padded = torch.nn.functional.pad(ctx, (0, (-n) % unit))[None].to(device)  # (1, n rounded up)
        if split is None:
            logits, _ = tp_model(padded)  # (1, n', V/tp)
        else:
            logits = split.unshard(tp_model(split.shard(padded, 1))[0], 1)  # (1, n', V/tp) in global order
        last = logits[0, n - 1].float()  # (V/tp,) or (V,)
        full = (all_gather_raw(last, 0, plain_tp, "fwd") if tp_model.vocab_parallel else last).cpu()  # (V,)
        if temperature <= 0:  # greedy
            ids = torch.cat([ids, full.argmax().reshape(1)])
            continue
        top = torch.topk(full / temperature, min(top_k, full.numel()))
        probs = torch.softmax(top.values, dim=-1)
        ids = torch.cat([ids, top.indices[torch.multinomial(probs, 1, generator=gen)]])
    tp_model.train()
    return decode(ids[len(encode(prompt)):].tolist())


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
    tokens: int = 0

    @property
    def tokens_per_s(self) -> float:
        return 0.0 if not self.step_times else self.tokens / sum(self.step_times)


@torch.no_grad()
def evaluate(model: ParallelModel, corpus: Corpus, cfg: TrainConfig, batches: int = 4) -> float:
    model.eval()
    device = next(model.parameters()).device
    total = torch.zeros(1, dtype=torch.float64, device=device)
    for i in range(batches):
        ids, targets = corpus.batch(i, cfg.batch_size, cfg.seq_len, cfg.seed, split="val")
        ids, targets = (t.to(device) for t in model.shard_batch(ids, targets))  # (B/dp, S/cp)
        with autocast(cfg, device):
            _, loss = model.tp_model(ids, targets)
        total += loss.double()
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


def train(cfg: TrainConfig, mesh: DeviceMesh, progress: bool = True, prompt: str = "def ") -> TrainResult:
    """Train from scratch on every rank; rank 0 shows a progress bar and writes the outputs."""
    rank0 = dist.get_rank() == 0
    check_same_config(cfg)
    corpus = Corpus.from_path(cfg.data)
    corpus.check(cfg.seq_len)
    model = build_model(cfg, mesh)
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

    bar = None
    if progress and rank0:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
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
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_step / result.step_times[-1]:,.0f}")
                bar.update(1)
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
                save(step + 1)
    finally:
        if bar is not None:
            bar.close()
    result.val_loss = evaluate(model, corpus, cfg)
    if cfg.sample_tokens > 0:
        result.sample = generate(model, prompt, cfg.sample_tokens, seed=cfg.seed)
    path = save(cfg.steps)
    if rank0:
        result.checkpoint = str(path)
        metrics = {"first_step": start, "losses": result.losses, "grad_norms": result.grad_norms,
                   "skipped_steps": result.skipped_steps, "val_loss": result.val_loss,
                   "step_times": result.step_times, "tokens_per_s": result.tokens_per_s, "sample": result.sample,
                   "config": cfg.to_dict()}
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return result
