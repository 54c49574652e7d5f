"""A checkpoint never runs code: a `.metadata` pickle that calls anything but DCP's own metadata
classes is refused by name, with the manifest rewritten to match (as anyone who can write the
folder could), on one process and on every rank, and the command it carries never runs; so is
metadata marking a value as bytes, which DCP would read with an unrestricted `torch.load`. A
legitimate checkpoint still loads through the restricted reader."""

from __future__ import annotations

import io
import json
import os
import pathlib
import pickle
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from meshattn import ModelConfig, ParallelConfig, TrainConfig, Transformer
from meshattn.training import checkpoint as ckpt
from meshattn.training.safe_pickle import MetadataUnpickler, RefusedPickle, SafeFileSystemReader

MODEL = ModelConfig(d_model=32, n_heads=4, n_kv_heads=2, n_layers=1, d_ff=64, vocab_size=256, max_seq_len=16)
CFG = TrainConfig(model=MODEL, parallel=ParallelConfig(tp=2), batch_size=2, seq_len=16)


class _Command:
    """Unpickles into `os.system(command)`."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _getattr_system(command: str) -> bytes:
    """getattr(__import__('os'), 'system')(command), with no reference to os.system itself."""
    return (b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(Vos\ntRVsystem\ntR(V" + command.encode() + b"\ntR.")


def _eval(command: str) -> bytes:
    return b"cbuiltins\neval\n(V__import__('os').system(" + repr(command).encode() + b")\ntR."


def _set_on_class() -> bytes:
    """State for the class pathlib.PosixPath itself: would replace its `joinpath` process-wide."""
    return b"\x80\x04cpathlib\nPosixPath\nN}X\x08\x00\x00\x00joinpathX\x01\x00\x00\x00xs\x86b."


PAYLOADS = {  # name -> (pickle carrying `command`, the global the refusal names)
    "os.system": (lambda c: pickle.dumps(_Command(c)), f"{os.system.__module__}.system"),
    "getattr": (_getattr_system, "builtins.getattr"),
    "eval": (_eval, "builtins.eval"),
}


def _dcp_save(state: dict, directory: Path) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, checkpoint_id=str(directory), no_dist=True)


def _finish(directory: Path) -> None:
    """meta.json as `checkpoint.save` writes it, then the manifest over every file."""
    meta = {"format": ckpt.FORMAT, "step": 1, "config": CFG.to_dict(), "extra": {}, "optimizer": False,
            "rng": torch.get_rng_state().tolist()}
    (directory / ckpt.META).write_text(json.dumps(meta))
    ckpt.write_manifest(directory)


@pytest.fixture(scope="module")
def legit(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A meshattn checkpoint of MODEL written in this process, and the state dict in it."""
    directory = tmp_path_factory.mktemp("legit") / "step-00000001"
    torch.manual_seed(0)
    weights = Transformer(MODEL).state_dict()
    _dcp_save({f"model/{k}": v for k, v in weights.items()}, directory)
    _finish(directory)
    return directory, weights


def _plant(legit_dir: Path, tmp_path: Path, payload: bytes) -> Path:
    """A copy of the checkpoint whose `.metadata` is `payload`, with a manifest to match."""
    directory = tmp_path / "step-00000001"
    shutil.copytree(legit_dir, directory)
    (directory / ".metadata").write_bytes(payload)
    ckpt.write_manifest(directory)
    ckpt.verify(directory)  # the manifest is no obstacle
    return directory


def _refusal(directory: Path, what: str) -> str:
    return (f"{directory}/.metadata: refused to unpickle {what} (a checkpoint may hold only tensor metadata); "
            "the checkpoint is not read")


@pytest.mark.parametrize("kind", sorted(PAYLOADS))
def test_a_metadata_pickle_that_runs_a_command_is_refused(legit, tmp_path, kind):
    make, what = PAYLOADS[kind]
    marker = tmp_path / "pwned"
    directory = _plant(legit[0], tmp_path, make(f"touch {marker}"))
    with pytest.raises(ckpt.CheckpointError) as refused:
        ckpt.load_reference(directory)
    assert str(refused.value) == _refusal(directory, what)
    assert not marker.exists(), "the planted command ran"
    pickle.loads((directory / ".metadata").read_bytes())  # the payload is live: plain pickle runs it
    assert marker.exists()


def test_a_pickle_cannot_set_attributes_of_an_admitted_class(legit, tmp_path):
    joinpath = pathlib.PosixPath.joinpath
    directory = _plant(legit[0], tmp_path, _set_on_class())
    with pytest.raises(ckpt.CheckpointError) as refused:
        ckpt.load_reference(directory)
    assert str(refused.value) == _refusal(directory, "state set on builtins.type")
    assert pathlib.PosixPath.joinpath is joinpath


def test_persistent_ids_are_refused():
    with pytest.raises(RefusedPickle, match="refused to unpickle persistent id 'x'"):
        MetadataUnpickler(io.BytesIO(b"\x80\x04X\x01\x00\x00\x00xQ.")).load()


def test_a_value_stored_as_bytes_is_refused(legit, tmp_path):
    """Metadata made only of DCP's classes can still mark a key as bytes, which DCP reads with
    torch.load(weights_only=False): here `model/tok...` holds a pickle calling os.system."""
    marker = tmp_path / "pwned"
    directory = tmp_path / "step-00000001"
    state = {f"model/{k}": v for k, v in legit[1].items()}
    state[next(iter(state))] = _Command(f"touch {marker}")
    _dcp_save(state, directory)
    _finish(directory)
    with pytest.raises(ckpt.CheckpointError) as refused:
        ckpt.load_reference(directory)
    assert str(refused.value) == _refusal(directory, "torch.distributed.checkpoint.metadata.BytesStorageMetadata")
    assert not marker.exists(), "the planted command ran"
    shapes = {f"model/{k}": torch.empty_like(v) for k, v in legit[1].items()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(shapes, checkpoint_id=str(directory), no_dist=True)  # DCP's own reader runs it
    assert marker.exists()


def test_a_data_file_path_outside_the_checkpoint_is_refused(legit, tmp_path):
    """Whitelisted classes only, but a storage path that would make DCP read a file the manifest
    never covered."""
    metadata = pickle.loads((legit[0] / ".metadata").read_bytes())  # our own, trusted
    for info in metadata.storage_data.values():
        info.relative_path = "../" + info.relative_path
    directory = _plant(legit[0], tmp_path, pickle.dumps(metadata))
    with pytest.raises(ckpt.CheckpointError, match=r"a data file path '\.\./__0_0\.distcp' that leaves the "
                                                   "checkpoint folder"):
        ckpt.load_reference(directory)


def test_metadata_replaced_after_it_was_vetted_is_refused_by_dcp_load_too(legit, tmp_path):
    marker = tmp_path / "pwned"
    directory = _plant(legit[0], tmp_path, pickle.dumps(_Command(f"touch {marker}")))
    state = {f"model/{k}": torch.empty_like(v) for k, v in legit[1].items()}
    with pytest.raises(ckpt.CheckpointError) as refused, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        ckpt._dcp_load(state, directory, no_dist=True)
    assert str(refused.value) == _refusal(directory, f"{os.system.__module__}.system")
    assert not marker.exists()


def load_on_every_rank(rank, world, root):
    from distributed import mesh_for
    from meshattn.training.loop import build_model, make_optimizer

    model = build_model(CFG, mesh_for(CFG.parallel))
    try:
        ckpt.load(model, make_optimizer(model, CFG), CFG, Path(root))
    except ckpt.CheckpointError as e:
        return str(e)
    return None


def test_every_rank_refuses_the_planted_metadata(pools, legit, tmp_path):
    marker = tmp_path / "pwned"
    directory = _plant(legit[0], tmp_path, pickle.dumps(_Command(f"touch {marker}")))
    messages = pools.run(CFG.parallel.world_size, load_on_every_rank, root=str(directory))
    assert messages == [_refusal(directory, f"{os.system.__module__}.system")] * CFG.parallel.world_size
    assert not marker.exists(), "the planted command ran"


def test_a_legitimate_checkpoint_loads_through_the_safe_reader(legit):
    directory, weights = legit
    state, meta = ckpt.load_reference(directory)
    assert meta["step"] == 1
    assert state.keys() == weights.keys()
    for name, t in weights.items():
        assert torch.equal(state[name], t), name


def test_the_safe_reader_reads_what_pickle_reads(tmp_path):
    """Every dtype DCP may record, and storage_meta's path: the whitelist covers DCP's metadata."""
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.uint8, torch.bool]
    _dcp_save({f"t/{d}": torch.zeros(2, 3, dtype=d) for d in dtypes}, tmp_path)
    safe, plain = SafeFileSystemReader(tmp_path).read_metadata(), dcp.FileSystemReader(tmp_path).read_metadata()
    safe.storage_meta.load_id = plain.storage_meta.load_id = None
    assert safe == plain
