"""Every invalid combination is refused at construction with a message naming the fix."""

import pytest

from meshattn.config import PRESETS, ConfigError, ModelConfig, ParallelConfig, TrainConfig, preset


def test_presets_are_valid_and_sized():
    assert {"tiny", "gpt2-small", "llama-1b"} <= PRESETS.keys()
    gpt2 = preset("gpt2-small")
    assert 124e6 < gpt2.num_params() < 125e6  # GPT-2 small with the vocabulary padded to 50304
    llama = preset("llama-1b")
    assert llama.n_kv_heads < llama.n_heads and 1.2e9 < llama.num_params() < 1.3e9


def test_num_params_matches_the_model():
    from meshattn import Transformer
    for name in ("tiny", "small"):
        cfg = preset(name)
        assert cfg.num_params() == sum(p.numel() for p in Transformer(cfg).parameters())
    cfg = preset("gpt2-small", n_layers=1, vocab_size=512, max_seq_len=64)
    assert cfg.num_params() == sum(p.numel() for p in Transformer(cfg).parameters())


def test_heads_not_divisible_by_tp_lists_legal_sizes():
    with pytest.raises(ConfigError, match=r"n_heads=12 is not divisible by tp=8; legal tp sizes: 1, 2, 3, 4, 6, 12"):
        ParallelConfig(tp=8).check_model(ModelConfig(d_model=768, n_heads=12, vocab_size=768))


def test_kv_heads_fewer_than_tp_is_legal_replication():
    ParallelConfig(tp=4).check_model(ModelConfig(d_model=64, n_heads=8, n_kv_heads=2, vocab_size=64))
    ParallelConfig(tp=8).check_model(ModelConfig(d_model=64, n_heads=8, n_kv_heads=1, vocab_size=64))


def test_kv_heads_neither_multiple_nor_divisor_refused():
    cfg = ModelConfig(d_model=96, n_heads=12, n_kv_heads=6, vocab_size=96)
    with pytest.raises(ConfigError, match=r"n_kv_heads=6 is neither a multiple nor a divisor of tp=4.*legal tp sizes: 1, 2, 3, 6, 12"):
        ParallelConfig(tp=4).check_model(cfg)


def test_world_size_mismatch_refused():
    with pytest.raises(ConfigError, match=r"dp\*cp\*tp = 2\*1\*2 = 4 does not match the world size 2"):
        ParallelConfig(dp=2, tp=2).check_world(2)


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(d_model=100, n_heads=8), r"d_model=100 is not divisible by n_heads=8; legal n_heads: 1, 2, 4, 5"),
    (dict(n_heads=4, n_kv_heads=3), r"n_heads=4 is not divisible by n_kv_heads=3; legal n_kv_heads: 1, 2, 4"),
    (dict(norm="batchnorm"), r"norm='batchnorm' is unknown"),
    (dict(d_model=60, n_heads=4), r"rotary positions need an even head_dim"),
    (dict(n_layers=0), r"n_layers=0 must be a positive integer"),
])
def test_model_config_errors(kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        ModelConfig(**kwargs)


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(tp=0), r"tp=0 must be a positive integer"),
    (dict(cp_impl="striped"), r"cp_impl='striped' is unknown"),
    (dict(cp_layout="striped"), r"cp_layout='striped' is unknown"),
    (dict(cp=4, cp_impl="hybrid"), r"cp_impl='hybrid' needs ulysses_size dividing cp=4; legal: 1, 2, 4"),
    (dict(cp=4, cp_impl="hybrid", ulysses_size=3), r"needs ulysses_size dividing cp=4"),
    (dict(cp=4, ulysses_size=2), r"ulysses_size is only used by cp_impl='hybrid'"),
    (dict(tp=4, node_size=6), r"node_size=6 must be a positive multiple of tp=4"),
    (dict(vocab_parallel="yes"), r"vocab_parallel='yes' is unknown; choose one of \('auto', 'on', 'off'\)"),
    (dict(tp=2, sequence_parallel=True, vocab_parallel="off"), r"use vocab_parallel='on' \(or 'auto'\)"),
])
def test_parallel_config_errors(kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        ParallelConfig(**kwargs)


def test_vocab_not_divisible_names_padding():
    with pytest.raises(ConfigError, match=r"vocab_size=50257 is not divisible by tp=2.*pad vocab_size to 50258, "
                                          r"set vocab_parallel='off'"):
        ParallelConfig(tp=2).check_model(ModelConfig(d_model=768, n_heads=12, vocab_size=50257))
    # A whole vocabulary needs no divisibility.
    ParallelConfig(tp=2, vocab_parallel="off").check_model(ModelConfig(d_model=768, n_heads=12, vocab_size=50257))


def test_vocab_split_rule():
    byte_level, subword = ModelConfig(d_model=128, n_heads=4, vocab_size=512), preset("gpt2-small")
    assert not ParallelConfig(tp=2).splits_vocab(byte_level)  # 512 <= 4 * 128: whole
    assert ParallelConfig(tp=2).splits_vocab(ModelConfig(d_model=128, n_heads=4, vocab_size=576))
    assert ParallelConfig(tp=2).splits_vocab(subword)
    assert ParallelConfig(tp=2, sequence_parallel=True).splits_vocab(byte_level)  # forced by sequence parallelism
    assert ParallelConfig(tp=2, vocab_parallel="on").splits_vocab(byte_level)
    assert not ParallelConfig(tp=2, vocab_parallel="off").splits_vocab(subword)
    assert not ParallelConfig(dp=2, vocab_parallel="on").splits_vocab(subword)  # nothing to split at tp=1


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(batch_size=6, parallel=ParallelConfig(dp=4)), r"batch_size=6 is not divisible by dp\*grad_accum=4\*1"),
    (dict(seq_len=1000), r"seq_len=1000 exceeds the model's max_seq_len=256"),
    (dict(seq_len=127, parallel=ParallelConfig(tp=2, sequence_parallel=True)), r"use seq_len=128"),
    (dict(parallel=ParallelConfig(tp=8)), r"n_heads=4 is not divisible by tp=8; legal tp sizes: 1, 2, 4"),
    (dict(seq_len=100, parallel=ParallelConfig(cp=4)), r"seq_len=100 must be a multiple of 8 \(cp=4 with the zigzag layout"),
    (dict(seq_len=36, parallel=ParallelConfig(cp=2, tp=2, sequence_parallel=True)),
     r"must be a multiple of 8 .*sequence parallelism splits each over tp=2\); use seq_len=40"),
    (dict(parallel=ParallelConfig(cp=4, tp=2, cp_impl="ulysses")),
     r"splits each tp rank's 2 query and 1 KV heads over cp=4.*legal cp: 1, 2"),
])
def test_train_config_validates_the_whole_combination(kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        TrainConfig(**kwargs)


def test_train_config_round_trips_and_fingerprints():
    cfg = TrainConfig(steps=7)
    again = TrainConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.fingerprint() == cfg.fingerprint()
    assert TrainConfig(steps=8).fingerprint() != cfg.fingerprint()
