"""meshattn: multi-head self-attention and transformer layers in parallel over a DeviceMesh,
checked against the single-device reference."""

from .comm import Axis, CommCounter
from .config import ConfigError, ModelConfig, ParallelConfig, TrainConfig, preset
from .model import Transformer
from .mesh import ContextGroup, ParallelDims, context_group
from .parallel.context import context_attention
from .parallel.layout import shard_sequence, unshard_sequence

__version__ = "0.1.0"
__all__ = ["Axis", "CommCounter", "ConfigError", "ContextGroup", "ModelConfig", "ParallelConfig", "TrainConfig",
           "ParallelDims", "Transformer", "context_attention", "context_group", "preset", "shard_sequence", "unshard_sequence"]
