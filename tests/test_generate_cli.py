"""`meshattn generate` end to end: a Hugging Face folder made here (meshattn.hf.save and a
tokenizer trained with `tokenizers`), generation on one process and split over tp, cp and dp
equal to the reference model's in-process generation, and bad input refused in the parent."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from meshattn.cli import main
from meshattn.config import ModelConfig, preset
from meshattn.inference import generate
from meshattn.model import Transformer

pytest.importorskip("tokenizers")

PROMPTS = ["def hello", "the quick brown fox jumps", "x"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from meshattn import hf

    out = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    hf.save(Transformer(preset("tiny", vocab_size=320, max_seq_len=64, init_std=0.2)), out)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["def hello world", "the quick brown fox", "import torch"] * 10, trainer)
    tok.save(str(out / "tokenizer.json"))
    return out


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meshattn", "generate", *args], capture_output=True, text=True,
                          timeout=240)


def _oracle(folder, n: int, **sampling) -> list[list[int]]:
    from meshattn import hf

    model = hf.load(folder, dtype=torch.float64)
    tok = hf.load_tokenizer(folder)
    return generate(model, [tok.encode(p) for p in PROMPTS], n, **sampling)


@pytest.mark.parametrize("layout", [["--tp", "2"], ["--cp", "2", "--dp", "2", "--cp-impl", "allgather"]],
                         ids=["tp2", "dp2xcp2"])  # one process: test_streamed_text_and_speeds, test_generate.py
def test_generate_json_equals_the_reference(folder, layout):
    args = ["--model", str(folder), "--max-new-tokens", "6", "--dtype", "float64", "--json"]
    sampled = "--dp" in layout  # one layout samples: seeded draws equal across layouts too
    if sampled:
        args += ["--temperature", "0.9", "--top-k", "40", "--top-p", "0.95", "--seed", "5"]
    r = _cli(*[a for p in PROMPTS for a in ("--prompt", p)], *args, *layout)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    want = _oracle(folder, 6, **(dict(greedy=False, temperature=0.9, top_k=40, top_p=0.95, seed=5) if sampled else {}))
    assert [o["prompt"] for o in out["outputs"]] == PROMPTS
    assert [o["token_ids"] for o in out["outputs"]] == want
    assert out["prefill_tokens_per_s"] > 0 and out["decode_tokens_per_s"] > 0


def test_streamed_text_and_speeds(folder):
    r = _cli("--model", str(folder), "--prompt", "def hello", "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[1].startswith("def hello") and "tokens/s" in lines[-1] and lines[-1].startswith("prefill:")


def _truncated(folder, tmp_path):
    bad = tmp_path / "trunc"
    bad.mkdir()
    for f in folder.iterdir():
        data = f.read_bytes()
        (bad / f.name).write_bytes(data[: len(data) // 2] if f.suffix == ".safetensors" else data)
    return bad


BAD = {
    "no folder": (lambda f, t: ["--model", str(t / "nope"), "--prompt", "a"], "no such folder"),
    "no config": (lambda f, t: ["--model", str(t), "--prompt", "a"], "neither a Hugging Face folder"),
    "truncated": (lambda f, t: ["--model", str(_truncated(f, t)), "--prompt", "a"], "truncated"),
    "too long": (lambda f, t: ["--model", str(f), "--prompt", "hello " * 40, "--max-new-tokens", "30"],
                 "past the model's window of 64"),
    "greedy and top-k": (lambda f, t: ["--model", str(f), "--prompt", "a", "--greedy", "--top-k", "3"], "--greedy"),
    "bad tp": (lambda f, t: ["--model", str(f), "--prompt", "a", "--tp", "3"], "legal tp sizes"),
    "top-p": (lambda f, t: ["--model", str(f), "--prompt", "a", "--top-p", "1.5"], "--top-p 1.5"),
    "empty prompt": (lambda f, t: ["--model", str(f), "--prompt", ""], "has no tokens"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_is_one_line_before_any_worker(folder, tmp_path, capsys, name):
    make, expected = BAD[name]
    assert main(["generate", *make(folder, tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("meshattn: error: ") and "\n" not in err and expected in err, err


def test_generate_from_a_meshattn_run(tmp_path):
    """A run's --out folder is a --model too: byte-level, the reference's greedy tokens."""
    from pathlib import Path

    from meshattn.training.checkpoint import load_reference

    text = tmp_path / "text.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 200)
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "meshattn", "train", "--tp", "1", "--steps", "2", "--batch-size", "2",
                        "--seq-len", "32", "--sample-tokens", "0", "--no-progress", "--data", str(text),
                        "--out", str(out)], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    r = _cli("--model", str(out), "--prompt", "def f", "--prompt", "ret", "--max-new-tokens", "5", "--dtype",
             "float64", "--json")
    assert r.returncode == 0, r.stderr
    state, meta = load_reference(Path(out) / "checkpoint")
    model = Transformer(ModelConfig(**meta["config"]["model"])).double()
    model.load_state_dict(state)
    want = generate(model, [list(b"def f"), list(b"ret")], 5)
    assert [o["token_ids"] for o in json.loads(r.stdout)["outputs"]] == want
