"""Training utilities on a real mesh: sampling, checkpoints, configuration agreement."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from distributed import mesh_for
from meshattn import ConfigError, ModelConfig, ParallelConfig, TrainConfig, Transformer
from meshattn.corpus import Corpus, decode, encode
from meshattn.parallel import parallelize
from meshattn.train import check_same_config, generate, save_checkpoint

MODEL = ModelConfig(d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, d_ff=64, vocab_size=256, max_seq_len=24,
                    norm="rmsnorm", position="rope", activation="swiglu", init_std=0.2)


def _reference_greedy(ref: Transformer, prompt: str, n: int) -> str:
    ids = encode(prompt)
    for _ in range(n):
        logits, _ = ref(ids[-ref.cfg.max_seq_len:][None])
        ids = torch.cat([ids, logits[0, -1].argmax().reshape(1)])
    return decode(ids[len(encode(prompt)):].tolist())


def greedy(rank, world, tp, sp, cp=1, impl="ring"):
    torch.manual_seed(0)
    ref = Transformer(MODEL).double()
    par = ParallelConfig(dp=world // tp // cp, tp=tp, cp=cp, sequence_parallel=sp, cp_impl=impl)
    model = parallelize(ref, mesh_for(par), par)
    # 30 new tokens from a 5-byte prompt run past max_seq_len=24: the context window slides.
    got = generate(model, "def f", 30, temperature=0)
    assert got == _reference_greedy(ref, "def f", 30), (got, _reference_greedy(ref, "def f", 30))
    return got


@pytest.mark.parametrize("tp,sp,cp,impl", [(2, False, 1, "ring"), (4, True, 1, "ring"), (1, False, 2, "ring"),
                                           (2, True, 2, "ulysses")])
def test_greedy_generation_matches_reference(pools, tp, sp, cp, impl):
    texts = pools.run(4, greedy, tp=tp, sp=sp, cp=cp, impl=impl)
    assert len(set(texts)) == 1 and len(texts[0]) > 0


def checkpoint(rank, world, out):
    torch.manual_seed(0)
    ref = Transformer(MODEL)
    cfg = TrainConfig(model=MODEL, parallel=ParallelConfig(dp=2, tp=2), seq_len=16, batch_size=4, out=out)
    model = parallelize(ref, mesh_for(cfg.parallel), cfg.parallel)
    path = save_checkpoint(model, cfg, step=3, out=__import__("pathlib").Path(out))
    if rank == 0:
        saved = torch.load(path, weights_only=True)
        assert saved["step"] == 3 and TrainConfig.from_dict(saved["config"]) == cfg
        expected = ref.state_dict()
        assert saved["model"].keys() == expected.keys()
        for name, t in expected.items():
            assert torch.equal(saved["model"][name], t), name
    return path is not None


def test_checkpoint_holds_the_full_reference_weights(pools, tmp_path):
    written = pools.run(4, checkpoint, out=str(tmp_path))
    assert written == [True, False, False, False]  # rank 0 writes, once


def disagree(rank, world):
    cfg = TrainConfig(lr=3e-3 if rank != 1 else 1e-3, parallel=ParallelConfig(tp=world))
    try:
        check_same_config(cfg)
    except ConfigError as e:
        return str(e)
    return None


def test_ranks_with_different_configs_are_refused_naming_the_field(pools):
    msgs = pools.run(2, disagree)
    assert msgs[0] == msgs[1] and msgs[0] is not None
    assert "rank(s) [1] differ from rank 0 in lr (0.003 vs 0.001)" in msgs[0]


def test_short_text_is_refused_before_training(tmp_path):
    f = tmp_path / "small.txt"
    f.write_text("x" * 3000)
    corpus = Corpus.from_path(str(f))
    with pytest.raises(ValueError, match="the validation split has 150 bytes"):
        corpus.check(256)
    corpus.check(64)


def test_out_of_range_token_ids_are_refused():
    from meshattn.comm import Axis
    from meshattn.parallel.tensor import TensorParallelTransformer

    model = TensorParallelTransformer(dataclasses.replace(MODEL, vocab_size=256), Axis.single("tp"), Axis.single("kv"))
    with pytest.raises(IndexError, match=r"token ids must lie in \[0, 256\); got \[0, 300\]"):
        model(torch.tensor([[0, 300]]))
