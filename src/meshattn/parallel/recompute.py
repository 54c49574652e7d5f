"""Activation checkpointing: keep less for backward, recompute it there.

Modes (config.Recompute), chosen when the parallel model is built: "none"; "attention": only the
attention core (q, k, v -> out) is recomputed, so its internals are not kept: worth it where
they are large (context parallelism's all-gathered K/V, the ring's merged out and lse), not for
a fused SDPA, which keeps little beyond q, k, v; "block": each transformer block keeps only its
input and recomputes everything else in backward, including its forward collectives. Gradients
are unchanged; the recomputed collectives show in the byte counter as extra forward-phase
traffic.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint


def checkpointed(fn):
    """fn, recomputed in backward instead of keeping its internals (when grad is enabled)."""

    @functools.wraps(fn)
    def run(*args):
        if not torch.is_grad_enabled():
            return fn(*args)
        return checkpoint(fn, *args, use_reentrant=False)

    return run
