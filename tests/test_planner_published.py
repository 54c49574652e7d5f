"""The cost model against published runs (planner/published.py, docs/published_runs.md): the
efficiency constants are fitted on at most a third of the throughput rows; every other row lands
within 20% of its published throughput, every activation-memory row within 10%."""

from __future__ import annotations

import pytest

from meshattn.planner import published
from meshattn.planner.flops import narayanan_flops
from meshattn.planner.stack import Efficiency

THROUGHPUT = published.throughput_rows()


def test_every_listed_run_is_there_once():
    keys = [r["key"] for r in THROUGHPUT]
    assert len(keys) == len(set(keys))
    sources = {r["source"] for r in THROUGHPUT}
    assert sum(k.startswith("N1-") for k in keys) == 10  # Narayanan Table 1
    assert sum(k.startswith("N2-") for k in keys) == 12  # Narayanan Table 2
    assert sum(k.startswith("K5-") for k in keys) == 8  # Korthikanti Table 5, both columns
    assert "Korthikanti 2022 sec. 6.3" in sources
    assert sum(r["key"].startswith("K7-") for r in published.memory_rows()) == 16  # Figure 7's bars
    assert sum(r["key"].startswith("K1-") for r in published.memory_rows()) == 8  # Figure 1's activation bars


def test_calibration_uses_at_most_a_third_of_the_rows():
    assert set(published.CALIBRATION) <= {r["key"] for r in THROUGHPUT}
    assert 3 * len(published.CALIBRATION) <= len(THROUGHPUT)


@pytest.mark.parametrize("row", [r for r in THROUGHPUT if not r["calibration"]], ids=lambda r: r["key"])
def test_throughput_within_20_percent(row):
    assert 0.8 <= row["ratio"] <= 1.2, row
    assert row["fits"], f"{row['key']} ran, so the model must say it fits in 80 GB: {row['memory_gib']:.1f} GiB"


@pytest.mark.parametrize("row", published.memory_rows(), ids=lambda r: r["key"])
def test_activation_memory_within_10_percent(row):
    assert 0.9 <= row["ratio"] <= 1.1, row
    assert 0.9 <= row["ratio_digitized"] <= 1.1, row


def test_implied_tflops_from_iteration_time():
    """Korthikanti's 22B present-work run: 1.10 s on 8 GPUs, counted as Narayanan's eq. 3."""
    run = next(r for r in published.RUNS if r.key == "K5-22B-sp-selective")
    assert run.tflops == pytest.approx(narayanan_flops(4, 2048, 48, 6144, 51200) / (8 * 1.10) / 1e12)


def test_predictions_move_with_the_constants():
    """A check that can fail: halving the matmul efficiency slows the compute-bound runs."""
    slow = published.throughput_rows(Efficiency(matmul=0.32))
    for fast_row, slow_row in zip(THROUGHPUT, slow):
        assert slow_row["predicted_tflops"] < fast_row["predicted_tflops"]
