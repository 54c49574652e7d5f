"""`meshattn generate`: batched KV-cache generation from a Hugging Face folder or a meshattn
checkpoint, on one process or a dp x cp x tp layout (with ep for a mixture of experts).

    meshattn generate --model FOLDER --prompt TEXT [--prompt TEXT ...] --max-new-tokens N \\
        [--greedy | --temperature T --top-k K --top-p P --seed S] [--tp N] [--cp N --cp-impl ...] [--dp N] [--json]

Everything that can be refused is refused here, before a worker starts: the folder (its config,
weights and tokenizer), the layout against the model, the sampling flags, and every prompt
against the model's window (prompt + new tokens <= max_seq_len).
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from ..config import CpImpl, CpLayout, ConfigError, ModelConfig, MoeDispatch, ParallelConfig, divisors

DTYPES = ("float32", "bfloat16", "float64")


def generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text with a KV cache from a Hugging Face folder or a meshattn "
                                        "checkpoint, on one process or split over tp / cp / dp (and ep)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, metavar="FOLDER",
                   help="a Hugging Face folder (config.json, *.safetensors, tokenizer.json) or a meshattn checkpoint "
                        "(a run's --out folder, its checkpoint folder or one step-* folder)")
    p.add_argument("--prompt", action="append", required=True, metavar="TEXT",
                   help="a request; repeat for a batch (outputs come in this order)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true", help="the most likely token each step (the default)")
    mode.add_argument("--temperature", type=float, default=None, help="sample at this temperature")
    p.add_argument("--top-k", type=int, default=None, help="sample among the K most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=None, help="sample among the most likely tokens reaching P")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (request i draws from (seed, i))")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (KV heads split, or replicated)")
    p.add_argument("--cp", type=int, default=1, help="context-parallel ranks: the prompt's cache stays split")
    p.add_argument("--cp-impl", default="ring", choices=CpImpl.names(), help="how the prefill crosses the split")
    p.add_argument("--cp-layout", default="zigzag", choices=CpLayout.names())
    p.add_argument("--ulysses-size", type=int, default=None, help="Ulysses group size for --cp-impl hybrid")
    p.add_argument("--dp", type=int, default=1, help="groups serving their own share of the requests")
    p.add_argument("--ep", type=int, default=1, help="expert parallelism for a mixture-of-experts model")
    p.add_argument("--moe-dispatch", default="all_to_all", choices=MoeDispatch.names())
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="weights and KV cache precision")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the text")
    p.add_argument("--no-progress", action="store_true", help="no streaming, no progress bar")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before a stuck collective fails")
    p.add_argument("--backend", default=None, choices=["gloo", "nccl"], help="default: nccl on GPU, else gloo")
    p.add_argument("--verbose", action="store_true", help="on a failure inside the workers, print every failed "
                   "rank's full traceback")


@dataclass(frozen=True)
class Request:
    """What every worker needs, as plain data."""

    kind: str  # "hf" or "meshattn"
    path: str  # the HF folder, or the verified checkpoint step folder
    tokenizer: str | None  # folder with tokenizer.json (None: byte-level)
    model: dict
    parallel: dict
    prompts: list
    texts: list
    max_new_tokens: int
    sampling: dict
    eos_token_ids: list
    dtype: str


def resolve_model(path: str) -> tuple[str, str, ModelConfig, str | None]:
    """(kind, path, config, tokenizer folder) of --model, refused by name unless it is an HF
    folder whose weights open, or a complete meshattn checkpoint."""
    from ..hf import HFSource, is_hf_folder, read_config
    from ..training.checkpoint import CheckpointError, open_verified

    folder = Path(path)
    if not folder.exists():
        raise ConfigError(f"--model {path}: no such folder; give a Hugging Face folder (config.json, *.safetensors, "
                          "tokenizer.json) or a meshattn checkpoint")
    if is_hf_folder(folder):
        cfg = read_config(folder)
        HFSource(folder)  # headers read and checked against config.json: truncation, shapes
        return "hf", str(folder), cfg, str(folder)
    candidates = [folder / "checkpoint", folder]
    for c in candidates:
        if (c / "latest").is_file() or (c / "meta.json").is_file():
            try:
                step, meta = open_verified(c)
            except CheckpointError as e:
                raise ConfigError(f"--model {path}: {e}") from None
            cfg = ModelConfig(**meta["config"]["model"])
            init = meta["config"].get("init_from")
            return "meshattn", str(step), cfg, init
    raise ConfigError(f"--model {path}: neither a Hugging Face folder (no config.json) nor a meshattn checkpoint "
                      "(no latest or meta.json); give the folder that holds config.json, or a run's --out folder")


def check_generate(a: argparse.Namespace) -> Request:
    from ..hf import ByteTokenizer, load_tokenizer
    from .checks import check_at_least, check_timeout, check_ulysses_flag

    check_timeout(a.timeout)
    check_at_least(a, 1, "max_new_tokens", "tp", "cp", "dp", "ep")
    sampling = _sampling(a)
    check_ulysses_flag(a)
    kind, path, model, tok_folder = resolve_model(a.model)
    par = ParallelConfig(dp=a.dp, tp=a.tp, cp=a.cp, cp_impl=a.cp_impl, cp_layout=a.cp_layout,
                         ulysses_size=a.ulysses_size, ep=a.ep, moe_dispatch=a.moe_dispatch)
    par.check_model(model)
    if par.world_size % a.ep:
        raise ConfigError(f"--ep {a.ep} must divide the dp*cp*tp = {par.world_size} ranks; choose among "
                          f"{', '.join(map(str, divisors(par.world_size)))}")
    tokenizer = ByteTokenizer() if tok_folder is None else load_tokenizer(tok_folder)
    prompts = [tokenizer.encode(t) for t in a.prompt]
    for i, (text, ids) in enumerate(zip(a.prompt, prompts)):
        if not ids:
            raise ConfigError(f"--prompt {i + 1} ({text!r}) has no tokens; give some text")
        bad = [t for t in ids if not 0 <= t < model.vocab_size]
        if bad:
            raise ConfigError(f"--prompt {i + 1} encodes to token {bad[0]}, outside the model's vocabulary of "
                              f"{model.vocab_size}; the tokenizer does not belong to this model")
        if len(ids) + a.max_new_tokens > model.max_seq_len:
            raise ConfigError(f"--prompt {i + 1} is {len(ids)} tokens and --max-new-tokens {a.max_new_tokens} would "
                              f"reach {len(ids) + a.max_new_tokens}, past the model's window of {model.max_seq_len}; "
                              f"shorten the prompt or ask for at most {max(model.max_seq_len - len(ids), 0)} new tokens")
    return Request(kind, path, tok_folder, asdict(model), asdict(par), prompts, list(a.prompt), a.max_new_tokens,
                   sampling, list(tokenizer.eos_token_ids), a.dtype)


def _sampling(a: argparse.Namespace) -> dict:
    sampled = a.temperature is not None or a.top_k is not None or a.top_p is not None
    if a.greedy and sampled:
        raise ConfigError("--greedy takes the most likely token; leave out --top-k/--top-p, or drop --greedy to sample")
    if not sampled:
        return {"greedy": True, "seed": a.seed}
    t = 1.0 if a.temperature is None else a.temperature
    k = 0 if a.top_k is None else a.top_k
    p = 1.0 if a.top_p is None else a.top_p
    if not (math.isfinite(t) and t > 0):
        raise ConfigError(f"--temperature {t} must be a finite number > 0 (use --greedy for the limit at 0)")
    if k < 0:
        raise ConfigError(f"--top-k {k} must be >= 0 (0 keeps every token)")
    if not (0 < p <= 1):
        raise ConfigError(f"--top-p {p} must be in (0, 1] (1 keeps every token)")
    return {"greedy": False, "temperature": t, "top_k": k, "top_p": p, "seed": a.seed}


def generate_command(a: argparse.Namespace) -> int:
    from ..launch import launch
    from ..outcome import Stopped, WorkerFailed
    from ..inference.worker import run_generation
    from .commands import _report_failure, _report_stop
    from .checks import first_process
    from .options import layout_name

    req = check_generate(a)
    world = ParallelConfig(**req.parallel).world_size
    if first_process() and not a.json:
        cfg = ModelConfig(**req.model)
        print(f"meshattn generate: {cfg.num_params() / 1e6:.2f}M params from {req.path}, "
              f"{layout_name(ParallelConfig(**req.parallel))}, {len(req.prompts)} prompt(s), "
              f"up to {req.max_new_tokens} new tokens, {'greedy' if req.sampling['greedy'] else 'sampled'}",
              flush=True)
    try:
        launch(run_generation, world, args=(asdict(req), not a.no_progress, a.json), env=dict(os.environ),
               backend=a.backend, timeout_s=a.timeout)
    except Stopped as e:
        return _report_stop(e)
    except (WorkerFailed, ConfigError) as e:
        return _report_failure(e, a.verbose)
    return 0
