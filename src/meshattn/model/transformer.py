"""The single-device reference Transformer: the oracle every parallel path is checked against.

A decoder-only language model: token embedding (+ learned positions), pre-norm blocks of
causal multi-head self-attention (fused QKV, grouped-query heads, rotary or learned positions,
an optional sliding window, packed documents given as per-token ids) and an MLP, a final norm
and the LM head. Masks other than plain causal are built dense here: it is the oracle. It never
imports torch.distributed.

Notation in shape comments: B batch, S sequence, H query heads, G KV heads, D head dim,
h = d_model, F = d_ff, V vocabulary.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from .mask import dense_mask, document_positions
from .moe import MoE


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


def rotary_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype,
                  scaling: tuple[float, float, float, int] | None = None):
    """cos and sin of the rotary angles for integer positions (S,) or (B, S) -> two (..., D/2) tables.

    Angles are computed in float64 and rounded once, so every layout that feeds the same
    global positions gets bitwise the same tables. `scaling`: Llama-3's frequency scaling
    (ModelConfig.rope_scaling; see scaled_frequencies).
    """
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (D/2,)
    if scaling is not None:
        inv_freq = scaled_frequencies(inv_freq, *scaling)
    angles = positions.to(torch.float64)[..., None] * inv_freq  # (S | B, S, D/2)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def scaled_frequencies(inv_freq: torch.Tensor, factor: float, low_freq_factor: float, high_freq_factor: float,
                       original_context: int) -> torch.Tensor:
    """Llama 3.1's long-context rotary frequencies: wavelengths shorter than
    original_context / high_freq_factor keep their frequency, those longer than
    original_context / low_freq_factor are slowed by `factor`, and the band between blends the
    two linearly in original_context / wavelength."""
    wavelength = 2 * torch.pi / inv_freq  # (D/2,)
    ratio = original_context / wavelength
    blend = ((ratio - low_freq_factor) / (high_freq_factor - low_freq_factor)).clamp(0.0, 1.0)  # 0: slowed, 1: kept
    return (1 - blend) * inv_freq / factor + blend * inv_freq


def rope_for(cfg: ModelConfig, positions: torch.Tensor, dtype: torch.dtype):
    """The rotary tables of cfg for these positions, or None when positions are learned."""
    if cfg.position != "rope":
        return None
    return rotary_tables(positions, cfg.head_dim, cfg.rope_theta, dtype, cfg.rope_scaling)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :D/2], x[..., D/2:]) of x (B, S, heads, D) by the position angles
    (tables (S, D/2), or (B, S, D/2) when positions differ per row, as packed documents' do)."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, S, heads, D/2) each
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # (S | B, S, 1, D/2)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def attention_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """Fused scaled-dot-product attention with grouped KV heads.

    q (B, H, S, D), k and v (B, G, S, D) with H % G == 0; query head i reads KV head i // (H/G).
    mask: the dense bool mask (B | 1, 1, S, S) (model/mask.py) instead of `causal`; a row that
    sees no key gives 0 and passes no gradient. Returns (B, H, S, D).
    """
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:
        k = k.repeat_interleave(n_rep, dim=1)  # (B, H, S, D)
        v = v.repeat_interleave(n_rep, dim=1)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    seen = mask.any(-1, keepdim=True)  # (B | 1, 1, S, 1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | ~seen)  # empty rows: any finite value...
    return out * seen  # ...then zero, with zero gradient


class Attention(nn.Module):
    """Causal self-attention; the fused QKV weight holds rows [Q heads | K heads | V heads]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim,
                             bias=cfg.bias or cfg.qkv_bias)
        self.proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, mask=None,
                cache=None) -> torch.Tensor:
        """cache: this layer's KV cache (inference/cache.py), which stores k and v and attends."""
        core = attention_core if mask is None else functools.partial(attention_core, mask=mask)
        if cache is not None:
            core = functools.partial(cache, inner=core)
        return self.proj(attend(self.qkv(x), self.n_heads, self.n_kv_heads, self.head_dim, rope, core))


def attend(qkv: torch.Tensor, n_heads: int, n_kv_heads: int, head_dim: int, rope, core=attention_core) -> torch.Tensor:
    """From fused projections (B, S, (H + 2G) * D) to the attention output (B, S, H * D).

    Shared by the reference and the parallel attention, which passes its local head counts and,
    when the sequence is split, a context-parallel `core(q, k, v)`.
    """
    q, k, v = qkv.split([n_heads * head_dim, n_kv_heads * head_dim, n_kv_heads * head_dim], dim=-1)
    return attend_split(q, k, v, n_heads, n_kv_heads, head_dim, rope, core)


def attend_split(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_heads: int, n_kv_heads: int, head_dim: int,
                 rope, core=attention_core) -> torch.Tensor:
    """attend() from separate projections q (B, S, H * D), k and v (B, S, G * D)."""
    B, S, _ = q.shape
    q = q.view(B, S, n_heads, head_dim)  # (B, S, H, D)
    k = k.view(B, S, n_kv_heads, head_dim)  # (B, S, G, D)
    v = v.view(B, S, n_kv_heads, head_dim)  # (B, S, G, D)
    if rope is not None:
        # Under autocast the tables stay fp32; keep q and k in the projections' precision.
        q, k = apply_rotary(q, *rope).to(v.dtype), apply_rotary(k, *rope).to(v.dtype)
    y = core(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, H, S, D)
    return y.transpose(1, 2).reshape(B, S, n_heads * head_dim)  # (B, S, H*D)


class MLP(nn.Module):
    """GELU MLP (fc -> gelu -> proj) or SwiGLU (silu(gate) * fc -> proj)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias) if cfg.activation == "swiglu" else None
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(mlp_hidden(self.fc(x), None if self.gate is None else self.gate(x)))


def mlp_hidden(fc: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    return F.gelu(fc) if gate is None else F.silu(gate) * fc


class Block(nn.Module):
    """Pre-norm attention, then the dense MLP or (cfg.moe_layer(layer)) the mixture of experts."""

    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.attn = Attention(cfg)
        self.norm2 = make_norm(cfg)
        moe = cfg.moe_layer(layer)
        self.mlp = None if moe else MLP(cfg)
        self.moe = MoE(cfg) if moe else None

    def forward(self, x: torch.Tensor, rope, mask=None, active=None, stats: list | None = None,
                cache=None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope, mask, cache)
        h = self.norm2(x)
        return x + (self.mlp(h) if self.moe is None else self.moe(h, active, stats))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.position == "learned" else None
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = make_norm(cfg)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 style: normal(0, std) weights, zero biases, output projections scaled by depth."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue  # norms keep their ones/zeros; biases below
            output = name.endswith("proj.weight") or name.endswith("experts.down")
            scale = (2 * self.cfg.n_layers) ** -0.5 if output else 1.0
            nn.init.normal_(p, mean=0.0, std=std * scale)
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(ids)  # (B, S, h)
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        return x

    def rope(self, positions: torch.Tensor, dtype: torch.dtype):
        return rope_for(self.cfg, positions, dtype)

    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None,
                documents: torch.Tensor | None = None, stats: dict | None = None, cache=None):
        """ids (B, S) -> logits (B, S, V), and the loss: the mean next-token loss over targets
        (B, S) that are not -100, plus, for a mixture of experts, aux_loss_coef and z_loss_coef
        times the sum over MoE layers of their load-balancing and z-losses. documents (B, S):
        per-token document ids of packed sequences (negative: padding, which no expert takes);
        attention stays inside a document and, with cfg.document_positions, positions restart at
        each document. cfg.window: sliding-window attention. `stats`, a dict, receives
        "lm_loss" (the next-token loss alone) and "moe": per MoE layer {"aux", "z", "counts"}.
        cache: a KV-cache step (inference/cache.py) giving the tokens' positions (B, S), which are
        not padding, and each layer's attention over the cached keys."""
        S = ids.shape[1]
        positions = torch.arange(S, device=ids.device)
        if documents is not None and self.cfg.document_positions:
            positions = document_positions(documents)  # (B, S)
        if cache is not None:
            positions = cache.positions  # (B, S)
        x = self.embed(ids, positions)
        rope = self.rope(positions, x.dtype)
        mask = None
        if documents is not None or self.cfg.window is not None:
            mask = dense_mask(S, True, self.cfg.window, documents, ids.device)  # the oracle: (B | 1, 1, S, S)
        active = None if documents is None else documents >= 0  # (B, S): padding goes to no expert
        if cache is not None:  # a prefill attends with the dense window mask; a decode has its own
            active = cache.active
        layers: list = []
        for i, block in enumerate(self.blocks):
            x = block(x, rope, mask, active, layers, None if cache is None else cache.layer(i))
        if cache is not None:
            x = cache.select(x)  # a prefill needs each row's last prompt token only: (B, 1, h)
        logits = self.head(self.norm(x))  # (B, S, V)
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, objective(self.cfg, loss, layers, stats)


def objective(cfg: ModelConfig, loss: torch.Tensor | None, layers: list, stats: dict | None) -> torch.Tensor | None:
    """The next-token loss plus aux_loss_coef times the sum of the MoE layers' load-balancing losses
    and z_loss_coef times the sum of their z-losses; `stats` (if given) receives "lm_loss" (the
    next-token loss alone) and "moe" (the layers' entries)."""
    if stats is not None:
        stats["moe"] = layers
        if loss is not None:
            stats["lm_loss"] = loss.detach()
    if loss is None or not layers:
        return loss
    penalty = cfg.aux_loss_coef * sum(s["aux"] for s in layers) + cfg.z_loss_coef * sum(s["z"] for s in layers)
    return loss + penalty.to(loss.dtype)
