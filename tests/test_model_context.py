"""The whole model with the sequence split (cp), alone and with dp and tp, against the reference:
logits, loss, the block-0 input gradient and every weight gradient (check_parity)."""

from __future__ import annotations

import pytest

from test_tensor_parallel import check_parity

# (world, dp, cp, tp, sp, impl, layout, ulysses_size, model)
LAYOUTS = [
    (2, 1, 2, 1, False, "ring", "zigzag", None, "gqa-llama"),
    (2, 1, 2, 1, False, "ring", "contiguous", None, "mha-gpt2"),
    (2, 1, 2, 1, False, "ulysses", "zigzag", None, "mqa"),
    (2, 1, 2, 1, False, "allgather", "zigzag", None, "mha-gpt2"),
    (4, 1, 2, 2, True, "ring", "zigzag", None, "mha-gpt2"),
    (4, 2, 2, 1, False, "ulysses", "contiguous", None, "gqa-llama"),
    (4, 1, 4, 1, False, "hybrid", "zigzag", 2, "mqa"),
    (4, 1, 4, 1, False, "allgather", "contiguous", None, "gqa-llama"),
    (4, 1, 2, 2, False, "ulysses", "zigzag", None, "mqa"),
    (4, 2, 2, 1, False, "hybrid", "zigzag", 2, "mha-gpt2"),
    (8, 2, 2, 2, False, "ring", "zigzag", None, "gqa-llama"),
    (8, 2, 2, 2, True, "allgather", "zigzag", None, "mqa"),
    (8, 1, 4, 2, False, "hybrid", "zigzag", 2, "gqa-llama"),
    (8, 1, 8, 1, False, "hybrid", "zigzag", 2, "mha-gpt2"),
]


@pytest.mark.parametrize("world,dp,cp,tp,sp,impl,layout,ulysses_size,model", LAYOUTS,
                         ids=[f"dp{d}-cp{c}-tp{t}{'-sp' if s else ''}-{i}{u or ''}-{l}-{m}"
                              for _, d, c, t, s, i, l, u, m in LAYOUTS])
def test_model_with_context_parallelism_matches_reference(pools, world, dp, cp, tp, sp, impl, layout, ulysses_size,
                                                          model):
    pools.run(world, check_parity, dp=dp, tp=tp, sp=sp, model=model, dtype="float32", cp=cp, cp_impl=impl,
              cp_layout=layout, ulysses_size=ulysses_size, seq=16)


@pytest.mark.parametrize("impl", ["ring", "ulysses"])
def test_model_with_context_parallelism_float64(pools, impl):
    pools.run(4, check_parity, dp=1, tp=2, sp=False, model="gqa-llama", dtype="float64", cp=2, cp_impl=impl,
              cp_layout="zigzag", seq=16)


# Packed documents (random lengths, length-1 documents, a row of one document, padding) and
# sliding windows through the whole model, every impl and layout, with tp and dp beside.
# (world, dp, cp, tp, impl, layout, ulysses_size, model, window, packed)
MASKED = [
    (1, 1, 1, 1, "ring", "zigzag", None, "gqa-llama", 5, True),
    (2, 1, 1, 2, "ring", "zigzag", None, "mha-gpt2", None, True),
    (2, 1, 2, 1, "ring", "zigzag", None, "gqa-llama", 3, True),
    (2, 1, 2, 1, "ring", "balanced", None, "mha-gpt2", None, True),
    (2, 1, 2, 1, "allgather", "contiguous", None, "mqa", 6, False),
    (4, 1, 2, 2, "ulysses", "balanced", None, "mqa", 4, True),
    (4, 2, 2, 1, "allgather", "zigzag", None, "gqa-llama", None, True),
    (4, 1, 4, 1, "ring", "contiguous", None, "gqa-llama", 2, True),
    (4, 1, 4, 1, "hybrid", "zigzag", 2, "mha-gpt2", 9, True),
    (8, 1, 4, 2, "hybrid", "balanced", 2, "gqa-llama", None, True),
    (8, 2, 2, 2, "ring", "zigzag", None, "mqa", 7, True),
]


@pytest.mark.parametrize("world,dp,cp,tp,impl,layout,ulysses_size,model,window,packed", MASKED,
                         ids=[f"dp{d}-cp{c}-tp{t}-{i}{u or ''}-{l}-{m}-w{w}{'-packed' if pk else ''}"
                              for _, d, c, t, i, l, u, m, w, pk in MASKED])
def test_model_with_masks_matches_reference(pools, world, dp, cp, tp, impl, layout, ulysses_size, model, window,
                                            packed):
    pools.run(world, check_parity, dp=dp, tp=tp, sp=False, model=model, dtype="float32", cp=cp, cp_impl=impl,
              cp_layout=layout, ulysses_size=ulysses_size, seq=16, window=window, packed=packed)


def test_model_with_masks_float64(pools):
    """Packed documents and a window at cp=2 x tp=2 in float64: differences are rounding only (1e-13)."""
    pools.run(4, check_parity, dp=1, tp=2, sp=False, model="gqa-llama", dtype="float64", cp=2, cp_impl="ring",
              cp_layout="balanced", seq=16, window=5, packed=True)
