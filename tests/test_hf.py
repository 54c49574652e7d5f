"""Hugging Face checkpoints in and out (meshattn.hf), with transformers as the independent oracle.

Tiny models are built locally from configs (nothing is downloaded), their weights redrawn at a
scale where attention is far from uniform (so a wrong window, rotary table or head order changes
the logits), saved with save_pretrained, read by meshattn, and compared logit for logit.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

import meshattn.hf as mh  # noqa: E402
from meshattn import ConfigError, ModelConfig, Transformer  # noqa: E402
from meshattn.hf.source import HFSource  # noqa: E402

HF = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
      "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
      "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
      "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM)}
TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=160, max_position_embeddings=64, rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=7,
            pad_token_id=None)
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
# name: (family, config overrides, the meshattn field that must matter, its neutral value)
CASES = {
    "llama": ("llama", {}, None),
    "llama-tied-llama3": ("llama", {"tie_word_embeddings": True, "rope_parameters": LLAMA3}, ("rope_scaling", None)),
    "llama-bias": ("llama", {"attention_bias": True, "mlp_bias": True}, None),
    "mistral-window": ("mistral", {"sliding_window": 5}, ("window", None)),
    "qwen2": ("qwen2", {}, None),
    "qwen2-window": ("qwen2", {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 0},
                     ("window", None)),
    "mixtral": ("mixtral", {"intermediate_size": 48, "num_local_experts": 4, "num_experts_per_tok": 2}, None),
}

# Float32 tolerance, HF against meshattn on the same weights. HF computes rotary angles as
# float32 position * float32 inverse frequency (each angle off by up to ~S * 2^-24 rad, ~1e-6 at
# S = 16); meshattn computes them in float64 and rounds once. The rest is reduction order (GEMMs
# and SDPA over h = 64 terms, ~1e-7 relative each), compounding over 2 layers and the RMSNorms.
# Logits here reach about 5; measured differences are below 4e-6, so 1e-4 absolute (+1e-4 relative)
# leaves a 25x margin while any mapping error (a swapped head, a missing bias, a wrong window)
# moves logits by O(0.1-1), which the "matters" checks below confirm.
TOL = dict(rtol=1e-4, atol=1e-4)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter redrawn: matrices normal(0, 1/sqrt(fan_in)), norm weights 1 + 0.2 N(0, 1),
    biases 0.2 N(0, 1) (HF initialises norms to 1 and biases to 0, which would hide a swap)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() >= 2:
                p.copy_(noise * p.shape[-1] ** -0.5)
            else:
                p.copy_(1 + 0.2 * noise if "norm" in name else 0.2 * noise)


def _hf_model(family: str, seed: int = 0, **overrides):
    config_cls, model_cls = HF[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**TINY, **overrides})).eval()
    _randomize(model, seed)
    return model


def _ids(batch: int = 3, seq: int = 16, vocab: int = 160, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


@torch.no_grad()
def _our_logits(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    return model(ids)[0]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each case's HF model, saved once: name -> (folder, HF model)."""
    out = {}
    for name, (family, overrides, _) in CASES.items():
        model = _hf_model(family, seed=len(out), **overrides)
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        out[name] = (folder, model)
    return out


# -- reading: HF -> meshattn ------------------------------------------------------------------------

@pytest.mark.parametrize("name", CASES)
def test_load_gives_transformers_logits(saved, name):
    folder, hf = saved[name]
    ours = mh.load(folder)
    ids = _ids()
    expected = _hf_logits(hf, ids)
    torch.testing.assert_close(_our_logits(ours, ids), expected, **TOL)
    feature = CASES[name][2]
    if feature is not None:  # the feature is live: without it the logits move far beyond TOL
        field, neutral = feature
        assert getattr(ours.cfg, field) != neutral
        plain = Transformer(dataclasses.replace(ours.cfg, **{field: neutral}))
        plain.load_state_dict(ours.state_dict())
        assert (_our_logits(plain, ids) - expected).abs().max() > 1e-2


def test_read_config_maps_every_field(saved):
    cfg = mh.read_config(saved["mixtral"][0])
    assert (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.n_layers, cfg.vocab_size) == (64, 4, 2, 2, 160)
    assert (cfg.n_experts, cfg.top_k, cfg.expert_ffn, cfg.capacity_factor, cfg.dense_layers) == (4, 2, 48, None, 0)
    assert (cfg.norm, cfg.position, cfg.activation, cfg.max_seq_len, cfg.norm_eps) == ("rmsnorm", "rope", "swiglu",
                                                                                       64, 1e-5)
    assert cfg.aux_loss_coef == saved["mixtral"][1].config.router_aux_loss_coef
    assert mh.read_config(saved["mixtral"][0]).rope_theta == 1e6  # Mixtral's own default theta
    llama3 = mh.read_config(saved["llama-tied-llama3"][0])
    assert llama3.tie_embeddings and llama3.rope_theta == 500000.0 and llama3.rope_scaling == (8.0, 1.0, 4.0, 16)
    assert mh.read_config(saved["qwen2"][0]).qkv_bias and mh.read_config(saved["llama-bias"][0]).bias
    assert mh.read_config(saved["mistral-window"][0]).window == 5
    assert mh.is_hf_folder(saved["llama"][0])


def test_source_names_are_the_reference_state_dict(saved):
    for name, (folder, _) in saved.items():
        source = HFSource(folder)
        reference = Transformer(source.cfg).state_dict()
        assert source.names() == set(reference), name
        assert all(source.shape(n) == tuple(t.shape) for n, t in reference.items()), name


def test_fused_expert_layout_is_read_too(saved, tmp_path):
    """Mixtral's 5.x in-memory names (mlp.experts.gate_up_proj (E, 2F, h), down_proj (E, h, F)) give
    the same model as the per-expert w1/w2/w3 files save_pretrained writes."""
    from safetensors.torch import save_file

    folder, hf = saved["mixtral"]
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(tmp_path / "model.safetensors"),
              metadata={"format": "pt"})
    assert any("gate_up_proj" in k for k in hf.state_dict())
    fused, legacy = mh.load(tmp_path).state_dict(), mh.load(folder).state_dict()
    assert fused.keys() == legacy.keys() and all(torch.equal(fused[k], legacy[k]) for k in fused)


def test_bfloat16_files_read_in_their_dtype(saved, tmp_path):
    folder, hf = saved["qwen2"]
    copy.deepcopy(hf).to(torch.bfloat16).save_pretrained(tmp_path)  # the fixture's model is shared
    source = HFSource(tmp_path)
    assert source.read("blocks.0.attn.qkv.bias", 0, 0, 8).dtype == torch.bfloat16
    ours = mh.load(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    exact = mh.load(folder).state_dict()
    assert all(torch.equal(v, exact[k].to(torch.bfloat16)) for k, v in ours.state_dict().items())


# -- slices: only the bytes asked for ---------------------------------------------------------------

@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A Mixtral saved in several shards (each under 40 kB), and its full reference state dict."""
    model = _hf_model("mixtral", seed=5, **CASES["mixtral"][1])
    folder = tmp_path_factory.mktemp("sharded")
    model.save_pretrained(folder, max_shard_size="40KB")
    assert (folder / "model.safetensors.index.json").exists()
    return folder, mh.load(folder).state_dict()


def test_slices_equal_the_full_tensor_slices(sharded):
    folder, full = sharded
    source = HFSource(folder)
    g = torch.Generator().manual_seed(0)
    for name in sorted(source.names()):
        tensor = full[name]
        for dim in range(tensor.dim()):
            n = tensor.shape[dim]
            for _ in range(2):
                start = int(torch.randint(0, n, (1,), generator=g))
                stop = int(torch.randint(start + 1, n + 1, (1,), generator=g))
                assert torch.equal(source.read(name, dim, start, stop), tensor.narrow(dim, start, stop - start)), \
                    (name, dim, start, stop)
    assert source.read("norm.weight", 0, 3, 3).shape == (0,)


def test_a_slice_opens_one_file_and_reads_only_its_bytes(sharded):
    folder, full = sharded
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 2
    source = HFSource(folder)
    assert source.opened == []  # headers only, so far
    # Q rows 16..32 of layer 1's fused QKV: q_proj rows only, from q_proj's file alone.
    q = source.read("blocks.1.attn.qkv.weight", 0, 16, 32)
    assert torch.equal(q, full["blocks.1.attn.qkv.weight"][16:32])
    assert source.opened == [index["model.layers.1.self_attn.q_proj.weight"]]
    assert source.bytes_read == q.numel() * 4
    # Experts 1..3 of layer 0's stacked down projection: those experts' w2 tensors only.
    before = source.bytes_read
    down = source.read("blocks.0.moe.experts.down", 0, 1, 3)
    assert torch.equal(down, full["blocks.0.moe.experts.down"][1:3])
    assert source.bytes_read - before == down.numel() * 4
    assert set(source.opened) <= {index[f"model.layers.{i}.{k}"] for i in (0, 1) for k in (
        "self_attn.q_proj.weight", "block_sparse_moe.experts.1.w2.weight", "block_sparse_moe.experts.2.w2.weight")}
    # A column slice of every row of the fused QKV reads h/4 of each of q, k and v.
    before = source.bytes_read
    source.read("blocks.0.attn.qkv.weight", 1, 0, 16)
    assert source.bytes_read - before == 128 * 16 * 4


# -- writing: meshattn -> HF ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["llama-tied-llama3", "llama-bias", "qwen2-window", "mistral-window", "mixtral"])
def test_save_then_from_pretrained_is_the_same_model(saved, tmp_path, name):
    folder, hf = saved[name]
    ours = mh.load(folder)
    mh.save(ours, tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(back) is type(hf)
    ids = _ids()
    # The same class with the same weights and config: bitwise the same logits.
    torch.testing.assert_close(_hf_logits(back, ids), _hf_logits(hf, ids), rtol=0, atol=0)
    again = mh.load(tmp_path)
    assert again.cfg == ours.cfg
    assert all(torch.equal(again.state_dict()[k], v) for k, v in ours.state_dict().items())


@pytest.mark.parametrize("overrides", [
    {"bias": True},
    {"qkv_bias": True, "window": 5, "tie_embeddings": True},
    {"window": 4, "rope_scaling": (4.0, 1.0, 4.0, 8), "rope_theta": 50000.0},
    {"n_experts": 4, "top_k": 2, "expert_ffn": 32, "aux_loss_coef": 0.02},
], ids=["llama-bias", "qwen2-window-tied", "mistral-llama3", "mixtral"])
def test_a_meshattn_model_exports_to_transformers(tmp_path, overrides):
    """A model born in meshattn (not read from HF) exports to the architecture transformers computes
    the same way; the round trip back is exact."""
    cfg = ModelConfig(d_model=64, n_heads=4, n_kv_heads=2, n_layers=2, d_ff=96, vocab_size=160, max_seq_len=64,
                      norm="rmsnorm", position="rope", activation="swiglu", **overrides)
    torch.manual_seed(0)
    ours = Transformer(cfg)
    _randomize(ours, 3)
    mh.save((cfg, ours.state_dict()), tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = _ids()
    torch.testing.assert_close(_hf_logits(hf, ids), _our_logits(ours, ids), **TOL)
    back = mh.load(tmp_path)
    # Training-only fields config.json does not carry, and d_ff, unused when every layer is MoE.
    assert dataclasses.replace(back.cfg, init_std=cfg.init_std, z_loss_coef=cfg.z_loss_coef, d_ff=cfg.d_ff) == cfg
    assert all(torch.equal(back.state_dict()[k], v) for k, v in ours.state_dict().items())


@pytest.mark.parametrize("overrides,named", [
    ({"norm": "layernorm"}, "norm='layernorm'"),
    ({"activation": "gelu"}, "activation='gelu'"),
    ({"position": "learned"}, "position='learned'"),
    ({"window": 4, "bias": True}, "bias=True"),
    ({"n_experts": 4, "n_shared_experts": 1}, "n_shared_experts=1"),
    ({"n_experts": 4, "capacity_factor": 1.25}, "capacity_factor=1.25"),
])
def test_save_refuses_what_no_architecture_holds(tmp_path, overrides, named):
    cfg = ModelConfig(**{**dict(d_model=32, n_heads=2, n_layers=2, d_ff=64, norm="rmsnorm", activation="swiglu"),
                         **overrides})
    with pytest.raises(ConfigError, match=named.replace("(", r"\(").replace(".", r"\.")):
        mh.save(Transformer(cfg), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- bad inputs -------------------------------------------------------------------------------------

def _copy(folder, tmp_path, edit=None):
    out = tmp_path / "model"
    shutil.copytree(folder, out)
    if edit is not None:
        config = json.loads((out / "config.json").read_text())
        edit(config)
        (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("edit,named", [
    (lambda c: c.update(architectures=["GPTNeoXForCausalLM"]), "architecture GPTNeoXForCausalLM is not supported"),
    (lambda c: c.update(architectures=["Qwen2MoeForCausalLM"]), "Qwen2MoeForCausalLM is not supported: its shared"),
    (lambda c: c.update(architectures=["DeepseekV3ForCausalLM"]), "multi-head latent attention"),
    (lambda c: c["rope_parameters"].update(rope_type="yarn", factor=4.0), "rope type 'yarn'"),
    (lambda c: c.update(head_dim=32), "head_dim=32"),
    (lambda c: c.update(hidden_act="gelu"), "hidden_act='gelu'"),
    (lambda c: c.update(mlp_bias=True), "attention_bias=False with mlp_bias=True"),
    (lambda c: c.update(intermediate_size=128),
     r"model\.safetensors: tensor model\.layers\.0\.mlp\.up_proj\.weight has shape \[96, 64\] but config\.json "
     r"implies \[128, 64\]"),
], ids=["unknown-arch", "qwen2-moe", "deepseek-v3", "yarn", "head-dim", "gelu", "mlp-bias-only", "shape"])
def test_read_refuses_by_name(saved, tmp_path, edit, named):
    folder = _copy(saved["llama"][0], tmp_path, edit)
    with pytest.raises(ConfigError, match=named):
        mh.load(folder)


def test_qwen2_per_layer_window_is_refused(saved, tmp_path):
    def per_layer(c):
        c.update(use_sliding_window=True, sliding_window=4, max_window_layers=1)
        c.pop("layer_types")

    with pytest.raises(ConfigError, match="max_window_layers=1 of 2"):
        mh.read_config(_copy(saved["qwen2"][0], tmp_path, per_layer))


def test_missing_or_broken_files_are_named(saved, tmp_path):
    with pytest.raises(ConfigError, match=f"{tmp_path} has no config.json"):
        mh.load(tmp_path)
    assert not mh.is_hf_folder(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json is not a readable config.json"):
        mh.read_config(tmp_path)
    folder = _copy(saved["llama"][0], tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ConfigError, match=r"model\.safetensors: tensor model\.\S+ ends at byte \d+ .* truncated"):
        mh.load(folder)
    weights.unlink()
    with pytest.raises(ConfigError, match="has neither model.safetensors"):
        mh.load(folder)


# -- tokenizers -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    """A byte-level BPE trained on a few strings, with <s> prepended by its post-processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<eot>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the mesh splits attention heads", "rings pass keys and values", "héllo wörld"] * 4,
                            trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    folder = tmp_path_factory.mktemp("tokenizer")
    tok.save(str(folder / "tokenizer.json"))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "bos_token_id": 0, "eos_token_id": 1}))
    return folder


def test_tokenizer_round_trips_and_reads_special_ids(tokenizer_folder, tmp_path):
    tok = mh.load_tokenizer(tokenizer_folder)
    text = "the rings pass héllo, unseen text: ∑ 42!"
    ids = tok.encode(text)
    assert ids[0] == 0 and tok.decode(ids) == text
    assert (tok.bos_token_id, tok.eos_token_ids) == (0, (1,))
    (tokenizer_folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2]}))
    try:
        assert mh.load_tokenizer(tokenizer_folder).eos_token_ids == (1, 2)  # generation_config.json wins
    finally:
        (tokenizer_folder / "generation_config.json").unlink()
    with pytest.raises(ConfigError, match=f"{tmp_path} has no tokenizer.json"):
        mh.load_tokenizer(tmp_path)


def test_byte_tokenizer():
    tok = mh.ByteTokenizer()
    text = "bytes: é ∑"
    assert tok.encode(text) == list(text.encode()) and tok.decode(tok.encode(text)) == text
    assert tok.eos_token_ids == () and tok.bos_token_id is None
    assert tok.decode([104, 105, 300]) == "hi"


def test_save_copies_the_tokenizer_and_its_ids(saved, tokenizer_folder, tmp_path):
    mh.save(mh.load(saved["llama"][0]), tmp_path, tokenizer_from=tokenizer_folder)
    tok = mh.load_tokenizer(tmp_path)
    assert (tok.bos_token_id, tok.eos_token_ids) == (0, (1,))
    assert tok.decode(tok.encode("rings")) == "rings"
    assert transformers.AutoConfig.from_pretrained(tmp_path).eos_token_id == 1


# -- generation -------------------------------------------------------------------------------------

def test_greedy_generation_matches_transformers(saved):
    inference = pytest.importorskip("meshattn.inference")
    folder, hf = saved["llama"]
    ours = mh.load(folder)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 160, (n,), generator=g).tolist() for n in (3, 7, 12)]
    eos = hf.config.eos_token_id
    got = inference.generate(ours, prompts, 10, greedy=True, eos_token_ids=(eos,))
    for prompt, tokens in zip(prompts, got):
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=eos,
                          pad_token_id=eos)
        assert tokens == out[0, len(prompt):].tolist()


def test_batched_greedy_generation_matches_transformers_batch(saved):
    """One batch of prompts of different lengths: transformers left-pads with an attention mask,
    meshattn right-pads with per-row cache lengths; float64 on both sides, so no near-tie of the
    random model can flip a choice."""
    from meshattn.inference import generate

    folder, hf = saved["llama"]
    ref = copy.deepcopy(hf).to(torch.float64)
    ours = mh.load(folder, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 160, (n,), generator=g).tolist() for n in (2, 9, 5, 14)]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = ref.generate(ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                       eos_token_id=None, pad_token_id=0)
    assert generate(ours, prompts, 8) == out[:, width:].tolist()
