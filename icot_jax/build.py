"""The one place that turns a config into what a run trains with: tokenizer and data, the model's
transformers config, the model, its sharded train state, the compiled step, the curriculum, the loader
and the output widths.

``icot train``, ``icot aot``, ``bench/`` and research code all build through these functions, so what
``icot aot`` compiles is exactly the step a run executes (the run's vocabulary, widths, dtypes, mesh,
remat). Each function is small and usable on its own (see docs/research.md)::

    config = load_config("configs/cpu/mult_2x2_tiny_icot.yaml")
    trainer = build.build_trainer(config, run_dir)       # data, model, state, step, curriculum, loader
    # or piece by piece:
    model = build.build_model(config, tokenizer)          # an NNX model, configured (remat, scan, ...)

Model configs: ``model.hf`` names a local folder, a hub repository (the local cache is tried first, then
:data:`BUILTIN_HF_CONFIGS`, so the paper's models resolve offline, then the hub) or nothing (then
``model.family`` with its defaults). ``model.overrides`` are applied on top, and a from-scratch model takes
its vocabulary and special tokens from the run's tokenizer -- the built-in tokenizer's 17 tokens, not
GPT-2's 50,257.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import optax
from flax import nnx

from icot_jax import adaptive, sharding
from icot_jax.adaptive import AdaptiveRule
from icot_jax.config import Config, MeshConfig
from icot_jax.data.formats import read_examples
from icot_jax.data.loader import BatchLoader
from icot_jax.data.tokenize import (EncodedDataset, OverlengthError, encode_examples, load_tokenizer,
                                    save_builtin_tokenizer)
from icot_jax.errors import UserError
from icot_jax.removal import Curriculum, Schedule
from icot_jax.train.step import StepConfig, TrainState, TrainStep, init_train_state, optimizer_for, split_model
from icot_jax.train.widths import Widths, plan_widths

BUILTIN_HF_CONFIGS: dict[str, dict[str, Any]] = {
    # config.json of each hub repository (architecture fields), for hosts that cannot reach the hub.
    "mistralai/Mistral-7B-v0.1": dict(
        model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, hidden_act="silu", max_position_embeddings=32768,
        rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=4096, tie_word_embeddings=False,
        initializer_range=0.02, bos_token_id=1, eos_token_id=2),
    "microsoft/Phi-3-mini-4k-instruct": dict(
        model_type="phi3", vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, hidden_act="silu", max_position_embeddings=4096,
        original_max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None,
        sliding_window=2047, attention_dropout=0.0, embd_pdrop=0.0, resid_pdrop=0.0, tie_word_embeddings=False,
        initializer_range=0.02, bos_token_id=1, eos_token_id=32000, pad_token_id=32000),
    "gpt2": dict(
        model_type="gpt2", vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
        activation_function="gelu_new", layer_norm_epsilon=1e-5, embd_pdrop=0.1, attn_pdrop=0.1, resid_pdrop=0.1,
        initializer_range=0.02, bos_token_id=50256, eos_token_id=50256),
    "gpt2-medium": dict(
        model_type="gpt2", vocab_size=50257, n_positions=1024, n_embd=1024, n_layer=24, n_head=16,
        activation_function="gelu_new", layer_norm_epsilon=1e-5, embd_pdrop=0.1, attn_pdrop=0.1, resid_pdrop=0.1,
        initializer_range=0.02, bos_token_id=50256, eos_token_id=50256),
}
BUILTIN_HF_CONFIGS["openai-community/gpt2"] = BUILTIN_HF_CONFIGS["gpt2"]
BUILTIN_HF_CONFIGS["openai-community/gpt2-medium"] = BUILTIN_HF_CONFIGS["gpt2-medium"]


def model_hf_config(config, tokenizer: Any = None):
    """The transformers config of ``config.model`` (a run :class:`~icot_jax.config.Config`), without
    downloading weights (see the module docs). ``tokenizer`` is required for a from-scratch model."""
    import transformers

    m = config.model
    if m.hf is None:
        hf_config = transformers.AutoConfig.for_model(m.family)
    else:
        try:
            hf_config = transformers.AutoConfig.from_pretrained(m.hf, local_files_only=True)
        except OSError:
            builtin = BUILTIN_HF_CONFIGS.get(m.hf)
            hf_config = (transformers.AutoConfig.from_pretrained(m.hf) if builtin is None else
                         transformers.AutoConfig.for_model(**builtin))
    for key, value in m.overrides.items():
        if not hasattr(hf_config, key):
            raise UserError(f"model.overrides.{key}: {type(hf_config).__name__} has no field '{key}'")
        setattr(hf_config, key, value)
    if m.from_scratch:
        if tokenizer is None:
            raise UserError("model.from_scratch: the model's vocabulary comes from the run's tokenizer; pass it")
        hf_config.vocab_size = len(tokenizer)
        hf_config.eos_token_id = tokenizer.eos_token_id
        bos = tokenizer.bos_token_id
        hf_config.bos_token_id = bos if bos is not None else tokenizer.eos_token_id
    return hf_config


# ----------------------------------------------------------------------------------------------------
# Data, curriculum, widths


@dataclasses.dataclass
class RunData:
    """Tokenizer and encoded splits of a run (``test`` may be None)."""

    tokenizer: Any
    train: EncodedDataset
    valid: EncodedDataset | None
    test: EncodedDataset | None


def generate_data(config: Config, run_dir: Path) -> dict[str, str]:
    """Built-in K×K multiplication data written under ``run_dir/data`` (CPU demos, tests)."""
    from icot_jax.data.multiplication import write_dataset

    d = config.data
    out = run_dir / "data"
    if not (out / "train.txt").exists():
        write_dataset(out, [d.generate_digits], {"train": d.generate_train, "valid": d.generate_valid},
                      seed=d.generate_seed, exclude_files=[p for p in (d.valid, d.test) if p])
    generated_valid = str(out / "valid.txt") if d.generate_valid else None
    return {"train": str(out / "train.txt"), "valid": d.valid or generated_valid, "test": d.test}


def build_data(config: Config, run_dir: str | Path) -> RunData:
    """Load the tokenizer (saved into ``run_dir/tokenizer``) and encode train/valid/test (generated
    multiplication data is written under ``run_dir/data``)."""
    d = config.data
    run_dir = Path(run_dir)
    tokenizer_dir = run_dir / "tokenizer"
    if not tokenizer_dir.exists():
        if d.tokenizer == "builtin":
            save_builtin_tokenizer(tokenizer_dir)
        else:
            load_tokenizer(d.tokenizer).save_pretrained(str(tokenizer_dir))
    tokenizer = load_tokenizer(tokenizer_dir)
    files = {"train": d.train, "valid": d.valid, "test": d.test}
    if d.generate_digits and not d.train:
        files = generate_data(config, run_dir)
    on_error = "raise" if d.on_malformed == "error" else "skip"

    def encode(split: str, limit: int | None) -> EncodedDataset | None:
        if not files[split]:
            return None
        parsed = read_examples(files[split], on_error=on_error)
        try:
            return encode_examples(parsed.examples[:limit], tokenizer, mode=d.join, max_length=d.max_length,
                                   buckets=d.buckets or None, on_overlength=d.too_long, source=files[split])
        except OverlengthError as error:
            raise UserError(f"{files[split]}:{parsed.line_numbers[error.first]}: the first of {error.detail}; "
                             "raise data.max_length / data.buckets or set data.too_long=skip") from None

    return RunData(tokenizer, encode("train", d.max_train_examples), encode("valid", d.max_eval_examples),
                   encode("test", d.max_eval_examples))


def build_curriculum(config: Config, n_train: int) -> Curriculum:
    """The run's curriculum (schedule, smoothing, resets, length skip) from its config and training-set size."""
    t = config.train
    schedule = Schedule(num_examples=n_train, batch_size=t.batch_size, remove_per_epoch=t.remove_per_epoch,
                        pretrain_epochs=t.pretrain_epochs, remove_start_from=t.remove_start_from,
                        remove_all_when_remove_beyond=t.remove_all_when_remove_beyond)
    return Curriculum(schedule=schedule, mode=t.mode, smoothing_lambda=t.removal_smoothing_lambda,
                      reset_optimizer=t.reset_optimizer, seed=t.seed, max_len_train=t.max_len_train)


def build_loader(config: Config, data: EncodedDataset, setup: sharding.Setup | None = None) -> BatchLoader:
    """The training loader: shuffled by ``train.seed``; with ``setup``, this host's rows of each batch."""
    t = config.train
    rows = setup.host_rows(t.batch_size) if setup is not None else {"process_index": 0, "process_count": 1}
    return BatchLoader(data, t.batch_size, seed=t.seed, **rows)


def build_widths(config: Config, curriculum: Curriculum, loader: BatchLoader) -> Widths:
    """The run's output widths (``train.length_buckets`` or chosen from the data; see
    :func:`icot_jax.train.widths.plan_widths`), the same on every host."""
    t = config.train
    loader = loader.global_view()
    return plan_widths(curriculum, loader, loader.steps_per_epoch * t.epochs, multiple=t.length_multiple,
                       buckets=t.length_buckets)


# ----------------------------------------------------------------------------------------------------
# Model and train state


def configure_model(model: nnx.Module, mesh: MeshConfig) -> nnx.Module:
    """``model`` with ``mesh.remat``, ``mesh.scan_layers`` and ``mesh.materialize_cotangents`` applied (in
    place; returned). None changes a parameter or its path, only the graphdef, so checkpoints, Hugging
    Face key maps and sharding rules are unaffected."""
    model = model.set_remat(mesh.remat).set_scan_layers(mesh.scan_layers)
    return model.set_materialize_cotangents(mesh.materialize_cotangents)


def model_factory(config: Config, hf_config: Any, *, seed: int | None = None) -> Callable[[], nnx.Module]:
    """A function that builds ``config``'s randomly initialised model from ``hf_config`` (configured)."""
    from icot_jax.models import hf

    m = config.model
    seed = config.train.seed if seed is None else seed

    def make() -> nnx.Module:
        model = hf.from_config(hf_config, dtype=m.dtype, param_dtype=m.param_dtype, seed=seed)
        return configure_model(model, config.mesh)

    return make


def build_model(config: Config, tokenizer: Any = None, *, setup: sharding.Setup | None = None) -> nnx.Module:
    """``config``'s model as training starts it: random (``model.from_scratch``, seeded by ``train.seed``)
    or the pretrained weights of ``model.hf``; configured (see :func:`configure_model`). With ``setup``,
    every array is created directly in its shards on that mesh."""
    setup = setup or sharding.setup(config.mesh)
    if config.model.from_scratch:
        make = model_factory(config, model_hf_config(config, tokenizer))
        abstract = nnx.eval_shape(make)
        graphdef, state = nnx.split(abstract)
        state_sharding = setup.shardings(state)
        return nnx.merge(graphdef, jax.jit(lambda: nnx.state(make()), out_shardings=state_sharding)())
    m = config.model
    model, _ = load_pretrained(m.hf, setup, dtype=m.dtype, param_dtype=m.param_dtype)
    return configure_model(model, config.mesh)


def load_pretrained(path_or_name: str, setup: sharding.Setup, *, dtype: str = "float32",
                    param_dtype: str = "float32"):
    """``(model, hf_config)`` of a Hugging Face checkpoint with every tensor read straight into its
    shards on ``setup`` (see :func:`icot_jax.models.hf.load_pretrained`)."""
    import transformers

    from icot_jax.models import hf

    hf_config = transformers.AutoConfig.from_pretrained(hf.resolve_checkpoint(path_or_name))
    abstract = nnx.eval_shape(lambda: hf.from_config(hf_config, dtype=dtype, param_dtype=param_dtype))
    param_shardings = setup.shardings(nnx.state(abstract, nnx.Param))
    return hf.load_pretrained(path_or_name, dtype=dtype, param_dtype=param_dtype, shardings=param_shardings)


def abstract_state(setup: sharding.Setup, make_model: Callable[[], nnx.Module], optimizer: optax.GradientTransformation,
                   *, seed: int) -> tuple[nnx.GraphDef, TrainState]:
    """``(graphdef, state)`` with ``jax.ShapeDtypeStruct`` leaves: shapes only, nothing allocated."""
    graphdef, params, rest = split_model(nnx.eval_shape(make_model))
    return graphdef, jax.eval_shape(lambda p, r: init_train_state(p, r, optimizer, seed=seed), params, rest)


def init_state(setup: sharding.Setup, make_model: Callable[[], nnx.Module], optimizer: optax.GradientTransformation,
               *, seed: int) -> tuple[nnx.GraphDef, TrainState]:
    """A freshly initialised, sharded train state: ``(graphdef, state)``.

    ``make_model()`` runs once abstractly to find every array's shape and sharding, then under
    ``jax.jit`` with those ``out_shardings``: each device computes only its own shards of parameters and
    optimizer state. The values equal an unsharded initialisation's (JAX's PRNG does not depend on
    sharding).
    """
    def init() -> TrainState:
        _, params, rest = split_model(make_model())
        return init_train_state(params, rest, optimizer, seed=seed)

    graphdef, abstract = abstract_state(setup, make_model, optimizer, seed=seed)
    return graphdef, jax.jit(init, out_shardings=setup.shardings(abstract))()


def state_from_model(setup: sharding.Setup, model: nnx.Module, optimizer: optax.GradientTransformation, *,
                     seed: int, donate: bool = False) -> tuple[nnx.GraphDef, TrainState]:
    """``(graphdef, state)`` around an existing model, its parameters resharded to the rules if needed
    and the optimizer state created directly in its shards.

    The state holds *copies* of the model's arrays, so ``model`` keeps working, unless ``donate=True``
    (what ``icot train`` does with a 7B checkpoint, to hold it once): then the model's arrays are deleted
    and the model must not be used afterwards.
    """
    graphdef, params, rest = split_model(model)

    def init(params, rest):
        return init_train_state(params, rest, optimizer, seed=seed)

    state_sharding = setup.shardings(jax.eval_shape(init, params, rest))
    init = jax.jit(init, in_shardings=(state_sharding.params, state_sharding.rest), out_shardings=state_sharding,
                   donate_argnums=(0, 1) if donate else ())
    return graphdef, init(params, rest)


def build_state(config: Config, tokenizer: Any, setup: sharding.Setup, optimizer: optax.GradientTransformation, *,
                abstract: bool = False) -> tuple[nnx.GraphDef, TrainState, Any]:
    """``(graphdef, state, hf_config)``: the initial train state of ``config`` (random init or HF weights),
    created directly in its shards on ``setup``'s mesh; with ``abstract=True`` shapes only (``icot aot``)."""
    seed = config.train.seed
    if config.model.from_scratch or abstract:
        hf_config = model_hf_config(config, tokenizer)
        make = model_factory(config, hf_config)
        graphdef, state = (abstract_state if abstract else init_state)(setup, make, optimizer, seed=seed)
    else:
        m = config.model
        model, hf_config = load_pretrained(m.hf, setup, dtype=m.dtype, param_dtype=m.param_dtype)
        graphdef, state = state_from_model(setup, configure_model(model, config.mesh), optimizer, seed=seed,
                                           donate=True)
    if tokenizer is not None and hf_config.vocab_size < len(tokenizer):
        raise UserError(f"model.hf: vocabulary of {hf_config.vocab_size} < tokenizer's {len(tokenizer)} tokens")
    return graphdef, state, hf_config


# ----------------------------------------------------------------------------------------------------
# The step and the whole trainer


def step_config(config: Config, pad_id: int) -> StepConfig:
    """The :class:`~icot_jax.train.step.StepConfig` of ``config.train`` (``pad_id``: the tokenizer's EOS)."""
    t = config.train
    answer_metrics = t.schedule == "adaptive" and t.adaptive_signal == "answer_token_accuracy"
    return StepConfig(pad_id=pad_id, side=t.removal_side, keep_position=t.keep_position,
                      accumulate_steps=t.accumulate_steps, random_position_shift=t.random_position_shift,
                      answer_metrics=answer_metrics)


def build_step(config: Config, graphdef: nnx.GraphDef, state: TrainState, setup: sharding.Setup, *,
               pad_id: int) -> TrainStep:
    """The run's compiled train step, sharded like ``state`` and the batches on ``setup``."""
    return TrainStep(graphdef, optimizer_for(config.train), step_config(config, pad_id),
                     state_sharding=setup.shardings(state), batch_sharding=setup.batch_sharding)


def check_batch_sizes(config: Config, setup: sharding.Setup, *, evaluation: bool = True) -> None:
    """Raise naming the key unless the train micro-batch (and with ``evaluation`` the eval batch) splits
    evenly over the mesh's batch axes."""
    t = config.train
    setup.check_batch_size(t.batch_size // t.accumulate_steps, "train.batch_size / train.accumulate_steps")
    if evaluation:
        setup.check_batch_size(config.eval.batch_size, "eval.batch_size")


def check_position_table(model_config: Any, width: int, shift: int) -> None:
    """A learned position table must hold the longest training row plus ``train.random_position_shift``
    (JAX clamps out-of-range gathers silently)."""
    n_positions = getattr(model_config, "n_positions", None)
    if n_positions is not None and width + shift > n_positions:
        raise UserError(f"training rows of {width} tokens shifted by up to train.random_position_shift={shift} "
                        f"need {width + shift} positions; the model has {n_positions} (model.overrides.n_positions)")


@dataclasses.dataclass
class Trainer:
    """What a run trains with: data, mesh, the compiled step, the initial state, curriculum and loader."""

    data: RunData
    setup: sharding.Setup
    hf_config: Any
    graphdef: nnx.GraphDef
    step: TrainStep
    state: TrainState
    curriculum: Curriculum
    loader: BatchLoader
    widths: Widths
    """Output widths of the train step (one compilation each)."""
    schedule_rule: AdaptiveRule | None = None
    """The adaptive schedule's rule (``train.schedule: adaptive``); None for the fixed schedule."""


def build_trainer(config: Config, run_dir: Path) -> Trainer:
    """Prepare data (under ``run_dir``) and model, and build the train step and a fresh train state."""
    setup = sharding.setup(config.mesh)
    check_batch_sizes(config, setup)
    data = build_data(config, run_dir)
    graphdef, state, hf_config = build_state(config, data.tokenizer, setup, optimizer_for(config.train))
    check_position_table(hf_config, data.train.buckets[-1], config.train.random_position_shift)
    curriculum = build_curriculum(config, len(data.train))
    loader = build_loader(config, data.train, setup)
    rule = adaptive.rule_for(config.train, curriculum.schedule, longest_cot=int(data.train.cot_lengths.max()))
    return Trainer(data=data, setup=setup, hf_config=hf_config, graphdef=graphdef,
                   step=build_step(config, graphdef, state, setup, pad_id=data.train.pad_id), state=state,
                   curriculum=curriculum, loader=loader, widths=build_widths(config, curriculum, loader),
                   schedule_rule=rule)
