"""The command line: the README's demo path end to end (shortened), torchrun, and clean refusals."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


@pytest.mark.parametrize("args,message", [
    (["--tp", "3"], "n_heads=4 is not divisible by tp=3; legal tp sizes: 1, 2, 4"),
    (["--batch-size", "3", "--dp", "2"], "batch_size=3 is not divisible by dp*grad_accum=2*1"),
    (["--seq-len", "4096"], "seq_len=4096 exceeds the model's max_seq_len=256"),
])
def test_bad_layout_is_refused_before_launch(args, message):
    res = _run([sys.executable, "-m", "meshattn", "train", *args], timeout=60)
    assert res.returncode == 2
    assert message in res.stderr


def test_missing_data_path_is_refused_in_the_parent(tmp_path):
    res = _run([sys.executable, "-m", "meshattn", "train", *SHORT, "--data", str(tmp_path / "nope"),
                "--out", str(tmp_path)])
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [f"meshattn: error: --data {tmp_path / 'nope'}: no such file or folder; "
                                               "give a text file or a folder of .py, .txt, .md, .rst files, or "
                                               "leave out --data for Python's standard library"]
    assert "rank" not in res.stderr and "Traceback" not in res.stderr  # no worker started


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    """6 steps in one go vs 3 steps, then --resume to 6 at the same layout: bitwise the same
    losses for steps 4-6; and resuming at another layout (cp=2) continues within fp32 rounding."""
    args = ["--steps", "6", "--batch-size", "4", "--seq-len", "64", "--sample-tokens", "0", "--no-progress"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert _run([sys.executable, "-m", "meshattn", "train", *args, "--out", str(whole)]).returncode == 0
    first = _run([sys.executable, "-m", "meshattn", "train", *args, "--save-every", "3", "--out", str(part)])
    assert first.returncode == 0, first.stderr[-2000:]
    shutil.rmtree(part / "checkpoint" / "step-00000006")  # as if the first run had stopped at step 3
    (part / "checkpoint" / "latest").write_text("step-00000003")
    again = _run([sys.executable, "-m", "meshattn", "train", *args, "--resume", str(part / "checkpoint"),
                  "--out", str(tmp_path / "resumed")])
    assert again.returncode == 0, again.stderr[-2000:]
    want = json.loads((whole / "metrics.json").read_text())["losses"]
    assert json.loads((part / "metrics.json").read_text())["losses"] == want  # two runs, bitwise the same
    got = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert got["first_step"] == 3 and got["losses"] == want[3:]
    other = _run([sys.executable, "-m", "meshattn", "train", *args, "--tp", "1", "--cp", "2", "--resume",
                  str(part / "checkpoint"), "--out", str(tmp_path / "cp2")])
    assert other.returncode == 0, other.stderr[-2000:]
    got = json.loads((tmp_path / "cp2" / "metrics.json").read_text())["losses"]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want[3:]), rtol=1e-5, atol=0)
