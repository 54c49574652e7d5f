"""The body of every rank of `meshattn generate` (module level, so spawned workers can import it).

Weights go straight into the layout: from a Hugging Face folder each rank reads only its slices
of the safetensors (meshattn.hf.HFSource); a meshattn checkpoint is read whole, then sliced.
Rank 0 streams a single request's text as it is decoded (several requests: a progress bar), then
prints the outputs in prompt order and the prefill and decode speeds, or one JSON object.
"""

from __future__ import annotations

import json
import sys

import torch

from ..config import ModelConfig, ParallelConfig
from ..mesh import ParallelDims, current_device
from ..parallel import build
from .generate import Generation, run
from .sampling import Sampling

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _weights(req: dict):
    if req["kind"] == "hf":
        from ..hf import HFSource

        return HFSource(req["path"])
    from ..training.checkpoint import load_reference

    return load_reference(req["path"])[0]


def _tokenizer(req: dict):
    from ..hf import ByteTokenizer, load_tokenizer

    return ByteTokenizer() if req["tokenizer"] is None else load_tokenizer(req["tokenizer"])


class _Stream:
    """Rank 0's view of its first request: the text printed as it grows (decoding the whole
    output each time, so multi-byte characters and merged tokens come out right)."""

    def __init__(self, tokenizer, index: int = 0):
        self.tokenizer, self.index, self.ids, self.shown = tokenizer, index, [], ""

    def __call__(self, request: int, token: int) -> None:
        if request != self.index:
            return
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.startswith(self.shown) and not text.endswith("\ufffd"):  # a partial character waits
            sys.stdout.write(text[len(self.shown):])
            sys.stdout.flush()
            self.shown = text


class _Bar:
    def __init__(self, total: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc="generate", unit="tok", file=sys.stderr, leave=False)

    def __call__(self, request: int, token: int) -> None:
        self.bar.update(1)


def run_generation(req: dict, progress: bool, as_json: bool) -> None:
    import torch.distributed as dist

    model_cfg = ModelConfig(**req["model"])
    dims = ParallelDims(ParallelConfig(**req["parallel"]))
    model = build(model_cfg, dims, _weights(req), dtype=DTYPES[req["dtype"]], device=current_device())
    rank0 = dist.get_rank() == 0
    tokenizer = _tokenizer(req) if rank0 else None
    texts = req["texts"]
    on_token = None
    if rank0 and progress and not as_json:
        on_token = _Stream(tokenizer) if len(texts) == 1 else _Bar(len(texts) * req["max_new_tokens"])
        if len(texts) == 1:
            print(texts[0], end="", flush=True)
    result = run(model, req["prompts"], req["max_new_tokens"], Sampling(**req["sampling"]), req["eos_token_ids"],
                 on_token)
    if isinstance(on_token, _Bar):
        on_token.bar.close()
    if rank0:
        _report(result, texts, tokenizer, as_json, streamed=isinstance(on_token, _Stream))


def _report(result: Generation, texts: list[str], tokenizer, as_json: bool, streamed: bool) -> None:
    outputs = [{"prompt": p, "token_ids": ids, "text": tokenizer.decode(ids)} for p, ids in zip(texts, result.tokens)]
    if as_json:
        print(json.dumps({"outputs": outputs, "prefill_tokens_per_s": result.prefill_tokens_per_s,
                          "decode_tokens_per_s": result.decode_tokens_per_s}), flush=True)
        return
    if streamed:
        print(flush=True)
    else:
        for i, o in enumerate(outputs):
            print(f"--- {i + 1}: {o['prompt']}{o['text']}", flush=True)
    print(f"prefill: {result.prompt_tokens} tokens in {result.prefill_s * 1e3:.0f} ms "
          f"({result.prefill_tokens_per_s:,.0f} tokens/s); decode: {result.new_tokens} new tokens, "
          f"{result.decode_tokens_per_s:,.1f} tokens/s", flush=True)
