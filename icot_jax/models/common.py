"""Building blocks shared by every model family.

Parameters carry logical axis names (``out_sharding`` metadata) so that ``icot_jax.sharding`` can map them
onto a mesh; layers take a compute ``dtype`` and a ``param_dtype``; attention supports grouped-query heads,
padding, causal and sliding-window masks, and a fixed-shape KV cache written at a traced index.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec

DTypeLike = Any  # a jnp dtype or its name ("float32", "bfloat16")

# Logical axis names used by the models (``None`` = never sharded).
LOGICAL_AXES = ("vocab", "embed", "positions", "mlp", "heads", "kv_heads", "head_dim", "norm")


def param(init: Callable, key: jax.Array | None, shape: Sequence[int], axes: Sequence[str | None],
          dtype: DTypeLike) -> nnx.Param:
    """An ``nnx.Param`` initialised with ``init(key, shape, dtype)`` that carries logical axis names.

    ``eager_sharding=False`` because the names are logical, not mesh axes: ``icot_jax.sharding`` maps them
    (e.g. with ``nnx.logical_axis_rules`` and ``nnx.get_partition_spec``) and places the arrays itself.
    """
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {tuple(axes)} do not match parameter shape {tuple(shape)}")
    return nnx.Param(init(key, tuple(shape), jnp.dtype(dtype)), out_sharding=tuple(axes), eager_sharding=False)


def normal_init(std: float) -> Callable:
    """Initialiser drawing from N(0, std²), as Hugging Face's ``_init_weights``."""
    return jax.nn.initializers.normal(stddev=std)


def logical_axes(model_or_state: nnx.Module | nnx.State) -> nnx.State:
    """The logical axis names of every parameter, as ``PartitionSpec``s of names.

    Same tree structure as ``nnx.state(model, nnx.Param)``; e.g. the token embedding gets
    ``PartitionSpec('vocab', 'embed')``. ``icot_jax.sharding`` turns these into mesh specs.
    """
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state, nnx.Param)
    return jax.tree.map(lambda v: PartitionSpec(*v.get_metadata("out_sharding")), state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


# ------------------------------------------------------------------------------ cotangents (XLA:CPU)


def _through_conditional(g: jax.Array) -> jax.Array:
    # Both branches return ``g``; the copy in one keeps JAX from forwarding ``g`` past the cond (it drops
    # outputs that every branch passes through), and the runtime predicate keeps XLA from folding it.
    return jax.lax.cond(jnp.isnan(g.reshape(-1)[0]), lambda g: g, jnp.copy, g)


@jax.custom_vjp
def materialize_cotangent(y: jax.Array) -> jax.Array:
    """Identity whose backward pass, when compiled for CPU, computes the cotangent of ``y`` once into a buffer.

    Why: XLA:CPU fuses the elementwise backward chain of the residual stream (residual adds, norm backward,
    dropout masks) into every transposed copy that feeds a weight-gradient matmul, so each copy recomputes
    the chain from the top layer down: work grows with depth², about half of a tiny GPT-2's train step.
    XLA cannot fuse into a conditional, so passing the cotangent through a ``jax.lax.cond`` (both branches
    return it unchanged) makes XLA compute it once; gradients stay bit-identical.
    ``jax.lax.optimization_barrier`` would not do: XLA:CPU removes it before fusion.

    The platform is resolved at lowering (``jax.lax.platform_dependent``): for GPU and TPU the backward is
    the plain identity and the compiled program is the one without this function.
    """
    return y


def _materialize_fwd(y: jax.Array) -> tuple[jax.Array, None]:
    return y, None


def _materialize_bwd(_, g: jax.Array) -> tuple[jax.Array]:
    return (jax.lax.platform_dependent(g, cpu=_through_conditional, default=lambda g: g),)


materialize_cotangent.defvjp(_materialize_fwd, _materialize_bwd)


# ----------------------------------------------------------------------------------------------- layers


class Dense(nnx.Module):
    """``y = x · W + b`` contracting the last ``len(in_shape)`` axes of ``x`` with the first axes of ``W``.

    Multi-axis kernels (e.g. ``[embed, heads, head_dim]``) keep heads as their own axis, so attention needs
    no reshapes and the heads axis can be sharded. The output passes through :func:`materialize_cotangent`
    unless ``materialize_cotangent`` is False (see :meth:`CausalLM.set_materialize_cotangents`).
    """

    materialize_cotangent: bool = True

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], axes: Sequence[str | None], *,
                 std: float, use_bias: bool, dtype: DTypeLike, param_dtype: DTypeLike, rngs: nnx.Rngs,
                 out_dtype: DTypeLike | None = None):
        self.n_in = len(in_shape)
        self.dtype = jnp.dtype(dtype)
        self.out_dtype = self.dtype if out_dtype is None else jnp.dtype(out_dtype)
        self.kernel = param(normal_init(std), rngs.params(), (*in_shape, *out_shape), axes, param_dtype)
        self.bias = (param(jax.nn.initializers.zeros, None, out_shape, axes[self.n_in:], param_dtype)
                     if use_bias else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.tensordot(x.astype(self.dtype), self.kernel[...].astype(self.dtype), axes=self.n_in,
                          preferred_element_type=self.out_dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.out_dtype)
        return materialize_cotangent(y) if self.materialize_cotangent else y


class Embed(nnx.Module):
    """Token (or position) embedding table ``[num, features]``; ``attend`` gives float32 logits (tied head)."""

    def __init__(self, num: int, features: int, axes: tuple[str, str], *, std: float, dtype: DTypeLike,
                 param_dtype: DTypeLike, rngs: nnx.Rngs):
        self.dtype = jnp.dtype(dtype)
        self.embedding = param(normal_init(std), rngs.params(), (num, features), axes, param_dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        table = self.embedding[...].astype(self.dtype)
        return jnp.einsum("...e,ve->...v", x.astype(self.dtype), table, preferred_element_type=jnp.float32)


class LayerNorm(nnx.Module):
    """LayerNorm (biased variance, as torch), computed in float32 and returned in the compute dtype."""

    def __init__(self, features: int, *, eps: float, dtype: DTypeLike, param_dtype: DTypeLike):
        self.eps = eps
        self.dtype = jnp.dtype(dtype)
        self.scale = param(jax.nn.initializers.ones, None, (features,), ("norm",), param_dtype)
        self.bias = param(jax.nn.initializers.zeros, None, (features,), ("norm",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(self.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm computed in float32 (as Hugging Face's Llama/Mistral/Phi-3) and returned in the compute dtype."""

    def __init__(self, features: int, *, eps: float, dtype: DTypeLike, param_dtype: DTypeLike):
        self.eps = eps
        self.dtype = jnp.dtype(dtype)
        self.scale = param(jax.nn.initializers.ones, None, (features,), ("norm",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        y = x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(self.dtype)


_ACTIVATIONS = {
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation called ``name`` in a Hugging Face config (``activation_function`` / ``hidden_act``)."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout as ``torch.nn.Dropout``; identity when ``key`` is None (evaluation) or ``rate`` is 0."""
    if key is None or rate == 0.0:
        return x
    keep = keep_mask(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def keep_mask(key: jax.Array, p: float, shape: Sequence[int]) -> jax.Array:
    """``jax.random.bernoulli(key, p, shape)``; compiled for CPU, the same mask from :func:`threefry_keep_mask`.

    The platform is resolved at lowering (``jax.lax.platform_dependent``), so GPU and TPU programs keep
    ``jax.random.bernoulli``; so does any setting where the two could differ (a non-threefry key,
    ``jax_threefry_partitionable`` off, 64-bit mode, 2³² elements or more).
    """
    def bernoulli(key):
        return jax.random.bernoulli(key, p, shape)

    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    impl = jax.random.key_impl(key) if typed else jax.config.jax_default_prng_impl
    same_bits = (str(impl) == "threefry2x32" and jax.config.jax_threefry_partitionable
                 and not jax.config.jax_enable_x64 and math.prod(shape) < 2 ** 32)
    if not same_bits:
        return bernoulli(key)
    data = jax.random.key_data(key) if typed else key
    return jax.lax.platform_dependent(data, cpu=lambda data: threefry_keep_mask(data, p, shape),
                                      default=lambda _: bernoulli(key))


_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def threefry_keep_mask(key_data: jax.Array, p: float, shape: Sequence[int]) -> jax.Array:
    """``jax.random.bernoulli`` of a threefry key (``key_data``: its ``uint32[2]``), as plain ``jnp`` ops.

    Why: on CPU JAX lowers the threefry hash as a rolled loop of 5 iterations, each copying its state and
    computing the hash's two words in separate fusions (about 11 ms for a ``[32, 67, 256]`` mask on this
    machine); unrolled into elementwise ops, XLA:CPU computes the hash, the xor of its words and the
    comparison in one vectorised fusion (under 1 ms). Same bits as JAX with ``jax_threefry_partitionable``
    (the default): element ``i`` hashes the counter ``(0, i)``, and ``uniform`` maps the top 23 bits ``m``
    to ``m·2⁻²³``, so ``uniform < p`` is ``m < ceil(p·2²³)`` with ``p`` in float32. Valid below 2³²
    elements, without ``jax_enable_x64``; ``tests/test_dropout.py`` checks the equality.
    """
    k1, k2 = key_data[0], key_data[1]
    ks = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
    x0 = jnp.broadcast_to(ks[0], shape)
    x1 = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape) + ks[1]
    for block in range(5):
        for rotation in _THREEFRY_ROTATIONS[block % 2]:
            x0 = x0 + x1
            x1 = ((x1 << np.uint32(rotation)) | (x1 >> np.uint32(32 - rotation))) ^ x0
        x0 = x0 + ks[(block + 1) % 3]
        x1 = x1 + ks[(block + 2) % 3] + np.uint32(block + 1)
    threshold = np.uint32(np.ceil(np.float64(np.float32(p)) * 2 ** 23))
    return ((x0 ^ x1) >> np.uint32(9)) < threshold


def split_key(key: jax.Array | None, n: int) -> list[jax.Array | None]:
    """``n`` independent keys, or ``n`` Nones when dropout is off."""
    return [None] * n if key is None else list(jax.random.split(key, n))


# -------------------------------------------------------------------------------------------- attention


def causal_mask(query_slots: jax.Array, key_valid: jax.Array, sliding_window: int | None) -> jax.Array:
    """Which keys each query may attend to: ``bool[B, T, S]``.

    ``query_slots`` (int ``[T]``) are the sequence (or cache) slots of the queries and ``key_valid``
    (bool ``[B, S]``) marks the slots holding real tokens. Causality and the sliding window are on slots,
    as in Hugging Face (``kv_idx <= q_idx`` and ``q_idx - kv_idx < sliding_window``), not on position ids.
    """
    key_slots = jnp.arange(key_valid.shape[1])
    allowed = key_slots[None, :] <= query_slots[:, None]
    if sliding_window is not None:
        allowed &= query_slots[:, None] - key_slots[None, :] < sliding_window
    return allowed[None] & key_valid[:, None, :]


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, scale: float,
              dropout_rate: float = 0.0, dropout_key: jax.Array | None = None, heads_first: bool = False
              ) -> jax.Array:
    """``softmax(q·kᵀ·scale) · v`` with grouped-query heads; scores and softmax in float32.

    Shapes: ``q [B, T, H, D]``, ``k, v [B, S, K, D]`` (or ``[B, K, S, D]`` with ``heads_first``) with ``H``
    a multiple of ``K`` (query head ``h`` reads key/value head ``h // (H // K)``, as Hugging Face's
    ``repeat_kv``), ``mask bool [B, T, S]``.
    """
    batch, length, heads, head_dim = q.shape
    kv = "bksd" if heads_first else "bskd"
    kv_heads = k.shape[1 if heads_first else 2]
    q = q.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum(f"btkgd,{kv}->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    # A large finite value rather than -inf: a query with no visible key (a padding row) then gets a
    # uniform distribution instead of NaN.
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = dropout(jax.nn.softmax(scores, axis=-1), dropout_rate, dropout_key)
    out = jnp.einsum(f"bkgts,{kv}->btkgd", probs.astype(v.dtype), v)
    return out.reshape(batch, length, heads, head_dim)


LayerCache = tuple[jax.Array, jax.Array]  # (keys, values) of one layer, each [B, K, S, D]


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                     layer_cache: LayerCache | None, cache_index: jax.Array | None, **kwargs
                     ) -> tuple[jax.Array, LayerCache | None]:
    """Attention over the new keys/values ``[B, T, K, D]``, or over the cache after writing them at
    ``cache_index``. Returns the attention output and the layer's updated cache (None without one).

    The cache keeps heads before slots (:class:`KVCache`), so the write is an in-place
    ``dynamic_update_slice`` of ``T`` slots and the attention dots read the cache as they find it; with
    slots first, XLA:CPU copied every layer's whole cache into that layout at every decode step.
    """
    if layer_cache is None:
        return attention(q, k, v, mask, **kwargs), None
    start = (0, 0, cache_index, 0)
    k, v = (jax.lax.dynamic_update_slice(cached, new.astype(cached.dtype).transpose(0, 2, 1, 3), start)
            for cached, new in zip(layer_cache, (k, v)))
    return attention(q, k, v, mask, heads_first=True, **kwargs), (k, v)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Fixed-shape decoding cache (a pytree, so it can be a ``lax.while_loop`` carry).

    Attributes:
      keys, values: one ``[B, kv_heads, max_length, head_dim]`` array per layer (heads before slots: the
        layout the attention dots read, at every batch size; see :func:`cached_attention`).
      valid: ``bool[B, max_length]``, True for slots holding a real (non-padding) token.
      index: ``int32[]``, the next slot to write; every row shares it (prompts are left-padded).
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    valid: jax.Array
    index: jax.Array

    @property
    def max_length(self) -> int:
        return self.valid.shape[1]


REMAT_POLICIES: dict[str, Callable | None] = {
    "full": None,  # save only each block's inputs; recompute the whole block in the backward pass
    # Save the outputs of matmuls without batch dimensions (the weight projections) and recompute the rest,
    # including the [B, heads, L, L] attention scores, whose einsums have batch dimensions.
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
"""``jax.checkpoint`` policy of each ``mesh.remat`` setting but ``none`` (see :meth:`CausalLM.set_remat`)."""


def _call_block(block: nnx.Module, x: jax.Array, position_ids: jax.Array, mask: jax.Array,
                dropout_key: jax.Array | None) -> jax.Array:
    """One block of a forward pass without a KV cache."""
    x, _ = block(x, position_ids, mask, None, None, dropout_key)
    return x


@functools.cache
def _remat_call_block(policy: str) -> Callable:
    """:func:`_call_block` under ``nnx.remat`` with ``policy``: one wrapper per policy, made once."""
    return nnx.remat(_call_block, policy=REMAT_POLICIES[policy])


class CausalLM(nnx.Module):
    """The call signature shared by every family, plus KV-cached decoding.

    Subclasses define ``config`` (with ``num_layers``, ``num_kv_heads``, ``head_dim``, ``sliding_window``),
    ``dtype``, ``embed`` (an :class:`Embed`), ``blocks``, ``final_norm``, ``lm_head`` (None when tied to
    ``embed``) and ``embed_inputs(input_ids, position_ids, dropout_key)``; a block is called as
    ``block(x, position_ids, mask, layer_cache, cache_index, dropout_key) -> (x, layer_cache)``.
    """

    scan_layers: bool = False
    """Run the blocks under one ``jax.lax.scan`` when there is no KV cache (see :meth:`set_scan_layers`)."""
    remat: str = "none"
    """Rematerialisation policy of the blocks when there is no KV cache (see :meth:`set_remat`)."""

    def set_scan_layers(self, enabled: bool = True) -> CausalLM:
        """Run the transformer blocks under one ``jax.lax.scan`` (``mesh.scan_layers``); returns the model.

        The compiler then sees one block instead of ``num_layers``, which shortens compiles of deep models.
        Parameters keep their paths (one subtree per block, as in Hugging Face checkpoints): each forward
        pass stacks the blocks' parameters into ``[num_layers, ...]`` arrays and scans over them, with the
        same per-layer dropout keys as the Python loop, so the results are the same. Decoding with a KV
        cache keeps the loop. The flag is a static attribute, so it travels in the model's graphdef.

        Raises ``ValueError`` if the blocks differ in a static attribute (they must share one graph).
        """
        if enabled:
            self._block_graphdef()
        self.scan_layers = enabled
        return self

    def set_remat(self, policy: str = "full") -> CausalLM:
        """Recompute each transformer block in the backward pass (``mesh.remat``); returns the model.

        ``policy``: ``none``; ``full`` keeps only each block's input and recomputes the block; ``dots`` also
        keeps the weight projections' outputs (:data:`REMAT_POLICIES`). Every forward pass without a KV
        cache (training, teacher-forced evaluation; scanned or not, see :meth:`set_scan_layers`) calls each
        block under ``nnx.remat``; decoding with a cache is unchanged. Parameters and their paths do not
        change, only memory and compute move; the policy is a static attribute, so it travels in the
        model's graphdef.
        """
        if policy != "none" and policy not in REMAT_POLICIES:
            raise ValueError(f"mesh.remat={policy!r}; expected none, {', '.join(REMAT_POLICIES)}")
        self.remat = policy
        return self

    def set_materialize_cotangents(self, enabled: bool = True) -> CausalLM:
        """Pass every :class:`Dense` output through :func:`materialize_cotangent` (the default); returns the model.

        ``mesh.materialize_cotangents``. It changes only CPU compilations (faster backward passes, the same
        gradients bit for bit); GPU and TPU programs are the same either way. The flag is a static attribute
        of each ``Dense``, so it travels in the model's graphdef.
        """
        for _, module in nnx.iter_modules(self):
            if isinstance(module, Dense):
                module.materialize_cotangent = enabled
        return self

    def _block_graphdef(self) -> nnx.GraphDef:
        """The graphdef every block shares; an error if one block's differs (then they cannot be scanned)."""
        graphdefs = [nnx.graphdef(block) for block in self.blocks]
        for index, graphdef in enumerate(graphdefs[1:], start=1):
            if graphdef != graphdefs[0]:
                raise ValueError(f"mesh.scan_layers: block {index} of this {type(self).__name__} differs from "
                                 f"block 0 in a static attribute, so the blocks cannot run as one scanned graph; "
                                 f"set mesh.scan_layers: false")
        return graphdefs[0]

    def __call__(self, input_ids: jax.Array, position_ids: jax.Array, attention_mask: jax.Array, *,
                 dropout_key: jax.Array | None = None) -> jax.Array:
        """Logits ``float32[B, L, V]`` for ``input_ids int[B, L]``.

        ``position_ids int[B, L]`` are each token's position; ``attention_mask`` (bool/int ``[B, L]``) is
        True for real tokens: padding keys are never attended to. ``dropout_key=None`` is deterministic.
        """
        mask = causal_mask(jnp.arange(input_ids.shape[1]), attention_mask.astype(bool),
                           self.config.sliding_window)
        logits, _ = self._forward(input_ids, position_ids, mask, None, None, dropout_key)
        return logits

    def init_cache(self, batch_size: int, max_length: int, dtype: DTypeLike | None = None) -> KVCache:
        """An empty cache for ``batch_size`` rows of up to ``max_length`` tokens (prompt + generated)."""
        config = self.config
        shape = (batch_size, config.num_kv_heads, max_length, config.head_dim)
        dtype = self.dtype if dtype is None else jnp.dtype(dtype)
        return KVCache(keys=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
                       values=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
                       valid=jnp.zeros((batch_size, max_length), bool), index=jnp.zeros((), jnp.int32))

    def decode(self, input_ids: jax.Array, position_ids: jax.Array, attention_mask: jax.Array,
               cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Run ``T`` new tokens per row against the cache; returns their logits and the updated cache.

        The tokens are written at slots ``cache.index .. cache.index + T - 1`` (prefill: the whole
        left-padded prompt, ``T = L``; decoding: ``T = 1``). ``attention_mask [B, T]`` marks which of them
        are real; ``position_ids [B, T]`` are each row's own positions. The caller keeps
        ``cache.index + T <= cache.max_length``.
        """
        length = input_ids.shape[1]
        valid = jax.lax.dynamic_update_slice(cache.valid, attention_mask.astype(bool), (0, cache.index))
        mask = causal_mask(cache.index + jnp.arange(length), valid, self.config.sliding_window)
        layer_caches = list(zip(cache.keys, cache.values))
        logits, new_caches = self._forward(input_ids, position_ids, mask, layer_caches, cache.index, None)
        keys, values = zip(*new_caches)
        return logits, KVCache(keys=keys, values=values, valid=valid, index=cache.index + length)

    def _forward(self, input_ids, position_ids, mask, layer_caches, cache_index, dropout_key):
        keys = split_key(dropout_key, len(self.blocks) + 1)
        x = self.embed_inputs(input_ids, position_ids, keys[0])
        if layer_caches is None:
            x = self._run_blocks(x, position_ids, mask, keys[1:])
            new_caches = [None] * len(self.blocks)
        else:
            new_caches = []
            for block, layer_cache, key in zip(self.blocks, layer_caches, keys[1:]):
                x, layer_cache = block(x, position_ids, mask, layer_cache, cache_index, key)
                new_caches.append(layer_cache)
        x = self.final_norm(x)
        logits = self.embed.attend(x) if self.lm_head is None else self.lm_head(x)
        return logits, new_caches

    def _run_blocks(self, x, position_ids, mask, keys):
        """``x`` through every block without a KV cache: looped or scanned, rematerialised or not."""
        call = _call_block if self.remat == "none" else _remat_call_block(self.remat)
        if self.scan_layers:
            return self._scan_blocks(call, x, position_ids, mask, keys)
        for block, key in zip(self.blocks, keys):
            x = call(block, x, position_ids, mask, key)
        return x

    def _scan_blocks(self, call, x, position_ids, mask, keys):
        """``x`` through every block as one ``jax.lax.scan`` over their stacked states.

        Stacking copies the blocks' parameters once per forward pass (and the gradients once back). The
        scanned body runs ``call`` (:func:`_call_block`, under ``nnx.remat`` with :meth:`set_remat`), so a
        rematerialised block stays rematerialised.
        """
        graphdef = self._block_graphdef()
        stacked = jax.tree.map(lambda *layers: jnp.stack(layers), *(nnx.state(block) for block in self.blocks))
        stacked_keys = None if keys[0] is None else jnp.stack(keys)

        def body(x, layer):
            state, key = layer
            return call(nnx.merge(graphdef, state), x, position_ids, mask, key), None

        x, _ = jax.lax.scan(body, x, (stacked, stacked_keys))
        return x
