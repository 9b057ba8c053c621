from __future__ import annotations

import sys

import pytest
import tensorflow_datasets as tfds

from icot_jax.cli import main
from icot_jax.data import multiplication as mult
from icot_jax.data import tfds_builders as tb
from icot_jax.data.formats import Example, read_examples, write_examples


def test_multiplication_builds_and_reads_back_in_generation_order(tmp_path):
    sizes = {"train": 30, "valid": 5, "test": 4}
    config = tb.multiplication_config([3, 4], sizes, seed=2)
    assert config.name == "3x3+4x4-30-5-4-seed2"
    tb.build(tb.IcotMultiplication, config, tmp_path)
    expected = mult.generate_splits([3, 4], sizes, seed=2)
    for split, pairs in expected.items():
        source = tfds.data_source(f"icot_multiplication/{config.name}", split=split, data_dir=str(tmp_path))
        assert len(source) == len(pairs)
        assert source[0]["source"].decode() == mult.make_example(*pairs[0]).source
        examples = tb.read_split(f"icot_multiplication/{config.name}", split, tmp_path)
        assert examples == [mult.make_example(a, b) for a, b in pairs]
    assert "tensorflow" not in sys.modules


def test_multiplication_config_excludes_pairs_of_existing_files(tmp_path):
    held_out = tmp_path / "valid.txt"
    write_examples(held_out, [mult.make_example(a, b) for a in range(10, 100) for b in range(10, 60)])
    config = tb.multiplication_config([2], {"train": 8100 - 4500}, exclude_files=[held_out])
    assert config.name.endswith("-excl")
    tb.build(tb.IcotMultiplication, config, tmp_path / "tfds")
    train = tb.read_split(f"icot_multiplication/{config.name}", "train", tmp_path / "tfds")
    assert {mult.parse_operands(e.source) for e in train}.isdisjoint(mult.read_pairs([held_out]))


def test_default_configs_cover_every_k_with_feasible_sizes():
    configs = {c.name: c for c in tb.IcotMultiplication.BUILDER_CONFIGS}
    assert list(configs) == [f"{k}x{k}" for k in range(2, 21)]
    assert configs["4x4"].sizes == mult.REFERENCE_SIZES
    assert configs["2x2"].sizes == {"train": 6480, "valid": 810, "test": 810}
    assert configs["3x3"].sizes == {"train": 808_000, "valid": 1000, "test": 1000}  # all 810,000 pairs


def test_text_files_build_and_read_back(tmp_path):
    examples = [Example("Q1?", "<<1+1=2>>", "#### 2"), Example("Q2?", "", "#### 1200")]
    write_examples(tmp_path / "train.txt", examples)
    (tmp_path / "valid.txt").write_text("Q3?||<<2*2=4>> #### 4\nnot a line\n")
    files = {split: str(tmp_path / f"{split}.txt") for split in ("train", "valid")}
    config = tb.TextFilesConfig(name="toy", split_files=files, on_error="skip")
    builder = tb.build(tb.IcotText, config, tmp_path / "tfds")
    assert builder.info.splits["valid"].num_examples == 1
    assert tb.read_split("icot_text/toy", "train", tmp_path / "tfds") == examples


def test_text_builder_needs_files(tmp_path):
    with pytest.raises(ValueError, match="split_files"):
        tb.build(tb.IcotText, tb.TextFilesConfig(name="empty"), tmp_path)


def test_cli_packages_the_reference_gsm8k_valid_file(tmp_path, capsys, reference_dir):
    path = reference_dir / "gsm8k" / "valid.txt"
    main(["data", "tfds", "--name", "gsm8k", "--split", f"valid={path}", "--data-dir", str(tmp_path)])
    assert "prepared icot_text/gsm8k" in capsys.readouterr().out
    assert tb.read_split("icot_text/gsm8k", "valid", tmp_path) == read_examples(path).examples
