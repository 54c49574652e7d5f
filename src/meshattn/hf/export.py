"""save(model, folder): a reference model as a Hugging Face folder that transformers' from_pretrained
loads as the same network.

Writes config.json (hf/config.py: to_hf picks Llama, Mistral, Qwen2 or Mixtral), model.safetensors
in the layout transformers' save_pretrained writes (hf/names.py: the fused QKV weight split into
q/k/v_proj, experts one tensor each as block_sparse_moe.experts.e.w1/w3/w2, no lm_head.weight when
tied), generation_config.json, and the tokenizer files of `tokenizer_from`. A configuration no
supported architecture holds is refused (ConfigError) before anything is written.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

from ..config import ConfigError, ModelConfig
from ..model.transformer import Transformer
from .config import to_hf
from .names import recipes
from .tokenizer import special_ids

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


def hf_tensors(cfg: ModelConfig, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A full reference state dict -> the HF tensors (contiguous, none shared)."""
    table = recipes(cfg)
    needed = set(table) - ({"head.weight"} if cfg.tie_embeddings else set())  # tied: tok_emb.weight is enough
    absent = sorted(needed - set(state))
    if absent:
        raise ValueError(f"the state dict lacks {len(absent)} parameter(s) of the config: {absent[:5]}")
    out: dict[str, torch.Tensor] = {}
    for name, recipe in table.items():
        if cfg.tie_embeddings and name == "head.weight":
            continue  # the same tensor as tok_emb.weight: HF ties it, the file holds it once
        full = state[name].detach()
        if tuple(full.shape) != recipe.shape:
            raise ValueError(f"{name} has shape {tuple(full.shape)}, the config implies {recipe.shape}")
        offset = 0
        for piece in recipe.pieces:
            n = piece.extent(recipe.dim)
            part = full.narrow(recipe.dim, offset, n)  # this piece of the reference tensor
            target = out.setdefault(piece.key, torch.empty(piece.hf_shape, dtype=full.dtype))
            target[tuple(slice(a, b) for a, b in piece.box)] = part.squeeze(0) if piece.stacked else part
            offset += n
    return out


def _unpack(model_or_cfg, state_dict) -> tuple[ModelConfig, Mapping[str, torch.Tensor]]:
    if isinstance(model_or_cfg, Transformer):
        return model_or_cfg.cfg, model_or_cfg.state_dict()
    if isinstance(model_or_cfg, tuple) and len(model_or_cfg) == 2:
        return model_or_cfg
    if isinstance(model_or_cfg, ModelConfig) and state_dict is not None:
        return model_or_cfg, state_dict
    raise TypeError("save() takes a reference Transformer, a (ModelConfig, state dict) pair, or a ModelConfig and "
                    "state_dict=")


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def save(model_or_cfg, folder, state_dict: Mapping[str, torch.Tensor] | None = None, tokenizer_from=None) -> Path:
    """Write `folder` as a Hugging Face model: a reference Transformer, or a ModelConfig with its full
    reference-named state dict (a pair, or state_dict=). `tokenizer_from`: a folder whose tokenizer
    files (and bos / eos ids) are copied. Returns the folder."""
    from safetensors.torch import save_file  # a runtime dependency of meshattn.hf only

    cfg, state = _unpack(model_or_cfg, state_dict)
    dtypes = {t.dtype for t in state.values()}
    if len(dtypes) != 1:
        raise ValueError(f"the state dict mixes dtypes {sorted(map(str, dtypes))}; cast it to one first")
    config = to_hf(cfg, str(dtypes.pop()).removeprefix("torch."))
    tensors = hf_tensors(cfg, state)
    bos, eos = None, ()
    if tokenizer_from is not None:
        source = Path(tokenizer_from)
        if not (source / "tokenizer.json").exists():
            raise ConfigError(f"{source} has no tokenizer.json to copy; pass a Hugging Face model or tokenizer folder")
        bos, eos = special_ids(source)
    special = {"bos_token_id": bos, "eos_token_id": (eos[0] if len(eos) == 1 else list(eos)) if eos else None,
               "pad_token_id": None}  # explicit: transformers' defaults (bos 1, eos 2) are not ours
    folder = Path(folder)
    if (folder / "model.safetensors.index.json").exists():
        raise ConfigError(f"{folder} already holds a sharded checkpoint (model.safetensors.index.json), which readers "
                          "would prefer to the file written here; choose an empty folder")
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "config.json", {**config, **special})
    _write_json(folder / "generation_config.json", {k: v for k, v in special.items() if k != "pad_token_id"})
    partial = folder / "model.safetensors.partial"
    save_file(tensors, str(partial), metadata={"format": "pt"})
    os.replace(partial, folder / "model.safetensors")
    if tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_from) / name).exists():
                shutil.copyfile(Path(tokenizer_from) / name, folder / name)
    return folder
