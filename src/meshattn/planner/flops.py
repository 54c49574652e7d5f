"""FLOPs of the model's forward pass and of a training step, from sizes alone (pure integers).

Convention: a multiply-add is 2 FLOPs, and only matrix products are counted: the Q/K/V, output,
MLP (or router and experts) and LM-head projections and the attention core's Q K^T and P V.
Everything else is O(B*S*h) elementwise work (embedding lookup, norms, rotary angles, softmax,
GELU/SiLU, residual adds, biases, the loss, an MoE layer's routing and gating) and is left out,
as Narayanan et al. 2021 and Korthikanti et al. 2022 leave it out; so `step_flops` of their
model equals their formulas exactly (see the tests).

Notation: B batch, S sequence, L layers, h = d_model, H query heads, G KV heads, D head dim,
F = d_ff, V vocabulary. All results are whole-model FLOPs for B sequences of S tokens (not per
tensor-parallel rank; a whole vocabulary computes the head on every tp rank, see
ParallelConfig.splits_vocab).
"""

from __future__ import annotations

from ..config import ModelConfig
from .moe import moe_layers

# Checkpointing modes: the planner's names and config.Recompute's names for the same thing.
RECOMPUTE = {"none": "none", "selective": "selective", "attention": "selective", "full": "full", "block": "full"}
CAUSAL_PAIRS = ("exact", "half")


def recompute_mode(recompute: str) -> str:
    """'none', 'selective' (also 'attention') or 'full' (also 'block'); anything else refused."""
    try:
        return RECOMPUTE[recompute]
    except (KeyError, TypeError):
        raise ValueError(f"recompute={recompute!r} is unknown; choose one of {tuple(RECOMPUTE)}") from None


def attention_pairs2(seq: int, causal: bool = True, window: int | None = None, causal_pairs: str = "exact") -> int:
    """Twice the (query, key) pairs one head of one sequence scores (twice, so that "half" stays
    an integer).

    causal=False: S^2 (every pair; what both papers count).
    causal_pairs="exact": the pairs the causal (and sliding-window) mask leaves visible: query i
        (0-based) sees min(i + 1, w) keys, sum = S(S+1)/2 without a window, w(w+1)/2 + (S-w) w
        with a window w < S.
    causal_pairs="half": the continuous area, the usual "causal halving": S^2/2, or S w - w^2/2
        with a window w < S.
    """
    if causal_pairs not in CAUSAL_PAIRS:
        raise ValueError(f"causal_pairs={causal_pairs!r} is unknown; choose one of {CAUSAL_PAIRS}")
    if not causal:
        return 2 * seq * seq
    w = seq if window is None or window >= seq else window
    if causal_pairs == "half":
        return 2 * seq * w - w * w  # = S^2 when w = S
    return w * (w + 1) + 2 * (seq - w) * w  # = S(S+1) when w = S


def forward_flops(cfg: ModelConfig, batch: int, seq: int, causal: bool = True, causal_pairs: str = "exact") -> dict:
    """Forward FLOPs of B sequences of S tokens, by part, summed over the L layers:

        qkv        2 B S h (H + 2G) D            per layer (fused Q/K/V, grouped KV heads)
        attention  2 * 2 B H D pairs             per layer: Q K^T and P V, pairs = S^2 or the
                                                 causal count (attention_pairs2; cfg.window applies)
        out_proj   2 B S (H D) h                 per layer
        mlp        2 B S h F (n + 1)             per layer; n = 1 matmul before the activation
                                                 for GELU, 2 (fc and gate) for SwiGLU
        lm_head    2 B S h V                     once (tied or not: the same matmul)
        blocks     the parts above but the head; total = blocks + lm_head; the embedding
                   lookup is no matmul.

    Mixture of experts (cfg.is_moe; these keys only then): the first cfg.dense_layers layers keep
    the dense MLP ("mlp" counts those), every other layer's feed-forward is, per token, its
    active parameters only (Fe = cfg.expert_ffn, E experts, k = top_k, s shared experts):
        router         2 B S h E                 per MoE layer (float64 logits: counted as matmul
                                                 FLOPs all the same)
        experts        2 B S k (3 h Fe)          per MoE layer: the k routed SwiGLU experts
                                                 (gate, up, down) of every token; capacity drops
                                                 are not subtracted (dropless)
        shared_expert  2 B S (3 h s Fe)          per MoE layer: the shared SwiGLU of s Fe

    For MHA, GELU and F = 4h without causal saving a layer is 24 B S h^2 + 4 B S^2 h, as in
    Narayanan et al. 2021, sec. 5.1.
    """
    n = batch * seq  # tokens
    H, G, D, h, F, L = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model, cfg.d_ff, cfg.n_layers
    n_fc = 2 if cfg.activation == "swiglu" else 1
    pairs2 = attention_pairs2(seq, causal, cfg.window, causal_pairs)  # 2 x (query, key) pairs per head
    out = {
        "qkv": L * 2 * n * h * (H + 2 * G) * D,
        "attention": L * 2 * batch * H * D * pairs2,  # = L * 4 B H D pairs: Q K^T and P V
        "out_proj": L * 2 * n * H * D * h,
        "mlp": (L - moe_layers(cfg)) * 2 * n * h * F * (n_fc + 1),
    }
    if cfg.is_moe:
        out.update(moe_forward_flops(cfg, n))
    out["blocks"] = sum(out.values())
    out["lm_head"] = 2 * n * h * cfg.vocab_size
    out["total"] = out["blocks"] + out["lm_head"]
    return out


def moe_forward_flops(cfg: ModelConfig, tokens: int) -> dict:
    """Forward FLOPs of the MoE layers' feed-forward on `tokens` tokens, summed over the MoE
    layers: router, routed experts (k per token) and shared expert (see forward_flops)."""
    layers, h, f = moe_layers(cfg), cfg.d_model, cfg.expert_ffn
    swiglu = 2 * tokens * 3 * h * f  # one SwiGLU of width Fe on every token: gate, up, down
    return {"router": layers * 2 * tokens * h * cfg.n_experts,
            "experts": layers * cfg.top_k * swiglu,
            "shared_expert": layers * cfg.n_shared_experts * swiglu}


def step_flops(cfg: ModelConfig, batch: int, seq: int, recompute: str = "none", causal: bool = True,
               causal_pairs: str = "exact") -> dict:
    """FLOPs of one training step (forward + backward) on B sequences of S tokens.

    Convention: backward = 2 x forward for every matmul (the input gradient and the weight
    gradient each cost one forward; for the attention core dQ, dK and dV, dP likewise); the
    first layer's input gradient is counted (the embedding's gradient needs it). Recomputation
    adds, before backward:
        "none"                        nothing;
        "selective" (or "attention")  the attention core's forward again (Q K^T and P V:
                                      Korthikanti et al.'s selective recomputation);
        "full" (or "block")           the blocks' whole forward again (each block keeps only its
                                      input); the LM head is not recomputed (as in Megatron and in
                                      meshattn's Recompute.BLOCK, which checkpoints blocks only).
    FlashAttention-style kernels recompute Q K^T inside their backward as well; that is the
    kernel's choice, not counted here.

    Returns forward, backward, recompute, model (= forward + backward: the model FLOPs of
    Korthikanti et al. 2022, used for MFU) and total (= model + recompute: the hardware FLOPs;
    with "full" and causal=False on their model, Narayanan et al.'s eq. 3).
    """
    mode = recompute_mode(recompute)
    fwd = forward_flops(cfg, batch, seq, causal, causal_pairs)
    redo = {"none": 0, "selective": fwd["attention"], "full": fwd["blocks"]}[mode]
    out = {"forward": fwd["total"], "backward": 2 * fwd["total"], "recompute": redo}
    out["model"] = out["forward"] + out["backward"]
    out["total"] = out["model"] + redo
    return out


def narayanan_flops(batch: int, seq: int, layers: int, hidden: int, vocab: int) -> int:
    """Narayanan et al. 2021 (SC'21, "Efficient Large-Scale Language Model Training on GPU
    Clusters Using Megatron-LM"), eq. 3: FLOPs of one iteration with full activation
    recomputation,

        F = 96 B s l h^2 (1 + s/(6h) + V/(16 l h))
          = 96 B s l h^2 + 16 B s^2 l h + 6 B s h V        (the exact integer returned)

    i.e. 4 x (24 B s h^2 + 4 B s^2 h) per layer (forward, recomputed forward, backward = 2x)
    plus 6 B s h V for the logit layer (forward and backward, not recomputed). Counts every
    attention pair (no causal saving), matmuls only, the embedding as no FLOPs.
    """
    B, s, l, h, V = batch, seq, layers, hidden, vocab
    return 96 * B * s * l * h * h + 16 * B * s * s * l * h + 6 * B * s * h * V


def model_flops_korthikanti(batch: int, seq: int, layers: int, hidden: int, vocab: int) -> int:
    """Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models"),
    model FLOPs of one iteration, without recomputation (the numerator of their MFU):

        F = 72 B s l h^2 (1 + s/(6h) + V/(12 l h))
          = 72 B s l h^2 + 12 B s^2 l h + 6 B s h V        (the exact integer returned)

    i.e. 3 x (24 B s h^2 + 4 B s^2 h) per layer plus 6 B s h V for the logit layer.
    """
    B, s, l, h, V = batch, seq, layers, hidden, vocab
    return 72 * B * s * l * h * h + 12 * B * s * s * l * h + 6 * B * s * h * V
