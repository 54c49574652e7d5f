"""`meshattn bench`: layouts side by side with the single-process reference and PyTorch-native TP."""

from .layouts import Layout, default_layouts, parse_layout
from .run import run_bench

__all__ = ["Layout", "default_layouts", "parse_layout", "run_bench"]
