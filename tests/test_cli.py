"""The command line: the README's demo path end to end (shortened), torchrun, and clean refusals."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from meshattn import ModelConfig, TrainConfig, Transformer
from meshattn.training.checkpoint import load_reference

ROOT = Path(__file__).parents[1]
SHORT = ["--steps", "6", "--batch-size", "4", "--seq-len", "64", "--sample-tokens", "16"]


def _run(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def test_makefile_demo_runs_meshattn_train():
    demo = re.search(r"^demo:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.M)
    assert demo and "meshattn train" in demo.group(1)
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme


def test_demo_path_trains_samples_and_checkpoints(tmp_path):
    out = tmp_path / "run"
    res = _run([sys.executable, "-m", "meshattn", "train", *SHORT, "--out", str(out)])
    assert res.returncode == 0, res.stderr[-3000:]
    assert re.search(r"loss \d+\.\d+ -> \d+\.\d+ over 6 steps", res.stdout), res.stdout
    assert "sample:" in res.stdout and "train: 100%" in res.stderr  # the progress bar finished
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["losses"]) == 6 and metrics["losses"][-1] < metrics["losses"][0]
    state, meta = load_reference(out / "checkpoint")  # verified against its manifest first
    cfg = TrainConfig.from_dict(meta["config"])
    assert cfg.parallel.tp == 2 and meta["step"] == 6
    model = Transformer(ModelConfig(**meta["config"]["model"]))
    model.load_state_dict(state)  # layout-free: loads into the single-device model


def test_context_parallel_training_command(tmp_path):
    res = _run([sys.executable, "-m", "meshattn", "train", "--cp", "2", "--tp", "1", "--cp-impl", "ring",
                "--no-progress", *SHORT, "--out", str(tmp_path)])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "cp=2 ring zigzag" in res.stdout and re.search(r"^loss ", res.stdout, re.M)


def test_torchrun_launch(tmp_path):
    res = _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "meshattn", "train",
                "--no-progress", *SHORT, "--out", str(tmp_path)])
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(re.findall(r"^loss ", res.stdout, re.M)) == 1  # rank 0 reports, once


# Bad layouts (--tp 3, --dp 2 --batch-size 3, --seq-len 4096) and every other bad input: test_bad_inputs.py.


def test_missing_data_path_is_refused_in_the_parent(tmp_path):
    res = _run([sys.executable, "-m", "meshattn", "train", *SHORT, "--data", str(tmp_path / "nope"),
                "--out", str(tmp_path)])
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [f"meshattn: error: --data {tmp_path / 'nope'}: no such file or folder; "
                                               "give a text file or a folder of .py, .txt, .md, .rst files, or "
                                               "leave out --data for Python's standard library"]
    assert "rank" not in res.stderr and "Traceback" not in res.stderr  # no worker started


# Resuming (bitwise at the same layout, within fp32 rounding at another) is tested where a run is
# stopped by SIGTERM and resumed: tests/test_preemption.py.
