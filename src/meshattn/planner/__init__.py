"""The planner (issue 12, in progress): pure predictions from sizes alone (no torch.distributed),
checked against the code that runs the plan.

    comm.py      communication volumes per collective and mesh axis (the byte counter's formulas)
    flops.py     FLOPs per step by part, recomputation included; Narayanan's and Korthikanti's forms
    memory.py    activations per layer (Korthikanti's accounting), weights/gradients/optimizer per rank
    hardware.py  GPU and node presets (A100-80GB, H100, H200), each figure with its source
    models.py    the model to plan for: a preset, a ModelConfig JSON, a Hugging Face config.json, sizes
"""

from .comm import Volume, context_attention_comm, tensor_parallel_comm
from .flops import forward_flops, model_flops_korthikanti, narayanan_flops, step_flops
from .hardware import GPU, GPUS, gpu
from .memory import activation_bytes_per_layer, korthikanti_activation_bytes, params_per_rank, state_bytes
from .models import load_model, model_from_sizes

__all__ = ["GPU", "GPUS", "Volume", "activation_bytes_per_layer", "context_attention_comm", "forward_flops", "gpu",
           "korthikanti_activation_bytes", "load_model", "model_flops_korthikanti", "model_from_sizes",
           "narayanan_flops", "params_per_rank", "state_bytes", "step_flops", "tensor_parallel_comm"]
