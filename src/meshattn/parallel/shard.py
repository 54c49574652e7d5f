"""How a local parameter maps onto a parameter of the reference model, and back.

Every parameter of a parallel model carries a `Shard`: the reference parameter it came from,
the slice [start, stop) of that parameter along `dim` it belongs to (a fused QKV weight is three
such slices), and into how many `parts` that slice is split over its mesh axis (`axis`: "tp",
or "ep" for the experts of a mixture-of-experts layer). parts == axis size: rank r holds part r;
parts < size: each part is replicated on size/parts consecutive ranks (KV heads when
n_kv_heads < tp); parts == 1: replicated everywhere.

This one description drives slicing a full state dict into local parameters and gathering
local parameters (or their gradients) back into a full state dict.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn as nn

from ..comm import Axis, all_gather_raw
from .fsdp import copy_into, unsharded


@dataclass(frozen=True)
class Shard:
    name: str  # reference parameter name, e.g. "blocks.0.attn.qkv.weight"
    full_shape: tuple[int, ...]
    dim: int = 0
    parts: int = 1
    start: int = 0
    stop: int | None = None  # None: to the end of `dim`
    axis: str = "tp"  # the mesh axis the parts are split over ("tp" or "ep")

    @property
    def span(self) -> int:
        return (self.full_shape[self.dim] if self.stop is None else self.stop) - self.start

    def local_shape(self) -> tuple[int, ...]:
        shape = list(self.full_shape)
        shape[self.dim] = self.span // self.parts
        return tuple(shape)

    def part_of(self, tp_rank: int, tp: int) -> int:
        return tp_rank * self.parts // tp

    def take(self, full: torch.Tensor, tp_rank: int, tp: int) -> torch.Tensor:
        """The local piece of a full reference tensor."""
        region = full.narrow(self.dim, self.start, self.span)
        return region.chunk(self.parts, dim=self.dim)[self.part_of(tp_rank, tp)]

    def assemble(self, pieces: list[torch.Tensor], tp: int) -> torch.Tensor:
        """The region [start, stop) from every tp rank's local piece (replicas read once)."""
        return torch.cat([pieces[i * tp // self.parts] for i in range(self.parts)], dim=self.dim)


class ShardedModule(nn.Module):
    """A module whose parameters are declared by their Shard; values are loaded afterwards."""

    def __init__(self):
        super().__init__()
        self.param_shards: dict[str, Shard] = {}

    def declare(self, name: str, shard: Shard | None) -> None:
        if shard is None:
            self.register_parameter(name, None)
            return
        self.register_parameter(name, nn.Parameter(torch.empty(shard.local_shape())))
        self.param_shards[name] = shard


def linear_shards(prefix: str, out_f: int, in_f: int, bias: bool, dim: int, parts: int,
                   start: int = 0, stop: int | None = None):
    """Weight and bias shards of one reference Linear (or of a row slice of it)."""
    w = Shard(f"{prefix}.weight", (out_f, in_f), dim, parts, start, stop)
    if not bias:
        return w, None
    # A column split cuts the bias too; a row split leaves it whole (added after the reduction).
    b = Shard(f"{prefix}.bias", (out_f,), 0, parts, start, stop) if dim == 0 else Shard(f"{prefix}.bias", (out_f,))
    return w, b


def collect_shards(module: nn.Module) -> dict[str, Shard]:
    """Shards of every parameter, keyed by the parameter's name in `module` (ties included)."""
    shards = {}
    for mod_name, mod in module.named_modules(remove_duplicate=False):
        for pname, shard in getattr(mod, "param_shards", {}).items():
            shards[f"{mod_name}.{pname}" if mod_name else pname] = shard
    return shards


def check_shards(module: nn.Module, shards: dict[str, Shard]) -> None:
    names = {n for n, _ in module.named_parameters(remove_duplicate=False)}
    missing = names - shards.keys()
    if missing:
        raise RuntimeError(f"parameters without a Shard description: {sorted(missing)}")


class TensorSource(Protocol):
    """Full reference-named tensors read piece by piece (meshattn.hf.HFSource reads a safetensors
    folder so; a plain state dict is wrapped by DictSource)."""

    def names(self) -> set[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def read(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """The slice [start, stop) along `dim` of the full tensor `name`."""
        ...


class DictSource:
    """A full state dict as a TensorSource."""

    def __init__(self, state: Mapping[str, torch.Tensor]):
        self.state = state

    def names(self) -> set[str]:
        return set(self.state.keys())

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.state[name].shape)

    def read(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        return self.state[name].narrow(dim, start, stop - start)


@torch.no_grad()
def load_full_state_dict(module: nn.Module, shards: dict[str, Shard],
                         state: Mapping[str, torch.Tensor] | TensorSource, axes: dict[str, Axis]) -> None:
    """Copy this rank's slices of a full (reference-named) state dict, or of a TensorSource that
    reads only those slices, into the local parameters; `axes` maps a Shard's axis name to the
    Axis it is split over (MeshAxes.shard_axes)."""
    source = DictSource(state) if isinstance(state, Mapping) else state
    wanted = {s.name for s in shards.values()}
    absent = sorted(wanted - source.names())
    if absent:
        raise KeyError(f"state dict lacks {len(absent)} parameter(s) the model needs: {absent[:5]}")
    for name, p in module.named_parameters(remove_duplicate=False):
        shard = shards[name]
        if source.shape(shard.name) != shard.full_shape:
            raise ValueError(f"{shard.name}: state dict has shape {source.shape(shard.name)}, "
                             f"the model expects {shard.full_shape}")
        axis = axes[shard.axis]
        width = shard.span // shard.parts
        start = shard.start + shard.part_of(axis.rank, axis.size) * width
        copy_into(p, source.read(shard.name, shard.dim, start, start + width))  # this rank's piece under FSDP


@torch.no_grad()
def gather_full(module: nn.Module, shards: dict[str, Shard], axes: dict[str, Axis],
                grads: bool = False) -> dict[str, torch.Tensor]:
    """The full reference-named state dict (or gradients) on every rank.

    A collective over the shards' axes: every rank must call it. Parameters without a gradient
    give zeros.
    """
    def value(name: str, p: torch.Tensor) -> torch.Tensor:
        return p.detach() if not grads else (p.grad if p.grad is not None else torch.zeros_like(p))

    return gather_tensors(module, shards, axes, value)


@torch.no_grad()
def gather_tensors(module: nn.Module, shards: dict[str, Shard], axes: dict[str, Axis],
                   tensor_of: Callable[[str, torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full reference-named tensors from per-parameter local ones shaped like their parameter
    (the parameters, their gradients, an optimizer's moments): `tensor_of(local name, param)`.
    A collective over the shards' axes (MeshAxes.shard_axes), and over the batch axis for
    tensors sharded by FSDP."""
    out: dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        shard = shards[name]
        axis = axes[shard.axis].with_counter(None)  # not training traffic
        t = unsharded(tensor_of(name, p))  # under FSDP, all-gathered over the batch axis first
        if shard.parts == 1 or axis.size == 1:
            region = t.clone()
        else:
            pieces = all_gather_raw(t.contiguous().unsqueeze(0), 0, axis, "fwd").unbind(0)  # tp x local
            region = shard.assemble(list(pieces), axis.size)
        full = out.setdefault(shard.name, t.new_zeros(shard.full_shape))
        full.narrow(shard.dim, shard.start, shard.span).copy_(region)
    return out
