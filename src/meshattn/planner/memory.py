"""Memory per rank from sizes alone (pure integers): activations per transformer layer, and the
weights, gradients and optimizer state a rank holds.

    korthikanti_activation_bytes   Korthikanti et al. 2022's per-layer formulas, exactly
    activation_bytes_per_layer     what meshattn's block saves for backward, itemised; reduces to
                                   the paper's formula for the paper's model (see the tests)
    moe_activation_bytes           what an MoE block's feed-forward saves instead of the MLP
    params_per_rank                parameters one tp rank holds, by part (E/ep experts of an MoE)
    state_bytes                    weights / gradients / optimizer state per rank, with ZeRO

Notation: b micro-batch, s sequence (this rank's, before any tensor-parallel split: pass S/cp
under context parallelism), h = d_model, a = H query heads, G KV heads, D head dim, F = d_ff,
V vocabulary, t = tp. Bytes unless said otherwise.
"""

from __future__ import annotations

from fractions import Fraction

from ..config import ModelConfig, ParallelConfig
from .flops import recompute_mode
from .moe import check_experts, expert_rows, moe_layers, routed_tokens

ATTENTION_KINDS = ("fused", "unfused")
SHARD_MODES = ("none", "zero1", "zero2", "zero3")


def _exact(x: Fraction) -> int | float:
    return int(x) if x.denominator == 1 else float(x)


def korthikanti_activation_bytes(seq: int, micro_batch: int, hidden: int, heads: int, tp: int = 1,
                                 sequence_parallel: bool = False, recompute: str = "none") -> int | float:
    """Activation memory of one transformer layer, in bytes, 16-bit activations: Korthikanti et al.
    2022, "Reducing Activation Recomputation in Large Transformer Models", sec. 4 and Table 2:

        no parallelism                  s b h (34 + 5 a s / h)
        tensor parallel t               s b h (10 + 24/t + 5 a s / (h t))
        tensor + sequence parallel      s b h / t (34 + 5 a s / h)
        selective recomputation         the same without the 5 a s / h term (softmax output,
                                        its dropout mask and dropout output: 5 a s^2 b)
        full recomputation              2 s b h (the layer's input, as Table 2 gives it for any t;
                                        under sequence parallelism that input is in fact a
                                        sequence shard, 2 s b h / t, which is what
                                        activation_bytes_per_layer counts)

    Their model: MHA, 4h GELU MLP, LayerNorm, dropout after the softmax, the attention output and
    the MLP (1-byte masks), attention unfused (the s x s softmax output stored); per-token
    LayerNorm statistics are neglected. An int when exact (t dividing the terms), else a float.
    """
    s, b, h, a, t = seq, micro_batch, hidden, heads, tp
    mode = recompute_mode(recompute)
    if mode == "full":
        return 2 * s * b * h
    core = 0 if mode == "selective" else 5 * a * s * s * b  # the 5 a s / h term, times s b h
    if sequence_parallel:
        return _exact(Fraction(34 * s * b * h + core, t))
    return _exact(10 * s * b * h + Fraction(24 * s * b * h + core, t))


def _check_tp(cfg: ModelConfig, tp: int) -> None:
    ParallelConfig(tp=tp, vocab_parallel="off").check_model(cfg)  # heads, KV heads, d_ff divide


def activation_bytes_per_layer(cfg: ModelConfig, micro_batch: int, seq: int, tp: int = 1,
                               sequence_parallel: bool = False, recompute: str = "none", dtype_bytes: int = 2,
                               dropout: bool = False, attention: str = "fused", residual_bytes: int | None = None,
                               repeat_kv: bool = True, small_terms: bool = True, autocast: bool = False,
                               ep: int | None = None, imbalance: float = 1.0, dispatch: str = "all_to_all") -> dict:
    """Bytes one transformer block of meshattn's model keeps for backward on one tp rank, itemised
    (and "total"), following Korthikanti et al. 2022's accounting (sec. 4.1) tensor by tensor.

    n = b s tokens. "Between regions" tensors (norm inputs, the inputs of the column-parallel
    Q/K/V and fc/gate matmuls, dropout masks after the exits) have n h elements, replicated over
    tp, or n h / t under sequence parallelism (the region entry saves only the shard and
    re-gathers it in backward: parallel/region.py). Inside the region, per rank:
        q                     n (a/t) D               rotated queries (the core's input)
        k, v                  n (a/t) D each          meshattn's attention_core repeats grouped KV
                                                      heads to the query heads before SDPA, and the
                                                      kernel keeps the repeated copies; repeat_kv=
                                                      False: a kernel reading grouped heads keeps
                                                      n max(G/t, 1) D each (GQA's saving)
        attn_out              n (a/t) D               the core's output = the out projection's input
        fused core: lse       n (a/t) fp32            (small term) the softmax's log-sum-exp
        unfused core: scores  b (a/t) s^2             the softmax output (also P in P V), plus with
                                                      dropout a 1-byte mask and the dropout output
        GELU MLP              2 n F/t                 GELU's input, the down projection's input
        SwiGLU MLP            4 n F/t                 gate (SiLU's input), SiLU's output, fc, and
                                                      their product (the down projection's input)
        norm inputs           2 n h (/t)              at residual_bytes; meshattn's RMSNorm keeps a
                                                      fp32 copy of a 16-bit input
        norm stats            (small term) per token and norm: mean and rstd (LayerNorm) or rstd
                              (RMSNorm), fp32
    Every tensor is dtype_bytes per element (2 under autocast, 4 in float32) except the norm
    inputs: residual_bytes (default dtype_bytes, or 4 with autocast=True: meshattn's autocast
    keeps the residual stream in fp32), masks (1) and statistics (fp32, fp64 in float64).

    recompute: "selective" ("attention") drops the core's internals (lse; scores, dropout) and
    keeps q, k, v as the checkpoint's inputs (k, v then at the grouped width max(G/t, 1) D: the
    repeat happens inside the recomputed core); "full" ("block") keeps only the block's input,
    n h (/t under sequence parallelism) at residual_bytes.
    dropout: meshattn has none; True adds the paper's masks (and the unfused core's dropout
    output). small_terms=False leaves out the per-token statistics, as the paper does.
    autocast: meshattn's bf16/fp16 training (pass dtype_bytes=2): the residual stream stays fp32
    (residual_bytes defaults to 4), every matmul keeps its 16-bit weight copy for backward
    ("weight_casts": this rank's matmul weights of the block, biases not needed); the region
    entry (parallel/region.py) casts the shared input of Q/K/V (and of fc/gate) once, at any tp.

    ep: None for a block with the dense MLP; an int for an MoE block whose experts are split over
    ep ranks (by `dispatch`): the MLP's items are replaced by moe_activation_bytes's (the busiest
    rank's, at `imbalance`), and its weight casts by the shared expert's and the rank's E/ep
    experts' (each expert's slice is cast anew: no cache holds it).

    Checked against the bytes autograd saves (bench.memory.SavedActivations) in the parallel
    model on CPU, float32 and autocast: equal to the byte at tp=1 (tests/test_planner_costs.py,
    without recomputation) and, measured once, in each recompute mode at tp=1 and tp=2 with and
    without sequence parallelism, with GQA and with replicated KV heads. CUDA's fused kernels
    may lay out the log-sum-exp differently (padded rows); that small term is the one to recheck
    on a GPU.
    """
    mode = recompute_mode(recompute)
    if attention not in ATTENTION_KINDS:
        raise ValueError(f"attention={attention!r} is unknown; choose one of {ATTENTION_KINDS}")
    _check_tp(cfg, tp)
    if ep is not None:
        check_experts(cfg, ep)
    t, b, s, d = tp, micro_batch, seq, dtype_bytes
    sp = sequence_parallel and t > 1
    if sp and s % t:
        raise ValueError(f"seq={s} must be a multiple of tp={t} under sequence parallelism")
    r = (4 if autocast else dtype_bytes) if residual_bytes is None else residual_bytes
    stat = 8 if max(r, d) >= 8 else 4  # statistics: fp32, or fp64 in float64
    n = b * s  # tokens
    between = n * cfg.d_model // t if sp else n * cfg.d_model  # elements of an (n, h) tensor between regions
    if mode == "full":
        return {"block_input": between * r, "total": between * r}

    heads = cfg.n_heads // t  # query heads per rank
    D, h = cfg.head_dim, cfg.d_model
    local_kv = max(cfg.n_kv_heads // t, 1)  # KV heads per rank (replicated when G < t)
    kv_heads = heads if repeat_kv and mode == "none" else local_kv  # attention_core's repeat_interleave
    f = cfg.d_ff // t
    n_fc = 2 if cfg.activation == "swiglu" else 1
    norm_r = max(r, 4) if cfg.norm == "rmsnorm" else r  # rms_norm saves a fp32 copy of 16-bit input
    items = {
        "norm1_input": between * norm_r,
        "qkv_input": between * d,
        "q": n * heads * D * d,
        "k": n * kv_heads * D * d,
        "v": n * kv_heads * D * d,
    }
    if mode == "none":
        if attention == "fused":
            if small_terms:
                items["lse"] = n * heads * stat
        else:
            scores = b * heads * s * s  # (b, a/t, s, s)
            items["scores"] = scores * d
            if dropout:
                items["attn_dropout_mask"] = scores
                items["attn_dropout_output"] = scores * d
    items["attn_out"] = n * heads * D * d
    if dropout:
        items["attn_out_dropout_mask"] = between
    items["norm2_input"] = between * norm_r
    if ep is None:
        items["mlp_input"] = between * d
        if cfg.activation == "swiglu":
            items.update(gate=n * f * d, silu=n * f * d, fc=n * f * d, mlp_hidden=n * f * d)
        else:
            items.update(fc=n * f * d, mlp_hidden=n * f * d)
        ffn_weights = n_fc * f * h + h * f
    else:
        items.update(moe_activation_bytes(cfg, b, s, t, between, ep, imbalance, d, r, autocast, dispatch,
                                          small_terms))
        shared, experts = cfg.n_shared_experts * cfg.expert_ffn // t, cfg.n_experts // ep  # on this rank
        ffn_weights = 3 * h * shared + experts * 3 * h * cfg.expert_ffn
    if dropout:
        items["mlp_dropout_mask"] = between
    if small_terms:
        per_token = 2 if cfg.norm == "layernorm" else 1  # mean and rstd, or rstd
        items["norm_stats"] = 2 * per_token * (between // h) * stat  # two norms
    if autocast:
        items["weight_casts"] = ((heads + 2 * local_kv) * D * h + h * heads * D + ffn_weights) * d
    items["total"] = sum(items.values())
    return items


def moe_activation_bytes(cfg: ModelConfig, micro_batch: int, seq: int, tp: int, between: int, ep: int,
                         imbalance: float = 1.0, dtype_bytes: int = 2, residual_bytes: int = 4,
                         autocast: bool = False, dispatch: str = "all_to_all", small_terms: bool = True) -> dict:
    """Bytes an MoE feed-forward (parallel/moe.py) keeps for backward on the busiest rank of its ep
    group, itemised, tensor by tensor as autograd saves them. n = ceil(b s / t) tokens routed by
    this rank (moe.routed_tokens), m = ceil(x n k) rows its experts compute (x: the imbalance,
    moe.expert_rows), E experts, k = top_k, Fe = expert_ffn, d = dtype_bytes; r = residual_bytes:
    the MoE's input keeps the residual stream's dtype (the norm returns its input's), and so do
    the gates and the gate-weighted sums; the rows it dispatches and the experts' outputs are in
    the compute dtype d (cast once before the dispatch under autocast).
        router_input    n h 8         the router's float64 copy of its input (its matmul's input)
        router_logits   n E 8         float64 logits (the z-loss's log-sum-exp input)
        router_probs    n E 8         the float64 softmax output
        expert_rows     m h d         the rows each expert's gate and up matmuls read (one copy:
                                      they arrive in the compute dtype)
        expert_swiglu   4 m Fe d      gate, SiLU(gate), up and their product (down's input)
        expert_out      m h d         each expert's output (index_copy keeps its source)
        combine         n k h (d + r) all_to_all: the combined rows (d, for the gates' gradient)
                                      and the gate-weighted rows (r; index_add keeps its source)
                        m h (d + r)   gather: the same, on the rank's slots of the gathered tokens
        shared_input    between d     the shared expert's region entry (as the dense MLP's input)
        shared_mlp      4 b s sFe/t d the shared SwiGLU of s Fe over tp (s = n_shared_experts)
        routing         (small terms) the router's float64 weight E h 8, top-k indices and
                        probabilities 2 n k 8, their sum n 8, the balance loss's E 8 and the
                        z-loss's n 8 float64, the slots' index tensors (all_to_all: 2 n k 8;
                        gather: n k 8 + 3 m 8), each expert's row indices m 8, and the gates
                        (n k r; gather: m r)
    `between` is the block's (n, h)-shaped tensor between regions, in elements (memory.py).
    Measured against autograd at ep = 1 (tests/test_planner_moe.py): equal to the byte in float32
    and under autocast. (In float64 the router's copy of its input is the input itself.)
    """
    h, E, k, F, d, r = cfg.d_model, cfg.n_experts, cfg.top_k, cfg.expert_ffn, dtype_bytes, residual_bytes
    n = routed_tokens(micro_batch, seq, tp)
    m = expert_rows(cfg, n, ep, imbalance)
    gather = dispatch == "gather" and ep > 1  # at ep = 1 the layer takes the all-to-all path (no exchange)
    items = {
        "router_input": n * h * 8,
        "router_logits": n * E * 8,
        "router_probs": n * E * 8,
        "expert_rows": m * h * d,
        "expert_swiglu": 4 * m * F * d,
        "expert_out": m * h * d,
        "combine": (m if gather else n * k) * h * (d + r),
    }
    shared = cfg.n_shared_experts * F // tp  # the shared expert's columns on this rank
    if shared:
        items.update(shared_input=between * d, shared_mlp=4 * micro_batch * seq * shared * d)
    if small_terms:
        router = E * h * 8 + 2 * n * k * 8 + n * 8 + E * 8 + n * 8
        slots = (n * k * 8 + 3 * m * 8 + m * r) if gather else (2 * n * k * 8 + n * k * r)
        items["routing"] = router + slots + m * 8
    return items


def params_per_rank(cfg: ModelConfig, tp: int = 1, vocab_parallel: bool = True, ep: int = 1) -> dict:
    """Parameters one tp rank holds, by part, as parallel/transformer.py and parallel/vocab.py
    split them (all tp ranks hold equally many):

        per layer   q: (a/t) D (h + bias); k, v: max(G/t, 1) D (h + bias) each (a KV head is
                    replicated on t/G ranks when G < t); out projection: h (a/t) D + h bias
                    (the row-parallel bias whole); MLP: fc (and gate) F/t (h + bias), down
                    projection h F/t + h bias; two norms: h, or 2h for LayerNorm with bias
        embedding   V/t rows (vocab_parallel and t > 1) or V, times h; learned positions whole
        head        the same split; 0 when tied to the embedding
        final norm  whole

    An MoE layer (cfg.moe_layer(i)) has the attention and norms above and, instead of the MLP:
    the router E h (whole on every rank), the shared expert 3 h sFe/t (split over tp like the
    MLP; s = n_shared_experts, Fe = expert_ffn) and E/ep routed experts of 3 h Fe each (whole:
    ep splits experts, not their columns), no biases.

    Returns layer (one dense layer), layers (all), embedding, positions, head, final_norm, total,
    and replicated: the parameters every tp rank holds in full (norms, row-parallel biases,
    positions, a whole vocabulary, routers), so that for G >= t
        tp * (total - experts) == cfg.num_params() - routed + (tp - 1) * replicated
    (routed: every routed expert's parameters, 0 for a dense model) and for G < t the K/V rows
    add (t - G) D (h + bias) each, per layer. For an MoE model also moe_layer (one MoE layer,
    its E/ep experts included) and experts (the routed experts' parameters on this rank, all
    layers: E/ep x 3 h Fe per MoE layer, exactly 1/ep of them).
    """
    t = tp
    split = vocab_parallel and t > 1
    ParallelConfig(tp=t, vocab_parallel="on" if split else "off").check_model(cfg)
    check_experts(cfg, ep)
    h, D, f, V, bias = cfg.d_model, cfg.head_dim, cfg.d_ff // t, cfg.vocab_size, int(cfg.bias)
    heads, kv_heads = cfg.n_heads // t, max(cfg.n_kv_heads // t, 1)
    n_fc = 2 if cfg.activation == "swiglu" else 1
    norm = h * (2 if cfg.norm == "layernorm" and cfg.bias else 1)
    row_bias = h * bias  # the out projection's (and the MLP down projection's) bias: whole
    attention = ((heads + 2 * kv_heads) * D * (h + bias)  # column-parallel Q, K, V
                 + h * heads * D + row_bias)  # row-parallel out projection
    layer = attention + n_fc * f * (h + bias) + h * f + row_bias + 2 * norm  # + MLP and norms
    vocab_rows = V // t if split else V
    n_moe = moe_layers(cfg)
    experts = cfg.n_experts // ep * 3 * h * cfg.expert_ffn  # E/ep routed SwiGLU experts, whole
    router = cfg.n_experts * h
    moe_layer = attention + router + 3 * h * (cfg.n_shared_experts * cfg.expert_ffn // t) + experts + 2 * norm
    out = {
        "layer": layer,
        "layers": (cfg.n_layers - n_moe) * layer + n_moe * moe_layer,
        "embedding": vocab_rows * h,
        "positions": cfg.max_seq_len * h if cfg.position == "learned" else 0,
        "head": 0 if cfg.tie_embeddings else vocab_rows * h,
        "final_norm": norm,
    }
    out["total"] = sum(out[k] for k in ("layers", "embedding", "positions", "head", "final_norm"))
    whole_vocab = 0 if split else out["embedding"] + out["head"]
    out["replicated"] = ((cfg.n_layers - n_moe) * (2 * norm + 2 * row_bias) + n_moe * (2 * norm + row_bias + router)
                         + norm + out["positions"] + (whole_vocab if t > 1 else 0))
    if cfg.is_moe:
        out.update(moe_layer=moe_layer, experts=n_moe * experts)
    return out


def state_bytes(cfg: ModelConfig, tp: int = 1, dp: int = 1, shard: str = "none", vocab_parallel: bool = True,
                weight_bytes: int = 4, grad_bytes: int = 4, optim_bytes: int = 8, ep: int = 1,
                shard_experts: bool = True) -> dict:
    """Weights, gradients and optimizer state one rank holds, in bytes.

    P = params_per_rank(cfg, tp, vocab_parallel)["total"] (the tp split). Then over the dp ranks
    that hold the same P (pass dp * cp when sharding over both, as parameters are replicated over
    cp too), ZeRO (Rajbhandari et al. 2020) keeps ceil(P / dp) elements (a flat buffer padded to
    a multiple of dp) of:
        "none"   nothing sharded
        "zero1"  optimizer state (stage 1, P_os)
        "zero2"  optimizer state and gradients (stage 2, P_os+g)
        "zero3"  optimizer state, gradients and weights (stage 3, P_os+g+p; FSDP's full shard)
    Defaults: fp32 weights and gradients (meshattn's autocast keeps fp32 master weights), AdamW's
    two fp32 moments (8 bytes per parameter). Transient buffers (ZeRO-3's gathered layer,
    autocast's 16-bit weight copies, communication buckets) are not counted.

    An MoE model's routed experts (P_e = params_per_rank(...)["experts"], E/ep per MoE layer) are
    held by the edp = dp * tp / ep ranks of the same experts (the world over ep), so ZeRO shards
    them over edp apart: ceil((P - P_e) / dp) + ceil(P_e / edp), except where edp is the dp group
    itself (ep = 1, tp = 1: one flat buffer, ceil(P / dp)). shard_experts=False: the experts stay
    whole (meshattn's --shard dp leaves them to their ep split): ceil((P - P_e) / dp) + P_e.
    Returns params (P), weights, gradients, optimizer and total; for an MoE model also
    expert_params (P_e) and experts: the bytes of the experts' weights, gradients and optimizer
    state among the total.
    """
    if shard not in SHARD_MODES:
        raise ValueError(f"shard={shard!r} is unknown; choose one of {SHARD_MODES}")
    if dp < 1:
        raise ValueError(f"dp={dp} must be a positive integer")
    if shard != "none" and shard_experts and (dp * tp) % ep:
        raise ValueError(f"ZeRO shards the experts over their dp x tp / ep copies: dp x tp = {dp * tp} must be a "
                         f"multiple of ep={ep}")
    counts = params_per_rank(cfg, tp, vocab_parallel, ep)
    P, P_e = counts["total"], counts.get("experts", 0)
    edp = max(dp * tp // ep, 1)  # ranks holding the same experts
    if P_e and not shard_experts:
        expert_part = P_e
        part = -(-(P - P_e) // dp) + P_e
    elif P_e == 0 or (ep == 1 and tp == 1):
        part = -(-P // dp)  # ceil(P / dp)
        expert_part = -(-P_e // dp)  # (their share of the flat buffer; unpadded)
    else:
        expert_part = -(-P_e // edp)
        part = -(-(P - P_e) // dp) + expert_part
    level = SHARD_MODES.index(shard)  # how many of optimizer, gradients, weights are sharded
    out = {
        "params": P,
        "weights": (part if level >= 3 else P) * weight_bytes,
        "gradients": (part if level >= 2 else P) * grad_bytes,
        "optimizer": (part if level >= 1 else P) * optim_bytes,
    }
    out["total"] = out["weights"] + out["gradients"] + out["optimizer"]
    if cfg.is_moe:
        own = [expert_part if level >= n else P_e for n in (3, 2, 1)]  # weights, gradients, optimizer
        out.update(expert_params=P_e,
                   experts=own[0] * weight_bytes + own[1] * grad_bytes + own[2] * optim_bytes)
    return out
