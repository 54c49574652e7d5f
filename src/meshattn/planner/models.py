"""The planner's model inputs: a preset, a ModelConfig JSON, a Hugging Face config.json, or sizes.

Only the json module is used: a Hugging Face `config.json` is read as plain JSON, so neither
transformers nor torch is needed.

Hugging Face configs (model_type llama, mistral, qwen2) map onto ModelConfig so:

    hidden_size -> d_model              num_attention_heads -> n_heads
    num_key_value_heads -> n_kv_heads   (absent or null: n_heads)
    num_hidden_layers -> n_layers       intermediate_size -> d_ff
    vocab_size -> vocab_size            max_position_embeddings -> max_seq_len
    rms_norm_eps -> norm_eps            rope_theta -> rope_theta
    tie_word_embeddings -> tie_embeddings (default False)
    initializer_range -> init_std       hidden_act silu -> activation swiglu
    always norm=rmsnorm, position=rope, bias=False
    mistral: sliding_window -> window (null: no window)
    qwen2: use_sliding_window false -> no window (see _qwen2_window for true)

A field that changes the sizes, the FLOPs or the attention pattern and that ModelConfig cannot
express is refused with a ValueError naming the field and its value: an unknown model_type, a
hidden_act other than silu, a head_dim that is not hidden_size / num_attention_heads,
attention_bias or mlp_bias true, a Qwen2 sliding window on only some layers. Fields that change
none of these (rope_scaling, dropout, token ids, torch_dtype, ...) are ignored.

Qwen2's biases: Qwen2 has a bias on the Q, K and V projections only, which ModelConfig.bias
(a bias on every linear layer) cannot express. The planner maps Qwen2 to bias=False, so
`num_params()` is short by exactly `qkv_bias_params(hf_config)` =
n_layers * (n_heads + 2 * n_kv_heads) * head_dim (129,024 for Qwen2-7B, 0.002% of its
7.6e9 parameters; their FLOPs and activation memory are negligible as well).
"""

from __future__ import annotations

import dataclasses
import json
import os

from ..config import PRESETS, ModelConfig

HF_MODEL_TYPES = ("llama", "mistral", "qwen2")


def load_model(spec: str) -> ModelConfig:
    """The model named by `spec`: a preset name, or the path of a JSON file holding either a
    meshattn ModelConfig (its field names) or a Hugging Face config.json (Llama, Mistral, Qwen2).

    Raises ValueError (ConfigError for invalid sizes) saying what is wrong.
    """
    if spec in PRESETS:
        return PRESETS[spec]
    if not os.path.isfile(spec):
        raise ValueError(f"{spec!r} is neither a preset ({', '.join(PRESETS)}) nor a JSON file")
    with open(spec, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{spec}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{spec}: expected a JSON object, got {type(data).__name__}")
    if "model_type" in data:
        return from_hf_config(data)
    return from_model_json(data)


def from_model_json(data: dict) -> ModelConfig:
    """A ModelConfig from a dict of its own field names (as `dataclasses.asdict` writes them)."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(f"unknown ModelConfig field(s) {', '.join(unknown)}; a ModelConfig JSON has "
                         f"{', '.join(sorted(fields))} (a Hugging Face config.json has a model_type)")
    return ModelConfig(**data)


def _require(cfg: dict, name: str):
    if cfg.get(name) is None:
        raise ValueError(f"{cfg.get('model_type')} config.json lacks {name}")
    return cfg[name]


def _refuse(cfg: dict, name: str, why: str):
    raise ValueError(f"{cfg.get('model_type')} config.json: {name}={cfg[name]!r} {why}")


def _qwen2_window(cfg: dict, n_layers: int) -> int | None:
    """Qwen2 applies its sliding window only to layers from max_window_layers on, and only when
    use_sliding_window is true. All layers or none can be expressed; some cannot."""
    if not cfg.get("use_sliding_window", False):
        return None
    start = cfg.get("max_window_layers", n_layers)
    if start >= n_layers:
        return None
    if start <= 0:
        return _require(cfg, "sliding_window")
    raise ValueError(f"qwen2 config.json: use_sliding_window=true with max_window_layers={start} of "
                     f"{n_layers} layers windows only some layers, which ModelConfig (one window for "
                     "every layer) cannot represent")


def from_hf_config(cfg: dict) -> ModelConfig:
    """A ModelConfig from a parsed Hugging Face config.json (see the module docstring)."""
    kind = cfg.get("model_type")
    if kind not in HF_MODEL_TYPES:
        raise ValueError(f"config.json: model_type={kind!r} is not supported; supported: {', '.join(HF_MODEL_TYPES)}")
    hidden = _require(cfg, "hidden_size")
    heads = _require(cfg, "num_attention_heads")
    layers = _require(cfg, "num_hidden_layers")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        _refuse(cfg, "hidden_act", "is not supported; only silu (SwiGLU) maps onto ModelConfig")
    if cfg.get("head_dim") is not None and cfg["head_dim"] * heads != hidden:
        _refuse(cfg, "head_dim", f"differs from hidden_size/num_attention_heads = {hidden}/{heads}; "
                                 "ModelConfig needs head_dim = d_model / n_heads")
    for name in ("attention_bias", "mlp_bias"):
        if cfg.get(name):
            _refuse(cfg, name, "is not supported; ModelConfig biases either every linear layer or none")
    if kind == "mistral":
        window = cfg.get("sliding_window")
    elif kind == "qwen2":
        window = _qwen2_window(cfg, layers)
    else:
        window = None
    kv = cfg.get("num_key_value_heads")
    return ModelConfig(
        d_model=hidden, n_heads=heads, n_kv_heads=kv if kv is not None else heads, n_layers=layers,
        d_ff=_require(cfg, "intermediate_size"), vocab_size=_require(cfg, "vocab_size"),
        max_seq_len=_require(cfg, "max_position_embeddings"), norm="rmsnorm", position="rope",
        activation="swiglu", bias=False, tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=cfg.get("rope_theta", 10000.0),
        init_std=cfg.get("initializer_range", 0.02), window=window,
    )


def qkv_bias_params(hf_config: dict | str) -> int:
    """Parameters in the Q/K/V biases that `from_hf_config` leaves out: Qwen2's
    n_layers * (n_heads + 2 * n_kv_heads) * head_dim; 0 for Llama and Mistral (no biases).
    `hf_config` is a parsed config.json or its path."""
    if isinstance(hf_config, (str, os.PathLike)):
        with open(hf_config, encoding="utf-8") as f:
            hf_config = json.load(f)
    if hf_config.get("model_type") != "qwen2":
        return 0
    m = from_hf_config(hf_config)
    return m.n_layers * (m.n_heads + 2 * m.n_kv_heads) * m.head_dim


def model_from_sizes(hidden_size: int, layers: int, heads: int, kv_heads: int | None = None,
                     ffn_size: int | None = None, vocab_size: int | None = None,
                     seq_len: int | None = None) -> ModelConfig:
    """A Llama-style model (rmsnorm, rope, swiglu, no biases, untied embeddings) from its sizes.

    Defaults: kv_heads = heads (no GQA); ffn_size = Llama's 8/3 * hidden_size rounded up to a
    multiple of 256 (4096 -> 11008, as Llama-2-7B); vocab_size = 32000 (Llama-2's);
    seq_len (max_seq_len) = 4096.
    """
    if ffn_size is None:
        ffn_size = -(-(8 * hidden_size) // (3 * 256)) * 256
    return ModelConfig(
        d_model=hidden_size, n_heads=heads, n_kv_heads=kv_heads if kv_heads is not None else heads,
        n_layers=layers, d_ff=ffn_size, vocab_size=vocab_size if vocab_size is not None else 32000,
        max_seq_len=seq_len if seq_len is not None else 4096, norm="rmsnorm", position="rope",
        activation="swiglu", bias=False, tie_embeddings=False,
    )
