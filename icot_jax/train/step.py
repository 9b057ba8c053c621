"""One compiled train step for the whole curriculum: in-graph removal, masked loss, AdamW update.

``TrainStep(graphdef, optimizer, config)(state, batch, n_remove, width) -> (state, metrics)`` is a pure
function under plain ``jax.jit`` with the state donated. The removal count per example is an ordinary
``int32[B]`` input, so the schedule moves from "nothing removed" to "everything removed" (smoothing,
optimizer resets and all) without recompiling. The only static input is ``width``, the length the
compacted rows are written into: the host picks it per batch from a few buckets
(:mod:`icot_jax.train.widths`) so that compute follows the tokens left, and each bucket compiles once;
``metrics["train_step_compiles"]`` proves it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from icot_jax.removal import remove_cot

BATCH_KEYS = {"input_ids": np.int32, "seps": np.int32, "example_mask": np.bool_}
"""Batch entries the step reads and the dtypes it requires (other keys, e.g. ``index``, are ignored)."""


def make_optimizer(learning_rate: float, *, weight_decay: float = 0.01, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8, max_grad_norm: float = 1.0, warmup_steps: int = 0) -> optax.GradientTransformation:
    """The reference optimizer: global-norm clipping, then AdamW with torch's defaults and a constant LR.

    Weight decay applies to every parameter (biases and norms included), as ``torch.optim.AdamW`` does
    on the reference's ``model.parameters()``. Moments take the parameters' dtype, so pure-bf16
    parameters get bf16 optimizer state like the reference's ``--bf16``.

    ``warmup_steps > 0`` (not in the reference) ramps the LR linearly from 0 over that many updates. The
    ramp's counter lives in the optimizer state, so every optimizer reset restarts it: the first,
    bias-corrected Adam updates after a reset (each about ``learning_rate`` per parameter, whatever the
    gradient's size) are damped, which matters at the high LRs that small from-scratch models use.
    """
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    lr = learning_rate if warmup_steps == 0 else optax.linear_schedule(0.0, learning_rate, warmup_steps)
    return optax.chain(
        optax.clip_by_global_norm(max_grad_norm),
        optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay),
    )


def optimizer_for(train_config) -> optax.GradientTransformation:
    """:func:`make_optimizer` with a config's ``train`` section (``lr``, ``weight_decay``, ``max_grad_norm``,
    ``warmup_steps``)."""
    t = train_config
    return make_optimizer(t.lr, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
                          warmup_steps=t.warmup_steps)


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training; a pytree (checkpoint it whole)."""

    step: jax.Array
    """``int32[]``: updates applied so far. Seeds dropout; not reset by optimizer resets."""
    params: nnx.State
    """``nnx.Param`` variables of the model."""
    rest: nnx.State
    """All other model variables, passed through unchanged."""
    opt_state: optax.OptState
    rng: jax.Array
    """Base PRNG key (raw ``uint32[2]``); dropout uses ``fold_in(fold_in(rng, step), micro_batch)``."""


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """``graphdef, params, rest = nnx.split(model, nnx.Param, ...)``."""
    return nnx.split(model, nnx.Param, ...)


def init_train_state(params: nnx.State, rest: nnx.State, optimizer: optax.GradientTransformation, *,
                     seed: int) -> TrainState:
    """A fresh train state. Pure: ``jax.jit`` it with ``out_shardings`` for sharded initialisation."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest,
                      opt_state=optimizer.init(params), rng=jax.random.PRNGKey(seed))


def train_state_from_model(model: nnx.Module, optimizer: optax.GradientTransformation, *, seed: int = 0
                           ) -> tuple[nnx.GraphDef, TrainState]:
    """``(graphdef, state)``: a fresh train state holding *copies* of ``model``'s arrays.

    The train step donates its state, which deletes the state's arrays; because they are copies here,
    ``model`` keeps working after any number of steps. (Sharded runs build their state with
    :func:`icot_jax.build.init_state`, which allocates each array once, in its shards.)
    """
    graphdef, params, rest = split_model(model)
    params, rest = jax.tree.map(jnp.copy, (params, rest))
    return graphdef, init_train_state(params, rest, optimizer, seed=seed)


def model_from_state(graphdef: nnx.GraphDef, state: TrainState, *, copy: bool = False) -> nnx.Module:
    """The NNX model with the current parameters of ``state`` (the inverse of :func:`train_state_from_model`).

    Without ``copy`` the model *shares* the state's arrays: the next train step, which donates ``state``,
    deletes them, so use the model before that step (as the training loop's evaluation does) or pass
    ``copy=True`` to keep it.
    """
    params, rest = (state.params, state.rest)
    if copy:
        params, rest = jax.tree.map(jnp.copy, (params, rest))
    return nnx.merge(graphdef, params, rest)


def token_stats(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array,
                answer_mask: jax.Array | None = None) -> dict[str, jax.Array]:
    """Summed next-token cross-entropy (``loss_sum``) and correct predictions (``n_correct``) over target
    positions (float32); with ``answer_mask``, also the correct predictions among the targets it marks
    (``answer_correct``) and their number (``answer_tokens``).

    ``logits[:, j]`` predicts ``input_ids[:, j + 1]``, which counts where ``loss_mask[:, j + 1]``.
    """
    logits = logits[:, :-1].astype(jnp.float32)
    targets, mask = input_ids[:, 1:], loss_mask[:, 1:]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = mask & (jnp.argmax(logits, axis=-1) == targets)
    sums = {"loss_sum": jnp.sum(jnp.where(mask, ce, 0.0)), "n_correct": jnp.sum(correct).astype(jnp.float32)}
    if answer_mask is not None:
        answer = mask & answer_mask[:, 1:]
        sums.update(answer_correct=jnp.sum(correct & answer).astype(jnp.float32),
                    answer_tokens=jnp.sum(answer).astype(jnp.float32))
    return sums


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static settings of the compiled step (changing one means a new ``TrainStep``)."""

    pad_id: int
    side: str = "left"
    """Which end of the CoT is removed first (the paper: ``left``)."""
    keep_position: bool = False
    """Kept tokens keep their original position ids (not used in the paper)."""
    accumulate_steps: int = 1
    """Micro-batches per update: the batch of ``B`` rows is processed as ``A`` slices of ``B / A`` rows."""
    random_position_shift: int = 0
    """Training only (not in the reference): add a random offset in ``[0, random_position_shift]``, drawn
    per example from (rng, step), to every position id, so that a model cannot tie what it computes to
    absolute positions. Evaluation and generation start at position 0, as without it. The position table
    must hold ``max_length + random_position_shift`` positions."""
    answer_metrics: bool = False
    """Also return ``answer_token_accuracy``: the token accuracy over the answer's targets alone (after the
    second EOS), closer to exact match than the accuracy over every target; the adaptive schedule can follow
    it (``train.adaptive_signal``). Off by default, so other runs compile exactly the program they did."""


def prepare_inputs(config: StepConfig, batch: dict, n_remove: jax.Array, width: int) -> tuple[dict, dict]:
    """Remove CoT tokens in-graph into ``width`` columns; return the model inputs with the loss mask, and
    removal statistics (``mean_removed``, ``mean_cot_left`` over real rows)."""
    removed = remove_cot(batch["input_ids"], batch["seps"], n_remove, side=config.side,
                         keep_position=config.keep_position, pad_id=config.pad_id, width=width)
    real = batch["example_mask"]
    inputs = {"input_ids": removed.input_ids, "position_ids": removed.position_ids,
              "attention_mask": removed.attention_mask, "loss_mask": removed.loss_mask & real[:, None]}
    if config.answer_metrics:  # the answer and its EOS: every target after the second separator
        inputs["answer_mask"] = jnp.arange(width)[None, :] > removed.seps[:, 1:2]
    n_real = jnp.maximum(jnp.sum(real), 1).astype(jnp.float32)
    cot_left = jnp.maximum(removed.seps[:, 1] - removed.seps[:, 0] - 1, 0)
    stats = {"mean_removed": jnp.sum(jnp.where(real, removed.n_removed, 0)) / n_real,
             "mean_cot_left": jnp.sum(jnp.where(real, cot_left, 0)) / n_real}
    return inputs, stats


def model_token_stats(graphdef: nnx.GraphDef, params: nnx.State, rest: nnx.State, inputs: dict,
                      dropout_key: jax.Array | None) -> dict[str, jax.Array]:
    """:func:`token_stats` of the model ``(graphdef, params, rest)`` on prepared ``inputs``."""
    model = nnx.merge(graphdef, params, rest)
    logits = model(inputs["input_ids"], inputs["position_ids"], inputs["attention_mask"], dropout_key=dropout_key)
    return token_stats(logits, inputs["input_ids"], inputs["loss_mask"], inputs.get("answer_mask"))


def answer_metrics(sums: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """``answer_token_accuracy`` from :func:`token_stats`'s answer sums (none without them)."""
    if "answer_tokens" not in sums:
        return {}
    return {"answer_token_accuracy": sums["answer_correct"] / jnp.maximum(sums["answer_tokens"], 1.0)}


class EvalStep:
    """The compiled teacher-forced evaluation step: removal, forward pass, token sums; no dropout, no
    optimizer, no update. ``state_sharding`` (shardings of a :class:`TrainState`, or of anything with
    ``params`` and ``rest``) and ``batch_sharding`` as for :class:`TrainStep`."""

    def __init__(self, graphdef: nnx.GraphDef, config: StepConfig, *, state_sharding: Any = None,
                 batch_sharding: Any = None):
        self.graphdef, self.config = graphdef, config
        params = rest = None
        if state_sharding is not None:
            params, rest = state_sharding.params, state_sharding.rest
        self._eval = jax.jit(self._eval_step, in_shardings=(params, rest, batch_sharding, batch_sharding),
                             static_argnums=4)

    def __call__(self, params: nnx.State, rest: nnx.State, batch: Mapping[str, Any], n_remove: Any,
                 width: int | None = None) -> dict:
        """Teacher-forced sums for one batch: ``loss_sum``, ``n_correct``, ``n_target_tokens`` (add them
        over batches) and the batch's ``loss`` and ``token_accuracy``. Nothing is donated. ``width`` as
        in :meth:`TrainStep.__call__` (each width compiles once)."""
        batch, n_remove = _select(batch, n_remove)
        return self._eval(params, rest, batch, n_remove, _checked_width(batch, width))

    def _eval_step(self, params: nnx.State, rest: nnx.State, batch: dict, n_remove: jax.Array, width: int) -> dict:
        inputs, stats = prepare_inputs(self.config, batch, n_remove, width)
        sums = model_token_stats(self.graphdef, params, rest, inputs, None)
        loss_sum, n_correct = sums["loss_sum"], sums["n_correct"]
        n_tokens = jnp.sum(inputs["loss_mask"][:, 1:])
        denominator = jnp.maximum(n_tokens, 1).astype(jnp.float32)
        return {"loss_sum": loss_sum, "n_correct": n_correct, "n_target_tokens": n_tokens,
                "loss": loss_sum / denominator, "token_accuracy": n_correct / denominator, **stats,
                **answer_metrics(sums)}


class TrainStep:
    """The compiled train step, evaluation step and optimizer reset for one model graph.

    ``state_sharding`` (a pytree of shardings matching :class:`TrainState`) and ``batch_sharding`` (one
    sharding for every batch array and ``n_remove``) are passed to ``jax.jit``; ``None`` lets JAX
    follow the inputs' placement.
    """

    def __init__(self, graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, config: StepConfig, *,
                 state_sharding: Any = None, batch_sharding: Any = None):
        if config.accumulate_steps < 1:
            raise ValueError(f"accumulate_steps must be >= 1, got {config.accumulate_steps}")
        self.graphdef, self.optimizer, self.config = graphdef, optimizer, config
        self._traces = 0
        data = (state_sharding, batch_sharding, batch_sharding, _replicated(batch_sharding))
        self._train = jax.jit(self._train_step, in_shardings=data, out_shardings=(state_sharding, None),
                              donate_argnums=0, static_argnums=(4, 5))
        self.eval_step = EvalStep(graphdef, config, state_sharding=state_sharding, batch_sharding=batch_sharding)
        self._reset = jax.jit(self._reset_optimizer, in_shardings=(state_sharding,),
                              out_shardings=state_sharding, donate_argnums=0)

    @property
    def compiles(self) -> int:
        """How many times the train step has been traced (= compiled by ``jax.jit``) so far."""
        return self._traces

    def __call__(self, state: TrainState, batch: Mapping[str, Any], n_remove: Any,
                 width: int | None = None, *, lr_scale: float = 1.0) -> tuple[TrainState, dict]:
        """One update. ``state`` is donated: use only the returned one. Metrics are scalars.

        ``width`` (default: the batch's stored length) is the static length of the rows after removal;
        it must hold every row's post-removal length (:func:`icot_jax.removal.post_removal_lengths`).
        ``lr_scale`` multiplies this update (so the learning rate, weight decay included). At exactly 1.0
        the step runs the program without the multiply (even ``u * 1.0`` changes how XLA fuses the update,
        and so its last bits); any other value runs, per width, one program in which the scale is an input
        like ``n_remove``: a decaying LR (``train.lr_decay``) compiles each width at most once more, when
        the decay starts, and a run is bit-identical to one without the decay until then.
        """
        batch, n_remove = _select(batch, n_remove)
        width = _checked_width(batch, width)
        state, metrics = self._train(state, batch, n_remove, np.float32(lr_scale), width, lr_scale != 1.0)
        return state, {**metrics, "train_step_compiles": self.compiles, "batch_width": width}

    def lower(self, state: Any, batch: Mapping[str, Any], n_remove: Any, width: int | None = None) -> jax.stages.Lowered:
        """Lower the train step for these (possibly abstract, ``jax.ShapeDtypeStruct``) arguments, e.g.
        to compile ahead of time for a TPU topology and read ``compile().memory_analysis()``."""
        batch, n_remove = _select(batch, n_remove)
        return self._train.lower(state, batch, n_remove, np.float32(1.0), _checked_width(batch, width), False)

    def evaluate(self, state: TrainState, batch: Mapping[str, Any], n_remove: Any, width: int | None = None) -> dict:
        """Teacher-forced sums for one batch, no dropout, no update: ``loss_sum``, ``n_correct``,
        ``n_target_tokens`` (add them over batches) and the batch's ``loss`` and ``token_accuracy``.
        ``width`` as in :meth:`__call__` (each width compiles the evaluation once)."""
        return self.eval_step(state.params, state.rest, batch, n_remove, width)

    def reset_optimizer(self, state: TrainState) -> TrainState:
        """Fresh optimizer state (moments and count zeroed), as the reference rebuilds AdamW; donates ``state``."""
        return self._reset(state)

    # -- traced functions ------------------------------------------------------------------------------

    def _train_step(self, state: TrainState, batch: dict, n_remove: jax.Array, lr_scale: jax.Array,
                    width: int, scaled: bool) -> tuple[TrainState, dict]:
        self._traces += 1  # Python side effect: runs once per trace, never per call
        inputs, stats = prepare_inputs(self.config, batch, n_remove, width)
        if self.config.random_position_shift:
            inputs["position_ids"] = shift_positions(inputs["position_ids"], self.config.random_position_shift,
                                                     jax.random.fold_in(state.rng, state.step))
        n_tokens = jnp.sum(inputs["loss_mask"][:, 1:])
        inv_tokens = 1.0 / jnp.maximum(n_tokens, 1).astype(jnp.float32)
        grads, sums = self._accumulate_gradients(state, inputs, inv_tokens)
        loss_sum, n_correct = sums["loss_sum"], sums["n_correct"]
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        if scaled:
            updates = jax.tree.map(lambda u: u * lr_scale.astype(u.dtype), updates)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss_sum * inv_tokens, "token_accuracy": n_correct * inv_tokens,
                   "n_target_tokens": n_tokens, "grad_norm": optax.tree.norm(grads), **stats, **answer_metrics(sums)}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    def _accumulate_gradients(self, state: TrainState, inputs: dict, inv_tokens: jax.Array):
        """Gradient of the batch's token-mean loss, ``accumulate_steps`` micro-batches at a time (``lax.scan``);
        also :func:`token_stats`'s sums over the whole batch."""
        steps = self.config.accumulate_steps
        step_key = jax.random.fold_in(state.rng, state.step)

        def objective(params, micro_batch, key):
            # Each micro-batch contributes its *sum* over target tokens divided by the target count of the
            # whole batch, so the micro-batch gradients add up to exactly the gradient of the full batch's
            # token-mean loss, however unevenly the targets fall into micro-batches. (Averaging per-micro
            # means, or the reference's update after the first micro-batch alone, would not.)
            sums = model_token_stats(self.graphdef, params, state.rest, micro_batch, key)
            return sums["loss_sum"] * inv_tokens, sums

        def accumulate(grads, indexed_micro_batch):
            index, micro_batch = indexed_micro_batch
            key = jax.random.fold_in(step_key, index)
            (_, sums), micro_grads = jax.value_and_grad(objective, has_aux=True)(state.params, micro_batch, key)
            return jax.tree.map(jnp.add, grads, micro_grads), sums

        def split(x):
            if x.shape[0] % steps:
                raise ValueError(f"batch size {x.shape[0]} is not divisible by accumulate_steps={steps}")
            # Micro-batch m takes rows m, m + A, m + 2A, ...: with the batch sharded in contiguous blocks,
            # every device then holds an equal share of every micro-batch and nothing moves.
            return x.reshape(x.shape[0] // steps, steps, *x.shape[1:]).swapaxes(0, 1)

        # Gradients accumulate in the parameters' dtype, as the reference's .grad does (an fp32 buffer
        # would add 4 bytes per parameter to a pure-bf16 run).
        zeros = jax.tree.map(jnp.zeros_like, state.params)
        micro_batches = (jnp.arange(steps), jax.tree.map(split, inputs))
        grads, sums = jax.lax.scan(accumulate, zeros, micro_batches)
        return grads, jax.tree.map(jnp.sum, sums)

    def _reset_optimizer(self, state: TrainState) -> TrainState:
        return state.replace(opt_state=self.optimizer.init(state.params))


def _replicated(batch_sharding: Any) -> Any:
    """A scalar input's sharding on the batches' mesh: whole on every device (``None`` without a mesh)."""
    if isinstance(batch_sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec())
    return None


POSITION_SHIFT_STREAM = 0x5F3759DF
"""``fold_in`` data that separates the position-shift draws from the dropout keys of the same step."""


def shift_positions(position_ids: jax.Array, max_shift: int, step_key: jax.Array) -> jax.Array:
    """``position_ids`` with one random offset in ``[0, max_shift]`` per row added (``step_key``: the
    step's key, ``fold_in(rng, step)``)."""
    key = jax.random.fold_in(step_key, POSITION_SHIFT_STREAM)
    offsets = jax.random.randint(key, (position_ids.shape[0], 1), 0, max_shift + 1, dtype=position_ids.dtype)
    return position_ids + offsets


def _select(batch: Mapping[str, Any], n_remove: Any) -> tuple[dict, Any]:
    """The batch entries the step reads, checked for presence, dtype and shape (a dtype change would
    silently recompile the step), and ``n_remove`` as ``int32`` (any integer array-like works: a list,
    NumPy or JAX integers of another width)."""
    n_remove = _as_int32(n_remove)
    missing = [key for key in BATCH_KEYS if key not in batch]
    if missing:
        raise KeyError(f"batch is missing {missing}; it has {sorted(batch)}")
    named = {f"batch['{key}']": (batch[key], dtype) for key, dtype in BATCH_KEYS.items()}
    for name, (value, dtype) in named.items():
        if np.dtype(value.dtype) != np.dtype(dtype):
            raise TypeError(f"{name} must be {np.dtype(dtype).name}, got {np.dtype(value.dtype).name}")
    rows = batch["input_ids"].shape[0]
    if batch["seps"].shape != (rows, 3) or batch["example_mask"].shape != (rows,) or n_remove.shape != (rows,):
        raise ValueError(f"inconsistent batch shapes: input_ids {batch['input_ids'].shape}, seps "
                         f"{batch['seps'].shape}, example_mask {batch['example_mask'].shape}, n_remove {n_remove.shape}")
    return {key: batch[key] for key in BATCH_KEYS}, n_remove


def _as_int32(n_remove: Any) -> Any:
    """Removal counts as ``int32`` (a JAX array stays on its devices; others become NumPy)."""
    if not hasattr(n_remove, "dtype"):
        n_remove = np.asarray(n_remove)
    if not np.issubdtype(np.dtype(n_remove.dtype), np.integer):
        raise TypeError(f"n_remove must hold integers, got {np.dtype(n_remove.dtype).name}")
    return n_remove if np.dtype(n_remove.dtype) == np.int32 else n_remove.astype(np.int32)


def _checked_width(batch: Mapping[str, Any], width: int | None) -> int:
    """``width`` as a Python int (a static argument), the stored length when ``None``."""
    if width is None:
        return int(batch["input_ids"].shape[1])
    if int(width) != width or width < 1:
        raise ValueError(f"width must be a positive integer, got {width!r}")
    return int(width)
