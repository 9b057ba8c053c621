"""The compiled train step: exact loss and gradients, one compilation per batch shape, resets, dtypes."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from icot_jax.models.hf import from_config
from icot_jax.removal import REMOVE_ALL, Curriculum, Schedule, post_removal_lengths, removed_counts
from icot_jax.train.step import StepConfig, TrainStep, init_train_state, make_optimizer, shift_positions, split_model
from icot_jax.train.widths import Widths

VOCAB, EOS = 20, 0


def tiny_gpt2(*, dropout=0.0, dtype=jnp.float32, param_dtype=jnp.float32, seed=0):
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64,
                                     resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                                     bos_token_id=EOS, eos_token_id=EOS)
    return from_config(config, dtype=dtype, param_dtype=param_dtype, seed=seed)


def make_batch(rng, rows, length, *, filler=0, max_cot=8):
    """``rows`` random examples ``q EOS cot EOS ans EOS`` (EOS-padded to ``length``) plus filler rows."""
    input_ids = np.full((rows + filler, length), EOS, np.int32)
    seps = np.zeros((rows + filler, 3), np.int32)
    for i in range(rows):
        q, cot, ans = rng.integers(1, 5), rng.integers(0, max_cot + 1), rng.integers(1, 4)
        body = rng.integers(1, VOCAB, q + cot + ans)
        tokens = [*body[:q], EOS, *body[q:q + cot], EOS, *body[q + cot:], EOS]
        input_ids[i, :len(tokens)] = tokens
        seps[i] = [q, q + cot + 1, len(tokens) - 1]
    input_ids[rows:] = rng.integers(1, VOCAB, (filler, length))  # junk that must not count
    return {"input_ids": input_ids, "seps": seps, "example_mask": np.arange(rows + filler) < rows,
            "index": np.arange(rows + filler, dtype=np.int32)}


def fresh(model, optimizer, seed=0):
    graphdef, params, rest = split_model(model)
    return graphdef, init_train_state(params, rest, optimizer, seed=seed)


def reference_loss(model, batch, n_remove):
    """Token-mean loss of physically shortened, unpadded examples run one at a time (left side)."""
    forward = jax.jit(lambda ids: model(ids, jnp.arange(ids.shape[1])[None], jnp.ones(ids.shape, bool)))
    total, count = 0.0, 0
    for tokens, (q_end, cot_end, last), n, real in zip(batch["input_ids"], batch["seps"], n_remove,
                                                       batch["example_mask"]):
        if not real:
            continue
        kept = np.concatenate([tokens[:q_end + 1], tokens[min(q_end + 1 + n, cot_end):last + 1]])
        log_probs = np.asarray(jax.nn.log_softmax(forward(kept[None])[0]), np.float64)
        targets = range(q_end + 1, len(kept))  # after the first EOS, up to and including the last EOS
        total -= sum(log_probs[j - 1, kept[j]] for j in targets)
        count += len(targets)
    return total / count


def host(tree):
    return jax.tree.map(np.asarray, tree)


def target_count(batch, n_remove, rows=slice(None)):
    """Training targets of the real examples among ``rows`` after removal: CoT left, answer, two EOS."""
    seps, real = batch["seps"][rows], batch["example_mask"][rows]
    return int((seps[:, 2] - seps[:, 0] - removed_counts(seps, n_remove[rows]))[real].sum())


def dtypes(tree):
    return [x.dtype for x in jax.tree.leaves(tree)]


def test_loss_and_accumulated_gradients_match_the_unpadded_reference():
    rng = np.random.default_rng(0)
    model = tiny_gpt2()
    batch = make_batch(rng, rows=7, length=24, filler=1, max_cot=10)
    n_remove = np.array([0, 2, 100, REMOVE_ALL, 5, 1, 3, REMOVE_ALL], np.int32)
    expected = reference_loss(model, batch, n_remove)
    sgd = optax.sgd(1.0)  # new params = params - grads: the update *is* the gradient

    def run(accumulate_steps, width=None):
        graphdef, state = fresh(model, sgd)
        before = host(state.params)
        step = TrainStep(graphdef, sgd, StepConfig(pad_id=EOS, accumulate_steps=accumulate_steps))
        evaluation = host(step.evaluate(state, batch, n_remove, width))
        state, metrics = step(state, batch, n_remove, width)
        return jax.tree.map(lambda b, a: b - a, before, host(state.params)), host(metrics), evaluation

    full, metrics, evaluation = run(1)
    accumulated, accumulated_metrics, _ = run(4)
    narrowest = int(post_removal_lengths(batch["seps"], n_remove)[batch["example_mask"]].max())
    assert narrowest < 24
    narrow, narrow_metrics, narrow_evaluation = run(2, width=narrowest)  # the rows compacted, nothing cut
    assert len({target_count(batch, n_remove, slice(m, None, 4)) for m in range(4)}) > 1  # uneven micro-batches
    for value in (metrics["loss"], accumulated_metrics["loss"], evaluation["loss"], narrow_metrics["loss"],
                  narrow_evaluation["loss"]):
        assert value == pytest.approx(expected, rel=1e-6)
    assert (metrics["batch_width"], narrow_metrics["batch_width"]) == (24, narrowest)
    for f, a, n in zip(jax.tree.leaves(full), jax.tree.leaves(accumulated), jax.tree.leaves(narrow)):
        np.testing.assert_allclose(a, f, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(n, f, rtol=1e-5, atol=1e-7)
    assert metrics["n_target_tokens"] == evaluation["n_target_tokens"] == target_count(batch, n_remove)
    real = batch["example_mask"]
    removed = removed_counts(batch["seps"], n_remove)[real]
    cot = (batch["seps"][:, 1] - batch["seps"][:, 0] - 1)[real]
    assert metrics["mean_removed"] == pytest.approx(removed.mean())
    assert metrics["mean_cot_left"] == pytest.approx((cot - removed).mean())


RESUME_AT = 5  # a checkpoint in the middle of the curriculum, before more resets


@pytest.fixture(scope="module")
def curriculum_run():
    """Tiny GPT-2 (dropout 0.1, AdamW, 2 micro-batches) through a whole curriculum: nothing removed ->
    smoothing and resets -> the remove-all jump, then a second batch shape. Keeps the compiled step, the
    curriculum, the batches, every plan and metric, a mid-run checkpoint and the final state. Each batch
    runs at the smallest of a few output widths that holds it after removal."""
    rng = np.random.default_rng(2)
    batch_size, num_examples = 4, 22
    # E = 6 batches per epoch, S = 1: one more token per batch; remove-all once 7 are scheduled.
    schedule = Schedule(num_examples, batch_size, remove_per_epoch=6, remove_all_when_remove_beyond=7)
    curriculum = Curriculum(schedule, "icot", smoothing_lambda=1.0, reset_optimizer=True, seed=5)
    optimizer = make_optimizer(1e-3)
    graphdef, state = fresh(tiny_gpt2(dropout=0.1), optimizer)
    step = TrainStep(graphdef, optimizer, StepConfig(pad_id=EOS, accumulate_steps=2))
    widths = Widths((8, 12, 16, 24, 32))
    run = {"step": step, "curriculum": curriculum, "widths": widths, "batches": [], "plans": [], "metrics": []}
    prev_cot_left = True
    for index in range(3 * schedule.steps_per_epoch):
        length = 24 if index < 2 * schedule.steps_per_epoch else 32  # a second bucket in the last epoch
        rows = batch_size if (index + 1) % schedule.steps_per_epoch else num_examples % batch_size
        batch = make_batch(rng, rows, length, filler=batch_size - rows)
        if index == RESUME_AT:
            run["checkpoint"] = host(state)
        plan = curriculum.plan(index, batch["seps"], batch["example_mask"], prev_cot_left=prev_cot_left)
        if plan.reset_optimizer:
            state = step.reset_optimizer(state)
        state, metrics = step(state, batch, plan.n_remove, widths.width(plan.batch_length))
        prev_cot_left = plan.cot_left
        for key, value in (("batches", batch), ("plans", plan), ("metrics", host(metrics))):
            run[key].append(value)
    run["final"] = host(state)
    return run


def test_whole_curriculum_compiles_once_per_batch_shape(curriculum_run):
    run = curriculum_run
    shapes = [(batch["input_ids"].shape[1], plan.batch_length) for batch, plan in zip(run["batches"], run["plans"])]
    used = [(stored, run["widths"].width(length)) for stored, length in shapes]
    assert [m["batch_width"] for m in run["metrics"]] == [width for _, width in used]
    assert [m["train_step_compiles"] for m in run["metrics"]] == [len(set(used[:i + 1])) for i in range(len(used))]
    assert run["step"].compiles == len(set(used)) >= 4  # widths shrink with the CoT; a second stored shape
    scheduled = [plan.schedule.scheduled_to_remove for plan in run["plans"]]
    assert scheduled[0] == 0 and scheduled[-1] == math.inf and scheduled == sorted(scheduled)
    resets = [i for i, plan in enumerate(run["plans"]) if plan.reset_optimizer]
    first_all = scheduled.index(math.inf)
    assert len(resets) >= 3 and max(resets) <= first_all
    for batch, plan, metrics in zip(run["batches"], run["plans"], run["metrics"]):
        real = batch["example_mask"]
        assert metrics["mean_removed"] == pytest.approx(removed_counts(batch["seps"], plan.n_remove)[real].mean())
        assert math.isfinite(metrics["loss"])
    assert all(m["mean_cot_left"] == 0 for m in run["metrics"][first_all:])
    assert int(run["final"].step) == len(run["batches"])


def test_resume_mid_curriculum_is_exact(curriculum_run):
    run = curriculum_run
    step, curriculum, batches = run["step"], run["curriculum"], run["batches"]
    previous = batches[RESUME_AT - 1]
    prev_cot_left = curriculum.plan(RESUME_AT - 1, previous["seps"], previous["example_mask"]).cot_left
    state = jax.tree.map(jnp.asarray, run["checkpoint"])
    for index in range(RESUME_AT, len(batches)):
        plan = curriculum.plan(index, batches[index]["seps"], batches[index]["example_mask"],
                               prev_cot_left=prev_cot_left)
        assert plan.reset_optimizer == run["plans"][index].reset_optimizer
        state = step.reset_optimizer(state) if plan.reset_optimizer else state
        state, metrics = step(state, batches[index], plan.n_remove, run["widths"].width(plan.batch_length))
        assert float(metrics["loss"]) == run["metrics"][index]["loss"]  # same dropout masks
        prev_cot_left = plan.cot_left
    for a, b in zip(jax.tree.leaves(run["final"]), jax.tree.leaves(host(state))):
        np.testing.assert_array_equal(a, b)
    # Dropout follows the step in the state: the same params and batch at another step draw other masks.
    moved = jax.tree.map(jnp.asarray, run["checkpoint"]).replace(step=jnp.asarray(RESUME_AT + 1, jnp.int32))
    _, other = step(moved, batches[RESUME_AT], run["plans"][RESUME_AT].n_remove, run["metrics"][RESUME_AT]["batch_width"])
    assert float(other["loss"]) != run["metrics"][RESUME_AT]["loss"]
    assert step.compiles == run["metrics"][-1]["train_step_compiles"]  # resuming compiled nothing new


@pytest.mark.parametrize("dtype, param_dtype", [
    pytest.param("bfloat16", "float32", marks=pytest.mark.slow),  # fp32 grads for fp32 params: the easy case
    ("bfloat16", "bfloat16"),  # the paper's pure bf16: params and AdamW moments in bf16
])
def test_dtypes_are_stable_and_reset_restarts_the_optimizer(dtype, param_dtype):
    rng = np.random.default_rng(3)
    optimizer = make_optimizer(1e-3)
    graphdef, state = fresh(tiny_gpt2(dtype=dtype, param_dtype=param_dtype), optimizer)
    initial = dtypes(state)
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(param_dtype)}
    step = TrainStep(graphdef, optimizer, StepConfig(pad_id=EOS, accumulate_steps=2))
    for index in range(2):
        state, metrics = step(state, make_batch(rng, 4, 24), np.full(4, index, np.int32))
        assert math.isfinite(float(metrics["loss"]))
    params = host(state.params)
    state = step.reset_optimizer(state)
    assert int(state.step) == 2  # the global step survives; the optimizer's own count restarts
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(host(state.params))):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(host(optimizer.init(state.params))), jax.tree.leaves(host(state.opt_state))):
        np.testing.assert_array_equal(a, b)
    state, _ = step(state, make_batch(rng, 4, 24), np.full(4, REMOVE_ALL, np.int32))
    assert dtypes(state) == initial
    assert step.compiles == 1


def test_evaluate_is_deterministic_and_sums_add_up():
    rng = np.random.default_rng(5)
    graphdef, state = fresh(tiny_gpt2(dropout=0.3), make_optimizer(1e-3))
    step = TrainStep(graphdef, make_optimizer(1e-3), StepConfig(pad_id=EOS))
    batch, n_remove = make_batch(rng, 4, 24, filler=2), np.array([0, 1, 2, REMOVE_ALL, 0, 0], np.int32)
    first, second = host(step.evaluate(state, batch, n_remove)), host(step.evaluate(state, batch, n_remove))
    assert all(first[key] == second[key] for key in first)
    assert first["loss"] == pytest.approx(first["loss_sum"] / first["n_target_tokens"])
    assert first["token_accuracy"] == pytest.approx(first["n_correct"] / first["n_target_tokens"])
    assert step.compiles == 0


def test_explicit_shardings_and_ahead_of_time_lowering():
    rng = np.random.default_rng(7)
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    optimizer = make_optimizer(1e-3)
    graphdef, state = fresh(tiny_gpt2(), optimizer)
    replicated, by_row = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("data"))
    step = TrainStep(graphdef, optimizer, StepConfig(pad_id=EOS), state_sharding=jax.tree.map(lambda _: replicated, state),
                     batch_sharding=by_row)
    batch, n_remove = make_batch(rng, 4, 24), np.zeros(4, np.int32)

    def abstract(tree, sharding):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)

    step.lower(abstract(state, replicated), abstract(batch, by_row), abstract(n_remove, by_row))
    # Inputs placed as declared; a differently placed input would be a new signature (and compilation).
    state, batch, n_remove = jax.device_put((state, batch, n_remove), (replicated, by_row, by_row))
    state, metrics = step(state, batch, n_remove)
    assert step.compiles == 1  # the abstract lowering is the very program the real call runs
    assert all(x.sharding == replicated for x in jax.tree.leaves(state))
    assert math.isfinite(float(metrics["loss"]))


def test_bad_batches_are_named():
    graphdef, state = fresh(tiny_gpt2(), make_optimizer(1e-3))
    step = TrainStep(graphdef, make_optimizer(1e-3), StepConfig(pad_id=EOS, accumulate_steps=3))
    batch = make_batch(np.random.default_rng(8), 4, 24)
    with pytest.raises(KeyError, match="seps"):
        step.evaluate(state, {k: v for k, v in batch.items() if k != "seps"}, np.zeros(4, np.int32))
    with pytest.raises(ValueError, match="width must be a positive integer"):
        step.evaluate(state, batch, np.zeros(4, np.int32), 0)
    with pytest.raises(TypeError, match=r"batch\['input_ids'\] must be int32"):
        step.evaluate(state, {**batch, "input_ids": batch["input_ids"].astype(np.int64)}, np.zeros(4, np.int32))
    with pytest.raises(TypeError, match="n_remove must hold integers"):
        step.evaluate(state, batch, np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="n_remove"):
        step.evaluate(state, batch, np.zeros(5, np.int32))
    with pytest.raises(ValueError, match="accumulate_steps=3"):
        step(state, batch, np.zeros(4, np.int32))


def test_removal_counts_accept_any_integer_array_like():
    """A list, int64 NumPy and int32 JAX counts give the same result; host counts of any integer type
    share one compiled program."""
    graphdef, state = fresh(tiny_gpt2(), make_optimizer(1e-3))
    step = TrainStep(graphdef, make_optimizer(1e-3), StepConfig(pad_id=EOS))
    batch = make_batch(np.random.default_rng(8), 4, 24)
    counts = [0, 1, 2, 3]
    results = [step.evaluate(state, batch, n) for n in (counts, np.array(counts, np.int64), np.array(counts, np.uint8))]
    assert step.eval_step._eval._cache_size() == 1
    results.append(step.evaluate(state, batch, jnp.array(counts)))
    for result in results[1:]:
        assert float(result["loss_sum"]) == float(results[0]["loss_sum"])


def test_warmup_ramps_the_lr_and_restarts_after_an_optimizer_reset():
    optimizer = make_optimizer(0.1, weight_decay=0.0, max_grad_norm=1e9, warmup_steps=4)
    params = {"w": jnp.zeros(3)}
    grads = {"w": jnp.ones(3)}

    def sizes(opt_state, n):
        out = []
        for _ in range(n):
            updates, opt_state = optimizer.update(grads, opt_state, params)
            out.append(float(jnp.abs(updates["w"][0])))
        return out

    ramp = sizes(optimizer.init(params), 6)
    np.testing.assert_allclose(ramp, [0.0, 0.025, 0.05, 0.075, 0.1, 0.1], rtol=1e-4)  # Adam: g/(|g|+eps)
    assert sizes(optimizer.init(params), 2) == ramp[:2]  # a reset is a fresh state: the ramp starts again
    with pytest.raises(ValueError, match="warmup_steps"):
        make_optimizer(0.1, warmup_steps=-1)


def test_random_position_shift_moves_whole_rows_within_bounds():
    positions = jnp.tile(jnp.arange(10, dtype=jnp.int32), (64, 1))
    shifted = shift_positions(positions, 7, jax.random.PRNGKey(3))
    offsets = np.asarray(shifted - positions)
    assert (offsets == offsets[:, :1]).all()  # one offset per row: relative positions are unchanged
    assert offsets.min() == 0 and offsets.max() == 7 and len(np.unique(offsets[:, 0])) == 8
    again = shift_positions(positions, 7, jax.random.PRNGKey(3))
    np.testing.assert_array_equal(shifted, again)  # a pure function of the step's key (exact resume)


def test_lr_scale_scales_the_update_without_recompiling():
    """``lr_scale`` multiplies the whole update (weight decay included): 1.0 runs the unscaled program
    (no bit changes), 0.5 halves the update, 0 leaves the parameters as they were while the optimizer
    state still moves; every scale but 1.0 shares one more compilation."""
    optimizer = make_optimizer(1e-2, weight_decay=0.1)
    step = TrainStep(fresh(tiny_gpt2(), optimizer)[0], optimizer, StepConfig(pad_id=EOS))
    batch = make_batch(np.random.default_rng(3), 4, 24)
    counts = np.array([0, 1, 2, 3], np.int32)

    def update(scale=None):
        _, state = fresh(tiny_gpt2(), optimizer)
        before = host(state.params)
        state, _ = step(state, batch, counts) if scale is None else step(state, batch, counts, lr_scale=scale)
        return before, host(state.params), host(state.opt_state)

    before, default, default_opt = update()
    for scale in (1.0, 0.5, 0.0, 0.25):
        _, after, opt = update(scale)
        for b, d, a in zip(jax.tree.leaves(before), jax.tree.leaves(default), jax.tree.leaves(after)):
            if scale == 1.0:
                np.testing.assert_array_equal(a, d)
            else:
                np.testing.assert_allclose(a - b, scale * (d - b), rtol=1e-5, atol=1e-7)
        for d, o in zip(jax.tree.leaves(default_opt), jax.tree.leaves(opt)):
            np.testing.assert_array_equal(d, o)  # the moments do not depend on the scale
    assert step.compiles == 2


def test_answer_token_accuracy_counts_the_answer_targets_alone():
    """``answer_metrics``: the token accuracy over the answer and its EOS, as physically shortened rows give
    it; the same in the train step (pre-update, accumulated over micro-batches) and in the evaluation step."""
    rng = np.random.default_rng(11)
    model = tiny_gpt2()
    batch, n_remove = make_batch(rng, 6, 24, filler=2), np.array([0, 1, 3, REMOVE_ALL, 2, 0, 0, 0], np.int32)
    forward = jax.jit(lambda ids: model(ids, jnp.arange(ids.shape[1])[None], jnp.ones(ids.shape, bool)))
    correct = total = 0
    for tokens, (q_end, cot_end, last), n, real in zip(batch["input_ids"], batch["seps"], n_remove,
                                                       batch["example_mask"]):
        if not real:
            continue
        kept = np.concatenate([tokens[:q_end + 1], tokens[min(q_end + 1 + n, cot_end):last + 1]])
        predicted = np.asarray(forward(kept[None])[0]).argmax(-1)
        answer_start = q_end + 1 + max(cot_end - q_end - 1 - n, 0) + 1  # the first token after the second EOS
        correct += sum(predicted[j - 1] == kept[j] for j in range(answer_start, len(kept)))
        total += len(kept) - answer_start

    graphdef, state = fresh(model, make_optimizer(1e-3))
    plain = TrainStep(graphdef, make_optimizer(1e-3), StepConfig(pad_id=EOS))
    assert "answer_token_accuracy" not in plain.evaluate(state, batch, n_remove)
    step = TrainStep(graphdef, make_optimizer(1e-3), StepConfig(pad_id=EOS, answer_metrics=True, accumulate_steps=2))
    evaluated = host(step.evaluate(state, batch, n_remove))
    _, trained = step(state, batch, n_remove)  # donates the state (and the model's arrays): last
    assert evaluated["answer_token_accuracy"] == pytest.approx(correct / total)
    assert float(trained["answer_token_accuracy"]) == pytest.approx(correct / total)
