"""meshattn bench and profile for a mixture of experts: the ep layout names, the default list
(ep variants, no PyTorch-native peer), bad ep layouts refused before any worker starts, and one
real bench worker and one profile run at world 2 (moe-tiny, a few tokens; times are recorded,
never asserted: only their structure and the routing's exact counts are)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from meshattn.bench import default_layouts, parse_layout
from meshattn.bench.layouts import check_layout, layout_to_dict, peer_notes
from meshattn.bench.report import table
from meshattn.bench.run import summarize
from meshattn.bench.timeline import moe_split
from meshattn.bench.worker import _build
from meshattn.cli import main
from meshattn.comm import CommCounter
from meshattn.config import ConfigError, preset

ROOT = Path(__file__).parents[1]
MOE = preset("moe-tiny")  # 8 experts, top-2; blocks 1-3 are MoE layers
B, S = 2, 16
SLOTS = B * S * MOE.top_k  # routing slots per MoE layer per step


@pytest.mark.parametrize("name", ["dp4xep4", "dp4xep4:gather", "dp2xtp2xep4", "dp2xcp2:ringxep4", "dp2xep2@block",
                                  "tp2+spxep2:gather", "dp8xep8"])
def test_moe_layout_names_round_trip(name):
    assert parse_layout(name).name == name


@pytest.mark.parametrize("name,model,match", [
    ("dp4xep4", "tiny", r"layout dp4xep4: ep4 splits experts, but this model is dense.*choose an MoE --preset"),
    ("ep2", "moe-tiny", r"ep2 borrows the dp x cp x tp = 1 ranks.*write e.g. dp2xep2"),
    ("dp2xtp2xep8", "moe-tiny", r"write e.g. dp4xtp2xep8, or ep among 2, 4"),
    ("dp6xep6", "moe-tiny", r"ep6 does not divide the model's 8 experts; choose ep among 2 for 6 ranks"),
    ("native-tp2", "moe-tiny", r"cannot split mixture-of-experts layers"),
    ("dp2xep2:scatter", "moe-tiny", r"ep<N>\[:all_to_all\|:gather\]"),
])
def test_bad_ep_layouts_are_refused(name, model, match):
    with pytest.raises(ConfigError, match=match):
        check_layout(parse_layout(name), preset(model), 12, 64)


def test_default_layouts_of_an_moe_model():
    names = [lay.name for lay in default_layouts(4, MOE, 4, 64)]
    assert {"single", "dp4", "dp4xep2", "dp4xep4", "dp4xep4:gather", "dp2xtp2xep4", "dp2xcp2:ringxep4",
            "cp4:ringxep4:gather"} <= set(names)
    assert "dp4xep2:gather" not in names  # the gather only at the largest ep
    assert not [n for n in names if n.startswith("native")]  # DTensor's plan cannot split experts
    dense = dataclasses.replace(MOE, n_experts=0)  # the same attention: the same dp x cp x tp layouts
    assert [n for n in names if "ep" not in n] == [lay.name for lay in default_layouts(4, dense, 4, 64)
                                                    if lay.kind != "native"]
    assert names.index("dp4xep2") == names.index("dp4") + 1  # each split's ep variants follow it
    assert "mixture-of-experts" in peer_notes(4, MOE, 4, 64)[0] and peer_notes(2, preset("tiny"), 2, 64) == []


def test_moe_split_finds_backward_through_sequence_numbers():
    bwd = "autograd::engine::evaluate_function: "
    events = [("meshattn.step", 1, 0, 100, -1, 0),
              ("moe.dispatch", 1, 10, 20, -1, 0), ("aten::argsort", 1, 11, 12, 7, 0),  # 7 created nothing here
              ("moe.experts", 1, 20, 30, -1, 0), ("aten::mm", 1, 21, 29, 8, 0),
              ("moe.combine", 1, 30, 35, -1, 0), ("aten::index_add", 1, 31, 34, 9, 0),
              ("aten::index", 1, 40, 41, 7, 0),  # the op that created node 7, outside the MoE ranges
              (bwd + "IndexAddBackward0", 1, 60, 66, 9, 0), ("IndexAddBackward0", 1, 60, 66, 9, 1),
              (bwd + "MmBackward0", 1, 70, 80, 8, 0), ("MmBackward0", 1, 70, 80, 8, 1),
              (bwd + "IndexBackward0", 1, 80, 90, 7, 0)]
    t = moe_split(events, "meshattn.step")
    assert t["step_s"] == pytest.approx(100e-6)
    assert (t["dispatch_s"], t["experts_s"], t["combine_s"]) == pytest.approx((10e-6, 10e-6, 5e-6))
    assert (t["dispatch_bwd_s"], t["experts_bwd_s"], t["combine_bwd_s"]) == pytest.approx((0, 10e-6, 6e-6))
    assert t["rest_s"] == pytest.approx(59e-6) and t["comm_share"] == pytest.approx(0.21)


@pytest.mark.parametrize("argv,match", [
    (["bench", "--preset", "tiny", "--layouts", "single", "dp2xep2"], "ep2 splits experts, but this model is dense"),
    (["bench", "--preset", "moe-tiny", "--layouts", "native-tp2"], "cannot split mixture-of-experts layers"),
    (["profile", "--preset", "moe-tiny", "--layout", "dp3xep3"], "no ep > 1 divides both the 3 ranks"),
    (["profile", "--preset", "tiny", "--layout", "dp2xep2"], "ep2 splits experts, but this model is dense"),
])
def test_cli_refuses_bad_ep_layouts_before_workers(argv, match, tmp_path, capsys):
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("meshattn: error: layout") and err.count("\n") == 1 and match in err, err
    assert not (tmp_path / "out").exists()  # refused before anything was made or launched


def bench_worker(rank, world, layout, cfg, out):
    from meshattn.bench.worker import measure

    measure(layout, cfg, 1, 1, out)
    return True


def test_bench_worker_reports_routing_and_moe_time(pools, tmp_path):
    layout = parse_layout("tp2xep2")  # the tp ranks route different halves of the same rows
    cfg = check_layout(layout, MOE, B, S)
    out = tmp_path / "rows.json"
    assert pools.run(2, bench_worker, layout=layout_to_dict(layout), cfg=cfg.to_dict(), out=str(out)) == [True] * 2
    r = summarize(layout, S, B, json.loads(out.read_text()))
    ref, ids, targets, _ = _build(parse_layout("single"), cfg, CommCounter())  # the same seeded model and batch
    stats: dict = {}
    ref(ids, targets, stats=stats)
    # The next-token loss is compared (each tp rank's objective holds only its half of the
    # balance loss); float32 sums in another order: 1e-5.
    assert r["first_loss"] == pytest.approx(stats["lm_loss"].item(), abs=1e-5)
    assert len(r["expert_counts"]) == MOE.n_moe_layers and all(sum(c) == SLOTS for c in r["expert_counts"])
    assert r["expert_imbalance"] >= 1 and r["rank_imbalance"] >= 1
    assert 0 < r["comm_share"] and 0 < r["experts_share"] and r["comm_share"] + r["experts_share"] <= 1
    assert 0 < r["param_bytes"] < 4 * MOE.num_params()  # each rank holds half the experts (float32)
    assert r["activation_bytes"] > 0 and r["peak_rss"] > 0
    assert "imbal experts/ranks" in table([r])


def test_profile_command_reports_the_experts(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    res = subprocess.run([sys.executable, "-m", "meshattn", "profile", "--preset", "moe-tiny", "--layout",
                          "dp2xep2:gather", "--seq-len", str(S), "--batch-size", str(B), "--warmup", "1", "--steps",
                          "2", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "MoE blocks 1, 2, 3: 8 experts, top-2" in res.stdout and "dispatch+combine" in res.stdout
    assert "USDT" not in res.stderr  # kineto's start/stop lines are kept out
    m = json.loads((tmp_path / "profile.json").read_text())["moe"]
    assert len(m["expert_counts_per_step"]) == 2
    for counts in m["expert_counts_per_step"]:  # every MoE layer routes every token to top_k experts
        assert [sum(c) for c in counts] == [SLOTS] * MOE.n_moe_layers
    assert [sum(layer) for layer in zip(*m["received"])] == [SLOTS] * MOE.n_moe_layers  # dropless: all computed
    assert [sum(layer) for layer in zip(*m["sent"])] == [SLOTS] * MOE.n_moe_layers
    assert min(m["rank_imbalance"]) >= 1 and m["rank_imbalance_max"] == max(m["rank_imbalance"])
    for r in json.loads((tmp_path / "profile.json").read_text())["ranks"]:
        t = r["moe"]
        assert min(t["dispatch_s"], t["experts_s"], t["combine_s"]) > 0 and t["rest_s"] >= 0
        assert t["dispatch_bwd_s"] > 0 and t["combine_bwd_s"] > 0  # backward found through sequence numbers
        assert 0 < t["comm_share"] < 1 and 0 < t["experts_share"] < 1
    assert (tmp_path / "profile_moe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
