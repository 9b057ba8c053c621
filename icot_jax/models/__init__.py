"""Flax NNX causal language models (GPT-2, Llama, Mistral, Phi-3) with Hugging Face checkpoints in and out.

Every model is called as ``logits = model(input_ids, position_ids, attention_mask, *, dropout_key=None)``
and decodes with ``cache = model.init_cache(batch, max_length)`` /
``logits, cache = model.decode(input_ids, position_ids, attention_mask, cache)``. See docs/models.md.
"""

from icot_jax.models.common import CausalLM, KVCache, logical_axes
from icot_jax.models.gpt2 import GPT2Config, GPT2LM, extend_positions
from icot_jax.models.hf import (
    FAMILIES,
    CheckpointMismatchError,
    export_pretrained,
    from_config,
    load_pretrained,
)
from icot_jax.models.llama import LlamaConfig, LlamaLM, RopeConfig

__all__ = [
    "FAMILIES",
    "CausalLM",
    "CheckpointMismatchError",
    "GPT2Config",
    "GPT2LM",
    "KVCache",
    "LlamaConfig",
    "LlamaLM",
    "RopeConfig",
    "export_pretrained",
    "extend_positions",
    "from_config",
    "load_pretrained",
    "logical_axes",
]
