"""The planner's FLOP and memory formulas: hand-computed cases, the papers' formulas as special
cases (exactly), monotonicity, and (tp=1, in process) what autograd really saves."""

from __future__ import annotations

import dataclasses
from fractions import Fraction

import pytest

from meshattn.config import ConfigError, ModelConfig, divisors
from meshattn.planner.flops import (attention_pairs2, forward_flops, model_flops_korthikanti, narayanan_flops,
                                    step_flops)
from meshattn.planner.memory import (activation_bytes_per_layer, korthikanti_activation_bytes, params_per_rank,
                                     state_bytes)

# h=8, H=2, G=1, D=4, F=16, V=32, L=3, SwiGLU
SMALL = ModelConfig(d_model=8, n_heads=2, n_kv_heads=1, n_layers=3, d_ff=16, vocab_size=32, max_seq_len=16,
                    norm="rmsnorm", activation="swiglu")


def gpt(h=12288, a=96, layers=96, vocab=51200, seq=2048) -> ModelConfig:
    """The papers' model: MHA, GELU, d_ff = 4h, LayerNorm (GPT-3 175B by default)."""
    return ModelConfig(d_model=h, n_heads=a, n_layers=layers, vocab_size=vocab, max_seq_len=seq, norm="layernorm",
                       position="learned", activation="gelu", bias=True)


# -- FLOPs ------------------------------------------------------------------------------------

def test_forward_flops_by_hand():
    f = forward_flops(SMALL, batch=2, seq=4)  # 8 tokens, causal: 4*5/2 = 10 visible pairs
    assert f == {
        "qkv": 3 * 2 * 8 * 8 * (2 + 2) * 4,  # 2 n h (H + 2G) D = 2048 per layer
        "attention": 3 * 2 * (2 * 2 * 2 * 4 * 10),  # Q K^T and P V: 2 B H D pairs each = 320
        "out_proj": 3 * 2 * 8 * 8 * 8,  # 1024
        "mlp": 3 * 2 * 8 * 8 * 16 * 3,  # fc, gate, down: 6144
        "blocks": 6144 + 1920 + 3072 + 18432,
        "lm_head": 2 * 8 * 8 * 32,  # 4096
        "total": 29568 + 4096,
    }
    gelu = forward_flops(dataclasses.replace(SMALL, activation="gelu"), 2, 4)
    assert gelu["mlp"] == 3 * 2 * 8 * 8 * 16 * 2
    assert forward_flops(SMALL, 2, 4, causal=False)["attention"] == 3 * 2 * (2 * 2 * 2 * 4 * 16)  # all 16 pairs
    assert forward_flops(SMALL, 2, 4, causal_pairs="half")["attention"] == 3 * 2 * (2 * 2 * 2 * 4 * 8)  # 16 / 2


def test_attention_pairs_exact_half_and_window():
    for S in range(1, 12):
        assert attention_pairs2(S, causal=False) == 2 * S * S
        assert attention_pairs2(S) == S * (S + 1)
        assert attention_pairs2(S, causal_pairs="half") == S * S
        for w in range(1, S + 3):
            visible = sum(1 for i in range(S) for j in range(S) if j <= i and i - j < w)  # brute force
            assert attention_pairs2(S, window=w) == 2 * visible
    assert attention_pairs2(6, window=2, causal_pairs="half") == 2 * (6 * 2 - 2 * 2 / 2)  # S w - w^2/2
    with pytest.raises(ValueError, match="causal_pairs"):
        attention_pairs2(4, causal_pairs="quarter")


def test_step_flops_by_hand():
    f = forward_flops(SMALL, 2, 4)
    none = step_flops(SMALL, 2, 4)
    assert none == {"forward": 33664, "backward": 2 * 33664, "recompute": 0, "model": 3 * 33664, "total": 3 * 33664}
    assert step_flops(SMALL, 2, 4, "selective")["total"] == 3 * 33664 + f["attention"]  # 1920
    assert step_flops(SMALL, 2, 4, "full")["total"] == 3 * 33664 + f["blocks"]  # 29568: not the head
    for name, alias in (("selective", "attention"), ("full", "block")):
        assert step_flops(SMALL, 2, 4, alias) == step_flops(SMALL, 2, 4, name)
        assert step_flops(SMALL, 2, 4, name)["model"] == none["model"]
    with pytest.raises(ValueError, match="recompute"):
        step_flops(SMALL, 2, 4, "some")


@pytest.mark.parametrize("B,s,l,h,a,V", [(1536, 2048, 96, 12288, 96, 51200),  # GPT-3 175B
                                         (1, 8, 2, 16, 2, 64), (3, 7, 5, 24, 4, 100)])
def test_step_flops_equal_the_papers(B, s, l, h, a, V):
    """Both papers count matmuls only, every attention pair (no causal saving), the embedding as
    no FLOPs and the logit layer forward + backward (6 B s h V, never recomputed): so does
    step_flops with causal=False, and the equality is exact."""
    cfg = gpt(h, a, l, V, s)
    full = step_flops(cfg, B, s, "full", causal=False)
    none = step_flops(cfg, B, s, "none", causal=False)
    assert full["total"] == narayanan_flops(B, s, l, h, V)
    assert none["model"] == none["total"] == model_flops_korthikanti(B, s, l, h, V)
    assert full["model"] == model_flops_korthikanti(B, s, l, h, V)  # model FLOPs ignore recomputation
    # the papers' factored forms, evaluated exactly
    assert narayanan_flops(B, s, l, h, V) == 96 * B * s * l * h**2 * (1 + Fraction(s, 6 * h) + Fraction(V, 16 * l * h))
    assert model_flops_korthikanti(B, s, l, h, V) == (72 * B * s * l * h**2
                                                      * (1 + Fraction(s, 6 * h) + Fraction(V, 12 * l * h)))
    # Narayanan - Korthikanti = one more forward of the blocks, 24 B s l h^2 + 4 B s^2 l h
    assert narayanan_flops(B, s, l, h, V) - model_flops_korthikanti(B, s, l, h, V) == full["recompute"]
    # Counting only the visible causal pairs S(S+1)/2 saves 2 B h S (S - 1) per layer and forward
    # pass: 4 passes with full recomputation, 3 without.
    saving = 2 * B * h * s * (s - 1) * l
    assert narayanan_flops(B, s, l, h, V) - step_flops(cfg, B, s, "full")["total"] == 4 * saving
    assert model_flops_korthikanti(B, s, l, h, V) - step_flops(cfg, B, s)["model"] == 3 * saving
    # and the S^2/2 convention saves 2 B h S^2 per layer and pass
    assert narayanan_flops(B, s, l, h, V) - step_flops(cfg, B, s, "full", causal_pairs="half")["total"] == (
        4 * 2 * B * h * s * s * l)


# -- activation memory ------------------------------------------------------------------------

def test_korthikanti_activation_bytes_by_hand():
    # s=4, b=2, h=8, a=2: s b h = 64, 5 a s^2 b = 320
    k = lambda **kw: korthikanti_activation_bytes(4, 2, 8, 2, **kw)  # noqa: E731
    assert k() == 64 * 34 + 320 == 2496
    assert k(tp=2) == 640 + (1536 + 320) // 2 == 1568
    assert k(tp=2, sequence_parallel=True) == (2176 + 320) // 2 == 1248
    assert k(tp=2, recompute="selective") == 640 + 1536 // 2 == 1408
    assert k(tp=2, sequence_parallel=True, recompute="selective") == 2176 // 2 == 1088
    assert k(tp=2, recompute="full") == k(tp=2, sequence_parallel=True, recompute="full") == k(recompute="full") == 128
    assert k(tp=3) == pytest.approx(640 + 1856 / 3)  # not whole bytes: a float
    assert isinstance(k(tp=3), float) and isinstance(k(tp=2), int)
    # GPT-3, t = 8: the paper's factored forms, exactly
    s, b, h, a, t = 2048, 1, 12288, 96, 8
    sbh = s * b * h
    assert korthikanti_activation_bytes(s, b, h, a) == sbh * (34 + Fraction(5 * a * s, h))
    assert korthikanti_activation_bytes(s, b, h, a, t) == sbh * (10 + Fraction(24, t) + Fraction(5 * a * s, h * t))
    assert korthikanti_activation_bytes(s, b, h, a, t, True) == Fraction(sbh, t) * (34 + Fraction(5 * a * s, h))
    assert korthikanti_activation_bytes(s, b, h, a, t, True, "selective") == Fraction(sbh, t) * 34


PAPER = dict(dtype_bytes=2, dropout=True, attention="unfused", small_terms=False)


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
@pytest.mark.parametrize("sp", [False, True])
@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_activation_bytes_reduce_to_korthikanti(tp, sp, recompute):
    """The paper's model (MHA, 4h GELU MLP, LayerNorm, dropout, unfused attention, 16-bit
    activations, per-token statistics neglected) gives the paper's formula exactly; the one
    difference: full recomputation under sequence parallelism keeps the layer input's sequence
    shard, 2 s b h / t, where Table 2 lists 2 s b h."""
    s, b, h, a = 64, 3, 64, 8
    cfg = gpt(h, a, 2, 256, s)
    ours = activation_bytes_per_layer(cfg, b, s, tp, sp, recompute, **PAPER)
    paper = korthikanti_activation_bytes(s, b, h, a, tp, sp, recompute)
    if recompute == "full" and sp:
        assert ours["total"] * tp == paper
    else:
        assert ours["total"] == paper
    # The statistics the paper neglects: LayerNorm's mean and rstd, fp32, two norms per layer.
    with_stats = activation_bytes_per_layer(cfg, b, s, tp, sp, recompute, **{**PAPER, "small_terms": True})
    assert with_stats["total"] - ours["total"] == (0 if recompute == "full" else 2 * 2 * 4 * s * b // (tp if sp else 1))


def test_activation_bytes_by_hand():
    # h=16, H=4, G=2 (D=4), F=32, SwiGLU, RMSNorm; b=1, s=4 (n=4), tp=2 (2 query heads, 1 KV head
    # per rank), fp32. An (n, h) tensor between regions: 64 elements, 256 bytes.
    cfg = ModelConfig(d_model=16, n_heads=4, n_kv_heads=2, n_layers=2, d_ff=32, vocab_size=64, norm="rmsnorm",
                      activation="swiglu")
    got = activation_bytes_per_layer(cfg, 1, 4, tp=2, dtype_bytes=4)
    assert got == {"norm1_input": 256, "qkv_input": 256,
                   "q": 128, "k": 128, "v": 128,  # 4 tokens x 2 heads x D=4 x 4 B: K/V repeated to 2 heads
                   "lse": 32,  # 4 tokens x 2 heads, fp32
                   "attn_out": 128, "norm2_input": 256, "mlp_input": 256,
                   "gate": 256, "silu": 256, "fc": 256, "mlp_hidden": 256,  # 4 tokens x F/2=16 x 4 B
                   "norm_stats": 32,  # rstd of 4 tokens, two norms
                   "total": 2624}
    # GQA kept grouped (a kernel that reads grouped heads): K and V at 1 head per rank
    assert activation_bytes_per_layer(cfg, 1, 4, tp=2, dtype_bytes=4, repeat_kv=False)["total"] == 2624 - 128
    # selective: no lse, and the checkpoint keeps k, v before the repeat
    sel = activation_bytes_per_layer(cfg, 1, 4, tp=2, dtype_bytes=4, recompute="selective")
    assert (sel["k"], sel["v"], "lse" in sel, sel["total"]) == (64, 64, False, 2624 - 128 - 32)
    # sequence parallel: the four (n, h) tensors and the statistics halve
    assert activation_bytes_per_layer(cfg, 1, 4, 2, True, dtype_bytes=4)["total"] == 2624 - 4 * 128 - 16
    assert activation_bytes_per_layer(cfg, 1, 4, 2, False, "full", dtype_bytes=4) == {"block_input": 256, "total": 256}
    assert activation_bytes_per_layer(cfg, 1, 4, 2, True, "full", dtype_bytes=4)["total"] == 128
    # autocast: 16-bit tensors, fp32 residual (RMSNorm inputs) and statistics, and the block's
    # 16-bit weight copies: (2 + 2*1) * 4 * 16 (Q,K,V) + 16 * 8 (out) + 2 * 16 * 16 (fc, gate)
    # + 16 * 16 (down) = 1152 elements
    ac = activation_bytes_per_layer(cfg, 1, 4, tp=2, dtype_bytes=2, autocast=True)
    assert ac["norm1_input"] == 256 and ac["qkv_input"] == 128 and ac["q"] == 64 and ac["lse"] == 32
    assert ac["weight_casts"] == 1152 * 2 and "input_casts" not in ac
    assert ac["total"] == 256 + 128 + 3 * 64 + 32 + 64 + 256 + 128 + 4 * 64 * 2 + 32 + 2304
    # at tp=1 too the region casts the shared input of Q/K/V (and of fc/gate) once
    assert "input_casts" not in activation_bytes_per_layer(cfg, 1, 4, dtype_bytes=2, autocast=True)
    with pytest.raises(ConfigError):
        activation_bytes_per_layer(cfg, 1, 4, tp=3)
    with pytest.raises(ValueError, match="multiple of tp"):
        activation_bytes_per_layer(cfg, 1, 5, tp=2, sequence_parallel=True)
    with pytest.raises(ValueError, match="attention"):
        activation_bytes_per_layer(cfg, 1, 4, attention="flash2")


MONO = [gpt(64, 8, 2, 256, 64),
        ModelConfig(d_model=32, n_heads=4, n_kv_heads=1, d_ff=64, norm="rmsnorm", activation="swiglu"),
        ModelConfig(d_model=64, n_heads=8, n_kv_heads=2, d_ff=96, vocab_size=256, activation="swiglu")]


@pytest.mark.parametrize("cfg", MONO, ids=["mha-gelu", "mqa-swiglu", "gqa-swiglu"])
def test_more_tp_never_raises_activations(cfg):
    legal = [t for t in divisors(cfg.n_heads) if cfg.d_ff % t == 0
             and (cfg.n_kv_heads % t == 0 or t % cfg.n_kv_heads == 0)]
    assert len(legal) >= 3
    for recompute in ("none", "selective", "full"):
        for kw in ({}, {"autocast": True}, {"repeat_kv": False}, {"attention": "unfused", "dropout": True}):
            for sp in (False, True):
                per_t = [activation_bytes_per_layer(cfg, 2, 64, t, sp, recompute, **kw)["total"] for t in legal]
                assert per_t == sorted(per_t, reverse=True), (recompute, kw, sp, per_t)
                if sp:  # sequence parallelism never keeps more than tensor parallelism alone
                    assert all(x <= activation_bytes_per_layer(cfg, 2, 64, t, False, recompute, **kw)["total"]
                               for t, x in zip(legal, per_t))
            paper = [korthikanti_activation_bytes(64, 2, cfg.d_model, cfg.n_heads, t, False, recompute) for t in legal]
            assert paper == sorted(paper, reverse=True)


def test_activation_bytes_equal_what_autograd_saves():
    """tp=1 in process: the bytes autograd saves in one block of the parallel model (parameters
    and the rotary tables, shared by all blocks, excluded), float32 and autocast. Without
    recomputation only: checkpointing imports torch._dynamo (2.4 s here). (Each recompute mode,
    and tp=2 with and without sequence parallelism and with replicated KV heads, agree to the
    byte as well, measured the same way; that takes the import and a process group, so it is
    not repeated here.)"""
    torch = pytest.importorskip("torch")
    from meshattn.bench.memory import SavedActivations
    from meshattn.comm import Axis
    from meshattn.model.transformer import rotary_tables
    from meshattn.parallel.region import Region
    from meshattn.parallel.transformer import ParallelBlock

    B, S = 2, 16
    for cfg in (ModelConfig(d_model=32, n_heads=4, n_kv_heads=2, n_layers=1, d_ff=64, vocab_size=64, max_seq_len=S,
                            norm="rmsnorm", activation="swiglu"),
                ModelConfig(d_model=32, n_heads=2, n_layers=1, vocab_size=64, max_seq_len=S, norm="layernorm",
                            position="learned", activation="gelu", bias=True)):
        rope = rotary_tables(torch.arange(S), cfg.head_dim, cfg.rope_theta, torch.float32) if cfg.position == "rope" \
            else None
        block = ParallelBlock(cfg, "blocks.0", Region(Axis.single("tp"), False), Axis.single("kv"))
        with torch.no_grad():
            for p in block.parameters():
                p.normal_(0, 0.02)
        for autocast in (False, True):
            x = torch.randn(B, S, cfg.d_model, requires_grad=True)  # the fp32 residual stream
            with SavedActivations([*block.parameters(), *(rope or ())]) as saved, \
                    torch.autocast("cpu", torch.bfloat16, enabled=autocast):
                block(x, rope)
            want = activation_bytes_per_layer(cfg, B, S, dtype_bytes=2 if autocast else 4, autocast=autocast)
            assert saved.nbytes == want["total"], (cfg.norm, autocast, saved.nbytes, want)


# -- parameters, gradients, optimizer state ---------------------------------------------------

def test_params_per_rank_by_hand_with_replicated_kv():
    cfg = dataclasses.replace(SMALL, n_layers=2)  # h=8, H=2, G=1, D=4, F=16, V=32, SwiGLU, no bias
    p = params_per_rank(cfg, tp=2)
    # per layer: Q 1 head + K, V 1 head each (G=1 < tp=2: replicated): 3*4*8 = 96; out 8*4 = 32;
    # fc, gate 2*8*8 = 128, down 8*8 = 64; two RMSNorms 16
    assert p == {"layer": 336, "layers": 672, "embedding": 16 * 8, "positions": 0, "head": 16 * 8, "final_norm": 8,
                 "total": 936, "replicated": 2 * 16 + 8}
    assert cfg.num_params() == 1704
    # summed over tp: each replicated part once more, and the K/V head on both ranks (2 * 4 * 8 per layer)
    assert 2 * p["total"] == cfg.num_params() + 40 + 2 * 64
    s = state_bytes(cfg, tp=2, dp=3)
    assert s == {"params": 936, "weights": 3744, "gradients": 3744, "optimizer": 7488, "total": 14976}
    assert state_bytes(cfg, tp=2, dp=3, shard="zero1")["optimizer"] == 312 * 8
    assert state_bytes(cfg, tp=2, dp=3, shard="zero1")["gradients"] == 3744
    assert state_bytes(cfg, tp=2, dp=3, shard="zero2")["gradients"] == 312 * 4
    z3 = state_bytes(cfg, tp=2, dp=5, shard="zero3")  # ceil(936 / 5) = 188
    assert (z3["weights"], z3["gradients"], z3["optimizer"]) == (188 * 4, 188 * 4, 188 * 8)
    assert state_bytes(cfg, tp=2, dp=5, shard="zero3", weight_bytes=2, grad_bytes=2, optim_bytes=12)["total"] == (
        188 * 16)
    with pytest.raises(ValueError, match="shard"):
        state_bytes(cfg, shard="zero4")
    with pytest.raises(ConfigError):
        params_per_rank(cfg, tp=4)  # 2 query heads over 4 ranks


def test_params_summed_over_tp_equal_num_params_plus_replicated():
    # GPT-2 shaped: LayerNorm with bias, learned positions, GELU, biases, tied embeddings; MHA
    cfg = ModelConfig(d_model=8, n_heads=4, n_layers=2, d_ff=32, vocab_size=64, max_seq_len=16, norm="layernorm",
                      position="learned", activation="gelu", bias=True, tie_embeddings=True)
    # replicated: per layer two LayerNorms (2 * 16) and the two row-parallel biases (2 * 8); the
    # final norm 16; positions 16 * 8
    replicated = 2 * (32 + 16) + 16 + 128
    for t in (1, 2, 4):
        p = params_per_rank(cfg, t)
        assert p["replicated"] == replicated
        assert t * p["total"] == cfg.num_params() + (t - 1) * replicated
        whole = params_per_rank(cfg, t, vocab_parallel=False)  # the (tied) embedding on every rank
        assert t * whole["total"] == cfg.num_params() + (t - 1) * (replicated + 64 * 8)
    assert params_per_rank(cfg, 1)["total"] == cfg.num_params()
    assert state_bytes(cfg)["weights"] == 4 * cfg.num_params()


def test_params_per_rank_equal_the_parallel_model():
    """The local parameters ParallelTransformer declares (tp rank 0 of 4; no process group
    needed to build it), ties counted once."""
    pytest.importorskip("torch")
    from meshattn.comm import Axis
    from meshattn.parallel.transformer import ParallelTransformer

    for cfg in (ModelConfig(d_model=16, n_heads=4, n_kv_heads=2, n_layers=2, d_ff=32, vocab_size=64, bias=True,
                            norm="rmsnorm", activation="swiglu"),
                ModelConfig(d_model=16, n_heads=4, n_kv_heads=1, n_layers=2, d_ff=32, vocab_size=64, bias=True,
                            norm="layernorm", position="learned", tie_embeddings=True)):
        for vocab in (True, False):
            tp = Axis("tp", None, 4, 0)
            model = ParallelTransformer(cfg, tp, Axis("kv", None, 2, 0), vocab_parallel=vocab)
            assert sum(p.numel() for p in model.parameters()) == params_per_rank(cfg, 4, vocab)["total"]
