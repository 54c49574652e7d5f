"""Sharding parameters, gradients and optimizer state over the batch axis with PyTorch's FSDP2.

`shard_parameters` applies `torch.distributed.fsdp.fully_shard` to the tensor-parallel model: each
transformer block is one FSDP unit (its parameters all-gathered just before its forward and again
before its backward, its gradients reduce-scattered right after), the embedding, final norm and
head form the root unit. Every local parameter (a tp shard, a plain tensor) becomes a DTensor
sharded on dim 0 over the dp x cp ranks, so one rank holds about 1/(dp x cp) of its tp shard's
weights, gradients and AdamW moments. Gradients are averaged over those ranks by the
reduce-scatter, as DDP's all-reduce averaged them.

Expert-parallel parameters (a mixture of experts' routed experts) stay outside FSDP: they are
already split over ep, and moe.py sums their gradients over their copies itself.

Mixed precision: under bfloat16/float16 autocast the weights are gathered in that dtype (FSDP's
param_dtype; half the all-gather bytes) and gradients reduced in float32 (reduce_dtype), which is
also the dtype of the sharded master weights and optimizer state. The residual stream is then in
the low dtype, as torchtitan trains; an unsharded bfloat16 run keeps it in float32.

The helpers below let the rest of the code treat a sharded parameter like a plain one: the local
piece (`local`), the tp-local whole (`unsharded`, a collective over the batch axis) and the
reverse (`shard_like`, no communication).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from ..comm import Axis


def shard_parameters(module: nn.Module, batch: Axis, device_type: str, ignore: list[str] = (),
                     param_dtype: torch.dtype | None = None) -> nn.Module:
    """fully_shard every block of `module` (a ParallelTransformer) and then the module itself over
    the batch axis's ranks; `ignore`: local names of parameters left as they are (the experts).
    param_dtype: the dtype weights are gathered in (None: their own); gradients are reduced in
    float32 (float64 for a float64 model). Returns the module, now an FSDP module."""
    mesh = DeviceMesh.from_group(batch.group, device_type, mesh_dim_names=("batch",))
    own = next(module.parameters()).dtype
    reduce_dtype = torch.float64 if own == torch.float64 else torch.float32
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype if param_dtype else None,
                                  cast_forward_inputs=False)
    params = dict(module.named_parameters())
    ignored = {params[name] for name in ignore if name in params}
    for block in module.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, ignored_params=ignored or None)
    fully_shard(module, mesh=mesh, mp_policy=policy, ignored_params=ignored or None)
    module.register_forward_hook(_reshard_without_backward)  # runs after FSDP's own post-forward hook
    return module


def _reshard_without_backward(module, args, output) -> None:
    """The root unit keeps its gathered weights after forward, for the backward that follows at
    once. A forward without autograd (evaluation, generation) has no backward, so reshard now:
    otherwise the whole weights would stay registered, and the optimizer and checkpoints, which
    know the sharded ones, would not find them."""
    if not torch.is_grad_enabled():
        module.reshard()


def is_sharded(t: torch.Tensor | None) -> bool:
    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's piece of a sharded tensor (a view: writing to it writes the tensor); a plain
    tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


def unsharded(t: torch.Tensor) -> torch.Tensor:
    """The whole (tp-local) tensor of a sharded one: an all-gather over the batch axis, which every
    rank of it must join; a plain tensor as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_like(param: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """`whole` (shaped like param's unsharded tensor) split as param is: this rank's piece as a
    DTensor on param's mesh, cut locally (every rank holds `whole`); `whole` itself when param is
    plain."""
    if not isinstance(param, DTensor):
        return whole
    return distribute_tensor(whole.to(param.device), param.device_mesh, param.placements, src_data_rank=None)


@torch.no_grad()
def copy_into(param: torch.Tensor, whole: torch.Tensor) -> None:
    """param <- whole (the unsharded value), each rank writing only its own piece."""
    local(param).copy_(local(shard_like(param, whole)))
