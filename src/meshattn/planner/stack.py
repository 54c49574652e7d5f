"""The software that runs a plan, as the cost model sees it: what it stores, in which precision,
and which communication it hides behind compute.

Two stacks matter: meshattn itself (what `meshattn plan` plans for), and Megatron-LM as
Narayanan et al. 2021 and Korthikanti et al. 2022 ran it (to check the model against their
published runs). The efficiency constants fitted on published runs live in `Efficiency`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class Stack:
    name: str
    # Flash-style attention: the S x S scores are never stored and fully masked blocks are skipped
    # (causal attention costs the visible pairs); unfused: scores stored, every pair computed.
    fused_attention: bool
    act_bytes: int  # bytes per activation element saved for backward (2: bf16/fp16, 4: fp32)
    residual_bytes: int  # the residual stream's element size (meshattn's autocast keeps it fp32)
    autocast: bool  # matmuls keep 16-bit weight copies for backward (memory.activation_bytes_per_layer)
    dropout: bool  # dropout masks stored (Megatron's GPT; meshattn has no dropout)
    weight_bytes: int  # per parameter: the weights the rank keeps (fp32 master, or fp16 + master in optimizer)
    grad_bytes: int
    optim_bytes: int  # optimizer state per parameter (AdamW moments, plus the fp32 master copy where separate)
    overlap_tp: bool  # backward's input-gradient all-reduce runs behind the weight-gradient matmul
    overlap_dp: bool  # the gradient all-reduce runs in buckets behind backward (DDP)
    overlap_cp: bool  # the ring's next K/V transfer runs behind the current block's attention
    traffic: float  # bytes of memory traffic per byte of saved activations, forward + backward
    # ZeRO/FSDP shards the routed experts too (over their edp copies); meshattn's --shard dp leaves
    # them whole, to their own ep split, and sums their gradients over edp as without sharding.
    zero_experts: bool = True

    def replace(self, **changes) -> Stack:
        return dataclasses.replace(self, **changes)


# meshattn under bf16 autocast (parallel/region.py, training/step.py): fp32 master weights,
# gradients and AdamW moments (4 + 4 + 8 bytes per parameter), 16-bit activations, fp32 residual.
# Its ZeRO-3 is `meshattn train --shard dp` (FSDP2 over dp x cp: weights gathered in the autocast
# dtype, gradients reduced in fp32, the experts left whole); it has no ZeRO-1.
# traffic: an eager elementwise op reads its inputs and writes its output; each saved tensor is
# written once in forward and read in backward, where its gradient is written and read again:
# about five passes per saved byte (an estimate, checked against measurements on this machine).
MESHATTN = Stack(name="meshattn", fused_attention=True, act_bytes=2, residual_bytes=4, autocast=True, dropout=False,
                 weight_bytes=4, grad_bytes=4, optim_bytes=8, overlap_tp=True, overlap_dp=True, overlap_cp=True,
                 traffic=5.0, zero_experts=False)
# meshattn in float32 (`meshattn bench`'s default, and this machine's).
MESHATTN_FP32 = MESHATTN.replace(name="meshattn-fp32", act_bytes=4, residual_bytes=4, autocast=False)

# Megatron-LM as in both papers: fp16 weights (2) with fp32 main gradients (4) and an fp32 master
# copy plus Adam's two moments in the optimizer (12): 18 bytes per parameter (Korthikanti et al.
# 2022 Figure 1's parameter-and-optimizer bars equal 18 bytes x parameters per GPU). Unfused
# attention (softmax and dropout of the full S x S scores), dropout masks, no overlap of the
# tensor-parallel all-reduces, gradient all-reduce after backward (Korthikanti sec. 6.3: "no
# overlap"). traffic: fitted (Efficiency), Megatron fuses bias+GELU and scale+mask+softmax.
MEGATRON = Stack(name="megatron", fused_attention=False, act_bytes=2, residual_bytes=2, autocast=False, dropout=True,
                 weight_bytes=2, grad_bytes=4, optim_bytes=12, overlap_tp=False, overlap_dp=False, overlap_cp=False,
                 traffic=3.0)

STACKS = {s.name: s for s in (MESHATTN, MESHATTN_FP32, MEGATRON)}


@dataclass(frozen=True)
class Efficiency:
    """What fraction of a GPU's peak each kind of work reaches: the model's only fitted constants.

    matmul     a large bf16/fp16 GEMM, of the dense tensor-core peak
    attention  a fused (flash) attention kernel's matmul FLOPs, of the same peak
    link       a large collective's bus bandwidth, of the link's per-direction bandwidth
    memory     elementwise work's achieved HBM bandwidth, of the datasheet's
    overlap    of communication that runs beside compute (ZeRO-3's prefetched gathers), the share
               of the shorter of the two that is hidden (the rest contends for the GPU)
    Fitted on the calibration rows of the published runs (planner/published.py says which) by
    minimising the largest |log(predicted / published)| over a grid (benchmarks/planner_published.py).
    """

    matmul: float = 0.66
    attention: float = 0.45  # not fitted (no published run uses a fused kernel): an assumption
    link: float = 0.8
    memory: float = 0.6
    overlap: float = 0.5
