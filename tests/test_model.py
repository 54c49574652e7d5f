"""The reference model itself: the oracle must be right before anything is compared to it."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch

from meshattn import ModelConfig, Transformer
from meshattn.model.transformer import apply_rotary, attention_core, rotary_tables


def _naive_attention(q, k, v):
    """softmax(q k^T / sqrt(D) + causal mask) v, written out, with KV heads repeated."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, S, S)
    mask = torch.ones(s.shape[-2:], dtype=torch.bool).tril()
    return s.masked_fill(~mask, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_attention_core_is_causal_softmax_attention(heads, kv_heads):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, heads, 7, 6, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, kv_heads, 7, 6, generator=g, dtype=torch.float64) for _ in range(2))
    torch.testing.assert_close(attention_core(q, k, v), _naive_attention(q, k, v), rtol=1e-12, atol=1e-12)


def test_rotary_scores_depend_only_on_relative_position():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8, generator=g, dtype=torch.float64), torch.randn(1, 1, 1, 8, generator=g, dtype=torch.float64)
    cos, sin = rotary_tables(torch.arange(20), 8, 10000.0, torch.float64)

    def score(m, n):
        return (apply_rotary(q, cos[m:m + 1], sin[m:m + 1]) * apply_rotary(k, cos[n:n + 1], sin[n:n + 1])).sum()

    torch.testing.assert_close(score(3, 1), score(17, 15))
    torch.testing.assert_close(score(0, 0), (q * k).sum())  # position 0 is the identity


def test_gqa_equals_mha_with_repeated_kv_weights():
    cfg = ModelConfig(d_model=32, n_heads=4, n_kv_heads=2, n_layers=1, vocab_size=64, max_seq_len=16)
    torch.manual_seed(0)
    gqa = Transformer(cfg).double()
    mha = Transformer(ModelConfig(**{**cfg.__dict__, "n_kv_heads": 4})).double()
    state = gqa.state_dict()
    w = state["blocks.0.attn.qkv.weight"]
    D = cfg.head_dim
    q, k, v = w.split([4 * D, 2 * D, 2 * D])
    rep = lambda t: t.view(2, D, -1).repeat_interleave(2, 0).reshape(4 * D, -1)  # noqa: E731
    state["blocks.0.attn.qkv.weight"] = torch.cat([q, rep(k), rep(v)])
    mha.load_state_dict(state)
    ids = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(gqa(ids)[0], mha(ids)[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("position", ["rope", "learned"])
def test_model_is_causal(position):
    cfg = ModelConfig(d_model=32, n_heads=4, n_layers=2, vocab_size=64, max_seq_len=16, position=position)
    model = Transformer(cfg).double()
    ids = torch.randint(0, 64, (1, 12))
    changed = ids.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 64
    a, b = model(ids)[0], model(changed)[0]
    torch.testing.assert_close(a[:, :8], b[:, :8], rtol=0, atol=0)
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_loss_at_init_is_near_uniform():
    cfg = ModelConfig(vocab_size=256)
    ids = torch.randint(0, 256, (2, 33))
    _, loss = Transformer(cfg)(ids[:, :-1], ids[:, 1:])
    assert abs(loss.item() - math.log(256)) < 0.1


def test_tied_embeddings_share_one_tensor():
    model = Transformer(ModelConfig(tie_embeddings=True))
    assert model.head.weight is model.tok_emb.weight


def test_reference_model_never_imports_distributed():
    imported = set()
    for path in (Path(__file__).parents[1] / "src/meshattn/model").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                imported.add(("." * node.level) + (node.module or ""))
    assert not any("distributed" in m for m in imported), imported
    ours = {m for m in imported if m.startswith(".")}
    assert ours <= {".transformer", ".mask", ".moe", "..config"}, ours  # the model package imports only config
