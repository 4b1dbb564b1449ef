"""bezoar.model: the OpenLLaMA (Llama) forward pass, checkpoints, tokenizer and decoding.

    model = bezoar.model.load("path/to/hf_folder", quant="nf4", adapter="path/to/adapter")
    logits = model(input_ids, position_ids=None)          # (B, T, vocab)
"""

from .checkpoint import CheckpointError, load, save
from .config import ConfigError, LlamaConfig, preset
from .decode import Generation, KVCache, generate, generate_ids
from .llama import LlamaForCausalLM
from .tokenizer import Tokenizer, TokenizerError

__all__ = [
    "CheckpointError", "ConfigError", "Generation", "KVCache", "LlamaConfig", "LlamaForCausalLM",
    "Tokenizer", "TokenizerError", "generate", "generate_ids", "load", "preset", "save",
]
