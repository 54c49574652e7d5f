"""`meshattn train --init-from FOLDER`: fine-tuning a Hugging Face checkpoint and exporting it back.

A tiny Llama is built locally with transformers (nothing is downloaded), its weights redrawn so
attention is far from uniform, with a byte-level BPE tokenizer trained on a few strings. The
oracles are transformers itself: the loss of the first step (taken before any update) is the loss
transformers' model computes on the same global batch, and the folder the run exports loads into
AutoModelForCausalLM with the logits of meshattn's trained reference (from the checkpoint).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import meshattn.hf as mh  # noqa: E402
from meshattn import ModelConfig, Transformer  # noqa: E402
from meshattn.cli import main  # noqa: E402
from meshattn.training.checkpoint import load_reference  # noqa: E402
from meshattn.training.tokenized import TokenizedCorpus  # noqa: E402

VOCAB = 300
SEQ, BATCH = 32, 4
WORDS = ("the mesh splits attention heads over tensor ranks; rings pass keys and values between context ranks, "
         "and the data axis averages gradients. def forward(self, x): return self.proj(x) + x\n")
# Float32, transformers against meshattn on the same weights (as tests/test_hf.py argues): rotary
# angles (float32 in HF, float64 then rounded here) and reduction order differ, ~1e-6 on logits
# of this size over 2 layers; a wrong weight moves them by O(0.1). tp=2 adds a split reduction.
TOL = dict(rtol=1e-4, atol=1e-4)


def _tokenizer(folder: Path) -> None:
    """A byte-level BPE of at most VOCAB ids with <s> prepended by its post-processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([WORDS] * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.save(str(folder / "tokenizer.json"))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(the model folder, a text file to train on)."""
    root = tmp_path_factory.mktemp("init")
    folder = root / "llama"
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
                                      rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=1, pad_token_id=None)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # matrices N(0, 1/fan_in), norms 1 + 0.2 N(0, 1): far from HF's uniform start
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(noise * p.shape[-1] ** -0.5 if p.dim() >= 2 else 1 + 0.2 * noise)
    model.save_pretrained(folder)
    _tokenizer(folder)
    text = root / "text.txt"
    text.write_text(WORDS * 60)  # ~12 KB: both splits hold many windows of SEQ + 1 ids
    return folder, text


def _hf_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits  # (B, S, V)


def test_fine_tune_starts_from_the_folder_and_exports_what_it_trained(llama, tmp_path, capfd):
    folder, text = llama
    out = tmp_path / "run"
    argv = ["train", "--init-from", str(folder), "--data", str(text), "--tp", "2", "--seq-len", str(SEQ),
            "--batch-size", str(BATCH), "--steps", "3", "--lr", "1e-2", "--sample-tokens", "8", "--no-progress",
            "--out", str(out)]
    assert main(argv) == 0
    stdout = capfd.readouterr().out
    assert f"hugging face folder: {out / 'hf'}" in stdout and "sample:" in stdout

    # Step 0's loss is taken before any update: transformers' loss on the same global batch.
    corpus = TokenizedCorpus.from_path(str(text), mh.load_tokenizer(folder))
    ids, targets = corpus.batch(0, BATCH, SEQ, seed=0)  # (B, S) each, the run's first global batch
    assert (ids[:, 0] == 0).all()  # every row starts with the tokenizer's <s>
    logits = _hf_logits(folder, ids)
    oracle = F.cross_entropy(logits.flatten(0, 1), targets.flatten()).item()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["losses"][0] == pytest.approx(oracle, rel=1e-5), (metrics["losses"], oracle)
    assert metrics["config"]["init_from"] == str(folder) and metrics["hf"] == str(out / "hf")

    # The export is the trained model: transformers' logits equal the checkpoint's reference.
    state, meta = load_reference(out / "checkpoint")
    assert meta["step"] == 3
    ref = Transformer(ModelConfig(**meta["config"]["model"]))
    ref.load_state_dict(state)
    with torch.no_grad():
        ours, _ = ref(ids)
    exported = _hf_logits(out / "hf", ids)
    torch.testing.assert_close(exported, ours, **TOL)
    assert (exported - logits).abs().max() > 1e-3  # three steps at lr 1e-2 moved the weights
    tok = mh.load_tokenizer(out / "hf")
    assert tok.encode("rings pass") == mh.load_tokenizer(folder).encode("rings pass")

    # --resume continues the fine-tune (here at dp=2): weights from the checkpoint, the folder's tokenizer.
    assert main([*argv[:argv.index("--tp")], "--dp", "2", "--tp", "1", *argv[argv.index("--seq-len"):],
                 "--steps", "4", "--sample-tokens", "0", "--resume", str(out / "checkpoint")]) == 0
    assert re.search(r"over 1 steps", capfd.readouterr().out)
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed["first_step"] == 3 and len(resumed["losses"]) == 1

    # Resuming a fine-tune without --init-from is another model (the preset's): the refusal names the folder.
    assert main(["train", "--resume", str(out / "checkpoint"), "--steps", "9", "--data", str(text), "--seq-len",
                 str(SEQ), "--out", str(tmp_path / "other")]) == 2
    assert f"fine-tune with --init-from {folder} as it was" in capfd.readouterr().err


def test_a_folder_without_its_tokenizer_is_refused_before_any_worker(llama, tmp_path, capfd):
    folder, text = llama
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in folder.iterdir():
        if f.name != "tokenizer.json":
            (bare / f.name).write_bytes(f.read_bytes())
    assert main(["train", "--init-from", str(bare), "--data", str(text), "--seq-len", str(SEQ),
                 "--out", str(tmp_path / "run")]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("meshattn: error: ") and "has no tokenizer.json" in err[0], err
    assert not (tmp_path / "run").exists()  # refused before --out was made


def test_tokenized_batches_are_windows_of_the_text(llama):
    folder, text = llama
    tok = mh.load_tokenizer(folder)
    corpus = TokenizedCorpus.from_path(str(text), tok)
    ids, targets = corpus.batch(5, 6, SEQ, seed=3)
    again, _ = corpus.batch(5, 6, SEQ, seed=3)
    assert ids.shape == targets.shape == (6, SEQ) and ids.dtype == torch.long
    assert torch.equal(ids, again) and torch.equal(ids[:, 1:], targets[:, :-1])
    assert int(ids.max()) < VOCAB
    for row in ids.tolist():  # each row is a prefix of the tokenizer's encoding of its text
        decoded = tok.decode(row)
        assert decoded and decoded in text.read_text()
    data = corpus.text.val
    assert len(corpus.row(data, len(data) - 2, SEQ + 1)) == SEQ + 1  # a start at the split's end moves back
    with pytest.raises(ValueError, match="tokenises to .* ids, not more than seq_len"):
        TokenizedCorpus.from_path(str(text), tok).check(10_000)
