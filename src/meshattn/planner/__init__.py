"""The planner (`meshattn plan`): which dp x cp x tp layout (and, for a mixture of experts, which
expert-parallel size and dispatch), checkpointing and micro-batch is fastest while it fits,
predicted from sizes alone and checked against the code that runs the plan.

Pure arithmetic (no torch.distributed; an estimate takes about 0.2 ms):
    flops.py      FLOPs per step by part, recomputation included; Narayanan's and Korthikanti's forms
    memory.py     activations per layer (Korthikanti's accounting), weights/gradients/optimizer per rank
    buffers.py    the transient buffers each context-parallel impl holds
    comm.py       communication volumes per collective and mesh axis (the byte counter's formulas)
    moe.py        an MoE layer per rank: tokens routed, rows computed, the expert imbalance assumed
    hardware.py   GPU and node presets (A100-80GB, H100, H200), each figure with its source
    models.py     the model to plan for: a preset, a ModelConfig JSON, a Hugging Face config.json, sizes
    stack.py      the software running the plan (meshattn, Megatron-LM) and the fitted efficiencies
    cluster.py    seconds of compute, memory traffic and collectives on GPUs or on this machine
    layout.py     a plan (mesh + pp, recompute, sharding, micro-batch), its name, every valid one
    estimate.py   one plan's step time and memory, by part
    search.py     rank the plans that fit, say why the first wins; the memory budget of one plan
    report.py     the table, the budget and the PNG
    published.py  the published runs the model must reproduce, and the comparison
Measurement:
    calibrate.py  this machine's compute, memory bandwidth and gloo collectives (`--calibrate`)
"""

from .comm import Volume, context_attention_comm, moe_comm, tensor_parallel_comm
from .flops import forward_flops, model_flops_korthikanti, narayanan_flops, step_flops
from .hardware import GPU, GPUS, gpu
from .memory import activation_bytes_per_layer, korthikanti_activation_bytes, params_per_rank, state_bytes
from .models import load_model, model_from_sizes

__all__ = ["GPU", "GPUS", "Volume", "activation_bytes_per_layer", "context_attention_comm", "forward_flops", "gpu",
           "korthikanti_activation_bytes", "load_model", "model_from_sizes", "model_flops_korthikanti", "moe_comm",
           "narayanan_flops", "params_per_rank", "state_bytes", "step_flops", "tensor_parallel_comm"]
