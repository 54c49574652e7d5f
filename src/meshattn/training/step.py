"""One optimizer step and its health checks: the seeded global batch, gradient accumulation,
the global gradient norm (equal to the reference model's), clipping, non-finite detection and
fp16 loss scaling. Runs on every rank; every decision is the same on every rank.

The global batch at each step is fixed by (seed, step) and split over dp; tp ranks of one
replica see the same rows. The reported loss is the global mean (averaged over dp x cp), not
rank 0's local value.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist

from ..comm import CommCounter, all_reduce_
from ..config import DType, TrainConfig
from ..hf import HFSource, load_tokenizer
from ..mesh import ParallelDims, current_device
from ..model import Transformer
from ..model.moe import expert_imbalance
from ..parallel import ParallelModel, build, parallelize
from ..parallel.fsdp import is_sharded, local
from .corpus import Corpus
from .packing import PackedCorpus
from .scaler import LossScaler
from .tokenized import TokenizedCorpus

# Parameter dtype per --dtype; bfloat16 keeps fp32 weights (and optimizer state) and runs the
# forward under autocast, with softmax statistics, merges and the loss in fp32.
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.float32, "float16": torch.float32}


def autocast(cfg: TrainConfig, device: torch.device):
    if DType(cfg.dtype).autocast:
        return torch.autocast(device.type, dtype=getattr(torch, cfg.dtype))
    return contextlib.nullcontext()


def build_model(cfg: TrainConfig, dims: ParallelDims, counter: CommCounter | None = None) -> ParallelModel:
    """Every rank builds the same seeded reference model and keeps its own slices of it; with
    init_from, every rank reads just its slices of the Hugging Face folder's weights instead.
    Under mixed precision a sharded (FSDP) model gathers its weights in the autocast dtype."""
    gather = getattr(torch, cfg.dtype) if DType(cfg.dtype).autocast else None
    if cfg.init_from is not None:
        with HFSource(cfg.init_from, cfg.model) as source:
            return build(cfg.model, dims, source, counter, cfg.checkpoint, dtype=DTYPES[cfg.dtype],
                         device=current_device(), gather_dtype=gather)
    torch.manual_seed(cfg.seed)
    ref = Transformer(cfg.model).to(dtype=DTYPES[cfg.dtype])  # on the host: a GPU only receives its slices
    return parallelize(ref, dims, counter, cfg.checkpoint, gather, device=current_device())


def make_optimizer(model: ParallelModel, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (embeddings and linear weights), as nanoGPT does.
    Parameters sharded by FSDP and plain ones (experts, which FSDP leaves alone) go in separate
    groups: one fused (foreach) update cannot mix DTensors and tensors."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if (p.dim() >= 2) == matrix and is_sharded(p) == sharded],
               "weight_decay": cfg.weight_decay if matrix else 0.0}
              for matrix in (True, False) for sharded in (False, True)]
    groups = [g for g in groups if g["params"]]
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

    A parameter split into `parts` over the ranks of its axis (tp, or ep for experts) appears
    size/parts times across that axis, so each rank weights its local sum of squares by
    parts/size before the sum over the axis; the tp and ep sums add up. A gradient sharded by
    FSDP over the batch axis is summed over that axis first (its pieces are disjoint).
    """
    axes = model.axes.shard_axes()
    device = next(model.parameters()).device
    totals = torch.zeros(2, len(axes), dtype=torch.float64, device=device)  # (plain | sharded, axis)
    index = {name: i for i, name in enumerate(axes)}
    seen = set()
    for _, p, shard in model.named_shards():
        if p.grad is None or id(p) in seen:
            continue
        seen.add(id(p))
        weight = shard.parts / axes[shard.axis].size
        totals[int(is_sharded(p.grad)), index[shard.axis]] += local(p.grad).double().pow(2).sum() * weight
    if model.cfg.shard != "none":
        totals[1] = all_reduce_(totals[1].contiguous(), model.axes.batch, "step")
    per_axis = totals.sum(0)  # (axes,)
    total = sum(all_reduce_(per_axis[i:i + 1].clone(), axes[name], "step") for name, i in index.items())  # (1,)
    return total.sqrt()[0]


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient norm: raised on every rank at the same step."""


def clip_grads(model: ParallelModel, max_norm: float, norm: torch.Tensor | None = None) -> torch.Tensor:
    norm = grad_norm(model) if norm is None else norm
    if max_norm > 0:
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for p in model.parameters():
            if p.grad is not None:
                local(p.grad).mul_(scale.to(p.grad.dtype))
    return norm


def locate_nonfinite(model: ParallelModel, loss_finite: bool) -> str:
    """Where a non-finite step showed first, the same text on every rank (one all_gather_object,
    only on this path): the ranks whose own loss was not finite, else the ranks and parameters
    whose gradients (after the data-parallel average, before the tp-wide norm) were not finite."""
    bad = sorted({shard.name for _, p, shard in model.named_shards()
                  if p.grad is not None and not torch.isfinite(local(p.grad)).all()})
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


def global_batch(corpus: Corpus | PackedCorpus | TokenizedCorpus, step: int, cfg: TrainConfig, split: str = "train"):
    """The global batch of `step`: ids, targets (B, S), and the document ids (B, S) of packed
    data (None for the plain corpus)."""
    batch = corpus.batch(step, cfg.batch_size, cfg.seq_len, cfg.seed, split)
    return batch if isinstance(corpus, PackedCorpus) else (*batch, None)


def local_batch(model: ParallelModel, ids, targets, documents, device):
    """This rank's part: ids, targets (B/dp, S/cp) and its rows' whole document ids (or None)."""
    if documents is None:
        return (*(t.to(device) for t in model.shard_batch(ids, targets)), None)
    return tuple(t.to(device) for t in model.shard_batch(ids, targets, documents=documents))


def load_corpus(cfg: TrainConfig) -> Corpus | PackedCorpus | TokenizedCorpus:
    """The training text: a byte stream, its files as packed documents (--pack-documents), or
    with init_from the stream tokenised by the folder's tokenizer."""
    if cfg.init_from is not None:
        corpus = TokenizedCorpus.from_path(cfg.data, load_tokenizer(cfg.init_from))
    else:
        corpus = (PackedCorpus if cfg.pack_documents else Corpus).from_path(cfg.data)
    corpus.check(cfg.seq_len)
    return corpus


def train_step(model: ParallelModel, opt: torch.optim.Optimizer, corpus: Corpus, step: int,
               cfg: TrainConfig, scaler: LossScaler | None = None, report: dict | None = None) -> tuple[float, float]:
    """One optimizer step over the global batch of `step`; returns (global mean loss, grad norm).

    The global gradient norm (identical on every rank: gradients are averaged over dp x cp and
    the norm summed over tp) is checked before the optimizer step: if it is not finite, every
    rank skips the step together and the returned norm says so (nan or inf). With a loss scaler
    (float16) the loss is scaled before backward and the gradients unscaled before the step."""
    ids, targets, documents = global_batch(corpus, step, cfg)  # (B, S) global
    model.check_token_ids(ids)  # on the global batch, before sharding: every rank agrees
    device = next(model.parameters()).device
    ids, targets, documents = local_batch(model, ids, targets, documents, device)  # (B/dp, S/cp), (B/dp, S)
    for group in opt.param_groups:
        group["lr"] = lr_at(step, cfg)
    opt.zero_grad(set_to_none=True)
    loss_sum = torch.zeros(1, dtype=torch.float64, device=device)
    experts = MoeReport()
    micro = [t.chunk(cfg.grad_accum) if t is not None else [None] * cfg.grad_accum for t in (ids, targets, documents)]
    for i, (x, y, d) in enumerate(zip(*micro)):
        stats: dict = {}
        with model.no_sync(skip=i < cfg.grad_accum - 1):
            with autocast(cfg, device):
                _, loss = model(x, y, documents=d, stats=stats)
            (loss * ((scaler.scale if scaler else 1.0) / cfg.grad_accum)).backward()
        loss_sum += stats["lm_loss"].double()
        experts.add(stats["moe"], model.axes.batch.size)
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
    if report is not None and experts.layers:
        report.update(experts.finish(model.axes.experts.world, cfg.grad_accum))
    return mean.item(), norm.item()


class MoeReport:
    """The mixture of experts' step statistics from each micro-batch's stats: the balance and
    z-losses (mean over MoE layers and micro-batches, summed over the ranks' shares: the batch's
    values) and the tokens each expert took per layer."""

    def __init__(self):
        self.layers = 0
        self.shares = None  # (2,) float64: this rank's aux and z shares, summed
        self.counts = None  # (layers, E) int64, summed over micro-batches

    def add(self, layers: list, batch_ranks: int) -> None:
        if not layers:
            return
        self.layers = len(layers)
        shares = torch.stack([torch.stack([s["aux"].detach(), s["z"].detach()]) for s in layers]).sum(0) / batch_ranks
        counts = torch.stack([s["counts"] for s in layers])
        self.shares = shares if self.shares is None else self.shares + shares
        self.counts = counts if self.counts is None else self.counts + counts

    def finish(self, world, micro_batches: int) -> dict:
        """One all-reduce over the world (every rank holds a share): aux_loss, z_loss,
        expert_counts (per layer, per expert), imbalance (the busiest expert's tokens over the
        mean, worst layer)."""
        aux, z = (all_reduce_(self.shares.clone(), world, "step") / (self.layers * micro_batches)).tolist()
        counts = self.counts.tolist()
        return {"aux_loss": aux, "z_loss": z, "expert_counts": counts, "imbalance": expert_imbalance(counts)}
