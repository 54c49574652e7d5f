"""Checkpoints that survive a change of layout, written atomically and verified before reading.

A checkpoint is a directory `ROOT/step-00000120/` holding

    *.distcp, .metadata   torch.distributed.checkpoint (DCP) files: the model's parameters and the
                          AdamW state under the *single-device* model's names at full shape
    meta.json             step, configuration, loss-scaler state
    manifest.json         SHA-256 and size of every other file, written last

and `ROOT/latest` names the newest complete one.

Layout-free: every tensor is stored at the reference model's full shape, so a checkpoint saved at
dp2 x tp2 loads at tp1, cp2 or anything else, with parameters sharded over dp x cp (FSDP) or not:
each rank slices what it holds (the same `Shard` descriptions that split the reference model, then
FSDP's split of the tp-local piece). DCP deduplicates the tensors every rank holds and
spreads the writing over ranks. Costs one full copy of the model and optimizer state per rank
while saving or loading (fine up to a few GB; sharded DTensor checkpoints would avoid it).

Atomic: everything is written under `ROOT/.step-00000120.partial`, files and directory fsynced,
the manifest last, then the directory is renamed into place and `latest` replaced by rename. A
crash at any point leaves the previous checkpoint and `latest` as they were.

Verified: before DCP reads anything, every file's SHA-256 and size are checked against the
manifest and the directory must hold exactly the manifest's files: a flipped byte, a truncated,
missing or extra file is refused with the file's name. This guards against corruption, not
malice: whoever can write the folder can rewrite the manifest too. DCP's `.metadata` is a pickle,
and unpickling runs code, so it is read only through `safe_pickle.SafeFileSystemReader`, which
builds nothing but tensor metadata and refuses anything else by name before calling it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from ..config import ConfigError, ModelConfig, TrainConfig
from ..parallel import ParallelModel, gather_state_dict, load_state_dict
from ..parallel.fsdp import shard_like
from .safe_pickle import RefusedPickle, SafeFileSystemReader

MANIFEST, META, LATEST = "manifest.json", "meta.json", "latest"
FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, corrupted or for another model."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(directory: Path) -> dict:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {"format": FORMAT, "files": {str(p.relative_to(directory)): {"sha256": _sha256(p),
                                                                            "bytes": p.stat().st_size}
                                            for p in files}}
    path = directory / MANIFEST
    path.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    for p in [*files, path]:
        _fsync(p)
    _fsync(directory)
    return manifest


def verify(directory: Path) -> dict:
    """Check every file against the manifest; returns the manifest or raises CheckpointError."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {MANIFEST}; the checkpoint is incomplete or not a meshattn "
                              "checkpoint, and is not read")
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable manifest ({e})") from None
    present = {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST}
    missing, extra = sorted(files.keys() - present), sorted(present - files.keys())
    if missing:
        raise CheckpointError(f"{directory}: file(s) {missing} listed in the manifest are missing")
    if extra:
        raise CheckpointError(f"{directory}: file(s) {extra} are not in the manifest; refusing to read them")
    for name, want in sorted(files.items()):
        p = directory / name
        size = p.stat().st_size
        if size != want["bytes"]:
            raise CheckpointError(f"{p}: {size} bytes, the manifest says {want['bytes']} (truncated or altered)")
        if _sha256(p) != want["sha256"]:
            raise CheckpointError(f"{p}: SHA-256 differs from the manifest (corrupted or altered)")
    return manifest


def resolve(path: Path) -> Path:
    """A checkpoint directory, or ROOT whose `latest` names one."""
    path = Path(path)
    if (path / LATEST).is_file():
        name = (path / LATEST).read_text().strip()
        if "/" in name or name.startswith("."):
            raise CheckpointError(f"{path / LATEST}: names {name!r}, not a checkpoint directory")
        return path / name
    if (path / MANIFEST).is_file() or (path / ".metadata").exists():
        return path
    raise CheckpointError(f"{path}: neither a checkpoint nor a folder with a '{LATEST}' file")


def _optimizer_tensors(model: ParallelModel, opt: torch.optim.Optimizer) -> dict[str, dict[str, torch.Tensor]]:
    """AdamW state per local parameter name: exp_avg, exp_avg_sq (shaped like the parameter)."""
    out = {}
    for name, p, _ in model.named_shards():
        state = opt.state.get(p, {})
        if "exp_avg" in state:
            out[name] = state
    return out


def _state(model: ParallelModel, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The full reference-named tensors of model and optimizer (a collective over tp)."""
    state = {f"model/{k}": v for k, v in gather_state_dict(model).items()}
    optim = _optimizer_tensors(model, opt)
    if not optim:
        return state
    for key in ("exp_avg", "exp_avg_sq"):
        full = model.gather_full(lambda n, p, key=key: optim[n][key])
        state.update({f"optim/{k}/{key}": v for k, v in full.items()})
    steps = {model.shards[n].name: s["step"].reshape(1).double() for n, s in optim.items()}
    state.update({f"optim/{k}/step": v for k, v in steps.items()})
    return state


def save(model: ParallelModel, opt: torch.optim.Optimizer, cfg: TrainConfig, step: int, root: Path,
         extra: dict | None = None, keep: int = 2) -> Path:
    """Write checkpoint `step` under root (every rank calls this); returns its directory."""
    root = Path(root)
    final, partial = root / f"step-{step:08d}", root / f".step-{step:08d}.partial"
    state = {k: v.contiguous() for k, v in _state(model, opt).items()}
    rank0 = dist.get_rank() == 0
    if rank0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)  # left by a crash
        partial.mkdir()
    dist.barrier()
    dcp.save(state, checkpoint_id=str(partial))
    dist.barrier()
    if rank0:
        meta = {"format": FORMAT, "step": step, "config": cfg.to_dict(), "extra": extra or {},
                "optimizer": any(k.startswith("optim/") for k in state),
                "rng": torch.get_rng_state().tolist()}
        (partial / META).write_text(json.dumps(meta))
        write_manifest(partial)
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        tmp = root / f".{LATEST}.tmp"
        tmp.write_text(final.name)
        _fsync(tmp)
        tmp.replace(root / LATEST)
        _fsync(root)
        for old in sorted(root.glob("step-*"))[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def open_verified(path: Path, cfg: TrainConfig | None = None) -> tuple[Path, dict]:
    """The verified checkpoint directory behind `path` and its meta; with cfg, refuse another model."""
    directory = resolve(path)
    verify(directory)
    _vet_metadata(directory)
    meta = json.loads((directory / META).read_text())
    if cfg is not None:
        _check_model(meta, cfg)
    return directory, meta


def _refusal(directory: Path, refused: RefusedPickle) -> CheckpointError:
    return CheckpointError(f"{directory / '.metadata'}: refused to unpickle {refused.what} (a checkpoint may hold "
                           "only tensor metadata); the checkpoint is not read")


def _vet_metadata(directory: Path) -> None:
    """Read DCP's metadata with the restricted unpickler, which calls nothing it refuses."""
    try:
        SafeFileSystemReader(directory).read_metadata()
    except RefusedPickle as e:
        raise _refusal(directory, e) from None
    except Exception as e:  # missing, truncated, garbled: a CheckpointError, so that in `load` every rank hears of it
        raise CheckpointError(f"{directory / '.metadata'}: unreadable DCP metadata ({type(e).__name__}: {e})") from None


def _dcp_load(state: dict[str, torch.Tensor], directory: Path, **kwargs) -> None:
    """dcp.load through SafeFileSystemReader. DCP wraps the reader's errors in its own, so a refusal
    (the file replaced since it was vetted) is recognised by the reader's record of it."""
    reader = SafeFileSystemReader(directory)
    try:
        dcp.load(state, storage_reader=reader, **kwargs)
    except (Exception, dcp.CheckpointException):  # CheckpointException is a BaseException
        if reader.refused is not None:
            raise _refusal(directory, reader.refused) from None
        raise


def load(model: ParallelModel, opt: torch.optim.Optimizer | None, cfg: TrainConfig, path: Path) -> dict:
    """Load a checkpoint saved at any layout into this one (every rank calls this); returns its
    meta (step, config, extra). Rank 0 verifies the files and vets DCP's metadata before any rank
    calls DCP, and shares the verdict in one small collective, so every rank raises the same error."""
    box = [None, None, None]  # error, directory, meta
    if dist.get_rank() == 0:
        try:
            directory, meta = open_verified(path, cfg)
            box = [None, str(directory), meta]
        except (CheckpointError, OSError, ValueError) as e:
            box = [str(e), None, None]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise CheckpointError(box[0])
    directory, meta = Path(box[1]), box[2]
    dtype = next(model.parameters()).dtype
    state = {f"model/{s.name}": torch.empty(s.full_shape, dtype=dtype) for s in model.shards.values()}
    opt = opt if meta["optimizer"] else None  # saved before any optimizer step: nothing to restore
    if opt is not None:
        for shard in model.shards.values():
            for key in ("exp_avg", "exp_avg_sq"):
                state[f"optim/{shard.name}/{key}"] = torch.empty(shard.full_shape, dtype=dtype)
            state[f"optim/{shard.name}/step"] = torch.empty(1, dtype=torch.float64)
    _dcp_load(state, directory)
    load_state_dict(model, {k[len("model/"):]: v for k, v in state.items() if k.startswith("model/")})
    if opt is not None:
        axes = model.axes.shard_axes()
        for _, p, shard in model.named_shards():
            axis = axes[shard.axis]
            opt.state[p] = {"step": state[f"optim/{shard.name}/step"].float().reshape(()),
                            **{key: shard_like(p, shard.take(state[f"optim/{shard.name}/{key}"], axis.rank,
                                                             axis.size).clone())
                               for key in ("exp_avg", "exp_avg_sq")}}  # split as p is under FSDP
    torch.set_rng_state(torch.tensor(meta["rng"], dtype=torch.uint8))
    return meta


def _check_model(meta: dict, cfg: TrainConfig) -> None:
    try:  # fields added since the checkpoint was written take their defaults
        saved = dataclasses.asdict(ModelConfig(**meta["config"]["model"]))
    except (TypeError, ValueError):
        saved = meta["config"]["model"]
    mine = cfg.to_dict()["model"]
    if saved != mine:
        fields = sorted(k for k in saved.keys() | mine.keys() if saved.get(k) != mine.get(k))
        raise ConfigError("the checkpoint holds another model: " + ", ".join(
            f"{k} ({saved.get(k)!r} saved vs {mine.get(k)!r} now)" for k in fields))


def load_reference(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The single-device model's state dict and the meta from a checkpoint, in one process with
    no process group (for inference or export), verified first."""
    directory, meta = open_verified(path)
    from ..model import Transformer

    with torch.device("meta"):  # shapes only: no initialisation of weights DCP overwrites anyway
        shapes = Transformer(ModelConfig(**meta["config"]["model"])).state_dict()
    state = {f"model/{k}": torch.empty(v.shape, dtype=v.dtype) for k, v in shapes.items()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # no_dist is the intent
        _dcp_load(state, directory, no_dist=True)
    return {k[len("model/"):]: v for k, v in state.items()}, meta
