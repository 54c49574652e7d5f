"""Property-based tests (hypothesis) over random model shapes, head counts and layouts of 4 ranks:
a valid combination computes what the reference computes (loss, logits, every gradient); an
invalid one is refused with a message naming the fix, the same on every rank, never a hang
(the pool's job timeout would catch one) and never a wrong answer. Examples are derandomised so
CI runs the same ones every time."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshattn import ConfigError, ModelConfig, ParallelConfig, context_attention, shard_sequence
from meshattn.comm import Axis
from parity import assert_close
from test_tensor_parallel import check_parity

WORLD = 4
SETTINGS = settings(max_examples=12, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@st.composite
def models_and_layouts(draw):
    n_heads = draw(st.sampled_from([2, 4, 8]))
    model = dict(
        d_model=n_heads * draw(st.sampled_from([2, 4, 6])), n_heads=n_heads,
        n_kv_heads=draw(st.sampled_from([g for g in (1, 2, 4, 8) if n_heads % g == 0])),
        n_layers=draw(st.integers(1, 2)), d_ff=draw(st.sampled_from([8, 16, 24])), vocab_size=64, max_seq_len=16,
        norm=draw(st.sampled_from(["layernorm", "rmsnorm"])), position=draw(st.sampled_from(["rope", "learned"])),
        activation=draw(st.sampled_from(["gelu", "swiglu"])), bias=draw(st.booleans()),
        tie_embeddings=draw(st.booleans()))
    tp = draw(st.sampled_from([1, 2, 4]))
    cp = draw(st.sampled_from([c for c in (1, 2, 4) if tp * c <= WORLD]))
    layout = dict(dp=WORLD // (tp * cp), tp=tp, cp=cp, sp=draw(st.booleans()) if tp > 1 else False,
                  vocab=draw(st.sampled_from(["auto", "on", "off"])) if tp > 1 else "auto")
    if cp > 1:
        impl = draw(st.sampled_from(["allgather", "ring", "ulysses"] + (["hybrid"] if cp == 4 else [])))
        layout.update(cp_impl=impl, cp_layout=draw(st.sampled_from(["contiguous", "zigzag"])),
                      ulysses_size=2 if impl == "hybrid" else None)
    return model, layout


def _refusal(model: dict, layout: dict) -> str | None:
    """The configuration error, if any, raised before any process group is touched."""
    try:
        par = ParallelConfig(**{k: v for k, v in layout.items() if k not in ("sp", "vocab")},
                             sequence_parallel=layout["sp"], vocab_parallel=layout["vocab"])
        par.check_model(ModelConfig(**model))
    except ConfigError as e:
        return str(e)
    return None


@SETTINGS
@given(models_and_layouts())
def test_random_models_and_layouts_equal_the_reference_or_are_refused(pools, example):
    model, layout = example
    refusal = _refusal(model, layout)
    if refusal is not None:  # e.g. heads not divisible by tp, Ulysses heads not divisible by cp
        assert any(word in refusal for word in ("legal", "choose", "must", "use ")), refusal
        return
    counts = pools.run(WORLD, check_parity, model=model, dtype="float32", **layout)
    assert len(set(counts)) == 1 and counts[0] > 0


def attention_example(rank, world, shape, impl, layout, causal):
    """'ok' if the context-parallel result equals SDPA on the whole sequence, else the refusal."""
    B, H, G, S, D = shape
    g = torch.Generator().manual_seed(0)
    q, dout = (torch.randn(B, H, S, D, generator=g) for _ in range(2))
    k, v = (torch.randn(B, G, S, D, generator=g) for _ in range(2))
    axis = Axis("cp", dist.group.WORLD, world, rank)
    try:
        local = [shard_sequence(t, axis, 2, layout).requires_grad_() for t in (q, k, v)]
        out = context_attention(*local, axis, impl=impl, layout=layout, causal=causal)
    except ValueError as e:
        return f"refused: {e}"
    out.backward(shard_sequence(dout, axis, 2, layout))
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    rep = H // G
    o = F.scaled_dot_product_attention(ref[0], ref[1].repeat_interleave(rep, 1), ref[2].repeat_interleave(rep, 1),
                                       is_causal=causal)
    o.backward(dout)
    assert_close(out.detach(), shard_sequence(o.detach(), axis, 2, layout), "out")
    for name, t, r in zip("qkv", local, ref):
        assert_close(t.grad, shard_sequence(r.grad, axis, 2, layout), f"d{name}")
    return "ok"


@SETTINGS
@given(st.tuples(st.integers(1, 2), st.sampled_from([1, 2, 3, 4, 6, 8]), st.sampled_from([1, 2, 3, 4]),
                 st.sampled_from([4, 8, 12, 16, 24]), st.sampled_from([3, 4, 8])),
       st.sampled_from(["allgather", "ring", "ulysses"]), st.sampled_from(["contiguous", "zigzag"]), st.booleans())
def test_random_attention_shapes_equal_sdpa_or_are_refused_alike(pools, shape, impl, layout, causal):
    B, H, G, S, D = shape
    if H % G:
        G = 1  # q heads must be a multiple of KV heads for the reference too
    answers = pools.run(WORLD, attention_example, shape=(B, H, G, S, D), impl=impl, layout=layout, causal=causal)
    assert len(set(answers)) == 1, answers  # every rank: the same verdict
    assert answers[0] == "ok" or "divisible" in answers[0] or "multiple" in answers[0], answers[0]
