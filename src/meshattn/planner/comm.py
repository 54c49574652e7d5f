"""Pure predictions from sizes alone: communication volumes (and later time and memory) of a layout.

Imports only `config` (and moe.py's token counts). The tests assert that the byte counter of a
real run equals these figures exactly, so they double as the documentation of what each layout
moves.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

from ..config import ModelConfig, ParallelConfig
from .moe import dispatch_imbalance, expert_replicas, experts_in_ddp, moe_layers, routed_tokens


@dataclass
class Volume:
    calls: int = 0
    nbytes: int = 0

    def add(self, calls: int, numel_each: int, itemsize: int) -> None:
        self.calls += calls
        self.nbytes += calls * numel_each * itemsize


def tensor_parallel_comm(model: ModelConfig, par: ParallelConfig, batch: int, seq: int,
                         itemsize: int = 4, moe_itemsize: int | None = None) -> dict[str, Volume]:
    """Collective payloads of one forward + backward of one tp group on `batch` x `seq` tokens.

    Keys are "axis/kind/phase" as the CommCounter records them. Per block: the attention and
    the MLP each enter the tensor-parallel region once and leave it once, each a collective of
    B*S*h elements (all-reduce forward + identity, or all-gather / reduce-scatter with sequence
    parallelism), mirrored in backward, where under sequence parallelism each entry also
    re-gathers its input. A split vocabulary (par.splits_vocab) adds one exit for
    the embedding and one entry for the LM head, and the loss all-reduces three (B*S,) vectors; a
    whole one adds nothing. Replicated KV heads (n_kv_heads < tp) sum their weight gradients over
    their replica group ("kv" axis).

    An MoE layer has no MLP region; its shared expert (if any) is one, as the MLP. Its routed part
    runs on distinct tokens per tp rank (moe.routed_tokens): the router's gradient is summed over
    tp (E h per layer), and without sequence parallelism the routed output is all-gathered from the
    tp ranks' token slices (B*S*h, padded to tp equal parts, forward) and so is the input gradient
    (backward), in moe_itemsize (the MoE input's dtype, the residual stream's; default itemsize).
    """
    out: dict[str, Volume] = defaultdict(Volume)
    tp, L, h, n = par.tp, model.n_layers, model.d_model, batch * seq
    if tp == 1:
        return {}
    act = n * h
    vocab = par.splits_vocab(model)
    n_moe = moe_layers(model)
    dense = L - n_moe  # layers with the dense MLP (every layer of a dense model)
    mlps = dense + (n_moe if model.n_shared_experts else 0)  # MLP regions: dense MLPs and shared experts
    regions = L + mlps + int(vocab)  # block entries/exits + the embedding exit or the head entry
    if par.sequence_parallel:
        out["tp/reduce_scatter/fwd"].add(regions, act, itemsize)
        out["tp/all_gather/fwd"].add(regions, act, itemsize)
        # Backward: the exits' all-gathers, and each entry gathers its input again (only the
        # shard was saved) before reduce-scattering the input gradient.
        out["tp/all_gather/bwd"].add(2 * regions, act, itemsize)
        out["tp/reduce_scatter/bwd"].add(regions, act, itemsize)
        # Replicated parameters applied to sequence shards: their gradients are summed over tp.
        norm_params = 2 if (model.norm == "layernorm" and model.bias) else 1
        row_biases = L + dense if model.bias else 0  # the out projections' and dense MLPs' biases
        out["tp/all_reduce/bwd"].add((2 * L + 1) * norm_params + row_biases, h, itemsize)
        if model.position == "learned":
            out["tp/all_reduce/bwd"].add(1, seq * h, itemsize)
    else:
        out["tp/all_reduce/fwd"].add(regions, act, itemsize)
        out["tp/all_reduce/bwd"].add(regions, act, itemsize)
    if vocab:
        out["tp/all_reduce/fwd"].add(3, n, itemsize)  # row max, exp-sum, target logit
    if n_moe:
        moe_item = itemsize if moe_itemsize is None else moe_itemsize
        out["tp/all_reduce/bwd"].add(n_moe, model.n_experts * h, moe_item)  # routers: distinct tokens per rank
        if not par.sequence_parallel:
            padded = tp * routed_tokens(batch, seq, tp) * h  # the tp ranks' token slices, padded alike
            out["tp/all_gather/fwd"].add(n_moe, padded, moe_item)  # routed outputs
            out["tp/all_gather/bwd"].add(n_moe, padded, moe_item)  # input gradients of the slices
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


def moe_comm(model: ModelConfig, par: ParallelConfig, batch: int, seq: int, itemsize: int = 4,
             imbalance: float = 1.0, grad_bytes: int = 4, row_itemsize: int | None = None) -> dict[str, Volume]:
    """Collective payloads of the MoE layers (beyond tensor_parallel_comm's) in one forward +
    backward of one rank on `batch` x `seq` tokens (seq = S/cp), keys "axis/kind/phase", as
    parallel/moe.py records them. Per MoE layer, with n = moe.routed_tokens(batch, seq, tp) tokens
    routed by the rank, h = d_model, E experts, k = top_k; gates, the gather's summed output and
    their gradients in `itemsize` (the MoE input's dtype: the residual stream's), the travelling
    rows and their gradients in `row_itemsize` (the compute dtype: 16-bit under autocast; default
    itemsize), ids and counts int64:

    ep (the ep group; nothing at ep = 1), moe_dispatch
        all_to_all   forward: the E counts (one all_to_all_single), then the n k rows (dispatch)
                     and the rows back (combine); backward: the same two row all-to-alls. Payload:
                     the rank's send tensor, all rows included (a share 1/ep stays on the rank).
                     With a capacity factor also the slots' float64 priorities (n k).
        gather       forward: all-gather of each rank's count (1), of its rows padded to the
                     group's largest count (every rank routes n: ep n h), of the expert ids
                     (ep n k; with a capacity factor the priorities too, float64) and of the gates
                     (ep n k), reduce-scatter of the (ep n, h) output; backward: reduce-scatter of
                     the gathered rows' and gates' gradients, all-gather of the output's gradient.
        With a capacity factor and ep < world, one float64 all-reduce over ep (the group's tokens).
    world  all-reduce of the E + 1 float64 expert counts and tokens (the balance loss), forward.
    edp    expert_gradient_comm.

    imbalance: 1 gives the byte counter's payloads (every rank sends n k rows). Above 1 the row
    all-to-alls are the busiest rank's: it receives (dispatch) and sends back (combine) that many
    times the mean rows, which sets the collective's time; the gather moves padded tokens, the
    same on every rank, whatever the routing.
    """
    out: dict[str, Volume] = defaultdict(Volume)
    L = moe_layers(model)
    if L == 0:
        return {}
    h, E, k, ep = model.d_model, model.n_experts, model.top_k, par.ep
    n = routed_tokens(batch, seq, par.tp)
    capacity = model.capacity_factor is not None
    row_item = itemsize if row_itemsize is None else row_itemsize
    if ep > 1 and par.moe_dispatch == "all_to_all":
        rows = math.ceil(dispatch_imbalance(ep, imbalance) * n * k)  # the rank's rows (the busiest's at x > 1)
        out["ep/all_to_all/fwd"].add(L, E, 8)  # counts per expert
        out["ep/all_to_all/fwd"].add(2 * L, rows * h, row_item)  # dispatch, combine
        out["ep/all_to_all/bwd"].add(2 * L, rows * h, row_item)  # their gradients
        if capacity:
            out["ep/all_to_all/fwd"].add(L, n * k, 8)  # priorities
    elif ep > 1:
        gathered = ep * n  # tokens of the group, each rank's padded to the largest count
        out["ep/all_gather/fwd"].add(L, ep, 8)  # counts
        out["ep/all_gather/fwd"].add(L, gathered * h, row_item)  # rows
        out["ep/all_gather/fwd"].add(L, gathered * k, 8)  # expert ids
        out["ep/all_gather/fwd"].add(L, gathered * k, itemsize)  # gates
        if capacity:
            out["ep/all_gather/fwd"].add(L, gathered * k, 8)  # priorities
        out["ep/reduce_scatter/fwd"].add(L, gathered * h, itemsize)  # the experts' output, home
        out["ep/reduce_scatter/bwd"].add(L, gathered * h, row_item)  # the gathered rows' gradient
        out["ep/reduce_scatter/bwd"].add(L, gathered * k, itemsize)  # the gathered gates' gradient
        out["ep/all_gather/bwd"].add(L, gathered * h, itemsize)  # the output's gradient
    if capacity and 1 < ep < par.world_size:
        out["ep/all_reduce/fwd"].add(L, 1, 8)  # the ep group's tokens
    if par.world_size > 1:
        out["world/all_reduce/fwd"].add(L, E + 1, 8)
    return {**out, **expert_gradient_comm(model, par, grad_bytes)}


def expert_gradient_comm(model: ModelConfig, par: ParallelConfig, grad_bytes: int = 4) -> dict[str, Volume]:
    """The routed experts' gradient all-reduces of one backward over their replicas ("edp":
    world / ep ranks at stride ep): one per expert weight (gate, up, down; E/ep Fe h each) and MoE
    layer; none when edp = 1 or when DDP buckets them with the rest (ep = tp = 1)."""
    if not model.is_moe or expert_replicas(par) == 1 or experts_in_ddp(par):
        return {}
    vol = Volume()
    vol.add(3 * moe_layers(model), model.n_experts // par.ep * model.expert_ffn * model.d_model, grad_bytes)
    return {"edp/all_reduce/bwd": vol}
