"""The KV-cached batched decoder against full-recompute greedy decoding, stopping, compilation count."""

from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx

from icot_jax.data.formats import Example
from icot_jax.generate import (
    DecodeSettings,
    Decoder,
    GenerationEvaluator,
    auto_batch_size,
    greedy_decode_naive,
    left_pad_prompts,
)
from icot_jax.data.tokenize import encode_examples
from icot_jax.models.hf import from_config

VOCAB = 8
EOS = VOCAB - 1
# A large init makes random logits peaked, so float rounding between the two decoders never flips an argmax.
TINY = dict(vocab_size=VOCAB, bos_token_id=EOS, eos_token_id=EOS, initializer_range=0.5)
CONFIGS = {
    "gpt2": transformers.GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=4, **TINY),
    "llama": transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      **TINY),
    # A window shorter than the sequences: the cache must apply it to positions despite the left padding.
    "mistral": transformers.MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, sliding_window=3,
                                          max_position_embeddings=64, **TINY),
    # Fused qkv / gate-up projections and partial rotary; its padding row is EOS, as in Phi-3.
    "phi3": transformers.Phi3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, partial_rotary_factor=0.5, max_position_embeddings=64,
                                    pad_token_id=EOS, **TINY),
}


def left_pad(prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    width = max(map(len, prompts))
    ids, mask = np.full((len(prompts), width), EOS, np.int32), np.zeros((len(prompts), width), bool)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):], mask[row, width - len(prompt):] = prompt, True
    return ids, mask


def decode(model, prompts, settings, active=None, position_gap=None):
    graphdef, state = nnx.split(model)
    decoder = Decoder(graphdef, eos_id=EOS, settings=settings)
    return decoder(state, *left_pad(prompts), active, position_gap=position_gap)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model(request):
    return from_config(CONFIGS[request.param], seed=3)


@pytest.fixture(scope="module")
def gpt2():
    """For behaviour that does not depend on the model family."""
    return from_config(CONFIGS["gpt2"], seed=3)


class ForcedEos(nnx.Module):
    """Wraps a model and forces EOS after every position ``p`` with ``(p + 1) % period == 0``, so that rows
    of a random model stop on schedule (it would rarely emit two EOS on its own) and at different steps."""

    def __init__(self, model, period: int):
        self.model, self.period = model, period

    def _force(self, logits, position_ids):
        forced = ((position_ids + 1) % self.period == 0)[..., None] & (jnp.arange(logits.shape[-1]) == EOS)
        return jnp.where(forced, 1e4, logits)

    def __call__(self, input_ids, position_ids, attention_mask, *, dropout_key=None):
        return self._force(self.model(input_ids, position_ids, attention_mask, dropout_key=dropout_key), position_ids)

    def init_cache(self, batch_size, max_length):
        return self.model.init_cache(batch_size, max_length)

    def decode(self, input_ids, position_ids, attention_mask, cache):
        logits, cache = self.model.decode(input_ids, position_ids, attention_mask, cache)
        return self._force(logits, position_ids), cache


RAGGED = [[1, 2, 3, 4, 5, 6], [3], [0, 6, 2, 5], [4, 4, 1, 0, 2, 3, 6, 1, 5]]
MAX_NEW = 10


def test_cached_decoder_matches_full_recompute_on_ragged_batch(model):
    stopping = ForcedEos(model, period=6)
    # A 3-token first cache stage: rows continue across the cache growth (the other tests use one stage).
    decoded = decode(stopping, RAGGED, DecodeSettings(max_new_tokens=MAX_NEW, short_cache_tokens=3))
    expected = greedy_decode_naive(stopping, RAGGED, eos_id=EOS, max_new_tokens=MAX_NEW)
    assert [row[:n].tolist() for row, n in zip(decoded.tokens, decoded.n_generated)] == expected
    # Rows stop at different steps, so the comparison covers the per-row stopping rule.
    assert len(set(decoded.n_generated.tolist())) > 1 and decoded.n_generated.min() < MAX_NEW
    assert decoded.n_steps > 3  # some row went on after the cache grew
    for tokens, n in zip(decoded.tokens, decoded.n_generated):
        generated = tokens[:n].tolist()
        if n < MAX_NEW:
            assert generated.count(EOS) == 2 and generated[-1] == EOS
        else:
            assert generated[:-1].count(EOS) < 2
        assert (tokens[n:] == EOS).all()  # finished rows are padded with EOS
    assert decoded.n_steps == decoded.n_generated.max()


def test_position_gap_continues_at_the_kept_positions(gpt2):
    """keep_position models: generated tokens sit `gap` positions after the prompt (cache vs recompute)."""
    gaps = [0, 3, 7, 1]
    settings = DecodeSettings(max_new_tokens=MAX_NEW, stop_after_eos=None)
    decoded = decode(gpt2, RAGGED, settings, position_gap=np.array(gaps))
    expected = greedy_decode_naive(gpt2, RAGGED, eos_id=EOS, max_new_tokens=MAX_NEW, stop_after_eos=None,
                                   position_gaps=gaps)
    assert decoded.tokens.tolist() == expected
    assert decoded.tokens.tolist() != decode(gpt2, RAGGED, settings).tokens.tolist()  # the gap is used
    with pytest.raises(ValueError, match="position_gap"):
        decode(gpt2, RAGGED, settings, position_gap=np.array([1, 2]))


def test_keep_position_gaps_clip_to_each_cot():
    from icot_jax.generate import keep_position_gaps
    from icot_jax.removal import REMOVE_ALL

    data = SimpleNamespace(seps=np.array([[3, 10, 14], [2, 4, 6], [5, 6, 8]]))  # CoT lengths 6, 1, 0
    assert keep_position_gaps(data, 2).tolist() == [2, 1, 0]
    assert keep_position_gaps(data, REMOVE_ALL).tolist() == [6, 1, 0]


def test_without_stopping_every_row_generates_max_new_tokens(model):
    decoded = decode(model, RAGGED, DecodeSettings(max_new_tokens=MAX_NEW, stop_after_eos=None))
    assert decoded.n_generated.tolist() == [MAX_NEW] * len(RAGGED)
    expected = greedy_decode_naive(model, RAGGED, eos_id=EOS, max_new_tokens=MAX_NEW, stop_after_eos=None)
    assert decoded.tokens.tolist() == expected


def test_inactive_rows_generate_nothing(gpt2):
    decoded = decode(gpt2, RAGGED, DecodeSettings(max_new_tokens=MAX_NEW, stop_after_eos=None),
                     active=np.array([True, False, True, False]))
    assert decoded.n_generated.tolist() == [MAX_NEW, 0, MAX_NEW, 0]
    assert (decoded.tokens[[1, 3]] == EOS).all()
    expected = greedy_decode_naive(gpt2, RAGGED[::2], eos_id=EOS, max_new_tokens=MAX_NEW, stop_after_eos=None)
    assert decoded.tokens[::2].tolist() == expected


def test_top_1_sampling_is_greedy_and_sampling_depends_on_the_key(gpt2):
    greedy = greedy_decode_naive(gpt2, RAGGED, eos_id=EOS, max_new_tokens=MAX_NEW, stop_after_eos=None)
    top1 = decode(gpt2, RAGGED, DecodeSettings(max_new_tokens=MAX_NEW, stop_after_eos=None, temperature=1.0, top_k=1))
    assert top1.tokens.tolist() == greedy
    graphdef, state = nnx.split(gpt2)
    sampler = Decoder(graphdef, eos_id=EOS, settings=DecodeSettings(max_new_tokens=MAX_NEW, stop_after_eos=None,
                                                                    temperature=2.0))
    ids, mask = left_pad(RAGGED)
    draws = [sampler(state, ids, mask, key=jax.random.key(seed)).tokens for seed in (0, 0, 1)]
    np.testing.assert_array_equal(draws[0], draws[1])
    assert (draws[0] != draws[2]).any()


class ScriptedLM(nnx.Module):
    """Predicts ``script[p + 1]`` after the token at position ``p``, whatever the tokens: known outputs."""

    def __init__(self, script: list[int], vocab_size: int):
        self.script = nnx.Variable(jnp.asarray(script, jnp.int32))
        self.vocab_size = vocab_size

    def _logits(self, position_ids):
        script = self.script[...]
        return 10.0 * jax.nn.one_hot(script[jnp.minimum(position_ids + 1, len(script) - 1)], self.vocab_size)

    def __call__(self, input_ids, position_ids, attention_mask, *, dropout_key=None):
        return self._logits(position_ids)

    def init_cache(self, batch_size, max_length):
        return jnp.zeros((batch_size, max_length))

    def decode(self, input_ids, position_ids, attention_mask, cache):
        return self._logits(position_ids), cache


@pytest.fixture(scope="module")
def scripted(builtin_tokenizer):
    """A scripted model emitting, from position 6 on: ``1 2 EOS #### 5 6 EOS 9 9 ...``."""
    ids = builtin_tokenizer.convert_tokens_to_ids
    eos = builtin_tokenizer.eos_token_id
    script = [0] * 6 + [ids("1"), ids("2"), eos, ids("####"), ids("5"), ids("6"), eos] + [ids("9")] * 20
    return ScriptedLM(script, len(builtin_tokenizer))


def test_loop_exits_when_every_row_is_done(scripted, builtin_tokenizer):
    graphdef, state = nnx.split(scripted)
    decoder = Decoder(graphdef, eos_id=builtin_tokenizer.eos_token_id, settings=DecodeSettings(max_new_tokens=30))
    prompt = builtin_tokenizer(" 3 1 * 2 4 <|endoftext|>")["input_ids"]  # positions 0..5: generation starts at 6
    decoded = decoder(state, *left_pad([prompt, prompt]))
    assert decoded.n_generated.tolist() == [7, 7]
    assert decoded.n_steps == 7


def test_evaluator_scores_like_the_reference(scripted, builtin_tokenizer):
    examples = [
        Example("3 1 * 2 4", "7 7", "#### 5 6"),  # right answer after a different CoT: the CoT is ignored
        Example("3 1 * 2 4", "1 2", "#### 5 7"),  # right CoT, wrong answer
        Example("1 2 3 * 4 5", "0", "#### 5 6"),  # a longer prompt: generation starts one position later
    ]
    result = GenerationEvaluator(builtin_tokenizer, examples, batch_size=2, settings=DecodeSettings(max_new_tokens=30),
                                 progress=False)(scripted)
    assert [p.generated_text for p in result.predictions] == ["1 2 #### 5 6", "1 2 #### 5 6", "2 #### 5 6"]
    assert [p.correct for p in result.predictions] == [True, False, True]
    assert [p.target_answer for p in result.predictions] == [e.answer for e in examples]
    assert [p.n_generated for p in result.predictions] == [7, 7, 6]
    assert (result.accuracy, result.n_correct, result.n_examples) == (2 / 3, 2, 3)
    assert result.mean_generated_tokens == pytest.approx(20 / 3)
    assert result.tokens_per_second == pytest.approx(20 / result.generate_seconds)


def test_left_pad_prompts_keeps_each_prompt_up_to_its_first_eos(builtin_tokenizer):
    examples = [Example("1 2 * 3", "4", "#### 5"), Example("1 * 2", "3 4", "#### 6")]
    data = encode_examples(examples, builtin_tokenizer)
    ids, mask = left_pad_prompts(data)
    eos = builtin_tokenizer.eos_token_id
    assert mask.tolist() == [[True] * 5, [False, True, True, True, True]]
    assert ids[0].tolist() == data.input_ids[0, :5].tolist()
    assert ids[1].tolist() == [eos, *data.input_ids[1, :4].tolist()]
    assert ids[:, -1].tolist() == [eos, eos]


def test_whole_evaluation_compiles_once_and_reuses_it_for_new_weights(builtin_tokenizer):
    rng = np.random.default_rng(0)
    examples = [Example(" ".join(map(str, rng.integers(0, 10, k))) + " * 7", "1", "#### 2")
                for k in rng.integers(1, 6, size=10)]  # ragged prompts, 3 batches, the last one short
    config = transformers.GPT2Config(vocab_size=len(builtin_tokenizer), n_positions=32, n_embd=32, n_layer=1,
                                     n_head=2, bos_token_id=builtin_tokenizer.eos_token_id,
                                     eos_token_id=builtin_tokenizer.eos_token_id)
    evaluator = GenerationEvaluator(builtin_tokenizer, examples, batch_size=4, settings=DecodeSettings(max_new_tokens=6),
                                    progress=False)
    first = evaluator(from_config(config, seed=0))
    second = evaluator(from_config(config, seed=1))
    assert (first.compiles, second.compiles) == (1, 0)
    assert second.compile_seconds == 0.0
    assert first.n_examples == second.n_examples == 10


def test_default_batch_size_splits_the_data_evenly_into_the_fewest_batches(builtin_tokenizer):
    assert [auto_batch_size(n) for n in (1, 5, 128, 129, 200, 1000)] == [1, 5, 128, 65, 100, 125]
    assert auto_batch_size(10, max_batch_size=4) == 4  # 3 batches: 4, 4, 2
    with pytest.raises(ValueError, match="n_examples"):
        auto_batch_size(0)
    examples = [Example("1 2 * 3", "4", "#### 5")] * 3
    assert GenerationEvaluator(builtin_tokenizer, examples, progress=False).batch_size == 3
