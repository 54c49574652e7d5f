"""Hugging Face checkpoints in and out: config.json, safetensors weights and tokenizers.

    config.py     config.json <-> ModelConfig for Llama, Mistral, Qwen2 and Mixtral; the rest refused by name
    names.py      which HF tensors make each reference parameter (the one statement of the layout)
    source.py     HFSource: a safetensors folder read slice by slice under reference names
    load.py       load(folder) -> the reference Transformer
    export.py     save(model, folder) -> a folder transformers' from_pretrained loads
    tokenizer.py  load_tokenizer(folder) (tokenizer.json) and the byte-level ByteTokenizer

safetensors and tokenizers are imported only when a file is read or written, so meshattn itself
imports with plain torch.
"""

from .config import is_hf_folder, read_config
from .export import save
from .load import load
from .source import HFSource
from .tokenizer import ByteTokenizer, load_tokenizer

__all__ = ["ByteTokenizer", "HFSource", "is_hf_folder", "load", "load_tokenizer", "read_config", "save"]
