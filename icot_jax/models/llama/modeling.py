"""The Llama family (Llama, Mistral, Phi-3) in Flax NNX, computing what transformers' PyTorch models compute.

Pre-RMSNorm decoder blocks, grouped-query attention, rotary embeddings in Hugging Face's ``rotate_half``
layout (so checkpoint q/k need no permutation; partial rotary as Phi-3 allows), an optional sliding window
(Mistral, Phi-3), a gated MLP, optional attention/MLP biases (Llama), attention dropout and Phi-3's
residual dropout. The checkpoint differences (Phi-3's fused ``qkv_proj`` / ``gate_up_proj``) live in
``params.py`` next to this file; the modules here are the same for the whole family.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from icot_jax.models.common import (
    CausalLM,
    DTypeLike,
    Dense,
    Embed,
    RMSNorm,
    activation,
    cached_attention,
    dropout,
    split_key,
)


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding frequencies.

    ``kind`` is Hugging Face's ``rope_type``: ``default``, ``linear`` (frequencies divided by ``factor``) or
    ``llama3`` (low frequencies divided by ``factor``, a smooth ramp between ``low_freq_factor`` and
    ``high_freq_factor`` wavelengths of ``original_max_position_embeddings``). The first ``rotary_dim``
    features of each head rotate; the rest pass through (Phi-3's ``partial_rotary_factor``).
    """

    theta: float
    rotary_dim: int
    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def inv_freq(self) -> np.ndarray:
        """Inverse frequencies ``float32[rotary_dim // 2]``, computed in float32 as transformers does."""
        exponents = np.arange(0, self.rotary_dim, 2, dtype=np.float32) / np.float32(self.rotary_dim)
        inv_freq = (np.float32(1.0) / np.float32(self.theta) ** exponents).astype(np.float32)
        if self.kind == "default":
            return inv_freq
        if self.kind == "linear":
            return (inv_freq / np.float32(self.factor)).astype(np.float32)
        if self.kind == "llama3":
            return self._llama3(inv_freq)
        raise NotImplementedError(f"rope_type {self.kind!r} is not implemented (default, linear, llama3)")

    def _llama3(self, inv_freq: np.ndarray) -> np.ndarray:
        context = self.original_max_position_embeddings
        wavelen = np.float32(2 * math.pi) / inv_freq
        scaled = np.where(wavelen > context / self.low_freq_factor, inv_freq / np.float32(self.factor), inv_freq)
        smooth = (context / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
        smoothed = (1 - smooth) * scaled / np.float32(self.factor) + smooth * scaled
        is_medium = (wavelen >= context / self.high_freq_factor) & (wavelen <= context / self.low_freq_factor)
        return np.where(is_medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, position_ids: jax.Array, rope: RopeConfig) -> jax.Array:
    """Rotate ``x [B, T, H, D]`` by its tokens' positions ``[B, T]`` (``q·cos + rotate_half(q)·sin``)."""
    half = rope.rotary_dim // 2
    freqs = position_ids[..., None].astype(jnp.float32) * jnp.asarray(rope.inv_freq())
    cos, sin = jnp.cos(freqs)[:, :, None, :], jnp.sin(freqs)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2, rest = x32[..., :half], x32[..., half:2 * half], x32[..., 2 * half:]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
    return rotated.astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture of a Llama / Mistral / Phi-3 decoder.

    ``padding_idx`` is the config's ``pad_token_id``: torch's ``nn.Embedding(padding_idx=...)`` gives that
    row no gradient from lookups (Phi-3 pads with its EOS id, so its EOS embedding never trains through the
    input side); the model reproduces this with a stop-gradient.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope: RopeConfig
    rms_norm_eps: float = 1e-6
    activation: str = "silu"
    sliding_window: int | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    attention_dropout: float = 0.0
    residual_dropout: float = 0.0
    tie_word_embeddings: bool = False
    padding_idx: int | None = None
    initializer_range: float = 0.02

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")


class LlamaAttention(nnx.Module):
    def __init__(self, config: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        embed, head_dim = config.hidden_size, config.head_dim
        common = dict(std=config.initializer_range, use_bias=config.attention_bias, dtype=dtype,
                      param_dtype=param_dtype, rngs=rngs)
        self.q = Dense((embed,), (config.num_heads, head_dim), ("embed", "heads", "head_dim"), **common)
        self.k = Dense((embed,), (config.num_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), **common)
        self.v = Dense((embed,), (config.num_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), **common)
        self.out = Dense((config.num_heads, head_dim), (embed,), ("heads", "head_dim", "embed"), **common)
        self.rope = config.rope
        self.scale = head_dim ** -0.5
        self.attention_dropout = config.attention_dropout

    def __call__(self, x, position_ids, mask, layer_cache, cache_index, dropout_key):
        q = apply_rope(self.q(x), position_ids, self.rope)
        k = apply_rope(self.k(x), position_ids, self.rope)
        out, layer_cache = cached_attention(q, k, self.v(x), mask, layer_cache, cache_index, scale=self.scale,
                                            dropout_rate=self.attention_dropout, dropout_key=dropout_key)
        return self.out(out), layer_cache


class LlamaMLP(nnx.Module):
    def __init__(self, config: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        common = dict(std=config.initializer_range, use_bias=config.mlp_bias, dtype=dtype,
                      param_dtype=param_dtype, rngs=rngs)
        embed, mlp = config.hidden_size, config.intermediate_size
        self.gate = Dense((embed,), (mlp,), ("embed", "mlp"), **common)
        self.up = Dense((embed,), (mlp,), ("embed", "mlp"), **common)
        self.down = Dense((mlp,), (embed,), ("mlp", "embed"), **common)
        self.activation = config.activation

    def __call__(self, x):
        return self.down(activation(self.activation)(self.gate(x)) * self.up(x))


class LlamaBlock(nnx.Module):
    def __init__(self, config: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        norm = dict(eps=config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.attn_norm = RMSNorm(config.hidden_size, **norm)
        self.attn = LlamaAttention(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp_norm = RMSNorm(config.hidden_size, **norm)
        self.mlp = LlamaMLP(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.residual_dropout = config.residual_dropout

    def __call__(self, x, position_ids, mask, layer_cache, cache_index, dropout_key):
        attn_key, attn_resid_key, mlp_resid_key = split_key(dropout_key, 3)
        h, layer_cache = self.attn(self.attn_norm(x), position_ids, mask, layer_cache, cache_index, attn_key)
        x = x + dropout(h, self.residual_dropout, attn_resid_key)
        x = x + dropout(self.mlp(self.mlp_norm(x)), self.residual_dropout, mlp_resid_key)
        return x, layer_cache


class LlamaLM(CausalLM):
    """Llama-family language model: ``logits = model(input_ids, position_ids, attention_mask, dropout_key=None)``.

    Args:
      config: the architecture.
      dtype: compute dtype (activations, matmuls); RoPE, softmax, norms and logits are float32.
      param_dtype: storage dtype of the parameters.
      rngs: initialisation randomness (Hugging Face's init: N(0, initializer_range), zero biases, unit
        norms, zero embedding row at ``padding_idx``).
    """

    def __init__(self, config: LlamaConfig, *, dtype: DTypeLike = jnp.float32,
                 param_dtype: DTypeLike = jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.embed = Embed(config.vocab_size, config.hidden_size, ("vocab", "embed"), std=config.initializer_range,
                           dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if config.padding_idx is not None:
            self.embed.embedding.set_value(self.embed.embedding[...].at[config.padding_idx].set(0))
        self.blocks = nnx.List([LlamaBlock(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                                for _ in range(config.num_layers)])
        self.final_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.lm_head = (None if config.tie_word_embeddings else
                        Dense((config.hidden_size,), (config.vocab_size,), ("embed", "vocab"),
                              std=config.initializer_range, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                              out_dtype=jnp.float32, rngs=rngs))

    def embed_inputs(self, input_ids, position_ids, dropout_key):
        del position_ids, dropout_key  # positions enter through RoPE; the family has no embedding dropout
        x = self.embed(input_ids)
        if self.config.padding_idx is None:
            return x
        return jnp.where((input_ids == self.config.padding_idx)[..., None], jax.lax.stop_gradient(x), x)
