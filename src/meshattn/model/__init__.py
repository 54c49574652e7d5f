"""The single-device reference model and the local kernels it and the parallel layouts share.

    transformer.py  the reference Transformer: the oracle (never imports torch.distributed)
    attention.py    local attention blocks returning the log-sum-exp, their backward, the merge
    norm.py         the fused RMSNorm used by the parallel model (checked against nn.RMSNorm)
"""

from .transformer import Transformer

__all__ = ["Transformer"]
