"""Which Hugging Face tensors make each reference (meshattn) parameter: the one statement of the
weight layout, used to read (source.py) and to write (export.py).

A reference tensor is a `Recipe`: its pieces concatenated along one dim. Each `Piece` is a box
(a [start, stop) range per dim) of one HF tensor, or, for an expert of a stacked tensor, a whole
HF tensor that is one index of dim 0:

    tok_emb.weight (V, h)              model.embed_tokens.weight
    head.weight (V, h)                 lm_head.weight, or model.embed_tokens.weight when tied
    norm.weight (h,)                   model.norm.weight
    blocks.i.norm1 / norm2.weight      model.layers.i.input_layernorm / post_attention_layernorm.weight
    blocks.i.attn.qkv.weight           cat([q_proj, k_proj, v_proj], 0) ((H + 2G) D, h); .bias likewise
    blocks.i.attn.proj.weight          o_proj (h, H D): rotate-half rotary on both sides, so no permutation
    blocks.i.mlp.fc / gate / proj      mlp.up_proj / gate_proj / down_proj
    blocks.i.moe.router.weight (E, h)  {moe}.gate.weight
    blocks.i.moe.experts.gate (E,F,h)  stack_e {moe}.experts.e.w1.weight, or {moe}.experts.gate_up_proj[:, :F]
    blocks.i.moe.experts.up (E, F, h)  stack_e {moe}.experts.e.w3.weight, or {moe}.experts.gate_up_proj[:, F:]
    blocks.i.moe.experts.down (E,h,F)  stack_e {moe}.experts.e.w2.weight, or {moe}.experts.down_proj

{moe} is `model.layers.i.block_sparse_moe` (what transformers 5.x save_pretrained writes for
Mixtral, per expert w1 = gate, w3 = up, w2 = down) or `model.layers.i.mlp` (the names of 5.x's
in-memory fused experts: gate_up_proj (E, 2F, h) with gate rows first, down_proj (E, h, F));
per-expert gate_proj / up_proj / down_proj (Qwen-MoE's names) are read too.
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass

from ..config import ConfigError, ModelConfig


@dataclass(frozen=True)
class Piece:
    key: str  # the HF tensor's name
    hf_shape: tuple[int, ...]  # its full shape, as config.json implies
    box: tuple[tuple[int, int], ...]  # the region of it this piece is: (start, stop) per HF dim
    stacked: bool = False  # the whole HF tensor is one index of the reference tensor's dim 0 (an expert)

    def hf_dim(self, dim: int) -> int:
        """The HF dim holding the reference tensor's `dim` (a stacked piece lacks dim 0)."""
        return dim - 1 if self.stacked else dim

    def extent(self, dim: int) -> int:
        """The piece's size along the reference tensor's `dim`."""
        if self.stacked and dim == 0:
            return 1
        start, stop = self.box[self.hf_dim(dim)]
        return stop - start

    def sub_box(self, dim: int, start: int, stop: int) -> tuple[tuple[int, int], ...]:
        """The box of the piece's [start, stop) along the reference tensor's `dim`."""
        if self.stacked and dim == 0:
            return self.box  # the piece is one index: [0, 1)
        box = list(self.box)
        d = self.hf_dim(dim)
        box[d] = (box[d][0] + start, box[d][0] + stop)
        return tuple(box)


@dataclass(frozen=True)
class Recipe:
    shape: tuple[int, ...]  # the reference tensor's shape
    dim: int  # its pieces are concatenated along this dim
    pieces: tuple[Piece, ...]


def _whole(key: str, *shape: int) -> Piece:
    return Piece(key, shape, tuple((0, n) for n in shape))


def _single(key: str, *shape: int) -> Recipe:
    return Recipe(shape, 0, (_whole(key, *shape),))


def _moe_layout(keys: Container[str] | None, layer: str) -> tuple[str, str]:
    """(prefix, expert style) of one MoE layer: what the files hold, or (keys None) what we write."""
    if keys is None:
        return f"{layer}.block_sparse_moe", "w"
    for prefix in (f"{layer}.block_sparse_moe", f"{layer}.mlp"):
        if f"{prefix}.gate.weight" not in keys:
            continue
        if f"{prefix}.experts.gate_up_proj" in keys:
            return prefix, "fused"
        if f"{prefix}.experts.0.w1.weight" in keys:
            return prefix, "w"
        if f"{prefix}.experts.0.gate_proj.weight" in keys:
            return prefix, "proj"
    raise ConfigError(f"{layer}: no mixture-of-experts tensors ({layer}.block_sparse_moe.gate.weight and "
                      "experts.N.w1/w2/w3 or experts.gate_up_proj/down_proj) although config.json has "
                      "num_local_experts; the config and the weights disagree")


def _experts(cfg: ModelConfig, prefix: str, style: str) -> dict[str, Recipe]:
    E, F, h = cfg.n_experts, cfg.expert_ffn, cfg.d_model
    if style == "fused":
        gate_up, down = f"{prefix}.experts.gate_up_proj", f"{prefix}.experts.down_proj"
        return {"gate": Recipe((E, F, h), 0, (Piece(gate_up, (E, 2 * F, h), ((0, E), (0, F), (0, h))),)),
                "up": Recipe((E, F, h), 0, (Piece(gate_up, (E, 2 * F, h), ((0, E), (F, 2 * F), (0, h))),)),
                "down": _single(down, E, h, F)}
    names = {"w": ("w1", "w3", "w2"), "proj": ("gate_proj", "up_proj", "down_proj")}[style]

    def stack(name: str, *shape: int) -> Recipe:
        pieces = tuple(Piece(f"{prefix}.experts.{e}.{name}.weight", shape, tuple((0, n) for n in shape), stacked=True)
                       for e in range(E))
        return Recipe((E, *shape), 0, pieces)

    return {"gate": stack(names[0], F, h), "up": stack(names[1], F, h), "down": stack(names[2], h, F)}


def _linear(out: dict, ours: str, theirs: str, rows: int, cols: int, bias: bool) -> None:
    out[f"{ours}.weight"] = _single(f"{theirs}.weight", rows, cols)
    if bias:
        out[f"{ours}.bias"] = _single(f"{theirs}.bias", rows)


def _block(cfg: ModelConfig, i: int, keys: Container[str] | None) -> dict[str, Recipe]:
    h, H, G, D, Fd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
    ours, layer = f"blocks.{i}", f"model.layers.{i}"
    attn = f"{layer}.self_attn"
    qkv = (("q_proj", H * D), ("k_proj", G * D), ("v_proj", G * D))
    out = {f"{ours}.norm1.weight": _single(f"{layer}.input_layernorm.weight", h),
           f"{ours}.norm2.weight": _single(f"{layer}.post_attention_layernorm.weight", h),
           f"{ours}.attn.qkv.weight": Recipe(((H + 2 * G) * D, h), 0,
                                             tuple(_whole(f"{attn}.{p}.weight", n, h) for p, n in qkv))}
    if cfg.bias or cfg.qkv_bias:
        biases = tuple(_whole(f"{attn}.{p}.bias", n) for p, n in qkv)
        out[f"{ours}.attn.qkv.bias"] = Recipe(((H + 2 * G) * D,), 0, biases)
    _linear(out, f"{ours}.attn.proj", f"{attn}.o_proj", h, H * D, cfg.bias)
    if not cfg.moe_layer(i):
        _linear(out, f"{ours}.mlp.fc", f"{layer}.mlp.up_proj", Fd, h, cfg.bias)
        _linear(out, f"{ours}.mlp.gate", f"{layer}.mlp.gate_proj", Fd, h, cfg.bias)
        _linear(out, f"{ours}.mlp.proj", f"{layer}.mlp.down_proj", h, Fd, cfg.bias)
        return out
    if cfg.n_shared_experts:
        raise ConfigError(f"n_shared_experts={cfg.n_shared_experts}: no supported Hugging Face architecture has an "
                          "ungated shared expert; use n_shared_experts=0")
    prefix, style = _moe_layout(keys, layer)
    out[f"{ours}.moe.router.weight"] = _single(f"{prefix}.gate.weight", cfg.n_experts, h)
    out.update({f"{ours}.moe.experts.{k}": r for k, r in _experts(cfg, prefix, style).items()})
    return out


def recipes(cfg: ModelConfig, keys: Container[str] | None = None) -> dict[str, Recipe]:
    """Every reference parameter name (as Transformer(cfg).state_dict() lists them) -> its Recipe.

    `keys`: the HF tensor names the files hold, to pick the experts' layout; None: the layout
    export writes (transformers' save_pretrained layout)."""
    V, h = cfg.vocab_size, cfg.d_model
    out = {"tok_emb.weight": _single("model.embed_tokens.weight", V, h)}
    for i in range(cfg.n_layers):
        out.update(_block(cfg, i, keys))
    out["norm.weight"] = _single("model.norm.weight", h)
    out["head.weight"] = _single("model.embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight", V, h)
    return out
