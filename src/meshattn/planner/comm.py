"""Pure predictions from sizes alone: communication volumes (and later time and memory) of a layout.

Imports only `config`. The tests assert that the byte counter of a real run equals these figures
exactly, so they double as the documentation of what each layout moves.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from ..config import ModelConfig, ParallelConfig


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


def context_attention_comm(impl: str, layout: str, p: int, batch: int, heads: int, kv_heads: int, seq: int,
                           head_dim: int, itemsize: int = 4) -> dict[str, Volume]:
    """Collective payloads of one causal context_attention forward + backward over p cp ranks
    (plain causal, no documents), summed over the ranks; keys "kind/phase".

    ring:      a chunk travels while a later rank needs it (ring.Route): contiguous, chunk o is
               needed by the p-1-o ranks after it; zigzag, every chunk by every rank except rank
               0's last chunk (2p-1), needed by no other rank. Forward: K and V per hop (one message
               each); backward: K and V again and dK/dV (in the accumulation dtype, here itemsize)
               as often: the owner keeps its share, the last user sends the rest home.
    allgather: K and V gathered once (payload: the gathered tensor), dK and dV reduce-scattered.
    ulysses:   q, k, v and out cross once each way; KV heads are first repeated to p when
               kv_heads < p (kv_heads * p/kv_heads heads move).
    """
    out: dict[str, Volume] = defaultdict(Volume)
    if p == 1:
        return {}
    chunk_len = seq // (p if layout == "contiguous" else 2 * p)
    kv_chunk = batch * kv_heads * chunk_len * head_dim  # one chunk of K (or V), elements
    if impl == "ring":
        if layout == "zigzag":
            hops, chunk_hops = p * (p - 1), (2 * p - 1) * (p - 1)
        else:
            hops = chunk_hops = p * (p - 1) // 2
        out["send_recv/fwd"].calls, out["send_recv/fwd"].nbytes = 2 * hops, 2 * chunk_hops * kv_chunk * itemsize
        out["send_recv/bwd"].calls, out["send_recv/bwd"].nbytes = 4 * hops, 4 * chunk_hops * kv_chunk * itemsize
    elif impl == "allgather":
        gathered = batch * kv_heads * seq * head_dim
        out["all_gather/fwd"].add(2 * p, gathered, itemsize)
        out["reduce_scatter/bwd"].add(2 * p, gathered, itemsize)
    elif impl == "ulysses":
        rep = 1 if kv_heads % p == 0 else p // kv_heads
        per_rank = batch * (seq // p) * head_dim * (2 * heads + 2 * kv_heads * rep)  # q, out, k, v
        out["all_to_all/fwd"].calls, out["all_to_all/fwd"].nbytes = 4 * p, p * per_rank * itemsize
        out["all_to_all/bwd"].calls, out["all_to_all/bwd"].nbytes = 4 * p, p * per_rank * itemsize
    else:
        raise ValueError(f"impl={impl!r}: volumes are modelled for ring, allgather and ulysses")
    return dict(out)
