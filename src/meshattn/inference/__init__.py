"""Inference with a KV cache: batched prefill and decode on one device or any dp x cp x tp layout
(with expert parallelism for a mixture of experts). See generate.py, engine.py and cache.py."""

from .cache import KVCache
from .engine import Engine
from .generate import Generation, generate, run
from .sampling import Sampling

__all__ = ["KVCache", "Engine", "Generation", "Sampling", "generate", "run"]
