"""Attention work counts and the balanced chunk table (parallel/balance.py), and packed-document
batches of the corpus (training/packing.py)."""

from __future__ import annotations

import pytest
import torch

from meshattn.model.mask import visible_counts
from meshattn.parallel.balance import balance_chunks, balanced_table, chunk_work, rank_work, token_work
from meshattn.parallel.balance import causal_work, imbalance
from meshattn.parallel.layout import chunk_table
from meshattn.training.corpus import Corpus, load_bytes, load_documents
from meshattn.training.packing import PackedCorpus, pack_lengths


def random_documents(gen: torch.Generator, batch: int, seq_len: int) -> torch.Tensor:
    """(batch, seq_len) ids: runs of 1-6 tokens, a fifth of them padding (-1, anywhere, also inside
    a document: the same id may resume after it), the rest numbered in order."""
    rows = []
    for _ in range(batch):
        row, doc = [], 0
        while len(row) < seq_len:
            n = int(torch.randint(1, 7, (), generator=gen))
            pad, resume = torch.rand(2, generator=gen).tolist()
            row += [-1] * n if pad < 0.2 else [doc] * n
            doc += pad >= 0.2 and resume > 0.3
        rows.append(row[:seq_len])
    return torch.tensor(rows)


def lognormal_rows(seq_len: int, rows: int, seed: int) -> torch.Tensor:
    """(rows, seq_len) ids of a long-tailed mix packed in order: lengths exp(N(ln(S/8), 1.5^2))."""
    gen = torch.Generator().manual_seed(seed)
    normal = torch.randn(40 * rows, generator=gen, dtype=torch.float64)
    draw = torch.exp(normal * 1.5 + torch.log(torch.tensor(seq_len / 8)))
    return torch.stack(pack_lengths(draw.round().clamp(1, 8 * seq_len).long().tolist(), seq_len)[:rows])


@pytest.mark.parametrize("causal", [True, False])
def test_token_work_equals_the_brute_force_count(causal):
    gen = torch.Generator().manual_seed(0)
    for seq_len in (1, 2, 7, 32, 48):
        docs = random_documents(gen, 3, seq_len)
        docs[0, -1] = -1  # padding last, and a length-1 document before it
        if seq_len > 2:
            docs[0, -2] = docs[0, :-2].max() + 1
        for window in (None, 1, 3, 8, 16, 40, 100):  # chunks of 8 (n=4 at S=32): smaller, equal, larger
            for d in (docs, None):
                assert torch.equal(token_work(seq_len, causal, window, d), visible_counts(seq_len, causal, window, d))


def test_chunk_and_rank_work_count_the_mask():
    docs = random_documents(torch.Generator().manual_seed(1), 2, 64)
    per_token = visible_counts(64, True, 12, docs).sum(0)
    assert chunk_work(8, 64, True, 12, docs) == per_token.view(8, 8).sum(1).tolist()
    table = [[0, 5], [2, 3], [1, 7], [4, 6]]
    work = chunk_work(8, 64, True, 12, docs)
    assert rank_work(table, 64, True, 12, docs) == [sum(work[c] for c in t) for t in table]
    for layout in ("contiguous", "zigzag"):  # one document: layout.causal_work's chunk-level rule
        for causal in (True, False):
            flops = causal_work(layout, 4, 64, causal=causal)  # 4 FLOPs per pair at head_dim 1
            assert rank_work(chunk_table(layout, 4), 64, causal) == [f / 4 for f in flops]


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="not divisible into 3 equal chunks"):
        chunk_work(3, 64)
    with pytest.raises(ValueError, match="not divisible into 12 equal chunks"):
        balanced_table(4, 3, 64)
    with pytest.raises(ValueError, match="exactly once"):
        rank_work([[0, 1], [1, 2]], 64)
    with pytest.raises(ValueError, match="chunks_per_rank"):
        balanced_table(2, 0, 64)
    with pytest.raises(ValueError, match="window"):
        token_work(8, window=0)
    with pytest.raises(ValueError, match="non-decreasing"):
        token_work(3, documents=torch.tensor([[1, 0, 0]]))
    with pytest.raises(ValueError, match="dealt equally"):
        balance_chunks([1.0, 2.0, 3.0], 2)


@pytest.mark.parametrize("p,k", [(1, 3), (2, 2), (3, 3), (4, 4), (8, 2)])
def test_balanced_table_deals_every_chunk_once(p, k):
    seq_len = 96 * p * k // 8
    docs = random_documents(torch.Generator().manual_seed(p * 10 + k), 2, seq_len)
    table = balanced_table(p, k, seq_len, documents=docs)
    assert all(len(t) == k and t == sorted(t) for t in table)
    assert sorted(c for t in table for c in t) == list(range(p * k))
    assert table == balanced_table(p, k, seq_len, documents=docs.clone())  # deterministic


def test_balanced_table_on_one_causal_document():
    for p in (2, 4, 8):
        assert balanced_table(p, 2, 1024) == [sorted(t) for t in chunk_table("zigzag", p)]  # LPT finds zigzag
        zigzag = imbalance(rank_work(chunk_table("zigzag", p), 1024))
        assert imbalance(rank_work(balanced_table(p, 4, 1024), 1024)) <= zigzag


def test_balanced_table_on_a_long_tailed_mix():
    # For an even chunks_per_rank, the contiguous and zigzag tables refined to the finer chunks are
    # among the starting tables and swaps never raise the maximum: balanced <= both, by
    # construction. The 1.1 is measured, not proved: on these 16 seeded rows k=4 at cp=4 is at
    # most 1.04 (2048 rows of benchmarks/balance.py reach 1.11 at worst, the mean is 1.01).
    S, p = 2048, 4
    rows = lognormal_rows(S, 16, seed=0)
    for docs in [r[None] for r in rows] + [rows[:4]]:
        fixed = min(imbalance(rank_work(chunk_table(layout, p), S, documents=docs))
                    for layout in ("contiguous", "zigzag"))
        for k in (2, 4):
            balanced = imbalance(rank_work(balanced_table(p, k, S, documents=docs), S, documents=docs))
            assert balanced <= fixed
            if k == 4:
                assert balanced < 1.1


def test_pack_lengths():
    rows = pack_lengths([3, 5, 2, 0, 7], 4)
    assert [r.tolist() for r in rows] == [[0, 0, 0, 1], [0, 0, 0, 0], [0, 0, 2, 2], [0, 0, 0, 0]]
    assert pack_lengths([], 4) == [] and pack_lengths([3], 4) == []


@pytest.fixture
def text_folder(tmp_path):
    """Files whose bytes name the file: file i holds only chr(65 + i); one empty file."""
    lengths = [5, 0, 17, 1, 30, 2, 9, 40, 3, 26, 11, 1, 38]
    for i, n in enumerate(lengths):
        (tmp_path / f"f{i:02d}.txt").write_bytes(bytes([65 + i]) * n)
    return tmp_path, lengths


def test_load_documents(text_folder):
    path, lengths = text_folder
    docs = load_documents(str(path))
    assert [len(d) for d in docs] == [n for n in lengths if n]
    assert torch.equal(torch.cat(docs), load_bytes(str(path)))
    assert [len(d) for d in load_documents(str(path), max_bytes=25)] == [5, 17, 1, 2]
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_documents(str(path / "missing"))
    assert sum(len(d) for d in load_documents(max_bytes=10_000)) == 10_000  # the standard library


@pytest.mark.parametrize("split", ["train", "val"])
def test_packed_batches_stop_at_file_boundaries(text_folder, split):
    path, _ = text_folder
    packed = PackedCorpus.from_path(str(path), val_fraction=0.4)
    ids, targets, documents = packed.batch(3, 16, 12, seed=5, split=split)
    same_ids, next_ids = Corpus.from_path(str(path), val_fraction=0.4).batch(3, 16, 12, seed=5, split=split)
    assert torch.equal(ids, same_ids)  # the same windows as Corpus.batch
    assert ids.dtype == targets.dtype == documents.dtype == torch.int64
    crosses = ids != next_ids  # the byte names the file
    assert crosses.any() and (~crosses).any()
    assert torch.equal(targets, next_ids.masked_fill(crosses, -100))
    changes = torch.cat([torch.zeros(16, 1, dtype=torch.bool), ids[:, 1:] != ids[:, :-1]], dim=1)
    assert torch.equal(documents, changes.cumsum(1))
    assert (documents[:, 0] == 0).all() and (documents.diff(dim=1) >= 0).all()
    again = packed.batch(3, 16, 12, seed=5, split=split)
    assert all(torch.equal(x, y) for x, y in zip((ids, targets, documents), again))
    assert not torch.equal(ids, packed.batch(4, 16, 12, seed=5, split=split)[0])
    with pytest.raises(ValueError, match="seq_len"):
        packed.batch(0, 1, 500, seed=0, split=split)
