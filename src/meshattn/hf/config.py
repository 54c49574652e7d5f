"""config.json <-> ModelConfig: which Hugging Face decoders meshattn's reference model is, exactly.

All four supported architectures are the same network as meshattn's `rmsnorm` + `rope` +
`swiglu` model (pre-norm blocks, a final RMSNorm, rotate-half rotary angles, no bias on the head):

    HF config.json                       ModelConfig
    hidden_size, intermediate_size       d_model, d_ff (Mixtral: expert_ffn too)
    num_attention_heads / key_value      n_heads / n_kv_heads (head_dim must be hidden/heads)
    num_hidden_layers, vocab_size        n_layers, vocab_size
    max_position_embeddings              max_seq_len
    rms_norm_eps, tie_word_embeddings    norm_eps, tie_embeddings
    rope_parameters (5.x) or             rope_theta, rope_scaling = (factor, low_freq_factor,
      rope_theta + rope_scaling (4.x)      high_freq_factor, original_max_position_embeddings)

and each architecture adds one idea (the `_ARCHS` table below, one reader and one writer each):

    LlamaForCausalLM    attention_bias and mlp_bias together -> bias (every Linear but the head)
    MistralForCausalLM  sliding_window w -> window w: HF's mask keeps key j for query i when
                        i - w < j <= i (masking_utils.sliding_window_overlay), meshattn's rule
    Qwen2ForCausalLM    bias on q/k/v only -> qkv_bias; a window only when every layer slides
    MixtralForCausalLM  num_local_experts, num_experts_per_tok -> n_experts, top_k: softmax over
                        all experts, top-k, gates renormalised over the k (meshattn's router), dropless

Anything else (another rope type, per-layer windows, qk-norm, MLA, a gated shared expert, an
activation other than silu, dropout, quantised weights) is refused with one line naming it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError, ModelConfig

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "MixtralForCausalLM")

# Architectures that look close but compute something else: the reason, said once.
_REFUSED = {
    "Qwen2MoeForCausalLM": "its shared expert is scaled by a sigmoid gate and its top-k gates are not renormalised "
                           "(norm_topk_prob=false)",
    "Qwen3ForCausalLM": "it normalises each query and key head (qk-norm)",
    "Qwen3MoeForCausalLM": "it normalises each query and key head (qk-norm)",
    "OlmoeForCausalLM": "it normalises queries and keys (qk-norm)",
    "DeepseekV2ForCausalLM": "its attention is multi-head latent attention (MLA) and its router groups experts",
    "DeepseekV3ForCausalLM": "its attention is multi-head latent attention (MLA) and its router is a biased sigmoid",
    "DeepseekForCausalLM": "it is remote code whose routing is not renormalised over the top-k experts",
    "GemmaForCausalLM": "it scales embeddings, uses gelu and a (1 + weight) RMSNorm",
    "Gemma2ForCausalLM": "it soft-caps logits and alternates sliding and global layers",
    "Phi3ForCausalLM": "it stores fused qkv and gate_up projections with its own rope scaling",
}


def _load_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path.parent} has no {path.name}; point at a Hugging Face model folder "
                          f"(one with config.json and model.safetensors, as save_pretrained writes)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} is not a readable {what} ({e}); restore it from the model's source") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} holds {type(data).__name__}, not a JSON object; restore it from the model's source")
    return data


def load_config_json(folder) -> dict:
    """The folder's config.json as a dict (ConfigError naming the folder when absent or unreadable)."""
    return _load_json(Path(folder) / "config.json", "config.json")


def is_hf_folder(folder) -> bool:
    """Whether `folder` holds a Hugging Face config.json (one with `architectures` or `model_type`)."""
    try:
        d = load_config_json(folder)
    except ConfigError:
        return False
    return "architectures" in d or "model_type" in d


# -- reading ----------------------------------------------------------------------------------------

def _need(d: dict, key: str, kind=int):
    value = d.get(key)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ConfigError(f"config.json: {key}={value!r} must be {'an integer' if kind is int else 'a number'}; "
                          "restore it from the model's source")
    return value


def _rope(d: dict, default_theta: float) -> tuple[float, tuple | None]:
    """(rope_theta, rope_scaling) from 5.x's rope_parameters or 4.x's rope_theta + rope_scaling."""
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise ConfigError(f"config.json: rope parameters {params!r} differ per layer type; meshattn uses one rotary "
                          "setting for every layer")
    theta = params.get("rope_theta", d.get("rope_theta", default_theta))
    partial = params.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ConfigError(f"config.json: partial_rotary_factor={partial} rotates part of each head; meshattn rotates "
                          "whole heads (partial_rotary_factor=1.0)")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind == "llama3":
        try:
            scaling = (params["factor"], params["low_freq_factor"], params["high_freq_factor"],
                       params.get("original_max_position_embeddings", d.get("max_position_embeddings")))
        except KeyError as e:
            raise ConfigError(f"config.json: llama3 rope scaling lacks {e.args[0]}; restore it from the model's "
                              "source") from None
        return float(theta), scaling
    raise ConfigError(f"config.json: rope type {kind!r} is not supported; meshattn implements the default rotary "
                      "angles and Llama-3 scaling (rope_type 'llama3')")


def _llama(d: dict) -> dict:
    attn, mlp = bool(d.get("attention_bias", False)), bool(d.get("mlp_bias", False))
    if attn != mlp:
        raise ConfigError(f"config.json: attention_bias={attn} with mlp_bias={mlp} is not supported; meshattn's "
                          "bias=True puts a bias on every Linear (both true) and qkv_bias on Q/K/V alone "
                          "(Qwen2ForCausalLM)")
    return {"bias": attn}


def _mistral(d: dict) -> dict:
    return {"window": d.get("sliding_window")}


def _qwen2(d: dict) -> dict:
    n = _need(d, "num_hidden_layers")
    if not d.get("use_sliding_window", False) or d.get("sliding_window") is None:
        return {"qkv_bias": True}
    first = d.get("max_window_layers", 0)
    kinds = d.get("layer_types") or ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
    if set(kinds) == {"full_attention"}:
        return {"qkv_bias": True}
    if set(kinds) == {"sliding_attention"}:
        return {"qkv_bias": True, "window": d["sliding_window"]}
    raise ConfigError(f"config.json: Qwen2 slides its window on some layers only (layer_types / max_window_layers="
                      f"{first} of {n}); meshattn uses one window for every layer: set max_window_layers=0 or "
                      "use_sliding_window=false")


def _mixtral(d: dict) -> dict:
    jitter = d.get("router_jitter_noise", 0.0) or 0.0
    if jitter:
        raise ConfigError(f"config.json: router_jitter_noise={jitter} perturbs routing in training; meshattn's router "
                          "has no noise: set it to 0.0")
    fields = _mistral(d)
    fields.update(n_experts=_need(d, "num_local_experts"), top_k=_need(d, "num_experts_per_tok"),
                  expert_ffn=_need(d, "intermediate_size"), capacity_factor=None)
    if "router_aux_loss_coef" in d:
        fields["aux_loss_coef"] = float(d["router_aux_loss_coef"])
    return fields


def _architecture(d: dict) -> str:
    names = d.get("architectures") or []
    if not isinstance(names, list) or len(names) > 1:
        raise ConfigError(f"config.json: architectures={names!r} must name one architecture")
    if names:
        return names[0]
    by_type = {a.model_type: a.name for a in _ARCHS.values()}
    return by_type.get(d.get("model_type"), f"model_type={d.get('model_type')!r}")


def from_hf(d: dict) -> ModelConfig:
    """The ModelConfig a config.json dict describes exactly, or ConfigError naming what differs."""
    name = _architecture(d)
    if name in _REFUSED:
        raise ConfigError(f"config.json: {name} is not supported: {_REFUSED[name]}; meshattn reads "
                          f"{', '.join(SUPPORTED)}")
    if name not in _ARCHS:
        raise ConfigError(f"config.json: architecture {name} is not supported; meshattn reads {', '.join(SUPPORTED)}")
    arch = _ARCHS[name]
    if d.get("quantization_config"):
        raise ConfigError("config.json: quantization_config is set (quantised weights); meshattn reads unquantised "
                          "float weights")
    act = d.get("hidden_act", d.get("hidden_activation", "silu"))
    if act != "silu":
        raise ConfigError(f"config.json: hidden_act={act!r} is not supported; meshattn's SwiGLU uses silu")
    dropout = d.get("attention_dropout", 0.0) or 0.0
    if dropout:
        raise ConfigError(f"config.json: attention_dropout={dropout} is not supported; meshattn has no dropout: "
                          "set 0.0")
    h, heads = _need(d, "hidden_size"), _need(d, "num_attention_heads")
    head_dim = d.get("head_dim")
    if head_dim is not None and head_dim * heads != h:
        raise ConfigError(f"config.json: head_dim={head_dim} differs from hidden_size/num_attention_heads="
                          f"{h}/{heads}; meshattn's heads are hidden_size/num_attention_heads wide")
    theta, scaling = _rope(d, arch.default_theta)
    fields = dict(d_model=h, n_heads=heads, n_kv_heads=d.get("num_key_value_heads") or heads,
                  n_layers=_need(d, "num_hidden_layers"), d_ff=_need(d, "intermediate_size"),
                  vocab_size=_need(d, "vocab_size"), max_seq_len=_need(d, "max_position_embeddings"),
                  norm="rmsnorm", position="rope", activation="swiglu",
                  tie_embeddings=bool(d.get("tie_word_embeddings", False)),
                  norm_eps=float(_need(d, "rms_norm_eps", (int, float))), rope_theta=theta, rope_scaling=scaling)
    fields.update(arch.read(d))
    try:
        return ModelConfig(**fields)
    except TypeError as e:  # a size that is not a number, e.g. null
        raise ConfigError(f"config.json: a size is not a number ({e}); restore it from the model's source") from None


def read_config(folder) -> ModelConfig:
    """The ModelConfig of a Hugging Face model folder (its config.json), or ConfigError naming what
    meshattn cannot represent exactly and what would work."""
    return from_hf(load_config_json(folder))


# -- writing ----------------------------------------------------------------------------------------

def _unrepresentable(target: str, what: str, fix: str) -> ConfigError:
    return ConfigError(f"{what} cannot be written as a Hugging Face {target}; {fix}")


def _llama_out(cfg: ModelConfig) -> dict:
    return {"attention_bias": cfg.bias, "mlp_bias": cfg.bias}


def _no_bias(cfg: ModelConfig) -> None:
    if cfg.bias:
        raise _unrepresentable(cfg_arch_name(cfg), "bias=True (a bias on every Linear)",
                               "only Llama carries one, without a sliding window or experts: use bias=False")


def _mistral_out(cfg: ModelConfig) -> dict:
    _no_bias(cfg)
    return {"sliding_window": cfg.window}


def _qwen2_out(cfg: ModelConfig) -> dict:
    _no_bias(cfg)
    window = cfg.window is not None
    return {"use_sliding_window": window, "sliding_window": cfg.window,
            "max_window_layers": 0 if window else cfg.n_layers}  # layers >= max_window_layers slide


def _mixtral_out(cfg: ModelConfig) -> dict:
    _no_bias(cfg)
    for what, bad, fix in (("qkv_bias=True", cfg.qkv_bias, "use qkv_bias=False"),
                           (f"n_shared_experts={cfg.n_shared_experts}", cfg.n_shared_experts, "use n_shared_experts=0"),
                           (f"dense_layers={cfg.dense_layers}", cfg.dense_layers, "use dense_layers=0"),
                           (f"capacity_factor={cfg.capacity_factor} (dropping tokens)", cfg.capacity_factor is not None,
                            "Mixtral is dropless: use capacity_factor=None")):
        if bad:
            raise _unrepresentable("MixtralForCausalLM", what, fix)
    return {"sliding_window": cfg.window, "num_local_experts": cfg.n_experts, "num_experts_per_tok": cfg.top_k,
            "router_aux_loss_coef": cfg.aux_loss_coef, "router_jitter_noise": 0.0, "output_router_logits": False}


@dataclass(frozen=True)
class Architecture:
    name: str  # config.json "architectures"
    model_type: str
    default_theta: float  # rope_theta when config.json omits it
    read: Callable[[dict], dict]  # config.json -> its architecture's ModelConfig fields
    write: Callable[[ModelConfig], dict]  # ModelConfig -> its architecture's config.json fields (or ConfigError)


_ARCHS = {a.name: a for a in (
    Architecture("LlamaForCausalLM", "llama", 10000.0, _llama, _llama_out),
    Architecture("MistralForCausalLM", "mistral", 10000.0, _mistral, _mistral_out),
    Architecture("Qwen2ForCausalLM", "qwen2", 10000.0, _qwen2, _qwen2_out),
    Architecture("MixtralForCausalLM", "mixtral", 1000000.0, _mixtral, _mixtral_out),
)}


def cfg_arch_name(cfg: ModelConfig) -> str:
    """The architecture a ModelConfig is written as: Mixtral for experts, Qwen2 for a Q/K/V-only
    bias, Mistral for a sliding window, else Llama."""
    if cfg.is_moe:
        return "MixtralForCausalLM"
    if cfg.qkv_bias and not cfg.bias:
        return "Qwen2ForCausalLM"
    return "MistralForCausalLM" if cfg.window is not None else "LlamaForCausalLM"


def to_hf(cfg: ModelConfig, dtype: str = "float32") -> dict:
    """The config.json dict (transformers 5.x field names) of a ModelConfig, or ConfigError naming
    what no supported architecture holds."""
    for what, ok, fix in ((f"norm={cfg.norm!r}", cfg.norm == "rmsnorm", "use norm='rmsnorm'"),
                          (f"activation={cfg.activation!r}", cfg.activation == "swiglu", "use activation='swiglu'"),
                          (f"position={cfg.position!r}", cfg.position == "rope", "use position='rope'")):
        if not ok:
            raise _unrepresentable(f"checkpoint ({', '.join(SUPPORTED)})", what, fix)
    arch = _ARCHS[cfg_arch_name(cfg)]
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        factor, low, high, original = cfg.rope_scaling
        rope.update(rope_type="llama3", factor=factor, low_freq_factor=low, high_freq_factor=high,
                    original_max_position_embeddings=original)
    d = {"architectures": [arch.name], "model_type": arch.model_type,
         "hidden_size": cfg.d_model, "intermediate_size": cfg.expert_ffn if cfg.is_moe else cfg.d_ff,
         "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
         "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_seq_len,
         "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
         "rope_parameters": rope, "attention_dropout": 0.0, "initializer_range": cfg.init_std, "dtype": dtype}
    d.update(arch.write(cfg))
    return d
