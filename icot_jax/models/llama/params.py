"""Llama, Mistral and Phi-3 checkpoints: the Hugging Face key maps and config conversion of :class:`LlamaLM`.

The three share one model; their checkpoints differ only in Phi-3's fused ``qkv_proj`` / ``gate_up_proj``
(split on load, fused on export) and in which optional fields their configs carry.
"""

from __future__ import annotations

import dataclasses

import transformers

from icot_jax.models.keymap import Family, TensorRule, linear, matrix, vector
from icot_jax.models.llama.modeling import LlamaConfig, LlamaLM, RopeConfig


def llama_rules(fused: bool) -> tuple[TensorRule, ...]:
    """Llama/Mistral checkpoints (``fused=False``) or Phi-3's fused ``qkv_proj`` / ``gate_up_proj``."""
    layer, attn, mlp = "model.layers.{i}.", "model.layers.{i}.self_attn.", "model.layers.{i}.mlp."
    if fused:
        projections = (
            linear(attn + "qkv_proj.weight", "blocks.{i}.attn.q.kernel", "blocks.{i}.attn.k.kernel",
                   "blocks.{i}.attn.v.kernel"),
            linear(mlp + "gate_up_proj.weight", "blocks.{i}.mlp.gate.kernel", "blocks.{i}.mlp.up.kernel"),
        )
    else:
        projections = []
        for prefix, hf, ours in ((attn, "q_proj", "attn.q"), (attn, "k_proj", "attn.k"), (attn, "v_proj", "attn.v"),
                                 (mlp, "gate_proj", "mlp.gate"), (mlp, "up_proj", "mlp.up")):
            projections += [linear(f"{prefix}{hf}.weight", f"blocks.{{i}}.{ours}.kernel"),
                            vector(f"{prefix}{hf}.bias", f"blocks.{{i}}.{ours}.bias")]
    return (
        matrix("model.embed_tokens.weight", "embed.embedding"),
        vector(layer + "input_layernorm.weight", "blocks.{i}.attn_norm.scale"),
        *projections,
        linear(attn + "o_proj.weight", "blocks.{i}.attn.out.kernel", n_in=2),
        vector(attn + "o_proj.bias", "blocks.{i}.attn.out.bias"),
        vector(layer + "post_attention_layernorm.weight", "blocks.{i}.mlp_norm.scale"),
        linear(mlp + "down_proj.weight", "blocks.{i}.mlp.down.kernel"),
        vector(mlp + "down_proj.bias", "blocks.{i}.mlp.down.bias"),
        vector("model.norm.weight", "final_norm.scale"),
        linear("lm_head.weight", "lm_head.kernel"),
    )


def rope_config(config: transformers.PretrainedConfig, head_dim: int) -> RopeConfig:
    """Our :class:`RopeConfig` from a config's ``rope_parameters`` (``rope_theta`` in older configs)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    kind = params.get("rope_type", "default")
    rope = RopeConfig(theta=float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0))),
                      rotary_dim=int(head_dim * params.get("partial_rotary_factor", 1.0)), kind=kind)
    if kind == "default":
        return rope
    if kind == "linear":
        return dataclasses.replace(rope, factor=float(params["factor"]))
    if kind == "llama3":
        return dataclasses.replace(
            rope, factor=float(params["factor"]), low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]))
    raise NotImplementedError(
        f"config.json: rope_scaling / rope_parameters['rope_type'] = {kind!r} is not supported "
        "(supported: default, linear, llama3); e.g. Phi-3's 128k 'longrope' switches frequencies with the "
        "sequence length. Use a checkpoint with rope_scaling null (Phi-3-mini-4k).")


def llama_config(config: transformers.PretrainedConfig) -> LlamaConfig:
    """Llama, Mistral and Phi-3 configs; the optional fields default to what the PyTorch models do."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_layers=config.num_hidden_layers, num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads or config.num_attention_heads, head_dim=head_dim,
        rope=rope_config(config, head_dim), rms_norm_eps=config.rms_norm_eps, activation=config.hidden_act,
        sliding_window=getattr(config, "sliding_window", None),
        attention_bias=getattr(config, "attention_bias", False), mlp_bias=getattr(config, "mlp_bias", False),
        attention_dropout=float(config.attention_dropout),
        residual_dropout=float(getattr(config, "resid_pdrop", 0.0)),  # Phi-3 only
        tie_word_embeddings=config.tie_word_embeddings, padding_idx=config.pad_token_id,
        initializer_range=config.initializer_range)


_IGNORED = (r"\.rotary_emb\.inv_freq$",)  # a buffer older checkpoints saved

FAMILIES = (
    Family("llama", llama_config, LlamaLM, llama_rules(fused=False), "model.", ignored=_IGNORED),
    Family("mistral", llama_config, LlamaLM, llama_rules(fused=False), "model.", ignored=_IGNORED),
    Family("phi3", llama_config, LlamaLM, llama_rules(fused=True), "model.", ignored=_IGNORED),
)
