"""The planner: pure predictions from sizes alone (no torch.distributed), checked against the code
that runs the plan.

    comm.py      communication volumes per collective and mesh axis (the byte counter's formulas)
"""

from .comm import Volume, tensor_parallel_comm

__all__ = ["Volume", "tensor_parallel_comm"]
