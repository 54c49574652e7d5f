"""One plan's predicted step: time by part, memory by part, throughput, and whether it fits.

    estimate(model, job, plan, cluster, stack) -> Estimate

Time of one optimizer step on one rank (every rank does the same work; the pipeline's last stage
also runs the LM head, spread evenly here as in Narayanan et al.'s eq. 3):

    compute    matmul FLOPs (flops.step_flops, recomputation included, / tp cp pp) at the
               cluster's matmul rate, the attention core at its attention rate (a fused kernel;
               unfused, its Q K^T and P V are plain matmuls over every pair), and the
               elementwise memory traffic: stack.traffic x the bytes saved for backward
    tp, cp     per layer the collectives comm.py's formulas give (the byte counter's), at the
               link's bandwidth and latency, minus what the stack hides: meshattn's backward
               input-gradient all-reduce behind the weight-gradient matmul (a third of the
               matmul time), the ring's next K/V behind the attention core
    pipeline   the 1F1B bubble (p-1)/(m v) of the compute and tp/cp time (m micro-batches, v
               virtual stages), and the activations sent between stages
    dp         the gradient all-reduce over dp x cp once per step (ZeRO-1: reduce-scatter +
               all-gather, the same bytes; ZeRO-3: all-gather the weights in forward and again
               in backward and reduce-scatter the gradients, per micro-batch, hidden behind
               compute as far as it lasts), minus what DDP's buckets hide behind backward
    optimizer  reading and writing weights, gradients and optimizer state once
    ep         (MoE models) each MoE layer's dispatch and combine over the ep group (comm.moe_comm:
               all-to-all or gather) and the expert counts' all-reduce over the world, not hidden;
               an all-to-all across nodes sends the share bound for other nodes over the network
               while the rest crosses NVLink. The busiest rank receives, and its experts compute,
               job.expert_imbalance x the mean rows (moe.py); the routed experts' gradients are
               all-reduced over their replicas (world / ep, at stride ep) once per backward, with
               dp, unless ep = tp = 1 (then DDP buckets them with the rest)

Memory per rank: weights, gradients and optimizer state (memory.state_bytes, over pp stages,
ZeRO over dp x cp); activations (memory.activation_bytes_per_layer on this rank's S/cp tokens,
times the layers of a stage, times the micro-batches in flight: min(pp, m) for 1F1B, times
1 + (pp-1)/(pp v) interleaved, Korthikanti et al. eq. 5), the LM head's fp32 log-probabilities;
and buffers alive during one layer (the context-parallel impl's, ZeRO-3's gathered layer, an MoE
layer's dispatch buffers). An MoE model's layers past cfg.dense_layers save the MoE feed-forward's
bytes (memory.moe_activation_bytes, the busiest rank's) instead of the MLP's, and a rank holds E/ep
experts with their gradients and optimizer state (memory.state_bytes).
Fits when the total is at most `usable` of the GPU's memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import ModelConfig
from .buffers import context_buffer_bytes
from .comm import context_attention_comm, expert_gradient_comm, moe_comm, tensor_parallel_comm
from .flops import forward_flops, step_flops
from .layout import Plan
from .memory import activation_bytes_per_layer, params_per_rank, state_bytes
from .moe import (EXPERT_IMBALANCE, check_imbalance, compute_imbalance, expert_replicas, expert_rows,
                  experts_in_ddp, moe_layers, routed_tokens)
from .stack import MESHATTN, Stack

GIB = 2**30
USABLE = 0.92  # of device memory: the CUDA context, the allocator's fragmentation and NCCL's buffers
DDP_BUCKET = 25 * 2**20  # bytes: DDP's default bucket: the last one cannot hide behind backward


@dataclass(frozen=True)
class Job:
    seq_len: int
    global_batch: int  # sequences per optimizer step
    causal: bool = True
    expert_imbalance: float = EXPERT_IMBALANCE  # MoE: the busiest ep rank's routed rows / the mean (moe.py)

    def __post_init__(self) -> None:
        object.__setattr__(self, "expert_imbalance", check_imbalance(self.expert_imbalance))


@dataclass
class Estimate:
    plan: Plan
    time_s: dict = field(default_factory=dict)  # compute, tp, cp, pipeline, dp, optimizer, step
    memory_bytes: dict = field(default_factory=dict)  # weights, gradients, optimizer, activations, buffers, total
    flops: dict = field(default_factory=dict)  # per step, whole job: total (with recompute) and model
    capacity_bytes: int = 0
    gpus: int = 1
    peak_flops: float = 0.0
    moe: dict = field(default_factory=dict)  # MoE models: ep, dispatch, the imbalance assumed, volumes (_moe_summary)

    @property
    def step_time_s(self) -> float:
        return self.time_s["step"]

    @property
    def fits(self) -> bool:
        return self.memory_bytes["total"] <= self.capacity_bytes

    @property
    def tflops_per_gpu(self) -> float:
        return self.flops["total"] / (self.step_time_s * self.gpus) / 1e12

    @property
    def mfu(self) -> float:
        return self.flops["model"] / (self.step_time_s * self.gpus * self.peak_flops)

    def to_dict(self) -> dict:
        mem = {k: v / GIB for k, v in self.memory_bytes.items()}
        out = {
            "layout": self.plan.name, "plan": self.plan.to_dict(), "step_time_s": self.step_time_s,
            "time_s": dict(self.time_s), "tflops_per_gpu": self.tflops_per_gpu,
            "tflops_counts": "matmul FLOPs of the step including recomputation (Narayanan et al. 2021 eq. 3 "
                             "for their model with full recomputation)",
            "mfu": self.mfu, "mfu_counts": "model FLOPs without recomputation / peak (Korthikanti et al. 2022 "
                                            "eq. 7)",
            "memory_gib": mem, "capacity_gib": self.capacity_bytes / GIB, "fits": self.fits,
        }
        if self.moe:
            out["moe"] = dict(self.moe)
        return out


def estimate(model: ModelConfig, job: Job, plan: Plan, cluster, stack: Stack = MESHATTN) -> Estimate:
    """The predicted step of `plan` (check_plan it first) on `cluster` running `stack`."""
    est = Estimate(plan, gpus=plan.gpus, peak_flops=cluster.peak_flops,
                   capacity_bytes=int(cluster.memory_bytes * (USABLE if cluster.name != "this" else 1.0)))
    b, S, p = plan.micro_batch, job.seq_len, plan.parallel
    micro = job.global_batch // (plan.dp * b)  # micro-batches per replica per step
    causal_pairs = job.causal and stack.fused_attention  # an unfused core computes every pair
    whole = step_flops(model, job.global_batch, S, plan.recompute, causal=causal_pairs)
    est.flops = {"total": whole["total"], "model": step_flops(model, job.global_batch, S, causal=job.causal)["model"]}
    layers = model.n_layers // plan.pp
    layer = _layer_bytes(model, plan, stack, S, "none")  # what one layer saves without recomputation
    per_layer = layer + _gathered_kv(model, plan, stack, S)
    moe_layer = _layer_bytes(model, plan, stack, S, "none", job) if model.is_moe else 0  # an MoE layer's
    moe_per_layer = moe_layer + _gathered_kv(model, plan, stack, S) if model.is_moe else 0

    compute = _compute_s(model, job, plan, cluster, stack, micro,
                         _stage_layers_bytes(model, per_layer, moe_per_layer) // plan.pp)
    tp_s = _tp_s(model, plan, cluster, stack, S, micro, layers, compute)
    cp_s = _cp_s(model, plan, cluster, stack, S, micro, layers, compute)
    ep_s = _ep_s(model, job, plan, cluster, stack, S, micro)  # 0.0 for a dense model
    ideal = compute["total"] + tp_s + cp_s + ep_s
    bubble = ideal * (plan.pp - 1) / (micro * plan.interleave) if plan.pp > 1 else 0.0
    pipe = bubble + _pipeline_send_s(model, plan, cluster, stack, S, micro)
    counts = params_per_rank(model, p.tp, p.splits_vocab(model), p.ep)
    states = state_bytes(model, p.tp, p.dp * p.cp, plan.shard, p.splits_vocab(model), stack.weight_bytes,
                         stack.grad_bytes, stack.optim_bytes, p.ep, stack.zero_experts)
    dp_s = _dp_s(model, plan, cluster, stack, micro, compute, counts)
    optim = cluster.traffic_s(2 * states["total"] / plan.pp)
    est.time_s = {"compute": compute["total"], "matmul": compute["matmul"], "attention": compute["attention"],
                  "elementwise": compute["elementwise"], "tp": tp_s, "cp": cp_s, "pipeline": pipe, "dp": dp_s,
                  "optimizer": optim}
    if model.is_moe:
        est.time_s.update(experts=compute["experts"], ep=ep_s)
    est.time_s["step"] = compute["total"] + tp_s + cp_s + pipe + dp_s + optim + ep_s
    est.memory_bytes = _memory(model, job, plan, stack, micro, states, counts, (per_layer, layer),
                               (moe_per_layer, moe_layer))
    if model.is_moe:
        est.moe = _moe_summary(model, job, plan, stack, micro, ep_s, states)
    return est


def _moe_summary(model, job, plan, stack, micro, ep_s, states) -> dict:
    """What the report shows of an MoE plan: the expert split, the dispatch, the imbalance
    assumed, the rows one rank routes and computes per layer, its dispatch bytes per step (the
    byte counter's: at imbalance 1) and its time."""
    p = plan.parallel
    n = routed_tokens(plan.micro_batch, job.seq_len // p.cp, p.tp)
    vols = moe_comm(model, p, plan.micro_batch, job.seq_len // p.cp, stack.residual_bytes, 1.0, stack.grad_bytes,
                    stack.act_bytes)
    ep_bytes = sum(v.nbytes for k, v in vols.items() if k.startswith("ep/"))
    return {"ep": p.ep, "dispatch": p.moe_dispatch if p.ep > 1 else None, "experts_per_rank": model.n_experts // p.ep,
            "expert_replicas": expert_replicas(p), "expert_imbalance": job.expert_imbalance,
            "imbalance_applied": compute_imbalance(model, p.ep, job.expert_imbalance),
            "tokens_per_rank": n, "expert_rows_per_rank": expert_rows(model, n, p.ep, job.expert_imbalance),
            "ep_bytes_per_step": micro * ep_bytes / plan.pp, "ep_s": ep_s,
            "expert_state_bytes": states["experts"] / plan.pp}


def _stage_layers_bytes(model, per_layer, moe_per_layer) -> int:
    """What all the blocks save: per_layer for each dense block, moe_per_layer for each MoE block."""
    if not model.is_moe:
        return per_layer * model.n_layers
    return per_layer * (model.n_layers - moe_layers(model)) + moe_per_layer * moe_layers(model)


def _compute_s(model, job, plan, cluster, stack, micro, saved_per_stage) -> dict:
    """Per rank per step: matmuls, the attention core and the elementwise traffic."""
    p = plan.parallel
    b, S = plan.micro_batch, job.seq_len
    share = p.tp * p.cp * plan.pp  # ranks splitting one micro-batch's work
    causal_pairs = job.causal and stack.fused_attention
    fwd = forward_flops(model, b, S, causal=causal_pairs)
    steps = step_flops(model, b, S, plan.recompute, causal=causal_pairs)
    core = 3 * fwd["attention"] + (fwd["attention"] if plan.recompute != "none" else 0)
    head = 3 * fwd["lm_head"]
    head_share = (p.tp if p.splits_vocab(model) else 1) * p.cp * plan.pp  # a whole vocabulary: every tp rank
    matmul = (steps["total"] - core - head) / share + head / head_share
    experts = 0.0
    if model.is_moe:  # the routed experts' matmuls: the busiest rank computes x times the mean rows
        x = compute_imbalance(model, p.ep, job.expert_imbalance)
        experts = x * (3 + (plan.recompute == "full")) * fwd["experts"] / share
        matmul += experts * (x - 1) / x
    redo = {"none": 0.0, "selective": 0.2, "full": 1 / 3}[plan.recompute]  # forward traffic again
    traffic = stack.traffic * saved_per_stage * (1 + redo)
    out = {"matmul": micro * cluster.matmul_s(matmul),
           "attention": micro * (cluster.attention_s(core / share) if stack.fused_attention
                                 else cluster.matmul_s(core / share)),
           "elementwise": micro * cluster.traffic_s(traffic)}
    out["total"] = sum(out.values())
    if model.is_moe:
        out["experts"] = micro * cluster.matmul_s(experts)  # (part of matmul)
    return out


def _spans(plan: Plan, cluster, inner: int, size: int) -> bool:
    """Whether a group of `size` ranks at stride `inner` (ranks ordered tp, cp, dp, pp, innermost
    first) leaves a node."""
    return size > 1 and inner * size > cluster.gpus_per_node


def _time(cluster, volumes: dict, p: int, inter: bool, scale: float = 1.0) -> dict:
    """{"fwd": s, "bwd": s} of comm.py volumes ("...kind/phase" keys -> Volume) over a group of p."""
    out = {"fwd": 0.0, "bwd": 0.0}
    for key, vol in volumes.items():
        kind, phase = key.split("/")[-2:]
        if vol.calls:
            out[phase] += scale * vol.calls * cluster.collective_s(kind, p, vol.nbytes / vol.calls, inter)
    return out


def _tp_s(model, plan, cluster, stack, S, micro, layers, compute) -> float:
    p = plan.parallel
    if p.tp == 1:
        return 0.0
    vols = tensor_parallel_comm(model, p, plan.micro_batch, S // p.cp, stack.act_bytes, stack.residual_bytes)
    t = _time(cluster, vols, p.tp, _spans(plan, cluster, 1, p.tp), scale=layers / model.n_layers)
    fwd = t["fwd"] * (2 if plan.recompute == "full" else 1)  # full recomputation runs the exits again
    bwd = t["bwd"]
    if stack.overlap_tp:  # behind the weight-gradient matmuls: a third of the matmul time
        bwd -= cluster.overlap * min(bwd, compute["matmul"] / micro / 3)
    return micro * (fwd + bwd)


def _cp_s(model, plan, cluster, stack, S, micro, layers, compute) -> float:
    p = plan.parallel
    if p.cp == 1:
        return 0.0
    heads, kv = model.n_heads // p.tp, max(model.n_kv_heads // p.tp, 1)
    inter = _spans(plan, cluster, p.tp, p.cp)
    b, D, item = plan.micro_batch, model.head_dim, stack.act_bytes
    if p.cp_impl == "hybrid":
        u, r = p.ulysses_size, p.cp // p.ulysses_size
        rep = 1 if kv % u == 0 else u // kv
        a2a = _time(cluster, context_attention_comm("ulysses", p.cp_layout, u, b, heads, kv, S // r, D, item),
                    u, _spans(plan, cluster, p.tp, u), 1 / u)
        ring = _time(cluster, context_attention_comm("ring", p.cp_layout, r, b, heads // u, kv * rep // u, S, D, item),
                     r, inter, 1 / r)
        comm = {"fwd": a2a["fwd"] + ring["fwd"], "bwd": a2a["bwd"] + ring["bwd"]}
        hidden_part = ring
    else:
        comm = _time(cluster, context_attention_comm(p.cp_impl, p.cp_layout, p.cp, b, heads, kv, S, D, item),
                     p.cp, inter, 1 / p.cp)  # the formulas sum over the cp ranks
        hidden_part = comm if p.cp_impl == "ring" else {"fwd": 0.0, "bwd": 0.0}
    per_layer = (comm["fwd"] * (2 if plan.recompute != "none" else 1) + comm["bwd"])
    if stack.overlap_cp:  # the ring's transfers behind the attention core of the same layer
        core = compute["attention"] / micro / layers
        hidden = hidden_part["fwd"] + hidden_part["bwd"]
        per_layer -= cluster.overlap * min(hidden, core)
    return micro * layers * per_layer


def _ep_s(model, job, plan, cluster, stack, S, micro) -> float:
    """Per rank per step: the MoE layers' dispatch and combine over the ep group (consecutive
    ranks) and the expert counts' all-reduce over the world (comm.moe_comm, the busiest rank's
    rows), a stage's share of the layers; none hidden. Full recomputation dispatches again."""
    if not model.is_moe:
        return 0.0
    p = plan.parallel
    vols = moe_comm(model, p, plan.micro_batch, S // p.cp, stack.residual_bytes, job.expert_imbalance,
                    stack.grad_bytes, stack.act_bytes)
    t = {"fwd": 0.0, "bwd": 0.0}
    for key, vol in vols.items():
        axis, kind, phase = key.split("/")
        if axis in ("ep", "world") and vol.calls:  # (edp: the gradients, in _dp_s)
            size = p.ep if axis == "ep" else p.world_size
            t[phase] += vol.calls * _collective_s(plan, cluster, kind, size, 1, vol.nbytes / vol.calls) / plan.pp
    return micro * (t["fwd"] * (2 if plan.recompute == "full" else 1) + t["bwd"])


def _collective_s(plan: Plan, cluster, kind: str, size: int, inner: int, payload: float) -> float:
    """One collective over `size` ranks at stride `inner`. An all-to-all that leaves the node sends
    the share bound for other nodes, (size - local)/size of the payload, over the network while the
    (local - 1)/size for the node's peers crosses NVLink meanwhile: the slower of the two (local:
    the group's ranks per node). Other kinds: the ring's alpha-beta time at the slowest link."""
    inter = _spans(plan, cluster, inner, size)
    if kind != "all_to_all" or not inter:
        return cluster.collective_s(kind, size, payload, inter)
    local = max(cluster.gpus_per_node // inner, 1)
    net = cluster.collective_s(kind, size, payload * (size - local) / (size - 1), True)
    nvlink = cluster.collective_s(kind, size, payload * (local - 1) / (size - 1), False)
    return max(net, nvlink)


def _pipeline_send_s(model, plan, cluster, stack, S, micro) -> float:
    """Activations (and their gradients) between stages: b S/cp h per micro-batch and virtual
    stage, split over tp (Narayanan's scatter/gather) when the stages cross nodes."""
    if plan.pp == 1:
        return 0.0
    p = plan.parallel
    inter = _spans(plan, cluster, p.tp * p.cp * p.dp, plan.pp) or p.tp * p.cp * p.dp >= cluster.gpus_per_node
    nbytes = plan.micro_batch * (S // p.cp) * model.d_model * stack.act_bytes / p.tp
    return 2 * micro * plan.interleave * cluster.collective_s("send_recv", 2, nbytes, inter)


def _dp_s(model, plan, cluster, stack, micro, compute, counts) -> float:
    """The gradients' (and ZeRO's weights') collectives over dp x cp, and an MoE model's routed
    experts' over their replicas (edp: world / ep ranks at stride ep) where they do not travel
    with the rest (moe.experts_in_ddp): without ZeRO one all-reduce per expert weight per backward
    (comm.moe_comm), not hidden; with ZeRO sharded over edp like the rest over dp x cp, unless the
    stack leaves the experts whole (Stack.zero_experts: then all-reduced as without ZeRO). counts:
    memory.params_per_rank's for this plan."""
    p = plan.parallel
    group = p.dp * p.cp
    apart = 0 if experts_in_ddp(p) else counts.get("experts", 0)  # expert parameters reduced over edp
    edp = expert_replicas(p) if apart else 1
    if group == 1 and edp == 1:
        return 0.0
    inter, e_inter = _spans(plan, cluster, p.tp, group), _spans(plan, cluster, p.ep, edp)
    P = (counts["total"] - apart) / plan.pp
    whole_experts = edp > 1 and (plan.shard == "none" or not stack.zero_experts)  # all-reduced per backward
    E = 0 if whole_experts else apart / plan.pp
    experts_s = micro * _expert_grads_s(model, plan, cluster, stack, e_inter) if whole_experts else 0.0

    def both(kind: str, per_param: int) -> float:  # the dp x cp group's and the experts' edp group's
        return (cluster.collective_s(kind, group, P * per_param, inter)
                + (cluster.collective_s(kind, edp, E * per_param, e_inter) if E else 0.0))
    if plan.shard == "zero3":  # per micro-batch: weights gathered twice, gradients reduce-scattered
        each = 2 * both("all_gather", stack.act_bytes) + both("reduce_scatter", stack.grad_bytes)
        if not stack.overlap_dp:
            return micro * each + experts_s
        return micro * (each - cluster.overlap * min(each, compute["total"] / micro)) + experts_s
    grads = P * stack.grad_bytes
    if plan.shard == "zero1":
        t = both("reduce_scatter", stack.grad_bytes) + both("all_gather", stack.weight_bytes)
    else:
        t = cluster.collective_s("all_reduce", group, grads, inter)
    if stack.overlap_dp:  # DDP's buckets behind the last micro-batch's backward; the last bucket shows
        backward = compute["total"] / micro * 2 / 3
        last = cluster.collective_s("all_reduce", group, min(DDP_BUCKET, grads), inter)
        t = max(t - cluster.overlap * min(t, backward), last)
    return t + experts_s


def _expert_grads_s(model, plan, cluster, stack, inter) -> float:
    """One backward's all-reduces of the routed experts' gradients over edp (a stage's share)."""
    p = plan.parallel
    vol = expert_gradient_comm(model, p, stack.grad_bytes)["edp/all_reduce/bwd"]
    return vol.calls * cluster.collective_s("all_reduce", expert_replicas(p), vol.nbytes / vol.calls, inter) / plan.pp


def _layer_bytes(model, plan, stack, S, recompute, job: Job | None = None) -> int:
    """memory.activation_bytes_per_layer's total for this plan's micro-batch, S/cp tokens, tp split
    and the stack's precision, dropout and attention kernel: a dense block, or with `job` an MoE
    block on the busiest rank of its ep group (at job.expert_imbalance)."""
    p = plan.parallel
    moe = {} if job is None else {"ep": p.ep, "imbalance": job.expert_imbalance, "dispatch": p.moe_dispatch}
    return activation_bytes_per_layer(
        model, plan.micro_batch, S // p.cp, p.tp, p.sequence_parallel, recompute, dtype_bytes=stack.act_bytes,
        dropout=stack.dropout, attention="fused" if stack.fused_attention else "unfused",
        residual_bytes=stack.residual_bytes, autocast=stack.autocast, **moe)["total"]


def _memory(model, job, plan, stack, micro, states, counts, dense_layer, moe_layer) -> dict:
    """Memory per rank by part. states, counts: memory.state_bytes's and params_per_rank's for this
    plan; dense_layer, moe_layer: (saved for backward with the all-gather impl's K/V, without) for
    one dense and one MoE block without recomputation (0s for a dense model)."""
    p = plan.parallel
    (per_layer, layer), (moe_per_layer, moe_layer) = dense_layer, moe_layer
    out = {k: states[k] / plan.pp for k in ("weights", "gradients", "optimizer")}
    b, s = plan.micro_batch, job.seq_len // p.cp
    if plan.recompute != "none":
        per_layer = _layer_bytes(model, plan, stack, job.seq_len, plan.recompute)
        if model.is_moe:
            moe_per_layer = _layer_bytes(model, plan, stack, job.seq_len, plan.recompute, job)
    in_flight = min(plan.pp, micro)
    if plan.interleave > 1:
        in_flight *= 1 + (plan.pp - 1) / (plan.pp * plan.interleave)
    blocks = _stage_layers_bytes(model, per_layer, moe_per_layer)
    out["activations"] = blocks / plan.pp * in_flight + _head_bytes(model, p, stack, b * s)
    out["buffers"] = _buffers(model, plan, stack, b, job.seq_len, max(layer, moe_layer), counts)
    if model.is_moe:
        out["buffers"] += _moe_buffers(model, job, plan, stack)
    out["total"] = sum(out.values())
    return out


def _moe_buffers(model, job, plan, stack) -> int:
    """Bytes alive during one MoE layer beyond what it saves, on the busiest rank (n tokens, m
    rows: moe.py), in the MoE input's dtype: with the all-to-all the rows it sends (n k h), the
    rows it receives and its experts' collected outputs (m h each); with the gather the gathered
    rows and the (ep n, h) output before its reduce-scatter, the gathered ids (int64) and gates."""
    p, r = plan.parallel, stack.residual_bytes
    h, k = model.d_model, model.top_k
    n = routed_tokens(plan.micro_batch, job.seq_len // p.cp, p.tp)
    if p.ep > 1 and p.moe_dispatch == "gather":
        return 2 * p.ep * n * h * r + p.ep * n * k * (8 + r)
    return (n * k + 2 * expert_rows(model, n, p.ep, job.expert_imbalance)) * h * r


def _gathered_kv(model, plan, stack, S) -> int:
    """The all-gather impl saves the gathered K and V (this rank's KV heads, the whole sequence)
    for backward: 2 b G/t (S - S/cp) D elements beyond the local K and V (parallel/context.py)."""
    p = plan.parallel
    if p.cp == 1 or p.cp_impl != "allgather":
        return 0
    kv = max(model.n_kv_heads // p.tp, 1)
    return 2 * plan.micro_batch * kv * (S - S // p.cp) * model.head_dim * stack.act_bytes


def _head_bytes(model, p, stack, tokens: int) -> int:
    """What the embedding, final norm, LM head and loss save (parallel/vocab.py): the token ids
    (int64), the final norm's input (fp32 for RMSNorm, as in the blocks) and statistic, the head's
    input, and the loss's weighted softmax (fp32, V/tp columns) with its target index, mask and
    weight per token."""
    vocab = model.vocab_size // (p.tp if p.splits_vocab(model) else 1)
    h = model.d_model // (p.tp if p.sequence_sharded else 1)
    norm_r = max(stack.residual_bytes, 4) if model.norm == "rmsnorm" else stack.residual_bytes
    stats = 4 * (2 if model.norm == "layernorm" else 1)
    return tokens * (8 + h * norm_r + stats + model.d_model * stack.act_bytes + vocab * 4 + 8 + 1 + 4)


def _buffers(model, plan, stack, b, S, layer, counts) -> float:
    """Bytes alive during one layer beyond what is saved: the context-parallel impl's transfer
    buffers, one recomputed layer's activations, ZeRO-3's gathered layer."""
    p = plan.parallel
    out = 0.0
    if p.cp > 1:
        out += context_buffer_bytes(p.cp_impl, p.cp, b, model.n_heads // p.tp, max(model.n_kv_heads // p.tp, 1),
                                    S, model.head_dim, stack.act_bytes, ulysses_size=p.ulysses_size,
                                    overlap=stack.overlap_cp, layout=p.cp_layout)["total"]
    if plan.recompute != "none":  # the layer being recomputed holds what it would have saved
        out += layer
    if plan.shard == "zero3":  # one layer's weights gathered at a time (the larger kind)
        out += max(counts["layer"], counts.get("moe_layer", 0)) * stack.act_bytes
    return out
