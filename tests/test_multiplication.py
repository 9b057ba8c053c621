from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from icot_jax.cli import main
from icot_jax.data import multiplication as mult
from icot_jax.data.formats import DataFormatError, parse_line, read_examples


@pytest.mark.parametrize("k", [4, 5, 7, 9, 11])
def test_reference_valid_lines_are_regenerated_byte_for_byte(reference_dir, k):
    raw = (reference_dir / f"{k}_by_{k}_mult" / "valid.txt").read_bytes()
    lines = raw.split(b"\n")
    assert lines[-1] == b"" and len(lines) == 1001
    for line in lines[:-1]:
        a, b = mult.parse_operands(line.decode().split("||")[0])
        assert mult.format_example(a, b).encode() == line


def test_format_small_example_by_hand():
    # 12 * 34: pp_0 = 12*4 = 048, pp_1 = 12*3*10 = 0360, no running sum after the last partial
    # product, answer 408 padded to 4 digits; everything least significant digit first.
    assert mult.format_example(12, 34) == "2 1 * 4 3||8 4 0 + 0 6 3 0 #### 8 0 4 0"


@pytest.mark.parametrize(("k", "length"), [(4, 46), (5, 74), (7, 148), (9, 246), (11, 368)])
def test_cot_length_matches_the_paper(k, length):
    assert mult.cot_length(k) == length


@given(st.integers(1, 10**20 - 1), st.integers(1, 10**20 - 1))
def test_line_encodes_operands_partial_products_running_sums_and_product(a, b):
    example = parse_line(mult.format_example(a, b))
    assert mult.parse_operands(example.source) == (a, b)

    def value(digits: str) -> int:
        return int("".join(reversed(digits.split())))

    assert value(example.answer.removeprefix("####")) == a * b
    terms = [t.split("(")[0] for t in example.cot.split("+")]
    assert [value(t) for t in terms] == [a * int(d) * 10**i for i, d in enumerate(reversed(str(b)))]
    sums = [value(t.split("(")[1].rstrip(") ")) for t in example.cot.split("+") if "(" in t]
    assert sums == [sum(value(t) for t in terms[: i + 1]) for i in range(1, len(terms) - 1)]


def test_format_rejects_non_positive_operands():
    with pytest.raises(ValueError, match="positive integers"):
        mult.format_example(0, 12)


def test_parse_operands_rejects_other_text():
    with pytest.raises(DataFormatError, match="not a multiplication source"):
        mult.parse_operands("Tom has 3 apples")


@pytest.mark.parametrize("k", [2, 9, 10, 19, 20])
def test_sampled_operands_have_k_digits_and_are_distinct(k):
    pairs = mult.sample_pairs(np.random.default_rng(0), k, 500)
    assert len(set(pairs)) == 500
    assert all(len(str(a)) == k and len(str(b)) == k for a, b in pairs)


def test_splits_are_disjoint_distinct_sized_and_seeded():
    sizes = {"train": 300, "valid": 50, "test": 40}
    splits = mult.generate_splits([3], sizes, seed=7)
    assert {s: len(p) for s, p in splits.items()} == sizes
    union = [pair for pairs in splits.values() for pair in pairs]
    assert len(set(union)) == len(union)
    assert mult.generate_splits([3], sizes, seed=7) == splits
    assert mult.generate_splits([3], sizes, seed=8) != splits


def test_dense_request_takes_every_pair_but_the_excluded_ones():
    everything = {(a, b) for a in range(10, 100) for b in range(10, 100)}
    excluded = {(10, 10), (55, 66), (99, 99), (123, 456)}  # the last is not a 2-digit pair
    pairs = mult.sample_pairs(np.random.default_rng(0), 2, len(everything) - 3, excluded)
    assert set(pairs) == everything - excluded


def test_impossible_request_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot draw 8101 distinct 2x2 pairs: only 8100 exist"):
        mult.sample_pairs(np.random.default_rng(0), 2, 8101)
    with pytest.raises(ValueError, match="only 8099 exist after excluding 1"):
        mult.sample_pairs(np.random.default_rng(0), 2, 8100, {(10, 10)})
    with pytest.raises(ValueError, match=r"digits must be in \[2, 20\]"):
        mult.sample_pairs(np.random.default_rng(0), 21, 1)


def test_mixture_splits_evenly_and_keeps_each_k_independent():
    sizes = {"train": 101, "valid": 10, "test": 10}
    mixed = mult.generate_splits([4, 5], sizes, seed=1)
    assert sorted(len(str(a)) for a, _ in mixed["train"]).count(4) == 51
    alone = mult.generate_splits([4], {"train": 51, "valid": 5, "test": 5}, seed=1)
    assert sorted(p for p in mixed["valid"] if p[0] < 10_000) == sorted(alone["valid"])


def test_write_dataset_excludes_pairs_of_existing_files(tmp_path):
    first = mult.write_dataset(tmp_path / "a", [2], {"valid": 4000}, seed=0)
    second = mult.write_dataset(
        tmp_path / "b", [2], {"train": 4000, "test": 100}, seed=0, exclude_files=[first["valid"].path]
    )
    seen = mult.read_pairs([first["valid"].path])
    assert seen.isdisjoint(mult.read_pairs([second["train"].path, second["test"].path]))
    assert set(second) == {"train", "test"} and not (tmp_path / "b" / "valid.txt").exists()


def test_cli_writes_the_three_splits_and_a_summary(tmp_path, capsys):
    out = tmp_path / "mult"
    main(["data", "multiplication", "--digits", "3,4", "--train", "40", "--valid", "6", "--test", "4",
          "--seed", "5", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "train.txt: 40 lines" in printed and "3x3: 24, 4x4: 46" in printed
    counts = {split: len(read_examples(out / f"{split}.txt").examples) for split in mult.SPLITS}
    assert counts == {"train": 40, "valid": 6, "test": 4}
    pairs = mult.generate_splits([3, 4], {"train": 40, "valid": 6, "test": 4}, seed=5)["valid"]
    assert (out / "valid.txt").read_text().splitlines() == [mult.format_example(a, b) for a, b in pairs]


def test_cli_reports_impossible_requests(tmp_path):
    with pytest.raises(SystemExit, match="icot data: error: cannot draw 9000 distinct 2x2 pairs"):
        main(["data", "multiplication", "--digits", "2", "--train", "9000", "--valid", "0", "--test", "0",
              "--out", str(tmp_path)])
