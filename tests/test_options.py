"""Every name a user types is defined once (config's options); the CLI, the bench grammar, the
impl table and the checks read that definition."""

from __future__ import annotations

import argparse

import pytest

from meshattn.bench.layouts import default_layouts, parse_layout
from meshattn.cli.options import build_parser
from meshattn.config import ConfigError, CpImpl, CpLayout, DType, OnNonfinite, ParallelConfig, Recompute, VocabParallel, preset
from meshattn.parallel.context import IMPLS
from meshattn.parallel.layout import chunks_of


def _choices(command: str) -> dict[str, tuple]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest: tuple(a.choices) for a in sub.choices[command]._actions if a.choices}


def test_cli_choices_are_the_config_options():
    train = _choices("train")
    assert train["cp_impl"] == CpImpl.names() and train["cp_layout"] == CpLayout.names()
    assert train["checkpoint"] == Recompute.names() and train["dtype"] == DType.names()
    assert train["vocab_parallel"] == VocabParallel.names() and train["on_nonfinite"] == OnNonfinite.names()
    assert _choices("bench")["dtype"] == DType.names() == _choices("profile")["dtype"]


def test_every_impl_and_layout_has_an_implementation():
    assert set(IMPLS) == set(CpImpl)
    for layout in CpLayout:
        for p in (1, 2, 4):
            held = sorted(c for r in range(p) for c in chunks_of(layout, r, p))
            assert held == list(range(layout.n_chunks(p)))  # every chunk held exactly once


def test_bench_grammar_and_default_list_read_the_options():
    for impl in CpImpl:
        name = f"cp4:{impl}" + ("2" if impl.needs_ulysses_size else "")
        assert parse_layout(name).parallel.cp_impl == impl.value
    for mode in Recompute:
        if mode is not Recompute.NONE:
            assert parse_layout(f"tp2@{mode}").checkpoint == mode.value
    names = {layout.name for layout in default_layouts(4, preset("small"), 4, 256)}
    assert {"cp4:allgather", "cp4:ring", "cp4:ulysses", "cp4:hybrid2"} <= names


def test_derived_rules_live_on_the_config():
    par = ParallelConfig(cp=2, tp=2, sequence_parallel=True, cp_layout="zigzag")
    assert (par.seq_chunks, par.seq_unit, par.batch_ranks) == (4, 8, 2)
    assert ParallelConfig(cp=4, cp_impl="hybrid", ulysses_size=2).ulysses_group == 2
    assert ParallelConfig(cp=4, cp_impl="ulysses").ulysses_group == 4
    assert ParallelConfig(cp=4, cp_impl="ring").ulysses_group is None
    with pytest.raises(ConfigError, match=r"cp_impl='striped' is unknown; choose one of \('allgather'"):
        ParallelConfig(cp_impl="striped")
