from __future__ import annotations

import json

import pytest

from icot_jax.cli import main
from icot_jax.data import formats
from icot_jax.data.formats import DataFormatError, Example


def test_parse_line_follows_the_reference():
    example = formats.parse_line("  3 * 4||<<3*4=12>>  <<12+0=12>> ####  1,200 \n")
    assert example == Example(source="3 * 4", cot="<<3*4=12>>  <<12+0=12>>", answer="####  1200")


def test_source_is_kept_verbatim_and_answer_is_everything_after_the_first_marker():
    example = formats.parse_line("q ||a #### b #### c")
    assert example == Example(source="q ", cot="a", answer="#### b #### c")


def test_empty_cot_is_legal_and_round_trips():
    line = "How many?|| #### 9"
    example = formats.parse_line(line)
    assert example.cot == "" and example.to_line() == line


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("3 * 4 <<3*4=12>> #### 12", "no '||' between source and CoT"),
        ("3 * 4||x||<<3*4=12>> #### 12", "2 '||' separators, expected exactly one"),
        ("3 * 4||<<3*4=12>> 12", "no '####' before the answer"),
        ("   ||<<3*4=12>> #### 12", "empty source"),
        ("3 * 4||<<3*4=12>> ####  ", "empty answer"),
    ],
)
def test_malformed_line_error_names_file_and_line(tmp_path, bad, message):
    path = _write(tmp_path / "data.txt", ["1 * 2|| #### 2", "", bad, "2 * 2|| #### 4"])
    with pytest.raises(DataFormatError, match=f"^{path}:3: {message}"):
        formats.read_examples(path)


def test_skip_counts_malformed_lines_and_keeps_the_rest(tmp_path):
    path = _write(tmp_path / "data.txt", ["1 * 2|| #### 2", "broken", "a||b||c", "2 * 2||x #### 4", ""])
    parsed = formats.read_examples(path, on_error="skip")
    assert parsed.n_skipped == 2
    assert [e.answer for e in parsed.examples] == ["#### 2", "#### 4"]


def test_unknown_error_policy_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="on_error"):
        formats.read_examples(_write(tmp_path / "d.txt", ["a|| #### 1"]), on_error="ignore")


@pytest.mark.parametrize("name", ["valid.txt", "train_no_aug.txt"])
def test_reference_gsm8k_files_parse_and_round_trip(reference_dir, name):
    parsed = formats.read_examples(reference_dir / "gsm8k" / name)
    assert parsed.n_skipped == 0 and len(parsed.examples) == {"valid.txt": 500, "train_no_aug.txt": 6973}[name]
    assert all(formats.parse_line(e.to_line()) == e for e in parsed.examples)
    assert all("," not in e.answer and e.answer.startswith("#### ") for e in parsed.examples)


def test_write_then_read_round_trips(tmp_path):
    examples = [Example("2 * 3", "", "#### 6"), Example("Q?", "<<1+1=2>>", "#### 2")]
    assert formats.write_examples(tmp_path / "out" / "x.txt", examples) == 2
    assert formats.read_examples(tmp_path / "out" / "x.txt").examples == examples


GSM8K_RECORDS = [
    {
        "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.\n"
        "How many clips did Natalia sell altogether in April and May?",
        "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
        "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72",
    },
    {"question": "What is 1000 plus 234?", "answer": "It is 1,234.\n#### 1,234"},
]


def _write_jsonl(path, records):
    return _write(path, [r if isinstance(r, str) else json.dumps(r) for r in records])


def test_gsm8k_jsonl_to_formula_cot(tmp_path):
    parsed = formats.convert_gsm8k_jsonl(_write_jsonl(tmp_path / "train.jsonl", GSM8K_RECORDS))
    assert [e.to_line() for e in parsed.examples] == [
        "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
        "How many clips did Natalia sell altogether in April and May?||<<48/2=24>> <<48+24=72>> #### 72",
        "What is 1000 plus 234?|| #### 1234",
    ]


def test_gsm8k_jsonl_to_prose_cot(tmp_path):
    parsed = formats.convert_gsm8k_jsonl(_write_jsonl(tmp_path / "train.jsonl", GSM8K_RECORDS), style="text")
    assert parsed.examples[0].cot == (
        "Natalia sold 48/2 = 24 clips in May. Natalia sold 48+24 = 72 clips altogether in April and May."
    )


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ('{"question": "q", "answer": ', "bad JSON"),
        ('["q", "a"]', "expected a JSON object, got list"),
        ({"question": "q"}, "missing key 'answer'"),
        ({"question": 3, "answer": "#### 3"}, "key 'question' is a int, expected a string"),
        ({"question": "q", "answer": "so 3"}, "'answer' has no '####' line"),
        ({"question": "a || b", "answer": "#### 3"}, "2 '||' separators"),
    ],
)
def test_malformed_gsm8k_record_error_names_file_and_line(tmp_path, record, message):
    path = _write_jsonl(tmp_path / "train.jsonl", [GSM8K_RECORDS[0], record])
    with pytest.raises(DataFormatError, match=f"^{path}:2: {message}"):
        formats.convert_gsm8k_jsonl(path)


def test_gsm8k_skip_and_cli(tmp_path, capsys):
    path = _write_jsonl(tmp_path / "train.jsonl", [GSM8K_RECORDS[0], "{not json", GSM8K_RECORDS[1]])
    main(["data", "gsm8k", str(path), "--out", str(tmp_path / "train.txt"), "--on-error", "skip"])
    assert "2 lines (1 malformed records skipped)" in capsys.readouterr().out
    converted = formats.convert_gsm8k_jsonl(path, on_error="skip").examples
    assert formats.read_examples(tmp_path / "train.txt").examples == converted
    with pytest.raises(SystemExit, match=f"icot data: error: {path}:2: bad JSON"):
        main(["data", "gsm8k", str(path), "--out", str(tmp_path / "again.txt")])
