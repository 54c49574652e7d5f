"""Pure predictions from sizes alone: communication volumes (and later time and memory) of a layout.

Imports only `config`. The tests assert that the byte counter of a real run equals these figures
exactly, so they double as the documentation of what each layout moves.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from .config import ModelConfig, ParallelConfig


@dataclass
class Volume:
    calls: int = 0
    nbytes: int = 0

    def add(self, calls: int, numel_each: int, itemsize: int) -> None:
        self.calls += calls
        self.nbytes += calls * numel_each * itemsize


def tensor_parallel_comm(model: ModelConfig, par: ParallelConfig, batch: int, seq: int,
                         itemsize: int = 4) -> dict[str, Volume]:
    """Collective payloads of one forward + backward of one tp group on `batch` x `seq` tokens.

    Keys are "axis/kind/phase" as the CommCounter records them. Per block: the attention and
    the MLP each enter the tensor-parallel region once and leave it once, each a collective of
    B*S*h elements (all-reduce forward + identity, or all-gather / reduce-scatter with sequence
    parallelism), mirrored in backward, where under sequence parallelism each entry also
    re-gathers its input. A split vocabulary (par.splits_vocab) adds one exit for
    the embedding and one entry for the LM head, and the loss all-reduces three (B*S,) vectors; a
    whole one adds nothing. Replicated KV heads (n_kv_heads < tp) sum their weight gradients over
    their replica group ("kv" axis).
    """
    out: dict[str, Volume] = defaultdict(Volume)
    tp, L, h, n = par.tp, model.n_layers, model.d_model, batch * seq
    if tp == 1:
        return {}
    act = n * h
    vocab = par.splits_vocab(model)
    regions = 2 * L + int(vocab)  # block entries/exits + the embedding exit or the head entry
    if par.sequence_parallel:
        out["tp/reduce_scatter/fwd"].add(regions, act, itemsize)
        out["tp/all_gather/fwd"].add(regions, act, itemsize)
        # Backward: the exits' all-gathers, and each entry gathers its input again (only the
        # shard was saved) before reduce-scattering the input gradient.
        out["tp/all_gather/bwd"].add(2 * regions, act, itemsize)
        out["tp/reduce_scatter/bwd"].add(regions, act, itemsize)
        # Replicated parameters applied to sequence shards: their gradients are summed over tp.
        norm_params = 2 if (model.norm == "layernorm" and model.bias) else 1
        out["tp/all_reduce/bwd"].add((2 * L + 1) * norm_params + (2 * L if model.bias else 0), h, itemsize)
        if model.position == "learned":
            out["tp/all_reduce/bwd"].add(1, seq * h, itemsize)
    else:
        out["tp/all_reduce/fwd"].add(regions, act, itemsize)
        out["tp/all_reduce/bwd"].add(regions, act, itemsize)
    if vocab:
        out["tp/all_reduce/fwd"].add(3, n, itemsize)  # row max, exp-sum, target logit
    if model.n_kv_heads < tp:
        kv_weights = model.head_dim * h  # one KV head's K (or V) rows
        out["kv/all_reduce/bwd"].add(2 * L, kv_weights, itemsize)
        if model.bias:
            out["kv/all_reduce/bwd"].add(2 * L, model.head_dim, itemsize)
    return dict(out)
