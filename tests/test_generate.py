"""KV-cache generation (meshattn.inference) against recomputing the whole context, and every
parallel layout against the single device, token for token.

Oracles: the reference model's full forward (no cache) for the cached logits, in float64 so
rounding cannot flip a greedy choice; the single-device cached generation for every layout.
"""

from __future__ import annotations

import pytest
import torch

from meshattn.config import ModelConfig, ParallelConfig, preset
from meshattn.inference import Engine, Sampling, generate, run
from meshattn.inference.sampling import filtered_probs, pick
from meshattn.model import Transformer
from meshattn.parallel import parallelize

from distributed import mesh_for

PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [9, 8], list(range(40, 61)), [5] * 13]
NEW = 8
SAMPLED = dict(greedy=False, temperature=0.9, top_k=50, top_p=0.9, seed=3)


def _model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg).double()


def _recompute(model: Transformer, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
    return ids[len(prompt):]


CONFIGS = {
    "tiny": preset("tiny"),
    "window": preset("tiny", window=6),
    "learned-gelu-bias": preset("tiny", position="learned", norm="layernorm", activation="gelu", bias=True,
                                tie_embeddings=True),
    "qwen-bias-rope-scaling": preset("tiny", qkv_bias=True, rope_scaling=(8.0, 1.0, 4.0, 64)),
    "moe": preset("moe-tiny"),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cached_logits_equal_the_full_forward(name):
    """Prefill and two decode steps: each row's next-token logits equal a forward over its whole
    context without the cache (float64, so equal to ~1e-13)."""
    model = _model(CONFIGS[name])
    engine = Engine(model)
    contexts = [list(p) for p in PROMPTS]
    logits = engine.prefill(PROMPTS, 4)
    for _ in range(3):
        full = torch.stack([model(torch.tensor([c]))[0][0, -1] for c in contexts])
        torch.testing.assert_close(logits, full, rtol=1e-11, atol=1e-11)
        tokens = logits.argmax(-1)
        for c, t in zip(contexts, tokens.tolist()):
            c.append(t)
        logits = engine.decode(tokens)


@pytest.mark.parametrize("name", ["tiny", "window", "moe"])
def test_greedy_batch_equals_one_prompt_at_a_time_without_cache(name):
    model = _model(CONFIGS[name])
    assert generate(model, PROMPTS, NEW) == [_recompute(model, p, NEW) for p in PROMPTS]


def test_eos_stops_a_request_and_is_kept():
    model = _model(CONFIGS["tiny"])
    free = generate(model, PROMPTS, NEW)
    eos = free[0][2]
    out = generate(model, PROMPTS, NEW, eos_token_ids=[eos])
    for f, o in zip(free, out):
        cut = f.index(eos) + 1 if eos in f else len(f)
        assert o == f[:cut]
    assert out[0][-1] == eos and len(out[0]) == 3


def test_sampling_is_seeded_per_request_and_filters_as_documented():
    model = _model(CONFIGS["tiny"])
    a = generate(model, PROMPTS, NEW, **SAMPLED)
    assert a == generate(model, PROMPTS, NEW, **SAMPLED)
    assert generate(model, PROMPTS[:2], NEW, **SAMPLED) == a[:2]  # the draws do not depend on the batch
    assert a != generate(model, PROMPTS, NEW, **{**SAMPLED, "seed": 4})
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]])
    p = filtered_probs(logits, Sampling(False, 1.0, 2, 1.0))
    assert torch.equal(p[0, :3], torch.zeros(3, dtype=torch.float64)) and p[0, 3:].sum() == 1
    full = torch.softmax(logits.double(), -1)[0]  # 0.012 0.032 0.086 0.234 0.636
    p = filtered_probs(logits, Sampling(False, 1.0, 0, 0.8))  # 0.636 < 0.8 <= 0.636 + 0.234: two kept
    torch.testing.assert_close(p[0, 3:], full[3:] / full[3:].sum())
    assert p[0, :3].sum() == 0
    g = [torch.Generator().manual_seed(0) for _ in range(2)]
    draws = pick(torch.tensor([[0.0, 50.0, 0.0], [50.0, 0.0, 0.0]]), Sampling(False, 1.0), g)
    assert draws.tolist() == [1, 0]


# -- every layout against the single device -----------------------------------------------------------

def check_layout(rank, world, model="tiny", sampled=False, prompts=None, **layout):
    cfg = CONFIGS[model]
    ref = _model(cfg)
    prompts = PROMPTS if prompts is None else prompts
    kwargs = SAMPLED if sampled else {}
    want = generate(ref, prompts, NEW, **kwargs)
    pm = parallelize(ref, mesh_for(ParallelConfig(**layout)))
    got = run(pm, prompts, NEW, Sampling(**kwargs) if kwargs else Sampling())
    assert got.tokens == want, (got.tokens, want)
    if not layout.get("dp", 1) > 1:  # the prefill's logits, rank by rank
        engine, oracle = Engine(pm), Engine(ref)
        torch.testing.assert_close(engine.prefill(prompts, 2), oracle.prefill(prompts, 2), rtol=1e-11, atol=1e-11)
    return got.new_tokens


LAYOUTS = {  # name: (world, layout)
    "tp2": (2, dict(tp=2)),
    "tp4-replicated-kv": (4, dict(tp=4)),
    "tp2-qkv-bias-rope-scaling": (2, dict(tp=2, model="qwen-bias-rope-scaling")),
    "cp2-ring": (2, dict(cp=2, cp_impl="ring")),
    "cp2-allgather-contiguous": (2, dict(cp=2, cp_impl="allgather", cp_layout="contiguous")),
    "cp2-ulysses": (2, dict(cp=2, cp_impl="ulysses")),
    "cp4-ring": (4, dict(cp=4, cp_impl="ring")),
    "cp4-allgather": (4, dict(cp=4, cp_impl="allgather")),
    "cp4-ulysses": (4, dict(cp=4, cp_impl="ulysses", model="moe")),
    "cp4-hybrid": (4, dict(cp=4, cp_impl="hybrid", ulysses_size=2)),
    "cp2-window": (2, dict(cp=2, model="window")),
    "dp2xtp2": (4, dict(dp=2, tp=2)),
    "cp2xtp2-sampled": (4, dict(cp=2, tp=2, sampled=True)),
    "dp2xcp2-sampled": (4, dict(dp=2, cp=2, sampled=True)),
    "dp2-ep2-moe": (2, dict(dp=2, ep=2, model="moe")),
    "dp4-ep4-moe-idle-rank": (4, dict(dp=4, ep=4, model="moe", prompts=PROMPTS[:3])),
    "dp2xtp2-ep4-moe-sampled": (4, dict(dp=2, tp=2, ep=4, model="moe", sampled=True)),
    # weights sharded over dp x cp: every rank steps until all have stopped (FSDP all-gathers)
    "dp4-sharded-idle-rank": (4, dict(dp=4, shard="dp", prompts=PROMPTS[:3])),
    "dp2xcp2-sharded-sampled": (4, dict(dp=2, cp=2, shard="dp", sampled=True)),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_layout_generates_the_single_device_tokens(pools, name):
    world, layout = LAYOUTS[name]
    out = pools.run(world, check_layout, **layout)
    assert len(set(out)) == 1 and out[0] > 0


# -- weights straight into the layout ------------------------------------------------------------------

def read_slices(rank, world, folder, tp):
    from meshattn import hf
    from meshattn.parallel import build, gather_state_dict

    source = hf.HFSource(folder)
    pm = build(hf.read_config(folder), mesh_for(ParallelConfig(tp=tp)), source)
    local = sum(p.numel() * 4 for p in pm.local.parameters())  # float32 file
    full = hf.load(folder).state_dict()
    got = gather_state_dict(pm)
    for name, t in full.items():
        assert torch.equal(got[name], t), name
    return source.bytes_read, local


def test_a_tp_rank_reads_only_its_slices_of_the_safetensors(pools, tmp_path):
    """At tp = 4 each rank reads exactly the bytes of its own parameters (replicated norms and
    the replicated KV head included), and the gathered weights equal the folder's."""
    from meshattn import hf

    torch.manual_seed(0)
    hf.save(Transformer(preset("tiny", vocab_size=512, n_kv_heads=2)), tmp_path)
    total = sum(t.numel() * 4 for t in hf.load(tmp_path).state_dict().values())
    for read, local in pools.run(4, read_slices, folder=str(tmp_path), tp=4):
        assert read == local < total / 2
