"""The reference Transformer split over tp (heads and MLP columns, Megatron style), cp (the
sequence, through a SequenceSplit's attention core) and the batch axis (the loss's global mean).

Per block, forward: the normed input enters the tensor-parallel region once (region.py); Q/K/V
and the MLP's first matmul are column-parallel, so each rank owns whole heads and whole hidden
columns; the attention output projection and the MLP's second matmul are row-parallel and leave
the region through one exit collective. Backward mirrors each collective. Activation
checkpointing is chosen when a block is built (recompute.py).
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..comm import Axis, copy_to_group
from ..config import ModelConfig, Recompute
from ..model.norm import rms_norm
from ..model.mask import document_positions
from ..mesh import ExpertAxes
from ..model.transformer import attend_split, mlp_hidden, objective, rope_for
from .context import batch_mask, local_attention
from .moe import ParallelMoE
from .recompute import checkpointed
from .region import Region
from .shard import Shard, ShardedModule, linear_shards
from .vocab import VocabParallelEmbedding, VocabParallelHead, vocab_parallel_cross_entropy


class ParallelAttention(ShardedModule):
    """Column-parallel Q/K/V (whole heads per rank), row-parallel output projection.

    tp rank r owns query heads [r*H/tp, (r+1)*H/tp). KV heads: G >= tp, each rank owns G/tp of
    them; G < tp, each KV head is replicated on tp/G consecutive ranks, and its weights pass
    through `copy_to_group` over that replica group so their gradients are summed there.
    """

    def __init__(self, cfg: ModelConfig, prefix: str, region: Region, kv_axis: Axis, split=None,
                 recompute: Recompute = Recompute.NONE):
        super().__init__()
        tp = region.axis.size
        H, G, D, h = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model
        self.n_heads, self.n_kv_heads, self.head_dim = H // tp, max(G // tp, 1), D
        self.region, self.kv_axis = region, kv_axis
        core = local_attention if split is None else split.attention  # context-parallel when split
        self.core = checkpointed(core) if recompute is Recompute.ATTENTION else core
        rows = (H + 2 * G) * D
        for name, start, stop, parts in (("q", 0, H * D, tp), ("k", H * D, (H + G) * D, min(G, tp)),
                                         ("v", (H + G) * D, rows, min(G, tp))):
            w, b = linear_shards(f"{prefix}.qkv", rows, h, cfg.bias or cfg.qkv_bias, 0, parts, start, stop)
            self.declare(f"w{name}", w)
            self.declare(f"b{name}", b)
        w, b = linear_shards(f"{prefix}.proj", h, H * D, cfg.bias, 1, tp)
        self.declare("proj_weight", w)
        self.declare("proj_bias", b)

    def forward(self, x: torch.Tensor, rope, mask=None, table=None, cache=None) -> torch.Tensor:
        """cache: this layer's KV cache (inference/cache.py): it stores this rank's k and v (its KV
        heads, its sequence chunks) and attends, through `core` for a prefill."""
        kv = lambda p: None if p is None else copy_to_group(p, self.kv_axis)  # noqa: E731 - replica grads summed
        q, k, v = self.region.column_linears(x, [(self.wq, self.bq), (kv(self.wk), kv(self.bk)),
                                                 (kv(self.wv), kv(self.bv))])  # (B, S, H/tp*D), (B, S, G_local*D) x2
        core = lambda q, k, v: self.core(q, k, v, mask, table)  # noqa: E731 - the batch's mask and chunk table
        if cache is not None:
            core = functools.partial(cache, inner=core)
        y = attend_split(q, k, v, self.n_heads, self.n_kv_heads, self.head_dim, rope, core)  # (B, S, H/tp*D)
        out = self.region.exit(F.linear(y, self.proj_weight))  # (B, S/tp | S, h)
        return out if self.proj_bias is None else out + self.region.replicated(self.proj_bias)


class ParallelMLP(ShardedModule):
    """Column-parallel fc (and gate), row-parallel proj: one entry, one exit."""

    def __init__(self, cfg: ModelConfig, prefix: str, region: Region):
        super().__init__()
        tp, h, f = region.axis.size, cfg.d_model, cfg.d_ff
        self.region = region
        for name in ("fc", "gate"):
            present = name == "fc" or cfg.activation == "swiglu"
            w, b = linear_shards(f"{prefix}.{name}", f, h, cfg.bias, 0, tp) if present else (None, None)
            self.declare(f"{name}_weight", w)
            self.declare(f"{name}_bias", b)
        w, b = linear_shards(f"{prefix}.proj", h, f, cfg.bias, 1, tp)
        self.declare("proj_weight", w)
        self.declare("proj_bias", b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_weight is None:
            fc, gate = self.region.column_linear(x, self.fc_weight, self.fc_bias), None  # (B, S, F/tp)
        else:  # fc and gate share their input: one entry
            fc, gate = self.region.column_linears(x, [(self.fc_weight, self.fc_bias), (self.gate_weight, self.gate_bias)])
        out = self.region.exit(F.linear(mlp_hidden(fc, gate), self.proj_weight))  # (B, S/tp | S, h)
        return out if self.proj_bias is None else out + self.region.replicated(self.proj_bias)


class ParallelNorm(ShardedModule):
    """LayerNorm or RMSNorm with replicated weights, applied to replicated or sequence-sharded x."""

    def __init__(self, cfg: ModelConfig, prefix: str, region: Region):
        super().__init__()
        self.kind, self.eps, self.region = cfg.norm, cfg.norm_eps, region
        self.declare("weight", Shard(f"{prefix}.weight", (cfg.d_model,)))
        has_bias = cfg.norm == "layernorm" and cfg.bias
        self.declare("bias", Shard(f"{prefix}.bias", (cfg.d_model,)) if has_bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.region.replicated(self.weight)
        if self.kind == "rmsnorm":
            return rms_norm(x, w, self.eps)  # fused: see norm.py
        return F.layer_norm(x, x.shape[-1:], w, self.region.replicated(self.bias), self.eps)


class ParallelBlock(nn.Module):
    """Pre-norm attention and the MLP or the mixture of experts (moe.py); under Recompute.BLOCK
    only the block's input is kept for backward, which recomputes the rest (its forward
    collectives included)."""

    def __init__(self, cfg: ModelConfig, prefix: str, region: Region, kv_axis: Axis, split=None,
                 recompute: Recompute = Recompute.NONE, moe: ParallelMoE | None = None):
        super().__init__()
        self.norm1 = ParallelNorm(cfg, f"{prefix}.norm1", region)
        self.attn = ParallelAttention(cfg, f"{prefix}.attn", region, kv_axis, split, recompute)
        self.norm2 = ParallelNorm(cfg, f"{prefix}.norm2", region)
        self.mlp = ParallelMLP(cfg, f"{prefix}.mlp", region) if moe is None else None
        self.moe = moe
        self.run = checkpointed(self._forward) if recompute is Recompute.BLOCK else self._forward

    def forward(self, x: torch.Tensor, rope, mask=None, table=None, active=None, stats=None,
                cache=None) -> torch.Tensor:
        if cache is not None:  # inference: nothing to recompute
            return self._forward(x, rope, mask, table, active, stats, cache)
        return self.run(x, rope, mask, table, active, stats)

    def _forward(self, x: torch.Tensor, rope, mask=None, table=None, active=None, stats=None,
                 cache=None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope, mask, table, cache)
        h = self.norm2(x)
        return x + (self.mlp(h) if self.moe is None else self.moe(h, active, stats))


class Collected:
    """The MoE layers' stats, appended to by the blocks. Not a list: module hooks that rebuild the
    containers among a module's arguments (FSDP's rebuild lists holding tensors that need grad)
    would hand the block a copy, and its entry would be lost."""

    def __init__(self):
        self.items: list = []

    def append(self, entry) -> None:
        self.items.append(entry)


class ParallelTransformer(nn.Module):
    """The reference Transformer split over tp and cp. Parameters are declared empty; load them
    with `parallel.shard.load_full_state_dict` (parallelize does)."""

    def __init__(self, cfg: ModelConfig, tp_axis: Axis, kv_axis: Axis, sequence_parallel: bool = False,
                 split=None, batch_axis: Axis | None = None, overlap: bool = True, vocab_parallel: bool = True,
                 recompute: Recompute = Recompute.NONE, experts: ExpertAxes | None = None,
                 moe_dispatch: str = "all_to_all"):
        super().__init__()
        self.cfg, self.tp_axis, self.split, self.batch_axis = cfg, tp_axis, split, batch_axis
        self.region = Region(tp_axis, sequence_parallel, overlap)
        if self.region.sp and not vocab_parallel:
            raise ValueError("a whole (replicated) vocabulary needs the activations replicated over tp; "
                             "use vocab_parallel=True with sequence parallelism")
        if cfg.is_moe and experts is None:
            raise ValueError("a mixture-of-experts model needs its expert axes (ParallelDims.axes(..., moe=True))")
        self.vocab_parallel = vocab_parallel and tp_axis.size > 1
        self.tok_emb = VocabParallelEmbedding(cfg, self.region, vocab_parallel)
        ranks = 1 if batch_axis is None else batch_axis.size

        def moe(i: int) -> ParallelMoE | None:
            if not cfg.moe_layer(i):
                return None
            return ParallelMoE(cfg, f"blocks.{i}.moe", self.region, experts, ranks, moe_dispatch)

        self.blocks = nn.ModuleList(ParallelBlock(cfg, f"blocks.{i}", self.region, kv_axis, split, recompute, moe(i))
                                    for i in range(cfg.n_layers))
        self.norm = ParallelNorm(cfg, "norm", self.region)
        self.head = VocabParallelHead(cfg, self.region, vocab_parallel)
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight

    def sequence(self, ids: torch.Tensor, documents: torch.Tensor | None):
        """This batch's (positions (S/cp,) or (B, S/cp), ChunkMask or None, chunk table or None)."""
        S_local, window = ids.shape[1], self.cfg.window
        if self.split is None:
            S, table, mask = S_local, None, batch_mask(S_local, window, documents)
        else:
            S = S_local * self.split.size
            table = self.split.table_for(S, window, documents)
            mask = batch_mask(S, window, documents, len(table) * len(table[0]))
        if documents is not None and self.cfg.document_positions:
            positions = document_positions(documents)  # (B, S)
            positions = positions if self.split is None else self.split.shard(positions, 1, table)
        elif self.split is None:
            positions = torch.arange(S, device=ids.device)
        else:
            positions = self.split.positions(S_local, ids.device, table)
        return positions, mask, table

    def expert_parameter_names(self) -> list[str]:
        """Local names of the expert parameters DDP must not average (moe.py syncs them)."""
        return [f"blocks.{i}.moe.{name}" for i, block in enumerate(self.blocks) if block.moe is not None
                for name in block.moe.expert_parameter_names]

    def active(self, documents: torch.Tensor | None, table) -> torch.Tensor | None:
        """This rank's (B, S') tokens that are not padding (None: all are), S' as the MoE sees them."""
        if documents is None or not self.cfg.is_moe:
            return None
        live = documents >= 0  # (B, S)
        if self.split is not None:
            live = self.split.shard(live, 1, table)  # (B, S/cp)
        return self.region.local_seq(live, 1)  # (B, S/cp/tp) under sequence parallelism

    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None,
                documents: torch.Tensor | None = None, stats: dict | None = None, cache=None):
        """ids (B, S/cp): this rank's chunks -> logits (B, S/cp, V/tp), or (B, S/cp, V) when the
        vocabulary is whole, and the loss (see vocab_parallel_cross_entropy: its average over
        dp x cp is the global mean; for a mixture of experts it adds this rank's share of the
        balance and z-losses, scaled to keep that property for the gradients: see moe.py).
        cache: a KV-cache step (inference/cache.py) giving this rank's positions, mask, chunk
        table and tokens that are not padding, and each layer's attention over the cache.
        documents (B, S): the *whole* sequences' document ids of these rows (every cp rank holds
        them; see ParallelModel.shard_batch), from which the batch's chunk table, the mask and
        the positions follow, alike on every rank. `stats` receives "lm_loss" (this rank's
        next-token loss) and "moe" (per MoE layer: this rank's scaled shares of the losses and
        the batch's expert counts)."""
        if cache is None:
            positions, mask, table = self.sequence(ids, documents)
            active = self.active(documents, table)
        else:
            positions, mask, table, active = cache.positions, cache.mask, cache.table, cache.active
        x = self.tok_emb(ids, positions)  # (B, S/cp/tp | S/cp, h)
        rope = rope_for(self.cfg, positions, x.dtype)
        layers = Collected()
        for i, block in enumerate(self.blocks):
            x = block(x, rope, mask, table, active, layers, None if cache is None else cache.layer(i))
        layers = list(layers.items)  # a block recomputed in backward appends again: keep this forward's
        if cache is not None:
            x = cache.select(x)  # a prefill needs each row's last prompt token only: (B, 1, h)
        logits = self.head(self.norm(x))  # (B, S/cp, V/tp | V)
        loss = None
        if targets is not None:
            vocab_axis = self.tp_axis if self.vocab_parallel else Axis.single(self.tp_axis.name)
            loss = vocab_parallel_cross_entropy(logits, targets, self.tok_emb.vocab_start, vocab_axis,
                                                self.batch_axis)
        return logits, objective(self.cfg, loss, layers, stats)
