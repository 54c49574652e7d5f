"""meshattn: multi-head self-attention and transformer layers in parallel over a DeviceMesh,
checked against the single-device reference."""

from .comm import Axis, CommCounter
from .config import ConfigError, ModelConfig, ParallelConfig, TrainConfig, preset
from .model import Transformer

__version__ = "0.1.0"
__all__ = ["Axis", "CommCounter", "ConfigError", "ModelConfig", "ParallelConfig", "TrainConfig", "Transformer",
           "preset"]
