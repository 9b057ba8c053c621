from __future__ import annotations

import numpy as np
import pytest
from tokenizers import processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from icot_jax.cli import main
from icot_jax.data import tokenize
from icot_jax.data.formats import Example, write_examples
from icot_jax.data.multiplication import make_example

MULT_4X4 = make_example(2365, 4347)  # the first line of the reference 4_by_4_mult/valid.txt
GSM = Example("Tom has 3 apples and buys 12 more. How many apples?", "<<3+12=15>>", "#### 15")


def test_builtin_tokenizer_round_trips_through_auto_tokenizer(tmp_path, capsys, builtin_tokenizer):
    main(["data", "tokenizer", "--out", str(tmp_path / "tok")])
    assert str(tmp_path / "tok") in capsys.readouterr().out
    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert loaded.get_vocab() == builtin_tokenizer.get_vocab()
    assert len(loaded) == len(tokenize.BUILTIN_VOCAB)
    assert (loaded.eos_token, loaded.pad_token, loaded.bos_token) == ("<|endoftext|>", "<|endoftext|>", None)
    text = f" {MULT_4X4.source} <|endoftext|> {MULT_4X4.cot} <|endoftext|> {MULT_4X4.answer} <|endoftext|>"
    ids = loaded(text)["input_ids"]
    assert ids == builtin_tokenizer(text)["input_ids"]
    assert loaded.decode(ids) == text.strip()
    assert loaded.convert_tokens_to_ids(["####", "<|endoftext|>"]) != [loaded.unk_token_id] * 2


@pytest.mark.parametrize("mode", ["reference", "segments"])
def test_builtin_tokenizer_counts_cot_in_whitespace_tokens(builtin_tokenizer, mode):
    data = tokenize.encode_examples([MULT_4X4], builtin_tokenizer, mode=mode)
    n_src, n_ans = len(MULT_4X4.source.split()), len(MULT_4X4.answer.split())
    assert data.seps.tolist() == [[n_src, n_src + 47, n_src + 47 + n_ans + 1]]
    assert data.cot_lengths.tolist() == [46]
    assert data.input_ids.dtype == np.int32 and data.input_ids.shape == (1, data.seps[0, 2] + 1)


def test_reference_mode_keeps_the_stray_space_token_that_segments_avoid(bpe_tokenizer):
    reference = tokenize.encode_examples([GSM], bpe_tokenizer, mode="reference")
    segments = tokenize.encode_examples([GSM], bpe_tokenizer, mode="segments")
    assert reference.cot_lengths[0] == segments.cot_lengths[0] + 1
    assert reference.lengths[0] == segments.lengths[0] + 3  # one lone space before each EOS
    ids = reference.input_ids[0]
    s0, s1, s2 = reference.seps[0]
    assert bpe_tokenizer.convert_ids_to_tokens([ids[s0 - 1], ids[s1 - 1], ids[s2 - 1]]) == ["Ġ"] * 3
    eos = bpe_tokenizer.eos_token_id
    assert ids[[s0, s1, s2]].tolist() == [eos] * 3
    assert bpe_tokenizer.decode(ids[s0 + 1 : s1]) == f" {GSM.cot} "
    t0, t1, t2 = segments.seps[0]
    assert bpe_tokenizer.decode(segments.input_ids[0][t0 + 1 : t1]) == f" {GSM.cot}"
    assert bpe_tokenizer.decode(segments.input_ids[0][t1 + 1 : t2]) == f" {GSM.answer}"


def _with_bos(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """A copy of `tokenizer` that prepends a BOS, as Llama / Mistral tokenizers do."""
    backend = tokenizer.backend_tokenizer.__class__.from_str(tokenizer.backend_tokenizer.to_str())
    backend.add_special_tokens(["<s>"])
    bos = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", bos_token="<s>")


@pytest.mark.parametrize("mode", ["reference", "segments"])
def test_bos_is_prepended_and_seps_are_absolute(builtin_tokenizer, mode):
    with_bos = _with_bos(builtin_tokenizer)
    plain = tokenize.encode_examples([MULT_4X4], builtin_tokenizer, mode=mode)
    data = tokenize.encode_examples([MULT_4X4], with_bos, mode=mode)
    assert data.input_ids[0, 0] == with_bos.bos_token_id
    assert (data.seps == plain.seps + 1).all()
    assert (data.input_ids[0, 1:] == plain.input_ids[0]).all()


def test_eos_inside_content_is_an_error(builtin_tokenizer):
    bad = Example("1 * 2", "2 <|endoftext|> 2", "#### 2")
    message = r"example 1 in train.txt has the EOS token '<\|endoftext\|>' inside its cot"
    with pytest.raises(ValueError, match=message):
        tokenize.encode_examples([MULT_4X4, bad], builtin_tokenizer, source="train.txt")


def test_rows_pad_to_the_smallest_fitting_bucket(builtin_tokenizer):
    examples = [make_example(12, 34), MULT_4X4, make_example(123, 456)]
    data = tokenize.encode_examples(examples, builtin_tokenizer, buckets=[80, 24, 48])
    assert data.buckets == (24, 48, 80)
    assert data.lengths.tolist() == [21, 67, 41] and data.input_ids.shape == (3, 80)
    for row, length in zip(data.input_ids, data.lengths):
        assert (row[length:] == builtin_tokenizer.eos_token_id).all() and row[length - 1] == data.pad_id
    assert [tokenize.smallest_bucket(data.buckets, n) for n in data.lengths] == [24, 80, 48]
    with pytest.raises(ValueError, match="a row of 81 tokens fits no bucket"):
        tokenize.smallest_bucket(data.buckets, 81)


def test_overlength_error_names_count_longest_and_file(tmp_path, builtin_tokenizer):
    path = tmp_path / "train.txt"
    write_examples(path, [make_example(12, 34), MULT_4X4, make_example(1234, 5678)])
    message = rf"2 of 3 examples in {path} are longer than max_length=21 tokens \(longest: 67\)"
    with pytest.raises(ValueError, match=message):
        tokenize.encode_file(path, builtin_tokenizer, max_length=21)


def test_overlength_skip_counts_and_keeps_the_rest(builtin_tokenizer):
    examples = [MULT_4X4, make_example(12, 34), make_example(1234, 5678), make_example(98, 76)]
    data = tokenize.encode_examples(examples, builtin_tokenizer, max_length=21, on_overlength="skip")
    assert data.n_skipped == 2 and len(data) == 2
    assert data.examples == [examples[1], examples[3]]
    assert data.input_ids.shape == (2, 21)  # without buckets, rows pad to the longest kept row
    full = tokenize.encode_examples([examples[3]], builtin_tokenizer)
    assert (data.input_ids[1, : full.lengths[0]] == full.input_ids[0]).all()


def test_the_largest_bucket_limits_the_length_too(builtin_tokenizer):
    examples = [make_example(12, 34), MULT_4X4]
    with pytest.raises(ValueError, match=r"1 of 2 examples are longer than the largest bucket \(48 tokens\)"):
        tokenize.encode_examples(examples, builtin_tokenizer, buckets=[24, 48], max_length=1024)
    data = tokenize.encode_examples(examples, builtin_tokenizer, buckets=[24, 48], on_overlength="skip")
    assert data.n_skipped == 1 and data.input_ids.shape == (1, 24)


def test_length_settings_are_checked(builtin_tokenizer):
    with pytest.raises(ValueError, match="buckets must be positive"):
        tokenize.encode_examples([MULT_4X4], builtin_tokenizer, buckets=[0, 64])
    with pytest.raises(ValueError, match="1 of 1 examples are longer"):
        tokenize.encode_examples([MULT_4X4], builtin_tokenizer, max_length=10, on_overlength="skip")
    with pytest.raises(ValueError, match="mode must be"):
        tokenize.encode_examples([MULT_4X4], builtin_tokenizer, mode="joined")
