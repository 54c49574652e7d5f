"""The vocabulary over tp: embedding, LM head and cross-entropy.

Split (ParallelConfig.splits_vocab): the embedding looks up only its own rows (others give
zeros, summed by the region's exit) and the LM head produces vocab-sharded logits whose
cross-entropy is computed with three all-reduces of (tokens,) vectors, never gathering
(B, S, V). Whole: embedding and head replicated on every tp rank like a norm, no collective at
either end, all V logits on every rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd import Function

from ..comm import Axis, all_reduce_
from ..config import ModelConfig
from .region import Region
from .shard import Shard, ShardedModule


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
            x = x + F.embedding(self.region.local_seq(positions, positions.dim() - 1), table)  # (S | B, S) ids
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
        all_reduce_(row_max, axis, "fwd", op="max")  # (N,) max over tp
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
