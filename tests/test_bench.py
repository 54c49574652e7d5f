"""meshattn bench and profile: layout names, the PyTorch-native peer's parity, the timeline
analysis, and both commands end to end (tiny model; times are recorded, never asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from meshattn import ModelConfig, ParallelConfig, Transformer, preset
from meshattn.bench import default_layouts, parse_layout
from meshattn.bench.native import _per_rank_rows, native_tensor_parallel
from meshattn.bench.report import plot
from meshattn.bench.timeline import analyse, balance, intersect, union
from meshattn.config import ConfigError
from meshattn.mesh import ParallelDims
from meshattn.planner import tensor_parallel_comm
from parity import assert_close

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize("name", ["single", "native-tp2", "tp2", "tp2+sp", "dp2", "cp2:ring", "cp2:ulysses:contiguous",
                                  "cp4:hybrid2", "dp2xtp2", "dp2xcp2:allgatherxtp2", "tp2@block",
                                  "cp2:ring@attention", "tp2+wv", "tp2+sp+vp", "dp2xtp2+vp@block"])
def test_layout_names_round_trip(name):
    assert parse_layout(name).name == name


@pytest.mark.parametrize("bad", ["tp", "tq2", "single@block", "tp2@all", "dp2:ring", "cp2:spiral", "tp2+sp+sp",
                                 "cp2:ring:diagonal", "cp4:hybrid3", "dp2+wv",
                                 "tp2+wv+sp"])
def test_bad_layout_names_are_refused(bad):
    with pytest.raises(ConfigError, match=r"cp|layout|hybrid|ulysses"):
        parse_layout(bad)


def test_default_layouts_list_every_valid_combination():
    tiny = preset("tiny")  # 4 query heads, 2 KV heads
    names = {lay.name for lay in default_layouts(2, tiny, 2, 64)}
    assert names == {"single", "native-tp2", "dp2", "tp2", "cp2:allgather", "cp2:ring", "cp2:ulysses"}
    four = {lay.name for lay in default_layouts(4, tiny, 4, 64)}
    assert {"dp4", "tp4", "dp2xtp2", "cp4:ring", "cp4:hybrid2", "dp2xcp2:ulysses", "cp2:ringxtp2"} <= four
    assert "native-tp4" not in four  # 2 KV heads cannot be split 4 ways without replication


def test_qkv_rows_regrouped_per_rank():
    attn = Transformer(ModelConfig(d_model=8, n_heads=4, n_kv_heads=2, n_layers=1, d_ff=8, vocab_size=16,
                                   max_seq_len=8)).blocks[0].attn  # head dim 2: rows q 0-7, k 8-11, v 12-15
    assert _per_rank_rows(attn, 2).tolist() == [0, 1, 2, 3, 8, 9, 12, 13, 4, 5, 6, 7, 10, 11, 14, 15]


def check_native_peer(rank, world):
    """PyTorch-native TP on the reference model: same loss and every gradient as one device."""
    cfg = ModelConfig(d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, d_ff=64, vocab_size=64, max_seq_len=16,
                      norm="rmsnorm", position="rope", activation="swiglu")
    torch.manual_seed(0)
    ref = Transformer(cfg).double()
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    loss_ref = ref(ids, ids.roll(-1, 1))[1]
    loss_ref.backward()
    torch.manual_seed(0)
    model = native_tensor_parallel(Transformer(cfg).double(), ParallelDims(ParallelConfig(tp=world)).mesh["tp"])
    loss = model(ids, ids.roll(-1, 1))[1]
    loss.backward()
    assert_close(loss.detach(), loss_ref.detach(), "loss")
    order = _per_rank_rows(ref.blocks[0].attn, world)
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        want = q.grad[order] if name.endswith("qkv.weight") else q.grad
        assert_close(grad, want, name)
    return True


def test_native_peer_equals_reference(pools):
    assert pools.run(2, check_native_peer) == [True, True]


def test_timeline_analysis_counts_overlap_once():
    assert union([(0, 2), (1, 3), (5, 6)]) == [(0, 3), (5, 6)]
    assert intersect([(0, 3), (5, 6)], [(2, 5.5)]) == [(2, 3), (5, 5.5)]
    events = [("meshattn.step", 1, 0, 100), ("aten::mm", 1, 0, 40), ("aten::add", 1, 30, 50),  # nested/overlapping
              ("gloo:all_reduce", 2, 40, 70), ("aten::mm", 1, 60, 90), ("aten::mm", 7, 0, 100)]  # other thread: not ours
    a = analyse(events, "meshattn.step")
    assert a["compute_s"] == pytest.approx(80e-6) and a["comm_s"] == pytest.approx(30e-6)
    assert a["hidden_s"] == pytest.approx(20e-6) and a["hidden_share"] == pytest.approx(2 / 3)
    assert a["other_s"] == pytest.approx(10e-6)  # 100 - 80 computing - 10 exposed
    b = balance([1.0, 2.0, 3.0])
    assert b["slowest_rank"] == 2 and b["efficiency"] == pytest.approx(1 / 3)
    assert b["load_imbalance"] == pytest.approx(1.0) and b["relative_load"] == pytest.approx([0.5, 1.0, 1.5])


def _meshattn(args, timeout=300):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "meshattn", *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)


def test_bench_command_end_to_end(tmp_path):
    res = _meshattn(["bench", "--preset", "tiny", "--seq-len", "32", "--batch-size", "2", "--layouts", "single",
                     "native-tp2", "tp2", "tp2+vp", "cp2:ring", "--warmup", "1", "--steps", "1", "--out",
                     str(tmp_path)])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "meshattn tp2 / PyTorch native-tp2 (DTensor) fwd+bwd step time" in res.stdout
    assert "meshattn bench: 100%" in res.stderr  # the progress bar ran to the end
    results = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert [(r["seq_len"], r["layout"]) for r in results] == [
        (32, name) for name in ("single", "native-tp2", "tp2", "tp2+vp", "cp2:ring")]
    for r in results:  # every layout computes the same model: first-step losses agree
        assert r["loss_delta"] < 1e-5, r
        assert r["activation_bytes"] > 0 and r["step_ms"] > 0
    tiny = preset("tiny")
    for r in (r for r in results if r["layout"].startswith("tp2")):  # bytes counted == the planner's, exactly
        vocab = "on" if r["layout"] == "tp2+vp" else "auto"
        analytic = tensor_parallel_comm(tiny, ParallelConfig(tp=2, vocab_parallel=vocab), 2, r["seq_len"])
        assert r["comm_bytes"]["all_reduce"] == sum(v.nbytes for k, v in analytic.items() if "all_reduce" in k)
        assert "vs_native" in r
    assert all(r["comm_calls"] for r in results if r["layout"] == "native-tp2")  # from CommDebugMode
    assert (tmp_path / "bench_S32.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Several sequence lengths add a scaling plot (in-process, on these rows relabelled: the
    # launches are what costs, and every layout's worker is exercised above).
    again = [dict(r, seq_len=64, **{k: 2 * r[k] for k in ("step_ms", "step_ms_min", "step_ms_max")}) for r in results]
    (tmp_path / "two").mkdir()
    written = plot(results + again, tmp_path / "two", "two sequence lengths")
    assert sorted(p.name for p in written) == ["bench_S32.png", "bench_S64.png", "bench_scaling.png"]
    for png in written:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_profile_command_end_to_end(tmp_path):
    res = _meshattn(["profile", "--preset", "tiny", "--layout", "tp2", "--seq-len", "32", "--warmup", "1",
                     "--steps", "2", "--out", str(tmp_path)])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "slowest rank" in res.stdout
    summary = json.loads((tmp_path / "profile.json").read_text())
    assert [r["rank"] for r in summary["ranks"]] == [0, 1]
    for r in summary["ranks"]:
        assert 0 < r["compute_s"] <= r["step_s"] and r["comm_s"] > 0 and 0 <= r["hidden_share"] <= 1
    for rank in (0, 1):
        trace = json.loads((tmp_path / f"trace_rank{rank}.json").read_text())
        assert any(e.get("name") == "meshattn.step" for e in trace["traceEvents"])


def test_bench_refuses_bad_layouts_before_launching(tmp_path):
    res = _meshattn(["bench", "--preset", "tiny", "--layouts", "tp8", "--out", str(tmp_path)], timeout=60)
    assert res.returncode == 2 and "meshattn: error:" in res.stderr and "tp=8" in res.stderr, res.stderr
    assert not (tmp_path / "bench.json").exists()


@pytest.mark.parametrize("name,peer", [("tp2", "native-tp2"), ("tp4+wv", "native-tp4"), ("tp2+vp", "native-tp2"),
                                       ("tp2+sp", None), ("tp2@block", None), ("dp2xtp2", None), ("native-tp2", None)])
def test_native_peer_of_a_layout(name, peer):
    assert parse_layout(name).native_peer == peer
