"""Bad input, as a new user would type it, is refused in the parent before any worker starts:
exit status 2, one line `meshattn: error: <what is wrong>; <what to do>` (or argparse's own
`meshattn <cmd>: error: ...` after its usage lines), no traceback, no process left behind.

Most cases call `meshattn.cli.main` in this process, with process creation and process-group
initialisation made to fail the test; two go through `python -m meshattn` to prove the entry point.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing

from meshattn.cli import main
from meshattn.cli.checks import check_data, check_out
from meshattn.cli.options import build_parser
from meshattn.config import TrainConfig, preset
from meshattn.training.checkpoint import write_manifest
from meshattn.training.corpus import looks_binary

ROOT = Path(__file__).parents[1]
TEXT = ["--data", "{text}", "--seq-len", "64"]  # a valid small text, so later checks are reached quickly


# -- the inputs

def _fake_checkpoint(directory: Path, model: str, step: int) -> Path:
    """A checkpoint folder that passes the manifest and metadata checks: a tiny DCP save, a
    meta.json for `model` at `step`, and its manifest."""
    import torch.distributed.checkpoint as dcp

    directory.mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model/x": torch.zeros(2)}, checkpoint_id=str(directory), no_dist=True)
    meta = {"format": 1, "step": step, "config": TrainConfig(model=preset(model)).to_dict(), "extra": {},
            "optimizer": False, "rng": []}
    (directory / "meta.json").write_text(json.dumps(meta))
    write_manifest(directory)
    return directory


def _garbled_checkpoint(directory: Path) -> Path:
    """A manifest listing a file whose bytes no longer match its SHA-256."""
    directory.mkdir()
    (directory / "__0_0.distcp").write_bytes(b"flipped")
    files = {"__0_0.distcp": {"sha256": hashlib.sha256(b"original").hexdigest(), "bytes": 7}}
    (directory / "manifest.json").write_text(json.dumps({"format": 1, "files": files}))
    return directory


def _hf_config(directory: Path, architecture: str) -> Path:
    """A Hugging Face folder holding only a tiny config.json (max_position_embeddings 64)."""
    directory.mkdir()
    config = {"architectures": [architecture], "model_type": architecture[:-len("ForCausalLM")].lower(),
              "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
              "hidden_act": "silu", "tie_word_embeddings": False}
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """Every file and folder the cases name, made once."""
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "text.txt").write_text("def f(x):\n    return x + 1\n" * 800)
    (tmp / "empty").mkdir()
    (tmp / "short.txt").write_text("too short for one sequence")
    (tmp / "binary.bin").write_bytes(bytes(range(256)) * 2)  # NUL bytes, and too short too
    (tmp / "afile").write_text("a regular file")
    (tmp / "no-manifest").mkdir()
    _garbled_checkpoint(tmp / "garbled")
    _fake_checkpoint(tmp / "small-ckpt" / "step-00000003", "small", step=3)
    (tmp / "small-ckpt" / "latest").write_text("step-00000003")
    _hf_config(tmp / "llama", "LlamaForCausalLM")  # config.json only: no weights, no tokenizer
    _hf_config(tmp / "gemma", "GemmaForCausalLM")
    locked = tmp / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    yield {"tmp": str(tmp), "text": str(tmp / "text.txt"), "empty": str(tmp / "empty"),
           "short": str(tmp / "short.txt"), "binary": str(tmp / "binary.bin"), "afile": str(tmp / "afile"),
           "no_manifest": str(tmp / "no-manifest"), "garbled": str(tmp / "garbled"),
           "other_model": str(tmp / "small-ckpt"), "locked": str(locked), "llama": str(tmp / "llama"),
           "gemma": str(tmp / "gemma"),
           "locked_writable": os.access(locked, os.W_OK)}  # as root, chmod does not stop writing
    locked.chmod(0o700)


# -- no worker may start, and no process may stay

def _children() -> set[int]:
    """Process ids whose parent is this process (from /proc, so nothing is started to look)."""
    me, kids = os.getpid(), set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # ended while we looked
        if int(fields[1]) == me:
            kids.add(int(stat.parent.name))
    return kids


def _session(sid: int) -> set[int]:
    """Process ids still in session `sid` (a subprocess started with start_new_session and
    everything it started)."""
    members = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid:
            members.add(int(stat.parent.name))
    return members


def _no_worker(*args, **kwargs):
    raise AssertionError("a worker or process group was started for input that should be refused first")


@pytest.fixture(autouse=True)
def refused_in_parent(monkeypatch, tmp_path):
    """Run each case in a scratch folder (default --out folders land there) with worker spawning
    and process-group initialisation failing the test; afterwards no new child process remains."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.multiprocessing, "start_processes", _no_worker)
    monkeypatch.setattr(dist, "init_process_group", _no_worker)
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(var, raising=False)
    before = _children()
    yield
    assert _children() <= before, "a child process was left behind"


def _refused(argv: list[str], capsys) -> tuple[str, list[str]]:
    """main(argv) in this process: asserts exit 2 and no traceback; returns (the error line,
    the warning lines)."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()
    assert code == 2, (code, out, err)
    assert "Traceback" not in out + err, err
    warnings_ = [line for line in err.splitlines() if line.startswith("meshattn: warning:")]
    lines = [line for line in err.splitlines() if not line.startswith("meshattn: warning:")]
    return _one_error_line(argv[0], lines), warnings_


def _one_error_line(command: str, lines: list[str]) -> str:
    """The refusal is one line: ours, or argparse's last line after its usage block (from the
    command's parser, or the top parser for an unknown flag)."""
    if lines and lines[0].startswith("usage:"):
        assert lines[-1].startswith((f"meshattn {command}: error: ", "meshattn: error: ")), lines
        assert all(line.startswith(("usage:", " ")) for line in lines[:-1]), lines
    else:
        assert len(lines) == 1 and lines[0].startswith("meshattn: error: "), lines
    return lines[-1]


CASES = [
    # train: the text
    (["train", "--data", "{tmp}/nope"], "no such file or folder; give a text file or a folder"),
    (["train", "--data", "{empty}"], "found no text (.py, .txt, .md, .rst files); give a non-empty text file"),
    (["train", "--data", "{short}"], "not more than seq_len+1=257; give more text or a shorter --seq-len"),
    # train: the checkpoint to resume
    (["train", *TEXT, "--resume", "{tmp}/nope"], "no such folder; give OUT/checkpoint of an earlier run"),
    (["train", *TEXT, "--resume", "{no_manifest}"], "neither a checkpoint nor a folder with a 'latest' file; give"),
    (["train", *TEXT, "--resume", "{garbled}"], "SHA-256 differs from the manifest (corrupted or altered); give"),
    (["train", *TEXT, "--resume", "{other_model}"],
     "holds another model: d_ff (1024 saved vs 512 now), d_model (256 saved vs 128 now)"),
    (["train", *TEXT, "--preset", "small", "--steps", "3", "--resume", "{other_model}"],
     "is at step 3, so --steps 3 leaves nothing to train; ask for more --steps than 3"),
    # train: the Hugging Face folder to fine-tune (--init-from)
    (["train", "--init-from", "{tmp}/nope"], "no such folder; give a Hugging Face model folder (config.json"),
    (["train", "--init-from", "{afile}"], "is a file, not a folder; give a Hugging Face model folder"),
    (["train", "--init-from", "{empty}"], "has no config.json, so it is not a Hugging Face model folder; give"),
    (["train", "--init-from", "{gemma}"], "GemmaForCausalLM"),
    (["train", "--init-from", "{llama}"],
     "--seq-len 256 exceeds the max_position_embeddings=64 of --init-from"),
    (["train", "--init-from", "{llama}", "--seq-len", "32", "--tp", "3"], "n_heads=4 is not divisible by tp=3"),
    (["train", "--init-from", "{llama}", "--seq-len", "32", "--ep", "2"],
     "is a dense model; leave out --ep"),
    (["train", "--init-from", "{llama}", "--seq-len", "32", "--pack-documents"],
     "--pack-documents packs byte-level files, but --init-from tokenises the text"),
    (["train", "--init-from", "{llama}", "--seq-len", "32"],
     "has neither model.safetensors nor model.safetensors.index.json"),
    # train: numbers
    (["train", "--shard", "dp", "--tp", "2"], "shard='dp' shards over the dp x cp ranks, and there is 1; use dp or cp"),
    (["train", "--shard", "dp", "--dp", "2", "--tp", "1", "--node-size", "2"], "drop node_size"),
    (["train", "--lr", "nan"], "--lr nan is not a usable learning rate; give a finite number > 0, e.g. --lr 3e-3"),
    (["train", "--lr", "-1"], "--lr -1.0 is not a usable learning rate; give a finite number > 0"),
    (["train", "--lr", "inf"], "--lr inf is not a usable learning rate"),
    (["train", "--lr", "abc"], "argument --lr: invalid float value: 'abc'"),
    (["train", "--timeout", "0"], "--timeout 0.0 is not a usable number of seconds; give a finite number > 0"),
    (["train", "--timeout", "-5"], "--timeout -5.0 is not a usable number of seconds"),
    (["train", "--timeout", "nan"], "--timeout nan is not a usable number of seconds"),
    (["train", "--steps", "0"], "--steps 0 is too small; give --steps 1 or more"),
    (["train", "--window", "0"], "window=0 must be None or an int >= 1"),
    (["train", "--cp", "2", "--cp-layout", "balanced", "--seq-len", "100"],
     "must be a multiple of 8 (cp=2 with the balanced layout cuts it into 8 chunks); use seq_len=104"),
    (["train", "--steps", "abc"], "argument --steps: invalid int value: 'abc'"),
    (["train", "--batch-size", "0"], "--batch-size 0 is too small; give --batch-size 1 or more"),
    (["train", "--seq-len", "0"], "--seq-len 0 is too small; give --seq-len 1 or more"),
    (["train", "--save-every", "-1"], "--save-every -1 is too small; give --save-every 0 or more"),
    # train: the layout
    (["train", "--tp", "3"], "n_heads=4 is not divisible by tp=3; legal tp sizes: 1, 2, 4"),
    (["train", "--dp", "2", "--batch-size", "3"],
     "batch_size=3 is not divisible by dp*grad_accum=2*1; use a batch size that is a multiple of 2"),
    (["train", "--seq-len", "4096"], "seq_len=4096 exceeds the model's max_seq_len=256; lower --seq-len"),
    (["train", "--cp", "2", "--cp-impl", "hybrid"], "--cp-impl hybrid needs --ulysses-size, the Ulysses group"),
    (["train", "--preset", "bogus"], "argument --preset: invalid choice: 'bogus'"),
    # train: mixture of experts
    (["train", "--preset", "moe-tiny", "--ep", "4"],
     "--ep 4 borrows the dp*cp*tp = 1*1*2 = 2 ranks and must divide that number; give e.g. --dp 2 (then 4 ranks)"),
    (["train", "--ep", "2"], "--ep 2 splits experts, but --preset tiny is a dense model; choose an MoE preset"),
    (["train", "--preset", "moe-tiny", "--tp", "1", "--dp", "3", "--ep", "3"],
     "n_experts=8 is not divisible by ep=3; legal ep: 1"),
    (["train", "--preset", "moe-tiny", "--ep", "0"], "--ep 0 is too small; give --ep 1 or more"),
    (["train", "--preset", "moe-tiny", "--capacity-factor", "0"], "--capacity-factor 0.0 must be a number > 0"),
    (["train", "--preset", "moe-tiny", "--moe-dispatch", "bogus"], "argument --moe-dispatch: invalid choice"),
    (["train", "--bogus-flag"], "unrecognized arguments: --bogus-flag"),
    # train: the output folder
    (["train", *TEXT, "--out", "{afile}"], "is a file, not a folder; give a folder path"),
    (["train", *TEXT, "--out", "{afile}/run"], "afile is a file, so no folder can be made under it; choose a path"),
    # bench
    (["bench", "--layouts", "bogus"], "layout 'bogus': cannot read 'bogus'; write e.g. single, native-tp2"),
    (["bench", "--layouts", "tp3"], "n_heads=8 is not divisible by tp=3; legal tp sizes: 1, 2, 4, 8"),
    (["bench", "--seq-len", "256", "0"], "--seq-len 0 is too small; give --seq-len 1 or more"),
    (["bench", "--rounds", "0"], "--rounds 0 is too small; give --rounds 1 or more"),
    (["bench", "--steps", "0"], "--steps 0 is too small; give --steps 1 or more"),
    (["bench", "--warmup", "-1"], "--warmup -1 is too small; give --warmup 0 or more"),
    (["bench", "--world", "0"], "--world 0 is too small; give --world 1 or more"),
    (["bench", "--n-heads", "3"], "d_model=256 is not divisible by n_heads=3; legal n_heads"),
    (["bench", "--timeout", "0"], "--timeout 0.0 is not a usable number of seconds"),
    (["bench", "--data", "{tmp}/nope"], "no such file or folder; give a text file"),
    (["bench", "--data", "{text}", "--out", "{afile}"], "is a file, not a folder; give a folder path"),
    (["bench", "--layouts", "tp2", "--preset", "bogus"], "argument --preset: invalid choice: 'bogus'"),
    # profile
    (["profile", "--layout", "cp3:ring"], "seq_len=256 must be a multiple of 6"),
    (["profile", "--layout", "tp2@everything"], "write @attention or @block after a meshattn layout"),
    (["profile", "--steps", "0", "--no-progress"], "--steps 0 is too small; give --steps 1 or more"),
    (["profile", "--warmup", "-1"], "--warmup -1 is too small; give --warmup 0 or more"),
    (["profile", "--data", "{short}", "--seq-len", "64"], "give more text or a shorter --seq-len"),
    (["profile", "--data", "{text}", "--out", "{afile}/run"], "is a file, so no folder can be made under it"),
]


@pytest.mark.parametrize("argv,fragment", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_input_is_refused_with_one_line(argv, fragment, paths, capsys):
    error, warned = _refused([a.format(**paths) for a in argv], capsys)
    assert fragment in error, error
    assert not warned


def test_binary_data_is_warned_about_then_refused_as_too_short(paths, capsys):
    error, warned = _refused(["train", "--data", paths["binary"]], capsys)
    assert len(warned) == 1 and "looks like a binary file, not text; it is read as bytes all the same" in warned[0]
    assert "the validation split has 25 bytes, not more than seq_len+1=257; give more text" in error


def test_unwritable_out_is_refused(paths, capsys):
    if paths["locked_writable"]:
        pytest.skip("chmod does not stop this user (root) from writing")
    error, _ = _refused(["train", *[a.format(**paths) for a in TEXT], "--out", f"{paths['locked']}/run"], capsys)
    assert "cannot be created or written (permission denied); choose a folder you can write to" in error


# -- the shared checks on their own

def test_binary_text_that_is_long_enough_is_only_warned_about(tmp_path, capsys):
    f = tmp_path / "weights.bin"
    f.write_bytes(bytes(range(256)) * 64)
    check_data(str(f), 64, 1 << 20)  # proceeds
    assert capsys.readouterr().err.startswith("meshattn: warning: --data ")
    text = tmp_path / "notes.txt"
    text.write_text("plain words, tabs\tand accents: café\n" * 50)
    assert looks_binary(f) and not looks_binary(text)


def test_out_check_leaves_only_the_folder(tmp_path):
    check_out(str(tmp_path / "a" / "b"))
    assert [p.relative_to(tmp_path) for p in sorted(tmp_path.rglob("*"))] == [Path("a"), Path("a/b")]


def test_profile_accepts_no_progress_like_its_siblings():
    for command in ("train", "bench", "profile"):
        assert build_parser().parse_args([command, "--no-progress"]).no_progress


# -- the entry point, in a real process

@pytest.mark.parametrize("argv,fragment", [
    (["train", "--lr", "nan"], "--lr nan is not a usable learning rate; give a finite number > 0"),
    (["profile", "--no-progress", "--layout", "cp3:ring"], "must be a multiple of 6 (cp=3 with the zigzag layout"),
])
def test_entry_point_refuses_in_one_line(argv, fragment, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR")}
    proc = subprocess.Popen([sys.executable, "-m", "meshattn", *argv, "--out", str(tmp_path / "out")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
                            start_new_session=True)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    assert "Traceback" not in out + err
    assert err.splitlines() == [err.strip()] and err.startswith("meshattn: error: ") and fragment in err, err
    assert not _session(proc.pid), "a process of the refused run is still alive"
    assert not (tmp_path / "out").exists()  # refused before --out is made
