"""Activation checkpointing: keep less for backward, recompute it there.

Modes: "none"; "attention": only the attention core (q, k, v -> out) is recomputed, so its
internals are not kept: worth it where they are large (context parallelism's all-gathered K/V,
the ring's merged out and lse), not for a fused SDPA, which keeps little beyond q, k, v; "block":
each transformer block keeps only its input and recomputes everything else in backward, including
its forward collectives. Gradients are unchanged; the recomputed collectives show in the byte
counter as extra forward-phase traffic.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint

MODES = ("none", "attention", "block")


def _checkpointed(fn):
    @functools.wraps(fn)
    def run(*args):
        if not torch.is_grad_enabled():
            return fn(*args)
        return checkpoint(fn, *args, use_reentrant=False)

    return run


def apply_checkpointing(model, mode: str):
    """Set the mode on every block of a parallel model (a ParallelModel or its tp_model)."""
    if mode not in MODES:
        raise ValueError(f"checkpoint={mode!r} is unknown; choose one of {MODES}")
    inner = getattr(model, "tp_model", model)
    for block in inner.blocks:
        block.checkpoint = mode
        block.attn.core = block.attn.plain_core if mode != "attention" else _checkpointed(block.attn.plain_core)
    return model


def block_forward(block, x: torch.Tensor, rope) -> torch.Tensor:
    """Run block._forward, checkpointed in "block" mode."""
    if getattr(block, "checkpoint", "none") == "block" and torch.is_grad_enabled():
        return checkpoint(block._forward, x, rope, use_reentrant=False)
    return block._forward(x, rope)
