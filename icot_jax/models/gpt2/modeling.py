"""GPT-2 (any size) in Flax NNX, computing what ``transformers.GPT2LMHeadModel`` computes.

Learned position embeddings (extendable with :func:`extend_positions`), pre-LayerNorm blocks, fused
q/k/v projection with bias, GELU MLP, dropout on embeddings, attention probabilities and both residual
branches (``embd_pdrop``, ``attn_pdrop``, ``resid_pdrop``), LM head tied to the token embedding.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from icot_jax.models.common import (
    CausalLM,
    DTypeLike,
    Dense,
    Embed,
    LayerNorm,
    activation,
    cached_attention,
    dropout,
    split_key,
)


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """Architecture of a GPT-2 model (the fields of Hugging Face's ``GPT2Config`` that matter)."""

    vocab_size: int
    n_positions: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    activation: str = "gelu_new"
    layer_norm_eps: float = 1e-5
    embd_dropout: float = 0.1
    attn_dropout: float = 0.1
    resid_dropout: float = 0.1
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_kv_heads(self) -> int:
        return self.num_heads

    @property
    def sliding_window(self) -> None:
        return None

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")


class GPT2Attention(nnx.Module):
    def __init__(self, config: GPT2Config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        embed, heads, head_dim = config.hidden_size, config.num_heads, config.head_dim
        common = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # One [embed, 3, heads, head_dim] kernel: Hugging Face's c_attn columns are [q | k | v], each
        # heads × head_dim, so the checkpoint maps onto it with a reshape and a single matmul computes all three.
        self.qkv = Dense((embed,), (3, heads, head_dim), ("embed", None, "heads", "head_dim"),
                         std=config.initializer_range, **common)
        self.out = Dense((heads, head_dim), (embed,), ("heads", "head_dim", "embed"),
                         std=config.initializer_range / math.sqrt(2 * config.num_layers), **common)
        scale = head_dim ** -0.5 if config.scale_attn_weights else 1.0
        self.scale = scale / (layer_idx + 1) if config.scale_attn_by_inverse_layer_idx else scale
        self.attn_dropout = config.attn_dropout
        self.resid_dropout = config.resid_dropout

    def __call__(self, x, mask, layer_cache, cache_index, dropout_key):
        attn_key, resid_key = split_key(dropout_key, 2)
        qkv = self.qkv(x)
        out, layer_cache = cached_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], mask, layer_cache,
                                            cache_index, scale=self.scale, dropout_rate=self.attn_dropout,
                                            dropout_key=attn_key)
        return dropout(self.out(out), self.resid_dropout, resid_key), layer_cache


class GPT2MLP(nnx.Module):
    def __init__(self, config: GPT2Config, *, dtype, param_dtype, rngs: nnx.Rngs):
        common = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc_in = Dense((config.hidden_size,), (config.intermediate_size,), ("embed", "mlp"),
                           std=config.initializer_range, **common)
        self.fc_out = Dense((config.intermediate_size,), (config.hidden_size,), ("mlp", "embed"),
                            std=config.initializer_range / math.sqrt(2 * config.num_layers), **common)
        self.activation = config.activation
        self.resid_dropout = config.resid_dropout

    def __call__(self, x, dropout_key):
        return dropout(self.fc_out(activation(self.activation)(self.fc_in(x))), self.resid_dropout, dropout_key)


class GPT2Block(nnx.Module):
    def __init__(self, config: GPT2Config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        norm = dict(eps=config.layer_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.attn_norm = LayerNorm(config.hidden_size, **norm)
        self.attn = GPT2Attention(config, layer_idx, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp_norm = LayerNorm(config.hidden_size, **norm)
        self.mlp = GPT2MLP(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, position_ids, mask, layer_cache, cache_index, dropout_key):
        del position_ids  # GPT-2 adds its positions to the embeddings
        attn_key, mlp_key = split_key(dropout_key, 2)
        h, layer_cache = self.attn(self.attn_norm(x), mask, layer_cache, cache_index, attn_key)
        x = x + h
        return x + self.mlp(self.mlp_norm(x), mlp_key), layer_cache


class GPT2LM(CausalLM):
    """GPT-2 language model: ``logits = model(input_ids, position_ids, attention_mask, dropout_key=None)``.

    Args:
      config: the architecture.
      dtype: compute dtype (activations, matmuls); softmax, norms and logits are float32.
      param_dtype: storage dtype of the parameters.
      rngs: initialisation randomness (Hugging Face's init: N(0, 0.02), residual projections scaled by
        1/sqrt(2·n_layer), LayerNorm 1/0).
    """

    def __init__(self, config: GPT2Config, *, dtype: DTypeLike = jnp.float32,
                 param_dtype: DTypeLike = jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = jnp.dtype(dtype)
        common = dict(std=config.initializer_range, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embed = Embed(config.vocab_size, config.hidden_size, ("vocab", "embed"), **common)
        self.pos_embed = Embed(config.n_positions, config.hidden_size, ("positions", "embed"), **common)
        self.blocks = nnx.List([GPT2Block(config, i, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                                for i in range(config.num_layers)])
        self.final_norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype,
                                    param_dtype=param_dtype)
        self.lm_head = (None if config.tie_word_embeddings else
                        Dense((config.hidden_size,), (config.vocab_size,), ("embed", "vocab"), use_bias=False,
                              out_dtype=jnp.float32, **common))

    def set_scan_layers(self, enabled: bool = True) -> GPT2LM:
        """:meth:`CausalLM.set_scan_layers`; refused with ``scale_attn_by_inverse_layer_idx`` (its blocks differ)."""
        if enabled and self.config.scale_attn_by_inverse_layer_idx:
            raise ValueError("mesh.scan_layers: this GPT-2 has scale_attn_by_inverse_layer_idx, which gives every "
                             "block its own attention scale (a static attribute), so the blocks cannot run as one "
                             "scanned graph; set mesh.scan_layers: false")
        return super().set_scan_layers(enabled)

    def embed_inputs(self, input_ids, position_ids, dropout_key):
        x = self.embed(input_ids) + self.pos_embed(position_ids)
        return dropout(x, self.config.embd_dropout, dropout_key)


def extend_positions(model_or_params: GPT2LM | nnx.State, new_n_positions: int) -> GPT2LM | nnx.State:
    """Grow the learned position table to ``new_n_positions`` rows by repeating its last row.

    Long multiplication sequences (16×16 and beyond) exceed GPT-2's 1024 positions; the reference extends the
    table the same way. A model is updated in place (table and ``config.n_positions``) and returned; a params
    ``nnx.State`` (as in a train state) is returned as a new state with the table replaced.
    """
    params = model_or_params if isinstance(model_or_params, nnx.State) else nnx.state(model_or_params, nnx.Param)
    variable = params["pos_embed"]["embedding"]
    table = variable.get_value()
    old_n_positions = table.shape[0]
    if new_n_positions <= old_n_positions:
        raise ValueError(f"new_n_positions={new_n_positions} must exceed the current {old_n_positions}")
    extra = jnp.broadcast_to(table[-1:], (new_n_positions - old_n_positions, table.shape[1]))
    extended = jax.device_put(jnp.concatenate([table, extra.astype(table.dtype)]), table.sharding)
    if isinstance(model_or_params, nnx.State):
        new_params = jax.tree.map(lambda x: x, params, is_leaf=lambda x: isinstance(x, nnx.Variable))
        new_params["pos_embed"]["embedding"] = variable.replace(extended)
        return new_params
    model = model_or_params
    model.pos_embed.embedding.set_value(extended)
    model.config = dataclasses.replace(model.config, n_positions=new_n_positions)
    return model
