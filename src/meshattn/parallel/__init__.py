"""parallelize(model, dims): the reference model split over a dp x cp x tp layout.

Order matters and is fixed: tensor parallelism first (it decides which parameters exist), then
context parallelism (how attention crosses the sequence split), then data parallelism over dp x cp:
DDP, which wraps the result and averages gradients, or with ParallelConfig.shard = "dp" FSDP2,
which shards the tp-local parameters again over those ranks (fsdp.py). Activation checkpointing is
chosen here, when the model is built.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from ..comm import CommCounter
from ..config import ModelConfig, ParallelConfig, Recompute
from ..mesh import MeshAxes, ParallelDims
from ..model import Transformer
from .context import SequenceSplit
from .data import local_batch, no_sync, unwrap, wrap_data_parallel
from .fsdp import shard_parameters, unsharded
from .shard import (Shard, TensorSource, check_shards, collect_shards, gather_full, gather_tensors,
                    load_full_state_dict)
from .transformer import ParallelTransformer
from .vocab import check_token_ids

__all__ = ["parallelize", "build", "ParallelModel", "gather_state_dict", "load_state_dict", "local_batch"]


class ParallelModel(nn.Module):
    """The parallel model: forward(ids, targets) -> (logits, vocab-sharded unless the vocabulary is
    whole on every tp rank (ParallelConfig.splits_vocab), loss).

    `ids` and `targets` are this rank's part of the global batch: its dp rows and its cp chunks of
    the sequence (see `shard_batch`). Averaged over dp x cp, the loss is the global mean, and the
    gradients after backward (averaged by DDP over dp x cp) equal the reference model's.
    The accessors below are what training, generation and checkpoints use.
    """

    def __init__(self, local: ParallelTransformer, cfg: ParallelConfig, axes: MeshAxes, shards: dict[str, Shard],
                 counter: CommCounter | None, split: SequenceSplit | None, gather_dtype: torch.dtype | None = None):
        super().__init__()
        self.cfg, self.axes, self.shards, self.counter, self.split = cfg, axes, shards, counter, split
        if cfg.shard == "dp":  # FSDP2: the module itself, its parameters now DTensors over the batch axis
            self.inner = shard_parameters(local, axes.batch, next(local.parameters()).device.type,
                                          local.expert_parameter_names(), gather_dtype)
        else:
            self.inner = wrap_data_parallel(local, axes.batch, hierarchy=axes.hierarchy,
                                            ignore=local.expert_parameter_names())

    @property
    def local(self) -> ParallelTransformer:
        """This rank's module, without the data-parallel wrapper (no gradient averaging)."""
        return unwrap(self.inner)

    @property
    def seq_unit(self) -> int:
        """A global sequence length must be a multiple of this (ParallelConfig.seq_unit)."""
        return self.cfg.seq_unit

    @property
    def vocab_parallel(self) -> bool:
        """Whether logits come vocab-sharded over tp."""
        return self.local.vocab_parallel

    def check_token_ids(self, ids: torch.Tensor) -> None:
        check_token_ids(ids, self.local.cfg.vocab_size)

    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None,
                documents: torch.Tensor | None = None, stats: dict | None = None):
        if stats is not None:
            return self.inner(ids, targets, documents, stats)
        if documents is None:
            return self.inner(ids, targets)
        return self.inner(ids, targets, documents)

    def no_sync(self, skip: bool = True):
        return no_sync(self.inner, skip)

    def shard_batch(self, *tensors: torch.Tensor, documents: torch.Tensor | None = None) -> list[torch.Tensor]:
        """This rank's part of global (B, S, ...) tensors: rows for dp, sequence chunks for cp.

        With documents (B, S), the global per-token document ids of packed sequences, the chunks
        follow the batch's table (the "balanced" layout deals them by work) and this rank's rows
        of `documents`, whole, come last: pass them to forward as `documents=`."""
        out = [local_batch(t, self.axes.dp) for t in tensors]
        docs = None if documents is None else local_batch(documents, self.axes.dp)  # (B/dp, S)
        if self.split is not None:
            table = self.table_for(docs, out[0].shape[1]) if out else None
            out = [self.split.shard(t, 1, table) for t in out]
        return out if docs is None else [*out, docs]

    def table_for(self, documents: torch.Tensor | None, seq_len: int) -> list[list[int]] | None:
        """The cp chunk table of a batch (None without cp)."""
        if self.split is None:
            return None
        return self.split.table_for(seq_len, self.local.cfg.window, documents)

    def unshard_sequence(self, t: torch.Tensor, dim: int = 1, documents: torch.Tensor | None = None) -> torch.Tensor:
        """The whole sequence from every cp rank's chunks (in global order; with the batch's
        documents, by its chunk table); identity without cp."""
        if self.split is None:
            return t
        return self.split.unshard(t, dim, self.table_for(documents, t.shape[dim] * self.split.size))

    def without_sequence_parallel(self) -> ParallelModel:
        """This model with activations replicated over tp, as generation needs (a decode step has
        one token per row): itself, or a twin on the same groups whose local parameters are
        copies of these (sequence parallelism changes where activations live, not the weights)."""
        if not self.cfg.sequence_parallel:
            return self
        local, axes = self.local, self.axes
        twin = ParallelTransformer(local.cfg, axes.tp, axes.kv, False, self.split, axes.batch, self.cfg.overlap,
                                   local.vocab_parallel, Recompute.NONE, axes.experts, self.cfg.moe_dispatch)
        p = next(local.parameters())
        twin.to(device=p.device, dtype=p.dtype)
        twin.load_state_dict({k: unsharded(v) for k, v in local.state_dict().items()})  # the twin is not sharded
        cfg = dataclasses.replace(self.cfg, sequence_parallel=False, shard="none")
        return ParallelModel(twin, cfg, axes, collect_shards(twin), None, self.split)

    def named_shards(self):
        """(local name, parameter, Shard) of every local parameter, tied ones under each name."""
        for name, p in self.local.named_parameters(remove_duplicate=False):
            yield name, p, self.shards[name]

    def gather_full(self, tensor_of) -> dict[str, torch.Tensor]:
        """Reference-named full tensors from per-parameter local ones, `tensor_of(local name,
        param)` (parameters, gradients, optimizer moments). A collective over tp, and over
        dp x cp when the parameters are sharded."""
        return gather_tensors(self.local, self.shards, self.axes.shard_axes(), tensor_of)


def parallelize(model: Transformer, dims: ParallelDims, counter: CommCounter | None = None,
                recompute: str = "none", gather_dtype: torch.dtype | None = None, device=None) -> ParallelModel:
    """Split a reference model (with its weights) over the layout of `dims`, onto `device` (default:
    the reference's). The reference is not modified. Validates the layout against the model
    before creating any group."""
    ref = next(model.parameters())
    return build(model.cfg, dims, model.state_dict(), counter, recompute, ref.dtype,
                 ref.device if device is None else device, gather_dtype)


def build(cfg: ModelConfig, dims: ParallelDims, weights: dict[str, torch.Tensor] | TensorSource,
          counter: CommCounter | None = None, recompute: str = "none", dtype: torch.dtype = torch.float32,
          device=None, gather_dtype: torch.dtype | None = None) -> ParallelModel:
    """The parallel model of `cfg` over the layout of `dims`, each rank copying only its slices
    from `weights`: a full reference-named state dict, or a TensorSource that reads just those
    slices (meshattn.hf.HFSource reads a safetensors folder so). Validates the layout against the
    model before creating any group. gather_dtype: with dims.cfg.shard = "dp", the dtype FSDP
    gathers weights in (the autocast dtype of mixed precision; None: the weights' own)."""
    dims.cfg.check_model(cfg)
    recompute = Recompute.parse(recompute, "checkpoint")
    axes = dims.axes(cfg.n_kv_heads, counter, moe=cfg.is_moe)
    split = SequenceSplit(axes.context, dims.cfg.cp_impl, dims.cfg.cp_layout, dims.cfg.overlap) if dims.cfg.cp > 1 else None
    local = ParallelTransformer(cfg, axes.tp, axes.kv, dims.cfg.sequence_parallel, split, axes.batch, dims.cfg.overlap,
                                dims.cfg.splits_vocab(cfg), recompute, axes.experts, dims.cfg.moe_dispatch)
    local.to(device=device, dtype=dtype)
    shards = collect_shards(local)
    check_shards(local, shards)
    load_full_state_dict(local, shards, weights, axes.shard_axes())
    return ParallelModel(local, dims.cfg, axes, shards, counter, split, gather_dtype)


def gather_state_dict(model: ParallelModel, grads: bool = False) -> dict[str, torch.Tensor]:
    """The full single-device state dict (or its gradients), on every rank. Collective over tp
    (and over dp x cp when the parameters are sharded)."""
    return gather_full(model.local, model.shards, model.axes.shard_axes(), grads=grads)


def load_state_dict(model: ParallelModel, state: dict[str, torch.Tensor]) -> None:
    """Load a full single-device state dict into any layout."""
    load_full_state_dict(model.local, model.shards, state, model.axes.shard_axes())
