"""PyTorch's own tensor parallelism on the reference model: the peer `meshattn bench` measures.

`parallelize_module` with ColwiseParallel on the fused QKV, MLP fc (and gate) and RowwiseParallel
on the attention and MLP output projections, as PyTorch's tutorials and torchtitan plan a
Transformer block. ColwiseParallel cuts a weight's rows into contiguous pieces, so the fused QKV
rows are first regrouped per rank as [Q heads of rank r | K heads of r | V heads of r], and each
attention module is told its local head counts. Embedding, final norm and head stay replicated
(no communication; every rank computes them in full).
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from ..model.transformer import Attention, Transformer


def _per_rank_rows(attn: Attention, tp: int) -> torch.Tensor:
    """Row order of the fused QKV weight that puts rank r's Q, K and V heads side by side."""
    H, G, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    rows = torch.arange((H + 2 * G) * D)
    q, k, v = rows[: H * D], rows[H * D: (H + G) * D], rows[(H + G) * D:]
    return torch.cat([torch.cat([q.chunk(tp)[r], k.chunk(tp)[r], v.chunk(tp)[r]]) for r in range(tp)])


@torch.no_grad()
def native_tensor_parallel(model: Transformer, tp_mesh: DeviceMesh) -> Transformer:
    """Shard every block of `model` in place over the 1-D `tp_mesh`; returns the model."""
    tp = tp_mesh.size()
    for block in model.blocks:
        attn = block.attn
        if attn.n_heads % tp or attn.n_kv_heads % tp:
            raise ValueError(f"native tensor parallelism needs heads divisible by tp={tp} "
                             f"(n_heads={attn.n_heads}, n_kv_heads={attn.n_kv_heads})")
        order = _per_rank_rows(attn, tp)
        attn.qkv.weight.copy_(attn.qkv.weight[order])
        if attn.qkv.bias is not None:
            attn.qkv.bias.copy_(attn.qkv.bias[order])
        attn.n_heads //= tp
        attn.n_kv_heads //= tp
        plan = {"attn.qkv": ColwiseParallel(), "attn.proj": RowwiseParallel(),
                "mlp.fc": ColwiseParallel(), "mlp.proj": RowwiseParallel()}
        if block.mlp.gate is not None:
            plan["mlp.gate"] = ColwiseParallel()
        parallelize_module(block, tp_mesh, plan)
    return model
