"""load(folder): a Hugging Face folder as meshattn's reference Transformer, weights included."""

from __future__ import annotations

import torch

from ..model.transformer import Transformer
from .source import HFSource


def load(folder, dtype: torch.dtype = torch.float32) -> Transformer:
    """The reference Transformer of a Hugging Face model folder (config.json + safetensors) in
    `dtype`. ConfigError (one line) when the folder is not a model meshattn represents exactly,
    or its files are missing, truncated or disagree with config.json."""
    with HFSource(folder) as source:
        cfg = source.cfg
        state = {name: source.full(name).to(dtype) for name in source.names() if name != "head.weight"}
        state["head.weight"] = state["tok_emb.weight"] if cfg.tie_embeddings else source.full("head.weight").to(dtype)
    with torch.device("meta"):  # no initialisation: every value was read above
        model = Transformer(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_embeddings:  # assign gives each name its own Parameter: tie them again
        model.head.weight = model.tok_emb.weight
    return model
