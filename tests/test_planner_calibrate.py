"""The machine calibration (planner/calibrate.py): one quick real measurement (world 2) checked for
sanity only (the host is shared: no speeds asserted), JSON round trips, refusal of bad files, and
the cost functions on a hand-made calibration, where the answers are exact."""

from __future__ import annotations

import json
import math
import os

import pytest

from meshattn.comm import KINDS
from meshattn.planner.calibrate import (DEFAULT_PATH, ENV_VAR, Calibration, default_path, fit_alpha_beta, load,
                                        measure, save, summary)


@pytest.fixture(scope="module")
def measured() -> Calibration:
    return measure(world_sizes=(2,), quick=True, progress=False)


def hand_made(**changes) -> Calibration:
    """Two cores; rates chosen so every answer below is exact."""
    fields = dict(cores=2, torch="x", host="h", measured_at="2025-01-01T00:00:00+00:00", quick=False,
                  matmul_flops={1: 1e10, 2: 2e10}, matmul_forward_flops={1: 1e10, 2: 2e10},
                  attention_flops={1: 5e9, 2: 1e10}, memory_bw=1.5e10, memory_bw_threads={1: 1e10, 2: 1.5e10},
                  concurrent_flops={"matmul": {"2": 8e9, "4": 4e9}, "attention": {"2": 4e9}},
                  collectives={k: {"2": {"latency_s": 1e-3, "bandwidth": 1e9},
                                   "4": {"latency_s": 2e-3, "bandwidth": 5e8}} for k in KINDS},
                  collective_samples={k: {"2": [[1024, 1e-3], [1 << 20, 2e-3]]} for k in KINDS})
    fields.update(changes)
    return Calibration(**fields)


def _finite_positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


# -- a real (quick) measurement -------------------------------------------------------------------

def test_measure_quick_is_sane(measured):
    cal = measured
    assert cal.cores == os.cpu_count() and cal.quick and cal.torch and cal.measured_at
    assert _finite_positive(cal.memory_bw) and cal.memory_bw == cal.memory_bw_threads[cal.cores]
    for rates in (cal.matmul_flops, cal.matmul_forward_flops, cal.attention_flops, cal.memory_bw_threads):
        assert min(rates) == 1 and max(rates) == cal.cores
        assert all(_finite_positive(r) for r in rates.values())
    assert set(cal.concurrent_flops) == {"matmul", "attention", "copy"}
    assert all(_finite_positive(by_world["2"]) for by_world in cal.concurrent_flops.values())
    assert set(cal.collectives) == set(KINDS)
    for kind in KINDS:
        fit = cal.collectives[kind]["2"]
        assert math.isfinite(fit["latency_s"]) and fit["latency_s"] >= 0
        assert _finite_positive(fit["bandwidth"])
        samples = cal.collective_samples[kind]["2"]
        assert len(samples) >= 3 and all(p > 0 and _finite_positive(t) for p, t in samples)
        assert [p for p, _ in samples] == sorted(p for p, _ in samples)


def test_measured_round_trips(measured, tmp_path):
    d = measured.to_dict()
    assert Calibration.from_dict(json.loads(json.dumps(d))) == measured
    path = save(measured, tmp_path / "sub" / "calibration.json")
    assert load(path) == measured
    assert "all_reduce" in summary(measured) and "quick" in summary(measured)
    assert measured.collective_seconds("all_reduce", 2, 1 << 20) > measured.collective_seconds("all_reduce", 2, 1024)


# -- files ----------------------------------------------------------------------------------------

def _edited(edit) -> str:
    d = hand_made().to_dict()
    edit(d)
    return json.dumps(d)


BAD_FILES = {
    "not json": ("not json {", "not JSON"),
    "a list": ("[1, 2]", "not a meshattn calibration"),
    "no format": (json.dumps({"cores": 2}), "not a meshattn calibration"),
    "missing field": (_edited(lambda d: d.pop("memory_bw")), "missing memory_bw"),
    "negative rate": (_edited(lambda d: d["matmul_flops"].update({"1": -1.0})), r"matmul_flops\[1\]"),
    "no bandwidth": (_edited(lambda d: d.update(collectives={"all_reduce": {"2": {"latency_s": 0.0}}})), "malformed"),
}


@pytest.mark.parametrize("name", BAD_FILES)
def test_load_refuses_bad_files(tmp_path, name):
    content, message = BAD_FILES[name]
    path = tmp_path / "calibration.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load(path)


def test_load_of_no_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "absent.json")


def test_default_path(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert default_path() == DEFAULT_PATH
    assert DEFAULT_PATH.parts[-3:] == (".cache", "meshattn", "calibration.json")
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "c.json"))
    assert default_path() == tmp_path / "c.json"


# -- the cost functions ------------------------------------------------------------------------------

def test_collective_seconds():
    cal = hand_made()
    assert cal.collective_seconds("all_gather", 2, 0) == pytest.approx(1e-3)
    assert cal.collective_seconds("all_gather", 2, 1e9) == pytest.approx(1.001)
    times = [cal.collective_seconds("send_recv", 4, p) for p in (0, 1 << 10, 1 << 20, 1 << 24)]
    assert times == sorted(times) and len(set(times)) == 4
    assert cal.collective_seconds("all_reduce", 8, 5e8) == pytest.approx(1.002)  # nearest measured world: 4
    assert cal.collective_seconds("all_reduce", 3, 5e8) == cal.collective_seconds("all_reduce", 4, 5e8)  # tie: larger
    assert cal.collective_seconds("all_reduce", 1, 1e9) == 0.0
    with pytest.raises(ValueError, match="unknown collective"):
        cal.collective_seconds("broadcast", 2, 1)


def test_compute_seconds():
    cal = hand_made()
    assert cal.compute_seconds(1e10, 1) == pytest.approx(1.0)
    assert cal.compute_seconds(3e10, 1) == pytest.approx(3 * cal.compute_seconds(1e10, 1))
    assert cal.compute_seconds(2e10, 2) == pytest.approx(1.0)
    assert cal.compute_seconds(1e10, 0) == cal.compute_seconds(1e10, 1)  # clamped to 1..cores
    assert cal.compute_seconds(1e10, 64) == cal.compute_seconds(1e10, 2)
    assert cal.compute_seconds(1e10, 1, kind="attention") == pytest.approx(2.0)
    assert cal.memory_seconds(3e10, 2) == pytest.approx(2.0)
    assert cal.rank_compute_seconds(8e9, 2) == pytest.approx(1.0)
    assert cal.rank_compute_seconds(8e9, 8) == pytest.approx(2.0)  # nearest measured world: 4
    assert cal.rank_compute_seconds(4e9, 4, kind="attention") == pytest.approx(1.0)  # only world 2 measured
    with pytest.raises(ValueError, match="unknown compute kind"):
        cal.compute_seconds(1, 1, kind="conv")


def test_compute_seconds_interpolates_between_measured_thread_counts():
    cal = hand_made(cores=16, matmul_flops={1: 1e10, 4: 4e10, 16: 1e11})
    assert cal.compute_seconds(2e10, 2) == pytest.approx(1.0)  # 2e10 FLOP/s, halfway between 1 and 4 threads
    assert cal.compute_seconds(1e11, 16) == pytest.approx(1.0)


def test_measured_quantities_are_validated():
    with pytest.raises(ValueError, match="latency_s"):
        hand_made(collectives={"all_reduce": {"2": {"latency_s": -1.0, "bandwidth": 1.0}}})
    with pytest.raises(ValueError, match="attention_flops"):
        hand_made(attention_flops={1: float("nan")})
    with pytest.raises(ValueError, match="unknown collective"):
        hand_made(collectives={"broadcast": {"2": {"latency_s": 0.0, "bandwidth": 1.0}}})


# -- the fit -------------------------------------------------------------------------------------------

def test_fit_recovers_an_exact_line():
    pts = [(x, 2e-4 + x / 3e9) for x in (1 << 10, 1 << 16, 1 << 20, 1 << 24)]
    fit = fit_alpha_beta(pts)
    assert fit["latency_s"] == pytest.approx(2e-4, rel=1e-6)
    assert fit["bandwidth"] == pytest.approx(3e9, rel=1e-6)


def test_fit_keeps_latency_nonnegative_and_bandwidth_positive():
    fit = fit_alpha_beta([(1 << 10, 1e-6), (1 << 20, 2e-3), (1 << 24, 4e-2)])  # line through < 0 at x = 0
    assert fit["latency_s"] == 0.0 and fit["bandwidth"] > 0
    flat = fit_alpha_beta([(1 << 10, 2e-3), (1 << 20, 1e-3), (1 << 24, 1e-3)])  # noise: time falls with size
    assert flat["latency_s"] >= 0 and flat["bandwidth"] > 0 and math.isfinite(flat["bandwidth"])
