"""The planner's inputs: GPU presets and models from presets, ModelConfig JSON, Hugging Face
config.json files and bare sizes, with every refusal."""

import dataclasses
import json

import pytest

from meshattn.config import PRESETS, ConfigError, ModelConfig
from meshattn.planner.hardware import GPU, GPUS, gpu
from meshattn.planner.models import load_model, model_from_sizes, qkv_bias_params

# The published config.json files (huggingface.co/<repo>/blob/main/config.json), as released.
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 8192,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 500000.0,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.40.0.dev0",
    "use_cache": True, "vocab_size": 128256,
}
MISTRAL_7B = {
    "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 32768, "model_type": "mistral", "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
    "sliding_window": 4096, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.34.0.dev0", "use_cache": True, "vocab_size": 32000,
}
QWEN2_7B = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02,
    "intermediate_size": 18944, "max_position_embeddings": 131072, "max_window_layers": 28,
    "model_type": "qwen2", "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.37.2", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 152064,
}


def _write(tmp_path, cfg, name="config.json"):
    path = tmp_path / name
    path.write_text(json.dumps(cfg))
    return str(path)


def test_llama3_8b(tmp_path):
    m = load_model(_write(tmp_path, LLAMA3_8B))
    assert (m.d_model, m.n_heads, m.n_kv_heads, m.n_layers, m.d_ff, m.vocab_size, m.max_seq_len) == \
        (4096, 32, 8, 32, 14336, 128256, 8192)
    assert (m.norm, m.position, m.activation, m.bias, m.tie_embeddings) == ("rmsnorm", "rope", "swiglu", False, False)
    assert (m.rope_theta, m.norm_eps, m.window) == (500000.0, 1e-5, None)
    # Per layer: q,o 2*4096^2 + k,v 2*4096*1024 = 41,943,040; MLP 3*4096*14336 = 176,160,768; two norms
    # 8192 -> 218,112,000 x 32 = 6,979,584,000. Embedding + head 2*128256*4096 = 1,050,673,152; final norm 4096.
    assert m.num_params() == 8_030_261_248 == 32 * 218_112_000 + 2 * 128256 * 4096 + 4096
    assert qkv_bias_params(LLAMA3_8B) == 0


def test_mistral_7b(tmp_path):
    m = load_model(_write(tmp_path, MISTRAL_7B))
    assert (m.d_model, m.n_kv_heads, m.vocab_size, m.max_seq_len, m.window, m.rope_theta) == \
        (4096, 8, 32000, 32768, 4096, 10000.0)
    # Llama-3-8B's blocks with a 32000-token vocabulary: 6,979,584,000 + 2*32000*4096 + 4096.
    assert m.num_params() == 7_241_732_096 == 32 * 218_112_000 + 2 * 32000 * 4096 + 4096
    # Later Mistral releases set sliding_window to null: no window.
    assert load_model(_write(tmp_path, {**MISTRAL_7B, "sliding_window": None})).window is None


def test_qwen2_7b(tmp_path):
    path = _write(tmp_path, QWEN2_7B)
    m = load_model(path)
    assert (m.d_model, m.n_heads, m.n_kv_heads, m.head_dim, m.d_ff, m.vocab_size) == (3584, 28, 4, 128, 18944, 152064)
    assert (m.bias, m.window, m.norm_eps, m.rope_theta) == (False, None, 1e-6, 1e6)
    # Qwen2's Q/K/V biases are not in ModelConfig: (28 + 2*4) * 128 = 4608 per layer, x 28 layers = 129,024.
    assert qkv_bias_params(path) == qkv_bias_params(QWEN2_7B) == 28 * (28 + 2 * 4) * 128 == 129_024
    # Per layer without them: q,o 2*3584^2 = 25,690,112; k,v 2*3584*512 = 3,670,016; MLP 3*3584*18944 =
    # 203,685,888; norms 7168 -> 233,053,184 x 28 = 6,525,489,152. Embedding + head 2*152064*3584 =
    # 1,089,994,752; final norm 3584. Total 7,615,487,488 = the published 7,615,616,512 - 129,024.
    assert m.num_params() == 28 * 233_053_184 + 2 * 152064 * 3584 + 3584 == 7_615_487_488
    assert m.num_params() + qkv_bias_params(QWEN2_7B) == 7_615_616_512


def test_qwen2_sliding_window(tmp_path):
    every = {**QWEN2_7B, "use_sliding_window": True, "max_window_layers": 0, "sliding_window": 4096}
    assert load_model(_write(tmp_path, every)).window == 4096
    none = {**QWEN2_7B, "use_sliding_window": True, "max_window_layers": 28}  # windows from layer 28 of 28
    assert load_model(_write(tmp_path, none)).window is None
    with pytest.raises(ValueError, match="max_window_layers=14"):
        load_model(_write(tmp_path, {**QWEN2_7B, "use_sliding_window": True, "max_window_layers": 14}))


def test_kv_heads_default_to_heads(tmp_path):
    cfg = {k: v for k, v in LLAMA3_8B.items() if k != "num_key_value_heads"}
    assert load_model(_write(tmp_path, cfg)).n_kv_heads == 32


@pytest.mark.parametrize("change, words", [
    ({"model_type": "gpt2"}, "model_type='gpt2'"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"head_dim": 64}, "head_dim=64"),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"mlp_bias": True}, "mlp_bias=True"),
    ({"hidden_size": None}, "lacks hidden_size"),
])
def test_hf_refusals(tmp_path, change, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(")):
        load_model(_write(tmp_path, {**LLAMA3_8B, **change}))


def test_head_dim_equal_is_accepted(tmp_path):
    assert load_model(_write(tmp_path, {**LLAMA3_8B, "head_dim": 128})).head_dim == 128


def test_presets_and_model_json_round_trip(tmp_path):
    for name, cfg in PRESETS.items():
        assert load_model(name) == cfg
        assert load_model(_write(tmp_path, dataclasses.asdict(cfg), f"{name}.json")) == cfg
    hf = load_model(_write(tmp_path, QWEN2_7B))
    assert load_model(_write(tmp_path, dataclasses.asdict(hf), "qwen.json")) == hf


def test_load_model_refusals(tmp_path):
    with pytest.raises(ValueError, match="neither a preset .*tiny.* nor a JSON file"):
        load_model("no-such-model")
    with pytest.raises(ValueError, match="unknown ModelConfig field.*hidden"):
        load_model(_write(tmp_path, {"hidden": 64}))
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_model(str(bad))
    with pytest.raises(ValueError, match="expected a JSON object"):
        load_model(_write(tmp_path, [1, 2]))
    with pytest.raises(ConfigError, match="n_heads"):  # ModelConfig's own checks still apply
        load_model(_write(tmp_path, {"d_model": 100, "n_heads": 3}))


def test_model_from_sizes():
    m = model_from_sizes(4096, 32, 32)
    assert isinstance(m, ModelConfig)
    # Llama-2-7B: d_ff 11008 = 8/3 * 4096 rounded up to a multiple of 256; 32000 tokens; 6,738,415,616 params.
    assert (m.n_kv_heads, m.d_ff, m.vocab_size, m.max_seq_len) == (32, 11008, 32000, 4096)
    assert (m.norm, m.position, m.activation, m.bias) == ("rmsnorm", "rope", "swiglu", False)
    assert m.num_params() == 6_738_415_616
    m = model_from_sizes(4096, 32, 32, kv_heads=8, ffn_size=14336, vocab_size=128256, seq_len=8192)
    assert m.num_params() == 8_030_261_248
    with pytest.raises(ConfigError, match="n_kv_heads"):
        model_from_sizes(4096, 32, 32, kv_heads=5)


def test_gpu_presets():
    assert set(GPUS) == {"a100-80gb", "h100", "h200"}
    for name, g in GPUS.items():
        assert gpu(name) is g and g.name == name
        for f in dataclasses.fields(GPU):
            if f.name != "name":
                assert getattr(g, f.name) > 0, (name, f.name)
        assert g.nvlink_bw > g.network_bw and g.inter_latency_s > g.intra_latency_s
        assert 1e14 < g.peak_flops < 1e16 and 64 < g.memory_gib < 160
    assert gpu("h200").memory_bytes > gpu("h100").memory_bytes > 0
    assert gpu("h100").peak_flops == gpu("h200").peak_flops > gpu("a100-80gb").peak_flops
    assert gpu("H100") is GPUS["h100"]
    with pytest.raises(ValueError, match="a100-80gb, h100, h200"):
        gpu("x")
    with pytest.raises(ValueError, match="peak_flops"):
        dataclasses.replace(GPUS["h100"], peak_flops=0)
