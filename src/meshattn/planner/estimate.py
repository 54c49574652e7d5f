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

Memory per rank: weights, gradients and optimizer state (memory.state_bytes, over pp stages,
ZeRO over dp x cp); activations (memory.activation_bytes_per_layer on this rank's S/cp tokens,
times the layers of a stage, times the micro-batches in flight: min(pp, m) for 1F1B, times
1 + (pp-1)/(pp v) interleaved, Korthikanti et al. eq. 5), the LM head's fp32 log-probabilities;
and buffers alive during one layer (the context-parallel impl's, ZeRO-3's gathered layer).
Fits when the total is at most `usable` of the GPU's memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import ModelConfig
from .buffers import context_buffer_bytes
from .comm import context_attention_comm, tensor_parallel_comm
from .flops import forward_flops, step_flops
from .layout import Plan
from .memory import activation_bytes_per_layer, params_per_rank, state_bytes
from .stack import MESHATTN, Stack

GIB = 2**30
USABLE = 0.92  # of device memory: the CUDA context, the allocator's fragmentation and NCCL's buffers
DDP_BUCKET = 25 * 2**20  # bytes: DDP's default bucket: the last one cannot hide behind backward


@dataclass(frozen=True)
class Job:
    seq_len: int
    global_batch: int  # sequences per optimizer step
    causal: bool = True


@dataclass
class Estimate:
    plan: Plan
    time_s: dict = field(default_factory=dict)  # compute, tp, cp, pipeline, dp, optimizer, step
    memory_bytes: dict = field(default_factory=dict)  # weights, gradients, optimizer, activations, buffers, total
    flops: dict = field(default_factory=dict)  # per step, whole job: total (with recompute) and model
    capacity_bytes: int = 0
    gpus: int = 1
    peak_flops: float = 0.0

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
        return {
            "layout": self.plan.name, "plan": self.plan.to_dict(), "step_time_s": self.step_time_s,
            "time_s": dict(self.time_s), "tflops_per_gpu": self.tflops_per_gpu,
            "tflops_counts": "matmul FLOPs of the step including recomputation (Narayanan et al. 2021 eq. 3 "
                             "for their model with full recomputation)",
            "mfu": self.mfu, "mfu_counts": "model FLOPs without recomputation / peak (Korthikanti et al. 2022 "
                                            "eq. 7)",
            "memory_gib": mem, "capacity_gib": self.capacity_bytes / GIB, "fits": self.fits,
        }


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

    compute = _compute_s(model, job, plan, cluster, stack, micro, per_layer * model.n_layers // plan.pp)
    tp_s = _tp_s(model, plan, cluster, stack, S, micro, layers, compute)
    cp_s = _cp_s(model, plan, cluster, stack, S, micro, layers, compute)
    ideal = compute["total"] + tp_s + cp_s
    bubble = ideal * (plan.pp - 1) / (micro * plan.interleave) if plan.pp > 1 else 0.0
    pipe = bubble + _pipeline_send_s(model, plan, cluster, stack, S, micro)
    dp_s = _dp_s(model, plan, cluster, stack, micro, compute)
    optim = cluster.traffic_s(2 * state_bytes(model, p.tp, p.dp * p.cp, plan.shard, p.splits_vocab(model),
                                              stack.weight_bytes, stack.grad_bytes, stack.optim_bytes)["total"]
                              / plan.pp)
    est.time_s = {"compute": compute["total"], "matmul": compute["matmul"], "attention": compute["attention"],
                  "elementwise": compute["elementwise"], "tp": tp_s, "cp": cp_s, "pipeline": pipe, "dp": dp_s,
                  "optimizer": optim}
    est.time_s["step"] = compute["total"] + tp_s + cp_s + pipe + dp_s + optim
    est.memory_bytes = _memory(model, job, plan, stack, micro, per_layer, layer)
    return est


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
    redo = {"none": 0.0, "selective": 0.2, "full": 1 / 3}[plan.recompute]  # forward traffic again
    traffic = stack.traffic * saved_per_stage * (1 + redo)
    out = {"matmul": micro * cluster.matmul_s(matmul),
           "attention": micro * (cluster.attention_s(core / share) if stack.fused_attention
                                 else cluster.matmul_s(core / share)),
           "elementwise": micro * cluster.traffic_s(traffic)}
    out["total"] = sum(out.values())
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
    vols = tensor_parallel_comm(model, p, plan.micro_batch, S // p.cp, stack.act_bytes)
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


def _pipeline_send_s(model, plan, cluster, stack, S, micro) -> float:
    """Activations (and their gradients) between stages: b S/cp h per micro-batch and virtual
    stage, split over tp (Narayanan's scatter/gather) when the stages cross nodes."""
    if plan.pp == 1:
        return 0.0
    p = plan.parallel
    inter = _spans(plan, cluster, p.tp * p.cp * p.dp, plan.pp) or p.tp * p.cp * p.dp >= cluster.gpus_per_node
    nbytes = plan.micro_batch * (S // p.cp) * model.d_model * stack.act_bytes / p.tp
    return 2 * micro * plan.interleave * cluster.collective_s("send_recv", 2, nbytes, inter)


def _dp_s(model, plan, cluster, stack, micro, compute) -> float:
    p = plan.parallel
    group = p.dp * p.cp
    if group == 1:
        return 0.0
    inter = _spans(plan, cluster, p.tp, group)
    P = params_per_rank(model, p.tp, p.splits_vocab(model))["total"] / plan.pp
    if plan.shard == "zero3":  # per micro-batch: weights gathered twice, gradients reduce-scattered
        each = (2 * cluster.collective_s("all_gather", group, P * stack.act_bytes, inter)
                + cluster.collective_s("reduce_scatter", group, P * stack.grad_bytes, inter))
        if not stack.overlap_dp:
            return micro * each
        return micro * (each - cluster.overlap * min(each, compute["total"] / micro))
    grads = P * stack.grad_bytes
    if plan.shard == "zero1":
        t = (cluster.collective_s("reduce_scatter", group, grads, inter)
             + cluster.collective_s("all_gather", group, P * stack.weight_bytes, inter))
    else:
        t = cluster.collective_s("all_reduce", group, grads, inter)
    if stack.overlap_dp:  # DDP's buckets behind the last micro-batch's backward; the last bucket shows
        backward = compute["total"] / micro * 2 / 3
        last = cluster.collective_s("all_reduce", group, min(DDP_BUCKET, grads), inter)
        t = max(t - cluster.overlap * min(t, backward), last)
    return t


def _layer_bytes(model, plan, stack, S, recompute) -> int:
    """memory.activation_bytes_per_layer's total for this plan's micro-batch, S/cp tokens, tp split
    and the stack's precision, dropout and attention kernel."""
    p = plan.parallel
    return activation_bytes_per_layer(
        model, plan.micro_batch, S // p.cp, p.tp, p.sequence_parallel, recompute, dtype_bytes=stack.act_bytes,
        dropout=stack.dropout, attention="fused" if stack.fused_attention else "unfused",
        residual_bytes=stack.residual_bytes, autocast=stack.autocast)["total"]


def _memory(model, job, plan, stack, micro, per_layer, layer) -> dict:
    p = plan.parallel
    states = state_bytes(model, p.tp, p.dp * p.cp, plan.shard, p.splits_vocab(model), stack.weight_bytes,
                         stack.grad_bytes, stack.optim_bytes)
    out = {k: states[k] / plan.pp for k in ("weights", "gradients", "optimizer")}
    b, s = plan.micro_batch, job.seq_len // p.cp
    if plan.recompute != "none":
        per_layer = _layer_bytes(model, plan, stack, job.seq_len, plan.recompute)
    in_flight = min(plan.pp, micro)
    if plan.interleave > 1:
        in_flight *= 1 + (plan.pp - 1) / (plan.pp * plan.interleave)
    out["activations"] = per_layer * model.n_layers / plan.pp * in_flight + _head_bytes(model, p, stack, b * s)
    out["buffers"] = _buffers(model, plan, stack, b, job.seq_len, layer)
    out["total"] = sum(out.values())
    return out


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


def _buffers(model, plan, stack, b, S, layer) -> float:
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
    if plan.shard == "zero3":  # one layer's weights gathered at a time
        out += params_per_rank(model, p.tp, p.splits_vocab(model))["layer"] * stack.act_bytes
    return out
