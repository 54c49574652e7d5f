"""Reading a checkpoint's DCP metadata without running code.

torch.distributed.checkpoint (DCP) keeps a checkpoint's index in `.metadata`, a Python pickle that
its FileSystemReader reads with plain `pickle.load`: a `.metadata` whose pickle calls `os.system`
runs that command on whoever loads the checkpoint. The manifest's SHA-256 sums (checkpoint.py)
catch corruption, not malice: whoever can write the folder can rewrite the manifest too.

`SafeFileSystemReader` reads `.metadata` with `MetadataUnpickler`, which builds only what DCP's
metadata of a tensors-only checkpoint is made of in torch 2.13 (listed in `ADMITTED` by exact
module and name, as found in pickles of real checkpoints) and refuses anything else by name,
before anything it names is called.

Two holes a `find_class` whitelist alone leaves open are closed here too:

* BytesStorageMetadata is not admitted. DCP stores a non-tensor value as a `torch.save` pickle in
  a `.distcp` file and reads it with `torch.load(weights_only=False)`, so metadata that marks any
  key as bytes runs that file's pickle, although every class in it would be whitelisted.
  meshattn checkpoints hold only tensors (`checkpoint._state`), so such metadata is refused.
* Only instances of the admitted dataclasses may receive state (pickle's BUILD). pickle's own
  BUILD sets attributes on whatever is on its stack, so a pickle could otherwise overwrite
  methods of an admitted class (say `pathlib.PosixPath`) for the rest of the process. This needs
  the pure-Python unpickler (`pickle._Unpickler`), whose opcodes can be overridden one by one;
  metadata is small, so its speed does not matter.

Tensor data DCP reads with `torch.load(weights_only=True)`, which is safe as it is.
"""

from __future__ import annotations

import io
import pathlib
import pickle
from pathlib import PurePath
from typing import Any

import torch
import torch.serialization
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.filesystem import _StorageInfo

_DATACLASSES = (dcp_metadata.Metadata, dcp_metadata.StorageMeta, dcp_metadata.TensorStorageMetadata,
                dcp_metadata.ChunkStorageMetadata, dcp_metadata.TensorProperties, dcp_metadata.MetadataIndex,
                _StorageInfo)

ADMITTED: dict[tuple[str, str], Any] = {
    **{(cls.__module__, cls.__qualname__): cls for cls in _DATACLASSES},
    # TensorProperties pickles its memory format as this enum
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"): dcp_metadata._MEM_FORMAT_ENCODING,
    ("torch", "Size"): torch.Size,  # shapes and offsets
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,  # torch.layout: a lookup by name
    ("pathlib", "PosixPath"): pathlib.PosixPath,  # StorageMeta.checkpoint_id
    # a dtype pickles as the global `torch.<name>`
    **{("torch", name): value for name, value in vars(torch).items() if isinstance(value, torch.dtype)},
}


class RefusedPickle(pickle.UnpicklingError):
    """The pickle asked for something the whitelist does not admit; `what` names it."""

    def __init__(self, what: str):
        super().__init__(f"refused to unpickle {what}")
        self.what = what


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class MetadataUnpickler(pickle._Unpickler):
    """Unpickles DCP metadata of a tensors-only checkpoint; refuses every other global, any
    persistent id, and state for anything but an instance of an admitted dataclass."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ADMITTED[(module, name)]
        except KeyError:
            raise RefusedPickle(f"{module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise RefusedPickle(f"persistent id {pid!r}")

    def load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if type(inst) not in _DATACLASSES:
            raise RefusedPickle(f"state set on {_qualified(type(inst))}")
        if hasattr(inst, "__setstate__"):  # TensorProperties
            inst.__setstate__(state)
        elif isinstance(state, dict) and all(type(k) is str for k in state):
            inst.__dict__.update(state)
        else:
            raise pickle.UnpicklingError(f"unexpected state for {_qualified(type(inst))}")

    dispatch[pickle.BUILD[0]] = load_build


def load_metadata(stream: io.BufferedIOBase) -> dcp_metadata.Metadata:
    """DCP's Metadata from a `.metadata` stream, or RefusedPickle / UnpicklingError."""
    metadata = MetadataUnpickler(stream).load()
    if not isinstance(metadata, dcp_metadata.Metadata):
        raise pickle.UnpicklingError(f"holds a {_qualified(type(metadata))}, not DCP metadata")
    for info in (metadata.storage_data or {}).values():  # data files must lie in the verified folder
        path = getattr(info, "relative_path", None)
        if not isinstance(path, str) or PurePath(path).name != path or path in ("", ".", ".."):
            raise RefusedPickle(f"a data file path {path!r} that leaves the checkpoint folder")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """DCP's FileSystemReader reading `.metadata` with MetadataUnpickler. A refusal is kept in
    `refused`, since DCP's loader wraps the error it raises in its own."""

    refused: RefusedPickle | None = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        # FileSystemReader.read_metadata in torch 2.13, with load_metadata for pickle.load
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as metadata_file:
            try:
                metadata = load_metadata(metadata_file)
            except RefusedPickle as e:
                self.refused = e
                raise
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
