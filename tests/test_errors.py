"""Bad layouts are refused on every rank, with the same message, before any collective."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from meshattn import ConfigError, ModelConfig, ParallelConfig, TrainConfig, Transformer
from meshattn.mesh import ParallelDims
from meshattn.parallel import parallelize


def refuse_everywhere(rank, world):
    from distributed import mesh_for

    attempts = {
        "world": lambda: ParallelDims(ParallelConfig(dp=1, tp=2 * world)),
        "heads": lambda: TrainConfig(parallel=ParallelConfig(tp=3)),
        "kv": lambda: parallelize(Transformer(ModelConfig(d_model=48, n_heads=6, n_kv_heads=3, vocab_size=64)),
                                  mesh_for(ParallelConfig(tp=world))),
        "vocab": lambda: parallelize(Transformer(ModelConfig(vocab_size=255)),
                                     mesh_for(ParallelConfig(tp=world, vocab_parallel="on"))),
    }
    messages = {}
    for name, attempt in attempts.items():
        try:
            attempt()
        except ConfigError as e:
            messages[name] = str(e)
    # Had any rank issued a collective before failing, this one would be mismatched.
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    assert t.item() == world * (world + 1) / 2
    return messages


def test_invalid_layouts_fail_identically_on_every_rank(pools):
    results = pools.run(2, refuse_everywhere)
    assert all(r == results[0] for r in results)
    msgs = results[0]
    assert set(msgs) == {"world", "heads", "kv", "vocab"}, msgs
    assert "dp*cp*tp = 1*1*4 = 4 does not match the world size 2" in msgs["world"]
    assert "n_heads=4 is not divisible by tp=3; legal tp sizes: 1, 2, 4" in msgs["heads"]
    assert "n_kv_heads=3 is neither a multiple nor a divisor of tp=2" in msgs["kv"]
    assert "vocab_size=255 is not divisible by tp=2" in msgs["vocab"] and "pad vocab_size to 256" in msgs["vocab"]


def test_parallelize_checks_the_model_before_touching_any_group():
    # A stand-in for ParallelDims that has a config and no groups: the check must come first.
    with pytest.raises(ConfigError, match="n_heads=4 is not divisible by tp=3"):
        parallelize(Transformer(ModelConfig()), SimpleNamespace(cfg=ParallelConfig(tp=3)))
