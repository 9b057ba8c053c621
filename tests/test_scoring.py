"""Answer extraction and exact-match scoring against the reference's rules (REFERENCE_SEMANTICS.md, Evaluation)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from icot_jax.data.formats import read_examples
from icot_jax.generate import GenerationEvaluator, extract_answer, is_correct


def reference_extract_answer(text: str) -> str:
    """The reference's ``extract_answer`` (src/data.py), transcribed as the specification."""
    if "####" not in text:
        return text.strip().replace(",", "")
    _, answer = text.strip().split("####", 1)
    return ("####" + answer).strip().replace(",", "")


@pytest.mark.parametrize(
    ("predicted", "target", "correct"),
    [
        ("#### 1,234", "#### 1234", True),  # commas removed from the prediction
        ("<<6*2=12>> <<12+5=17>> #### 17", "#### 17", True),  # a CoT before #### is ignored
        ("1 2 + 3 ( 4 ) #### 5 6", "7 8 #### 5 6", True),  # ... and so is the target's CoT
        ("  #### 17  ", "#### 17", True),  # outer whitespace stripped
        ("17", "#### 17", False),  # no ####: always wrong
        ("", "#### 17", False),
        ("#### 17 #### 18", "#### 17", False),  # everything after the first #### counts
        ("####  17", "#### 17", False),  # inner whitespace is kept, as in the reference
        ("####", "#### 17", False),
        ("#### 17 ", "#### 1 7", False),
    ],
)
def test_scoring_edge_cases(predicted, target, correct):
    assert is_correct(predicted, target) is correct
    assert (reference_extract_answer(predicted) == reference_extract_answer(target)) is correct


def test_extract_answer_returns_none_without_marker():
    assert extract_answer("12 + 5 = 17") is None
    assert extract_answer("x #### 1,000 ") == "#### 1000"


TEXT = st.text(alphabet="# ,0123<>=+\n", max_size=30)


@given(predicted=TEXT, target_cot=TEXT, target_answer=TEXT)
def test_is_correct_agrees_with_the_reference_on_any_text(predicted, target_cot, target_answer):
    target = f"{target_cot}####{target_answer}"  # targets always carry the marker
    assert extract_answer(target) == reference_extract_answer(target)
    assert is_correct(predicted, target) == (reference_extract_answer(predicted) == reference_extract_answer(target))


@pytest.mark.parametrize(("folder", "tokenizer"), [("4_by_4_mult", "builtin_tokenizer"), ("gsm8k", "bpe_tokenizer")])
def test_targets_decoded_from_tokens_give_the_file_answers(reference_dir, folder, tokenizer, request):
    """The evaluator builds each target the reference's way (decode the tokens after the first EOS, then
    extract); on the reference files that gives back exactly the answer of every line."""
    examples = read_examples(reference_dir / folder / "valid.txt").examples
    evaluator = GenerationEvaluator(request.getfixturevalue(tokenizer), examples, progress=False)
    assert [extract_answer(text) for text in evaluator.target_texts] == [e.answer for e in examples]
