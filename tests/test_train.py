"""Training utilities on a real mesh: sampling, checkpoints, configuration agreement."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from distributed import mesh_for
from meshattn import ConfigError, ModelConfig, ParallelConfig, TrainConfig, Transformer
from meshattn.training import checkpoint as ckpt
from meshattn.training.corpus import Corpus, decode, encode
from meshattn.parallel import parallelize
from meshattn.training.scaler import LossScaler
from meshattn.training.generate import generate
from meshattn.training.loop import TrainResult, _nonfinite, check_same_config
from meshattn.training.step import NonFiniteError, build_model, make_optimizer, train_step

MODEL = ModelConfig(d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, d_ff=64, vocab_size=256, max_seq_len=24,
                    norm="rmsnorm", position="rope", activation="swiglu", init_std=0.2)


def _reference_greedy(ref: Transformer, prompt: str, n: int) -> str:
    """Recomputing the whole context for every token: the oracle of the cached sample."""
    ids = encode(prompt)
    for _ in range(n):
        logits, _ = ref(ids[None])
        ids = torch.cat([ids, logits[0, -1].argmax().reshape(1)])
    return decode(ids[len(encode(prompt)):].tolist())


def greedy(rank, world, tp, sp, cp=1, impl="ring"):
    torch.manual_seed(0)
    ref = Transformer(MODEL).double()
    par = ParallelConfig(dp=world // tp // cp, tp=tp, cp=cp, sequence_parallel=sp, cp_impl=impl)
    model = parallelize(ref, mesh_for(par))
    # 30 new tokens asked after a 5-byte prompt: the sample stops at max_seq_len=24, after 19.
    got = generate(model, "def f", 30, temperature=0)
    assert got == _reference_greedy(ref, "def f", 19), (got, _reference_greedy(ref, "def f", 19))
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
    model = parallelize(ref, mesh_for(cfg.parallel))
    path = ckpt.save(model, make_optimizer(model, cfg), cfg, 3, Path(out))
    if rank == 0:
        saved, meta = ckpt.load_reference(Path(out))
        assert meta["step"] == 3 and TrainConfig.from_dict(meta["config"]) == cfg
        expected = ref.state_dict()
        assert saved.keys() == expected.keys()
        for name, t in expected.items():
            assert torch.equal(saved[name], t), name
    return path.name


def test_checkpoint_holds_the_full_reference_weights(pools, tmp_path):
    assert pools.run(4, checkpoint, out=str(tmp_path)) == ["step-00000003"] * 4


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
    from meshattn.parallel.transformer import ParallelTransformer

    model = ParallelTransformer(dataclasses.replace(MODEL, vocab_size=256), Axis.single("tp"), Axis.single("kv"))
    with pytest.raises(IndexError, match=r"token ids must lie in \[0, 256\); got \[0, 300\]"):
        model(torch.tensor([[0, 300]]))


def nan_on_one_rank(rank, world):
    """rank 3 of dp2 x tp2 gets NaN in one weight's gradient: every rank sees a non-finite
    global gradient norm and no rank takes the optimizer step."""
    model_cfg = ModelConfig(d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, d_ff=64, vocab_size=256, max_seq_len=32)
    cfg = TrainConfig(model=model_cfg, parallel=ParallelConfig(dp=2, tp=2), steps=3, batch_size=4, seq_len=32,
                      sample_tokens=0)
    corpus = Corpus.from_path(None, max_bytes=1 << 16)
    model = build_model(cfg, mesh_for(cfg.parallel))
    opt = make_optimizer(model, cfg)
    train_step(model, opt, corpus, 0, cfg)  # a normal step first (optimizer state exists)
    before = [p.detach().clone() for p in model.parameters()]
    victim_name, victim = [(n, p) for n, p in model.local.named_parameters() if p.dim() == 2][2]
    hook = victim.register_hook(lambda g: torch.full_like(g, float("nan"))) if rank == 3 else None
    report: dict = {}
    loss, norm = train_step(model, opt, corpus, 1, cfg, report=report)
    if hook is not None:
        hook.remove()
    assert norm != norm  # nan on every rank, not only on rank 3
    # rank 3 is tp rank 1 of replica 1; the dp average carries its NaN to tp rank 1 of replica 0
    assert report["where"] == (f"first seen in the gradients of {model.shards[victim_name].name} on rank(s) [1, 3]; "
                               "the loss was finite on every rank"), report
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # no step taken anywhere
    with pytest.raises(NonFiniteError, match=r"step 1: .*not taken on any rank \(first seen in the gradients"):
        _nonfinite(1, loss, norm, cfg, None, TrainResult(), report["where"])
    skip = dataclasses.replace(cfg, nonfinite="skip")
    result = TrainResult()
    _nonfinite(1, loss, norm, skip, None, result)  # by option: skipped, recorded, the run goes on
    assert result.skipped_steps == [1]
    loss, norm = train_step(model, opt, corpus, 2, cfg)  # the next step is clean again
    assert norm == norm and loss == loss
    return True


def test_nan_gradient_on_one_rank_stops_every_rank_before_the_step(pools):
    assert pools.run(4, nan_on_one_rank) == [True] * 4


def test_loss_scaler_halves_on_overflow_and_grows_after_clean_steps():
    s = LossScaler(scale=8.0, growth_interval=3)
    s.update(False)
    assert s.scale == 4.0 and s.skipped == 1
    for _ in range(3):
        s.update(True)
    assert s.scale == 8.0
    s2 = LossScaler()
    s2.load_state_dict(s.state_dict())
    assert s2.state_dict() == s.state_dict()
    assert LossScaler(scale=0.5).exhausted
