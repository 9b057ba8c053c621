"""GPT-2 checkpoints: the Hugging Face key map and config conversion of :class:`GPT2LM`.

GPT-2's ``Conv1D`` weights are stored ``[in, out]`` as ours, so only the attention output projection (heads
and head_dim as two input axes) and the fused ``c_attn`` (q, k, v as an axis of our kernel) need reshapes.
"""

from __future__ import annotations

import transformers

from icot_jax.models.gpt2.modeling import GPT2Config, GPT2LM
from icot_jax.models.keymap import Family, linear, matrix, vector

GPT2_RULES = (
    matrix("transformer.wte.weight", "embed.embedding"),
    matrix("transformer.wpe.weight", "pos_embed.embedding"),
    vector("transformer.h.{i}.ln_1.weight", "blocks.{i}.attn_norm.scale"),
    vector("transformer.h.{i}.ln_1.bias", "blocks.{i}.attn_norm.bias"),
    matrix("transformer.h.{i}.attn.c_attn.weight", "blocks.{i}.attn.qkv.kernel"),
    vector("transformer.h.{i}.attn.c_attn.bias", "blocks.{i}.attn.qkv.bias"),
    matrix("transformer.h.{i}.attn.c_proj.weight", "blocks.{i}.attn.out.kernel", n_in=2),
    vector("transformer.h.{i}.attn.c_proj.bias", "blocks.{i}.attn.out.bias"),
    vector("transformer.h.{i}.ln_2.weight", "blocks.{i}.mlp_norm.scale"),
    vector("transformer.h.{i}.ln_2.bias", "blocks.{i}.mlp_norm.bias"),
    matrix("transformer.h.{i}.mlp.c_fc.weight", "blocks.{i}.mlp.fc_in.kernel"),
    vector("transformer.h.{i}.mlp.c_fc.bias", "blocks.{i}.mlp.fc_in.bias"),
    matrix("transformer.h.{i}.mlp.c_proj.weight", "blocks.{i}.mlp.fc_out.kernel"),
    vector("transformer.h.{i}.mlp.c_proj.bias", "blocks.{i}.mlp.fc_out.bias"),
    vector("transformer.ln_f.weight", "final_norm.scale"),
    vector("transformer.ln_f.bias", "final_norm.bias"),
    linear("lm_head.weight", "lm_head.kernel"),
)


def gpt2_config(config: transformers.PretrainedConfig) -> GPT2Config:
    """Our :class:`GPT2Config` from transformers' ``GPT2Config``."""
    if getattr(config, "add_cross_attention", False):
        raise NotImplementedError("config.json: add_cross_attention=true (GPT-2 cross-attention) is not supported")
    return GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.n_positions, hidden_size=config.n_embd,
        num_layers=config.n_layer, num_heads=config.n_head, intermediate_size=config.n_inner or 4 * config.n_embd,
        activation=config.activation_function, layer_norm_eps=config.layer_norm_epsilon,
        embd_dropout=config.embd_pdrop, attn_dropout=config.attn_pdrop, resid_dropout=config.resid_pdrop,
        scale_attn_weights=config.scale_attn_weights,
        scale_attn_by_inverse_layer_idx=config.scale_attn_by_inverse_layer_idx,
        tie_word_embeddings=config.tie_word_embeddings, initializer_range=config.initializer_range)


FAMILIES = (
    Family("gpt2", gpt2_config, GPT2LM, GPT2_RULES, "transformer.", ignored=(r"\.attn\.(bias|masked_bias)$",),
           export_config=lambda c: {"n_positions": c.n_positions}),
)
