"""Bad input refused in the parent, before any worker starts.

Each check raises ConfigError with one line, `<what is wrong>; <what to do>`, which `main` prints
as `meshattn: error: ...` with exit status 2. One function per command (check_train,
check_bench, check_profile), built from small shared checks of one flag or one path each.

The checks only read, except that --out is created (the run would create it anyway) to prove it
can be written. They give the same verdict in every process, so under torchrun each process
runs them before the process group forms and all stop alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
from pathlib import Path

from ..config import PRESETS, ConfigError, ModelConfig, TrainConfig, divisors, preset
from ..hf import HFSource, is_hf_folder, load_tokenizer, read_config
from ..training.checkpoint import META, CheckpointError, open_verified, resolve
from ..training.corpus import MAX_BYTES, Corpus, looks_binary
from ..training.tokenized import TokenizedCorpus
from .options import bench_model, config_from_args


# -- one function per command

def check_train(a: argparse.Namespace) -> TrainConfig:
    """Everything `meshattn train` can refuse before it launches: the flags, the Hugging Face
    folder to fine-tune, the configuration (TrainConfig's own checks, on the preset's model or
    the folder's), the text (tokenised as the workers will), the checkpoint to resume and the
    output folder. Returns the run's configuration."""
    check_timeout(a.timeout)
    check_at_least(a, 1, "steps", "batch_size", "seq_len", "grad_accum", "dp", "tp", "cp", "ep")
    check_at_least(a, 0, "save_every", "sample_tokens")
    check_lr(a.lr)
    check_ulysses_flag(a)
    check_ep_flag(a, preset(a.preset) if a.init_from is None else check_init_from(a))
    cfg = config_from_args(a)  # the layout checked against the preset's model or the folder's
    tokenizer = None if a.init_from is None else check_init_files(a.init_from, cfg.model)
    check_data(a.data, cfg.seq_len, MAX_BYTES, tokenizer)
    if a.resume is not None:
        check_resume(a.resume, cfg)
    if a.init_from is not None:
        check_export(Path(a.out) / "hf")
    check_out(a.out)  # last: nothing is created for a run refused for another reason
    return cfg


def check_bench(a: argparse.Namespace) -> tuple[ModelConfig, list | None]:
    """Everything `meshattn bench` can refuse before its first layout starts: the flags, the
    model, the layouts asked for (whether each can run it), the text (for the longest sequence)
    and the output folder, which is otherwise first written after the whole benchmark.
    Returns the model and the layouts asked for (None: the default list)."""
    from ..bench.layouts import check_layout, parse_layout
    from ..bench.worker import TEXT_BYTES

    check_timeout(a.timeout)
    check_at_least(a, 1, "world", "batch_size", "steps", "rounds")
    check_at_least(a, 0, "warmup")
    check_model_sizes(a)
    for s in a.seq_len:
        check_value("--seq-len", s, 1)
    model = bench_model(a, a.seq_len)  # ModelConfig's checks of the sizes together
    layouts = None if not a.layouts else [parse_layout(name) for name in a.layouts]
    for layout in layouts or []:
        for s in a.seq_len:
            check_layout(layout, model, a.batch_size, s)
    check_data(a.data, max(a.seq_len), TEXT_BYTES)
    check_out(a.out)
    return model, layouts


def check_profile(a: argparse.Namespace):
    """Everything `meshattn profile` can refuse before its workers start: the flags, the model,
    the layout (and whether it can run this model and batch), the text and the output folder.
    Returns the layout (with --no-overlap applied) and its training configuration."""
    from ..bench.layouts import check_layout, parse_layout
    from ..bench.worker import TEXT_BYTES

    check_timeout(a.timeout)
    check_at_least(a, 1, "batch_size", "steps", "seq_len")
    check_at_least(a, 0, "warmup")
    check_model_sizes(a)
    layout = parse_layout(a.layout)
    if a.no_overlap:
        layout = dataclasses.replace(layout, parallel=dataclasses.replace(layout.parallel, overlap=False))
    cfg = check_layout(layout, bench_model(a, [a.seq_len]), a.batch_size, a.seq_len)
    check_data(a.data, a.seq_len, TEXT_BYTES)
    check_out(a.out)
    return layout, dataclasses.replace(cfg, dtype=a.dtype, data=a.data)


# -- flags

def flag(dest: str) -> str:
    """The option an argparse destination comes from: batch_size -> --batch-size."""
    return "--" + dest.replace("_", "-")


def check_value(name: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise ConfigError(f"{name} {value} is too small; give {name} {minimum} or more")


def check_at_least(a: argparse.Namespace, minimum: int, *dests: str) -> None:
    """Refuse a count below `minimum`, naming the flag (TrainConfig names the field instead)."""
    for dest in dests:
        check_value(flag(dest), getattr(a, dest), minimum)


def check_model_sizes(a: argparse.Namespace) -> None:
    """bench and profile's --d-model ... --d-ff, where given, are positive."""
    check_at_least(a, 1, *(d for d in ("d_model", "n_heads", "n_kv_heads", "n_layers", "d_ff")
                           if getattr(a, d) is not None))


def check_ulysses_flag(a: argparse.Namespace) -> None:
    """--cp-impl hybrid without --ulysses-size: say which flag is missing (TrainConfig names the field)."""
    if a.cp_impl == "hybrid" and a.ulysses_size is None:
        raise ConfigError(f"--cp-impl hybrid needs --ulysses-size, the Ulysses group inside the --cp {a.cp} ranks; "
                          f"give --ulysses-size among {', '.join(map(str, divisors(a.cp)))}")


def check_ep_flag(a: argparse.Namespace, model: ModelConfig) -> None:
    """--ep borrows the dp*cp*tp ranks: say how to get enough of them, and refuse it for a dense
    model (the preset's, or the --init-from folder's)."""
    world = a.dp * a.cp * a.tp
    if a.ep > 1 and model.n_experts == 0:
        if a.init_from is not None:
            raise ConfigError(f"--ep {a.ep} splits experts, but --init-from {a.init_from} is a dense model; leave out "
                              "--ep (or fine-tune a mixture of experts such as a Mixtral)")
        moe = ", ".join(n for n, m in PRESETS.items() if m.n_experts)
        raise ConfigError(f"--ep {a.ep} splits experts, but --preset {a.preset} is a dense model; choose an MoE "
                          f"preset ({moe}) or leave out --ep")
    if world % a.ep:
        dp = a.ep // math.gcd(a.ep, a.cp * a.tp)  # the fewest replicas that make a multiple of ep
        raise ConfigError(f"--ep {a.ep} borrows the dp*cp*tp = {a.dp}*{a.cp}*{a.tp} = {world} ranks and must divide "
                          f"that number; give e.g. --dp {dp} (then {dp * a.cp * a.tp} ranks) or choose --ep among "
                          f"{', '.join(str(d) for d in divisors(world))}")
    if a.capacity_factor is not None and not (math.isfinite(a.capacity_factor) and a.capacity_factor > 0):
        raise ConfigError(f"--capacity-factor {a.capacity_factor} must be a number > 0 (e.g. 1.25); leave it out "
                          "for dropless routing")


def check_lr(lr: float) -> None:
    """argparse reads 'nan' and 'inf' as floats; neither trains anything."""
    if not (math.isfinite(lr) and lr > 0):
        raise ConfigError(f"--lr {lr} is not a usable learning rate; give a finite number > 0, e.g. --lr 3e-3")


def check_timeout(timeout: float) -> None:
    """A collective timeout of zero, below zero or NaN fails every collective; infinity never
    reports a stuck one."""
    if not (math.isfinite(timeout) and timeout > 0):
        raise ConfigError(f"--timeout {timeout} is not a usable number of seconds; give a finite number > 0, "
                          "e.g. --timeout 300")


# -- paths

def check_data(data: str | None, seq_len: int, max_bytes: int, tokenizer=None) -> None:
    """Load the text as the workers will (the same files, the same split; tokenised by
    `tokenizer` when given, as far as needed to tell) and refuse it unless both splits are
    longer than seq_len+1 tokens. A file that looks binary is only warned about: it trains, as
    bytes, if it is long enough."""
    if data is not None and Path(data).is_file() and _binary(data):
        warn(f"--data {data} looks like a binary file, not text; it is read as bytes all the same")
    try:
        if tokenizer is None:
            Corpus.from_path(data, max_bytes=max_bytes).check(seq_len)
        else:
            TokenizedCorpus.from_path(data, tokenizer, max_bytes=max_bytes).check(seq_len)
    except OSError as e:
        if e.filename is None:  # corpus.py's own message
            raise ConfigError(str(e)) from None
        raise ConfigError(f"--data {data}: cannot read {e.filename} ({e.strerror}); make it readable or give "
                          "another --data") from None
    except ValueError as e:
        text = str(e)
        source = f"--data {data}" if data is not None else "Python's standard library (the default --data)"
        raise ConfigError(text if text.startswith("--data") else f"{source}: {text}") from None


def _binary(path: str) -> bool:
    try:
        return looks_binary(path)
    except OSError:
        return False  # unreadable: check_data's loading says so


def check_init_from(a: argparse.Namespace) -> ModelConfig:
    """The Hugging Face folder to fine-tune, its config.json: a model meshattn represents
    exactly, with --seq-len within its max_position_embeddings and no flag it cannot honour.
    Returns the model. (Its weights and tokenizer: check_init_files, once the layout is checked.)"""
    folder = a.init_from
    what = ("give a Hugging Face model folder (config.json, model.safetensors, tokenizer.json, as save_pretrained "
            "writes)")
    path = Path(folder)
    if not path.exists():
        raise ConfigError(f"--init-from {folder}: no such folder; {what}")
    if not path.is_dir():
        raise ConfigError(f"--init-from {folder} is a file, not a folder; {what}")
    if not (path / "config.json").exists():
        raise ConfigError(f"--init-from {folder} has no config.json, so it is not a Hugging Face model folder; {what}")
    try:
        if not is_hf_folder(path):
            raise ConfigError("config.json names neither architectures nor model_type; " + what)
        model = read_config(path)
    except ConfigError as e:
        raise ConfigError(f"--init-from {folder}: {e}") from None
    if a.seq_len > model.max_seq_len:
        raise ConfigError(f"--seq-len {a.seq_len} exceeds the max_position_embeddings={model.max_seq_len} of "
                          f"--init-from {folder}; give --seq-len {model.max_seq_len} or less")
    if a.pack_documents:
        raise ConfigError("--pack-documents packs byte-level files, but --init-from tokenises the text with the "
                          "folder's tokenizer; leave out --pack-documents to fine-tune")
    return model


def check_init_files(folder: str, model: ModelConfig):
    """The folder's weights (every safetensors header read and checked against config.json, as
    HFSource does in each worker; no weights read) and its tokenizer, whose ids must fit the
    model's vocabulary. Returns the tokenizer."""
    HFSource(folder, model).close()
    tokenizer = load_tokenizer(folder)
    if tokenizer.vocab_size > model.vocab_size:
        raise ConfigError(f"--init-from {folder}: tokenizer.json has {tokenizer.vocab_size} ids but the model's "
                          f"vocab_size is {model.vocab_size}; the tokenizer is not this model's, restore it from the "
                          "model's source")
    return tokenizer


def check_export(folder: Path) -> None:
    """OUT/hf, where a fine-tune exports, must not hold a sharded model: readers would prefer its
    index to the single file written there."""
    if (folder / "model.safetensors.index.json").exists():
        raise ConfigError(f"{folder} holds a sharded Hugging Face model (model.safetensors.index.json), where this "
                          "fine-tune exports; remove it or choose another --out")


def check_resume(resume: str, cfg: TrainConfig) -> None:
    """Resolve and verify the checkpoint as rank 0 will (every file against its manifest, DCP's
    metadata through the restricted unpickler), and refuse one of another model or one that
    has nothing left to train."""
    what = "give OUT/checkpoint of an earlier run, or one of its step-* folders"
    if not Path(resume).exists():
        raise ConfigError(f"--resume {resume}: no such folder; {what}")
    try:
        directory, meta = open_verified(Path(resume), cfg)
        step = meta["step"]
    except ConfigError as e:  # the model check names the fields that differ
        raise ConfigError(f"--resume {resume}: {e}; {_origin_fix(resume)}, or leave out --resume to start "
                          "afresh") from None
    except (CheckpointError, OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"--resume {resume}: {_one_line(e)}; {what}") from None
    if step >= cfg.steps:
        raise ConfigError(f"--resume {resume}: the checkpoint ({directory.name}) is at step {step}, so --steps "
                          f"{cfg.steps} leaves nothing to train; ask for more --steps than {step} to continue")


def _origin_fix(resume: str) -> str:
    """How to name the model a checkpoint was trained with: its --init-from folder, if it was a fine-tune."""
    try:
        saved = json.loads((resolve(Path(resume)) / META).read_text())["config"].get("init_from")
    except (CheckpointError, OSError, ValueError, KeyError, TypeError, AttributeError):
        saved = None
    return f"fine-tune with --init-from {saved} as it was" if saved else "train with the --preset it was saved with"


def check_out(out: str) -> None:
    """Create the output folder (and its parents) and prove a file can be written in it; the
    probe is an unnamed temporary file, so nothing is left but the folder."""
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except FileExistsError:
        raise ConfigError(f"--out {out} is a file, not a folder; give a folder path (it is created if need "
                          "be)") from None
    except NotADirectoryError:
        raise ConfigError(f"--out {out}: {_first_file(path)} is a file, so no folder can be made under it; "
                          "choose a path under a folder") from None
    except PermissionError:
        raise ConfigError(f"--out {out} cannot be created or written (permission denied); choose a folder you "
                          "can write to") from None
    except OSError as e:
        raise ConfigError(f"--out {out} cannot be created or written ({e.strerror}); choose another "
                          "folder") from None


def _first_file(path: Path) -> Path:
    """The nearest ancestor of path that exists and is not a folder (what blocks mkdir)."""
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.is_dir():
            return parent
    return path


# -- output

def first_process() -> bool:
    """Whether this process speaks for the command: always, except under torchrun, where every
    process runs the command and rank 0 speaks."""
    return os.environ.get("RANK", "0") == "0"


def warn(message: str) -> None:
    """One warning line, from the first process only (under torchrun every process checks)."""
    if first_process():
        print(f"meshattn: warning: {message}", file=sys.stderr, flush=True)


def _one_line(e: BaseException) -> str:
    """An exception's message with line breaks folded, so the error stays one line."""
    text = str(e) if not isinstance(e, KeyError) else f"meta.json lacks {e}"
    if isinstance(e, json.JSONDecodeError):
        text = f"unreadable JSON ({e})"
    return " ".join(text.split())
