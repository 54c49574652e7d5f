"""Tensor parallelism (Megatron style) over the tp axis: heads and MLP columns split across ranks.

Per block, forward: the normed input enters the tensor-parallel region once (identity, or an
all-gather of sequence shards under sequence parallelism); Q/K/V and the MLP's first matmul are
column-parallel, so each rank owns whole heads and whole hidden columns; the attention output
projection and the MLP's second matmul are row-parallel and leave the region through one
all-reduce (or a reduce-scatter to sequence shards). Backward mirrors each collective.

The vocabulary is split too (ParallelConfig.splits_vocab): the embedding looks up only its own
rows (others give zeros, summed by the exit collective) and the LM head produces vocab-sharded
logits whose cross-entropy is computed with three all-reduces of (tokens,) vectors, never
gathering (B, S, V). A small vocabulary is instead kept whole on every tp rank, like a norm: no
collective at either end, the full logits computed on every rank.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd import Function

from ..comm import (Axis, all_gather_raw, all_gather_start, all_reduce_, copy_to_group, reduce_from_group,
                    reduce_scatter, reduce_scatter_start)
from ..config import ModelConfig
from ..model import attend_split, attention_core, mlp_hidden, rotary_tables
from ..norm import rms_norm
from .recompute import block_forward
from .shard import Shard


class Region:
    """Entry and exit of a tensor-parallel region, and replicated parameters used beside it.

    Without sequence parallelism activations between regions are replicated: the entry is
    identity forward / all-reduce backward (fused with the column-parallel matmul that follows),
    the exit an all-reduce forward. With it they are sequence shards (dim 1): the entry is an
    all-gather, the exit a reduce-scatter, and replicated parameters that touch the shards (norms,
    biases after the exit, positions) have their gradients summed over tp.
    """

    def __init__(self, axis: Axis, sequence_parallel: bool, overlap: bool = True):
        self.axis, self.sp, self.overlap = axis, sequence_parallel and axis.size > 1, overlap

    def exit(self, x: torch.Tensor) -> torch.Tensor:  # partial (B, S, h) -> (B, S/tp | S, h)
        return reduce_scatter(x, 1, self.axis) if self.sp else reduce_from_group(x, self.axis)

    def column_linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Enter the region and apply a column-parallel linear: (B, S/tp | S, h) -> (B, S, out/tp)."""
        return self.column_linears(x, [(weight, bias)])[0]

    def column_linears(self, x: torch.Tensor, layers: list) -> tuple[torch.Tensor, ...]:
        """Enter the region once and apply several column-parallel linears [(weight, bias), ...]
        that read the same input (Q, K, V; fc and gate): one output (B, S, out_i/tp) each.

        The entry is fused with the matmuls (see _EnterLinears): backward sums their input
        gradients into one buffer and overlaps its collective with the weight gradients
        (Megatron's async all-reduce); no weight or output is concatenated. Under sequence
        parallelism only this rank's shard of the input is kept for backward, which gathers it
        again (Megatron's re-gather), so the full (B, S, h) input is never saved."""
        if self.axis.size == 1:
            return tuple(F.linear(x, w, b) for w, b in layers)
        weights = [w for w, _ in layers]
        biases = [b for _, b in layers]
        return _EnterLinears.apply(x, self.axis, self.sp, self.overlap, len(layers), *weights, *biases)

    def replicated(self, p: torch.Tensor | None) -> torch.Tensor | None:
        return copy_to_group(p, self.axis) if (self.sp and p is not None) else p

    def local_seq(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's sequence shard of a replicated tensor (a no-op without sequence parallelism)."""
        return x.chunk(self.axis.size, dim=dim)[self.axis.rank] if self.sp else x


class _EnterLinears(Function):
    """y_i = x W_i^T + b_i at the entry of the tensor-parallel region. Inputs: x, axis, gather,
    overlap, n, then n weights and n biases (None allowed).

    gather=False: x (B, S, h) is replicated over tp; forward moves nothing. Backward: the input
    gradient x' = sum_i y_i' W_i (partial: this rank's heads/columns) is all-reduced
    asynchronously while W_i' = y_i'^T x and b_i' are computed, then waited for.
    gather=True (sequence parallelism): x (B, S/tp, h) is this rank's sequence shard; forward
    all-gathers it and keeps only the shard. Backward re-gathers it (asynchronously, behind the
    input-gradient matmuls), reduce-scatters x' to sequence shards (asynchronously, behind the
    weight gradients). overlap=False waits for each collective at once.
    """

    @staticmethod
    def forward(ctx, x, axis, gather, overlap, n, *params):
        weights, biases = list(params[:n]), list(params[n:])
        if torch.is_autocast_enabled(x.device.type):  # save (and move) what the matmuls will use
            dt = torch.get_autocast_dtype(x.device.type)
            x, weights = x.to(dt), [w.to(dt) for w in weights]
            biases = [None if b is None else b.to(dt) for b in biases]
        ctx.axis, ctx.gather, ctx.overlap, ctx.n = axis, gather, overlap, n
        ctx.has_bias = [b is not None for b in biases]
        ctx.save_for_backward(x, *weights)  # x: the shard under sequence parallelism
        full = all_gather_raw(x, 1, axis, "fwd") if gather else x  # (B, S, h)
        return tuple(F.linear(full, w, b) for w, b in zip(weights, biases))

    @staticmethod
    def backward(ctx, *grads):
        x, *weights = ctx.saved_tensors
        axis, wait_now = ctx.axis, not ctx.overlap
        if ctx.gather:
            gathering, finish_gather = all_gather_start(x, 1, axis, "bwd")
            if wait_now:
                gathering.wait()
        g2 = [g.reshape(-1, g.shape[-1]) for g in grads]  # (N, out_i) each, N = B*S
        grad_x = g2[0] @ weights[0]  # (N, h), partial: this rank's heads/columns only
        for g, w in zip(g2[1:], weights[1:]):
            grad_x.addmm_(g, w)
        B, h = x.shape[0], x.shape[-1]
        grad_x = grad_x.view(B, -1, h)  # (B, S, h)
        if ctx.gather:
            work, grad_in = reduce_scatter_start(grad_x, 1, axis, "bwd")  # -> (B, S/tp, h)
            if not wait_now:
                gathering.wait()
            full = finish_gather()  # (B, S, h)
        else:
            grad_in, full = grad_x, x
            axis.record("all_reduce", "bwd", grad_in)
            work = torch.distributed.all_reduce(grad_in, group=axis.group, async_op=True)
        if wait_now:
            work.wait()
        need, n = ctx.needs_input_grad, ctx.n
        x2 = full.reshape(-1, h)  # (N, h)
        grad_w = [g.t() @ x2 if need[5 + i] else None for i, g in enumerate(g2)]  # (out_i, h)
        grad_b = [g.sum(0) if ctx.has_bias[i] and need[5 + n + i] else None for i, g in enumerate(g2)]
        if not wait_now:
            work.wait()
        return (grad_in.view(x.shape), None, None, None, None, *grad_w, *grad_b)


class ShardedModule(nn.Module):
    """A module whose parameters are declared by their Shard; values are loaded afterwards."""

    def __init__(self):
        super().__init__()
        self.param_shards: dict[str, Shard] = {}

    def declare(self, name: str, shard: Shard | None) -> None:
        if shard is None:
            self.register_parameter(name, None)
            return
        self.register_parameter(name, nn.Parameter(torch.empty(shard.local_shape())))
        self.param_shards[name] = shard


def _linear_shards(prefix: str, out_f: int, in_f: int, bias: bool, dim: int, parts: int,
                   start: int = 0, stop: int | None = None):
    """Weight and bias shards of one reference Linear (or of a row slice of it)."""
    w = Shard(f"{prefix}.weight", (out_f, in_f), dim, parts, start, stop)
    if not bias:
        return w, None
    # A column split cuts the bias too; a row split leaves it whole (added after the reduction).
    b = Shard(f"{prefix}.bias", (out_f,), 0, parts, start, stop) if dim == 0 else Shard(f"{prefix}.bias", (out_f,))
    return w, b


class ParallelAttention(ShardedModule):
    """Column-parallel Q/K/V (whole heads per rank), row-parallel output projection.

    tp rank r owns query heads [r*H/tp, (r+1)*H/tp). KV heads: G >= tp, each rank owns G/tp of
    them; G < tp, each KV head is replicated on tp/G consecutive ranks, and its weights pass
    through `copy_to_group` over that replica group so their gradients are summed there.
    """

    def __init__(self, cfg: ModelConfig, prefix: str, region: Region, kv_axis: Axis, split=None):
        super().__init__()
        tp = region.axis.size
        H, G, D, h = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model
        self.n_heads, self.n_kv_heads, self.head_dim = H // tp, max(G // tp, 1), D
        self.region, self.kv_axis = region, kv_axis
        self.plain_core = attention_core if split is None else split.attention  # context-parallel when split
        self.core = self.plain_core  # recompute.apply_checkpointing may wrap it
        rows = (H + 2 * G) * D
        for name, start, stop, parts in (("q", 0, H * D, tp), ("k", H * D, (H + G) * D, min(G, tp)),
                                         ("v", (H + G) * D, rows, min(G, tp))):
            w, b = _linear_shards(f"{prefix}.qkv", rows, h, cfg.bias, 0, parts, start, stop)
            self.declare(f"w{name}", w)
            self.declare(f"b{name}", b)
        w, b = _linear_shards(f"{prefix}.proj", h, H * D, cfg.bias, 1, tp)
        self.declare("proj_weight", w)
        self.declare("proj_bias", b)

    def forward(self, x: torch.Tensor, rope) -> torch.Tensor:
        kv = lambda p: None if p is None else copy_to_group(p, self.kv_axis)  # noqa: E731 - replica grads summed
        q, k, v = self.region.column_linears(x, [(self.wq, self.bq), (kv(self.wk), kv(self.bk)),
                                                 (kv(self.wv), kv(self.bv))])  # (B, S, H/tp*D), (B, S, G_local*D) x2
        y = attend_split(q, k, v, self.n_heads, self.n_kv_heads, self.head_dim, rope, self.core)  # (B, S, H/tp*D)
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
            w, b = _linear_shards(f"{prefix}.{name}", f, h, cfg.bias, 0, tp) if present else (None, None)
            self.declare(f"{name}_weight", w)
            self.declare(f"{name}_bias", b)
        w, b = _linear_shards(f"{prefix}.proj", h, f, cfg.bias, 1, tp)
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
    def __init__(self, cfg: ModelConfig, prefix: str, region: Region, kv_axis: Axis, split=None):
        super().__init__()
        self.norm1 = ParallelNorm(cfg, f"{prefix}.norm1", region)
        self.attn = ParallelAttention(cfg, f"{prefix}.attn", region, kv_axis, split)
        self.norm2 = ParallelNorm(cfg, f"{prefix}.norm2", region)
        self.mlp = ParallelMLP(cfg, f"{prefix}.mlp", region)
        self.checkpoint = "none"  # see recompute.py

    def forward(self, x: torch.Tensor, rope) -> torch.Tensor:
        return block_forward(self, x, rope)

    def _forward(self, x: torch.Tensor, rope) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope)
        return x + self.mlp(self.norm2(x))


def check_token_ids(ids: torch.Tensor, vocab_size: int) -> None:
    """Refuse ids outside [0, vocab_size): no vocabulary shard owns them."""
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise IndexError(f"token ids must lie in [0, {vocab_size}); got [{int(ids.min())}, {int(ids.max())}]")


class VocabParallelEmbedding(ShardedModule):
    """Rows [r*V/tp, (r+1)*V/tp) of the token embedding (split=True), or all of them on every tp
    rank (split=False: replicated, like a norm); learned positions replicated."""

    def __init__(self, cfg: ModelConfig, region: Region, split: bool = True):
        super().__init__()
        tp = region.axis.size if split else 1
        self.region, self.split = region, split and region.axis.size > 1
        self.vocab_start = region.axis.rank * (cfg.vocab_size // tp) if self.split else 0
        self.vocab_end = self.vocab_start + cfg.vocab_size // tp
        self.vocab_size = cfg.vocab_size
        self.declare("weight", Shard("tok_emb.weight", (cfg.vocab_size, cfg.d_model), 0, tp) if self.split
                     else Shard("tok_emb.weight", (cfg.vocab_size, cfg.d_model)))
        learned = cfg.position == "learned"
        self.declare("pos_weight", Shard("pos_emb.weight", (cfg.max_seq_len, cfg.d_model)) if learned else None)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        check_token_ids(ids, self.vocab_size)  # out-of-range ids would embed as zeros, silently
        if self.split:
            outside = (ids < self.vocab_start) | (ids >= self.vocab_end)  # (B, S)
            local_ids = (ids - self.vocab_start).masked_fill(outside, 0)
            x = F.embedding(local_ids, self.weight).masked_fill(outside[..., None], 0.0)  # (B, S, h) partial
            x = self.region.exit(x)  # (B, S/tp | S, h)
        else:  # never with sequence parallelism (see ParallelConfig)
            x = F.embedding(ids, self.weight)  # (B, S, h), the same on every tp rank
        if self.pos_weight is not None:
            # Only rows up to the largest position are used, so only they need a gradient sum.
            table = self.region.replicated(self.pos_weight[: int(positions.max()) + 1])  # (S, h)
            x = x + F.embedding(self.region.local_seq(positions, 0), table)
        return x


class VocabParallelHead(ShardedModule):
    """LM head rows [r*V/tp, (r+1)*V/tp): vocab-sharded logits (split=True); or the whole head on
    every tp rank: all V logits, no collective (split=False)."""

    def __init__(self, cfg: ModelConfig, region: Region, split: bool = True):
        super().__init__()
        self.region, self.split = region, split and region.axis.size > 1
        self.declare("weight", Shard("head.weight", (cfg.vocab_size, cfg.d_model), 0, region.axis.size)
                     if self.split else Shard("head.weight", (cfg.vocab_size, cfg.d_model)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, S/tp | S, h) -> (B, S, V/tp | V)
        if self.split:
            return self.region.column_linear(x, self.weight, None)
        return F.linear(x, self.weight)  # x is replicated over tp: so are the logits and every gradient


IGNORE_INDEX = -100  # as in F.cross_entropy: targets equal to it do not count


class _VocabParallelCrossEntropy(Function):
    """Mean cross-entropy of vocab-sharded logits (N, V/tp) against global target ids (N,).

    Forward: all-reduce(max) of each row's max, all-reduce(sum) of the shifted exp-sums, and
    all-reduce(sum) of the target logit (zero where this rank does not own the target).
    Backward: (softmax - onehot) / n_valid on the local columns; no communication. Rows whose
    target is IGNORE_INDEX contribute neither loss nor gradient.
    """

    @staticmethod
    def forward(ctx, logits, targets, vocab_start, axis, denominator):
        ctx.input_dtype = logits.dtype
        logits = logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits  # fp32 statistics
        valid = targets != IGNORE_INDEX  # (N,)
        weight = valid.to(logits.dtype) / denominator.to(logits.dtype)  # (N,) 1/denominator or 0
        row_max = logits.max(dim=-1).values  # (N,)
        all_reduce_(row_max, axis, "fwd", op=torch.distributed.ReduceOp.MAX)  # (N,) max over tp
        shifted = logits - row_max[:, None]  # (N, V/tp)
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)  # (N,)
        all_reduce_(sum_exp, axis, "fwd")  # (N,) summed over tp
        local_t = targets - vocab_start
        owned = (local_t >= 0) & (local_t < logits.shape[-1]) & valid  # (N,)
        local_t = local_t.masked_fill(~owned, 0)
        target_logit = shifted.gather(1, local_t[:, None]).squeeze(1).masked_fill(~owned, 0.0)  # (N,)
        all_reduce_(target_logit, axis, "fwd")  # (N,) from the one rank that owns each target
        loss = ((sum_exp.log() - target_logit) * weight).sum()
        exp.div_(sum_exp[:, None]).mul_(weight[:, None])  # softmax * weight, in place
        ctx.save_for_backward(exp, local_t, owned, weight)
        return loss

    @staticmethod
    def backward(ctx, grad):
        weighted_softmax, local_t, owned, weight = ctx.saved_tensors
        g = weighted_softmax.clone()  # (N, V/tp)
        rows = torch.arange(g.shape[0], device=g.device)
        g[rows, local_t] -= owned.to(g.dtype) * weight
        return g.mul_(grad).to(ctx.input_dtype), None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int,
                                 axis: Axis, batch_axis: Axis | None = None) -> torch.Tensor:
    """logits (B, S, V/tp), targets (B, S) -> this rank's loss, replicated over tp. (With a size-1
    axis and vocab_start 0: the loss of whole-vocabulary logits (B, S, V), without communication.)

    Without batch_axis: the mean over this rank's non-ignored tokens. With a batch axis (the
    ranks that hold different tokens: dp x cp) of size n: the sum over this rank's tokens times
    n / (global token count), so that averaging losses and gradients over that axis (as DDP
    does) gives the global-mean loss even when ranks hold unequal numbers of counted tokens.
    """
    targets = targets.flatten()
    count = (targets != IGNORE_INDEX).sum().reshape(1)  # (1,)
    if batch_axis is not None and batch_axis.size > 1:
        all_reduce_(count, batch_axis, "fwd")  # (1,) global count over dp x cp
        denominator = count.clamp(min=1).double() / batch_axis.size  # float64: exact for any dp x cp
    else:
        denominator = count.clamp(min=1).double()
    return _VocabParallelCrossEntropy.apply(logits.flatten(0, 1), targets, vocab_start, axis, denominator)


class TensorParallelTransformer(nn.Module):
    """The reference Transformer split over a tp axis. Parameters are declared empty; load them
    with `parallel.shard.load_full_state_dict` (parallelize does)."""

    def __init__(self, cfg: ModelConfig, tp_axis: Axis, kv_axis: Axis, sequence_parallel: bool = False,
                 split=None, batch_axis: Axis | None = None, overlap: bool = True, vocab_parallel: bool = True):
        super().__init__()
        self.cfg, self.tp_axis, self.split, self.batch_axis = cfg, tp_axis, split, batch_axis
        self.region = Region(tp_axis, sequence_parallel, overlap)
        if self.region.sp and not vocab_parallel:
            raise ValueError("a whole (replicated) vocabulary needs the activations replicated over tp; "
                             "use vocab_parallel=True with sequence parallelism")
        self.vocab_parallel = vocab_parallel and tp_axis.size > 1
        self.tok_emb = VocabParallelEmbedding(cfg, self.region, vocab_parallel)
        self.blocks = nn.ModuleList(ParallelBlock(cfg, f"blocks.{i}", self.region, kv_axis, split)
                                    for i in range(cfg.n_layers))
        self.norm = ParallelNorm(cfg, "norm", self.region)
        self.head = VocabParallelHead(cfg, self.region, vocab_parallel)
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight

    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None):
        """ids (B, S/cp): this rank's chunks -> logits (B, S/cp, V/tp), or (B, S/cp, V) when the
        vocabulary is whole, and the loss (see vocab_parallel_cross_entropy: its average over
        dp x cp is the global mean)."""
        S = ids.shape[1]
        positions = torch.arange(S, device=ids.device) if self.split is None else self.split.positions(S, ids.device)
        x = self.tok_emb(ids, positions)  # (B, S/cp/tp | S/cp, h)
        rope = None
        if self.cfg.position == "rope":
            rope = rotary_tables(positions, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        for block in self.blocks:
            x = block(x, rope)
        logits = self.head(self.norm(x))  # (B, S/cp, V/tp | V)
        loss = None
        if targets is not None:
            vocab_axis = self.tp_axis if self.vocab_parallel else Axis.single(self.tp_axis.name)
            loss = vocab_parallel_cross_entropy(logits, targets, self.tok_emb.vocab_start, vocab_axis,
                                                self.batch_axis)
        return logits, loss
