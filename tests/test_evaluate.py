"""`icot eval`, `icot generate`, `icot tradeoff` end to end on an exported Hugging Face folder, and the
multiplication notation they convert."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import transformers

from icot_jax.cli import main
from icot_jax.data.formats import Example, write_examples
from icot_jax.evaluation import (Answer, evaluate_checkpoint, format_answer, generate_answer, multiplication_operands,
                                 reversed_digits_value, to_model_notation)
from icot_jax.models.hf import export_pretrained, from_config
from icot_jax.runs import OpenedRun

EXAMPLES = [Example("3 1 * 2 4", "6 2 1 + 0 4 ( 6 6 5 )", "#### 6 6 5 0"),
            Example("7 * 9", "3 6", "#### 3 6"),
            Example("5 2 * 1 1", "5 2 + 0 5 2", "#### 5 7 2 0"),
            Example("9 9 * 9 9", "1 8 9 + 0 1 8 9 ( 1 0 8 9 )", "#### 1 0 8 9"),
            Example("2 * 3", "6", "#### 6")]


def in_memory(folder, model, tokenizer, **fields) -> OpenedRun:
    """An already loaded model as `open_run` would return it for ``folder``."""
    return OpenedRun(str(folder), model, tokenizer, model.config, **fields)


def run_cli(argv: list[str]) -> int:
    return main(argv)


@pytest.mark.parametrize(("question", "model_input"), [
    ("3719*3349", "9 1 7 3 * 9 4 3 3"),
    (" 12 * 5 ", "2 1 * 5"),
    ("9 1 7 3 * 9 4 3 3", "9 1 7 3 * 9 4 3 3"),  # already in model notation
    ("Tom has 3 apples. How many?", "Tom has 3 apples. How many?"),
])
def test_to_model_notation(question, model_input):
    assert to_model_notation(question) == model_input


def test_reversed_digits_and_operands():
    assert reversed_digits_value("1 3 9 4 5 4 2 1") == 12454931
    assert reversed_digits_value("0 1 0 0") == 10  # the padding zeros are the leading digits
    assert reversed_digits_value("12 3") is None and reversed_digits_value("") is None
    assert multiplication_operands("9 1 7 3 * 9 4 3 3") == (3719, 3349)
    assert multiplication_operands("Tom has 3 * 4 apples") is None


def test_format_answer_converts_multiplication_answers_back():
    right = format_answer(Answer("9 1 7 3 * 9 4 3 3", "#### 1 3 9 4 5 4 2 1", "", "#### 1 3 9 4 5 4 2 1"))
    assert "answer: 12454931" in right and "correct" in right and "CoT: (none" in right
    wrong = format_answer(Answer("2 * 3", "6 #### 7", "6", "#### 7"))
    assert "answer: 7 " in wrong and "wrong, 2*3 = 6" in wrong and "CoT: 6" in wrong
    assert "answer: 72" in format_answer(Answer("Tom?", "<<8*9=72>> #### 72", "<<8*9=72>>", "#### 72"))
    assert "answer: none" in format_answer(Answer("2 * 3", "6 6", "6 6", None))


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, builtin_tokenizer):
    """A tiny random GPT-2 exported with the built-in tokenizer, as `icot export-hf` writes it."""
    eos = builtin_tokenizer.eos_token_id
    config = transformers.GPT2Config(vocab_size=len(builtin_tokenizer), n_positions=64, n_embd=32, n_layer=2,
                                     n_head=2, bos_token_id=eos, eos_token_id=eos)
    model = from_config(config, seed=0)
    folder = export_pretrained(model, config, tmp_path_factory.mktemp("hf") / "tiny", tokenizer=builtin_tokenizer)
    return folder, model


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "valid.txt"
    write_examples(path, EXAMPLES)
    return path


def test_eval_command_on_hf_folder(hf_folder, data_file, builtin_tokenizer, tmp_path, capsys):
    folder, model = hf_folder
    out = tmp_path / "eval.json"
    assert run_cli(["eval", "--checkpoint", str(folder), "--data", str(data_file), "--batch-size", "2",
                    "--max-new-tokens", "12", "--n-remove", "all", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == printed
    assert (printed["n_examples"], printed["batch_size"], printed["max_new_tokens"]) == (5, 2, 12)
    assert printed["compiles"] == 1 and printed["compile_seconds"] > 0
    assert printed["examples_per_second"] > 0 and 1 <= printed["mean_generated_tokens"] <= 12
    assert printed["device"].startswith("cpu") and printed["n_remove"] == "all"
    assert printed["teacher_forced_loss"] > 0 and math.isfinite(printed["teacher_forced_ppl"])
    predictions = [json.loads(line) for line in out.with_name("eval_predictions.jsonl").read_text().splitlines()]
    # The exported folder decodes exactly as the in-memory model it came from.
    loaded, _ = evaluate_checkpoint(in_memory(folder, model, builtin_tokenizer), EXAMPLES,
                                    batch_size=2, max_new_tokens=12, progress=False)
    assert [p["generated_text"] for p in predictions] == [p.generated_text for p in loaded.predictions]
    assert [p["target_answer"] for p in predictions] == [e.answer for e in EXAMPLES]


def test_eval_writes_next_to_the_checkpoint_by_default(hf_folder, data_file, capsys):
    folder, _ = hf_folder
    run_cli(["eval", "--checkpoint", str(folder), "--data", str(data_file), "--limit", "2", "--max-new-tokens", "4"])
    assert json.loads((folder / "eval.json").read_text())["n_examples"] == 2
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n_examples"] == 2


def test_generate_command_converts_notation(hf_folder, capsys):
    folder, _ = hf_folder
    assert run_cli(["generate", "--checkpoint", str(folder), "--max-new-tokens", "6", "31*42"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "model input: 1 3 * 2 4"
    assert lines[-1].startswith("answer: ")


@pytest.mark.parametrize("question", ["", "   "])
def test_generate_refuses_an_empty_question(hf_folder, question):
    with pytest.raises(SystemExit, match="the question is empty"):
        run_cli(["generate", "--checkpoint", str(hf_folder[0]), question])


def test_generate_budget_defaults_to_the_run_and_is_capped_by_the_position_table(hf_folder, builtin_tokenizer,
                                                                                 capsys):
    from icot_jax.config import DEMO_CONFIG, load_config
    from icot_jax.evaluation import generation_budget

    folder, model = hf_folder  # 64 positions
    run = in_memory(folder, model, builtin_tokenizer, config=load_config(DEMO_CONFIG))
    assert generation_budget(run, 6, 0, None) == 32  # the demo's eval.max_new_tokens
    assert generation_budget(run, 6, 0, 50) == 50
    assert capsys.readouterr().err == ""
    exported = in_memory(folder, model, builtin_tokenizer)
    assert generation_budget(exported, 6, 4, None) == 54  # 800 does not fit: 64 - 6 - 4
    assert "max_new_tokens capped at 54 (asked for 800): the model has 64 positions and the prompt takes 6 and " \
           "the position gap 4" in capsys.readouterr().err
    with pytest.raises(ValueError, match="nothing can be generated: the model has 64 positions"):
        generation_budget(exported, 60, 4, None)


def test_tradeoff_command_writes_csv_and_png(hf_folder, data_file, tmp_path, capsys):
    folder, _ = hf_folder
    out = tmp_path / "tradeoff"
    assert run_cli(["tradeoff", "--checkpoints", str(folder), str(folder), "--labels", "a", "b", "--data",
                    str(data_file), "--max-new-tokens", "4", "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "tradeoff.csv").open()))
    assert [row["label"] for row in rows] == ["a", "b"]
    assert min(float(row["speedup_vs_slowest"]) for row in rows) == 1.0
    assert (out / "tradeoff.png").stat().st_size > 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["png"] == str(out / "tradeoff.png")


def test_keep_position_runs_decode_after_a_gap_of_the_cot_length(hf_folder, builtin_tokenizer):
    """`--position-gap auto`: a train.keep_position model continues where its removed CoT used to end."""
    from icot_jax.data.tokenize import encode_examples
    from icot_jax.generate import GenerationEvaluator, keep_position_gaps
    from icot_jax.removal import REMOVE_ALL

    folder, model = hf_folder
    checkpoint = in_memory(folder, model, builtin_tokenizer, keep_position=True)
    data = encode_examples(EXAMPLES, builtin_tokenizer)
    cot_lengths = keep_position_gaps(data, REMOVE_ALL)
    assert cot_lengths.tolist() == [len(e.cot.split()) for e in EXAMPLES]
    evaluator = GenerationEvaluator(builtin_tokenizer, data, batch_size=2, progress=False)
    expected = [p.generated_text for p in evaluator(model, cot_lengths).predictions]
    auto, metrics = evaluate_checkpoint(checkpoint, EXAMPLES, batch_size=2, max_new_tokens=800, progress=False)
    assert [p.generated_text for p in auto.predictions] == expected
    assert metrics["mean_position_gap"] == pytest.approx(cot_lengths.mean())
    plain, metrics = evaluate_checkpoint(in_memory(folder, model, builtin_tokenizer), EXAMPLES,
                                         batch_size=2, progress=False)
    assert metrics["mean_position_gap"] == 0 and [p.generated_text for p in plain.predictions] != expected
    # generate: the gap of a multiplication question is the length of the CoT its operands give.
    with_gap = generate_answer(checkpoint, "31*42", max_new_tokens=6)
    assert with_gap == generate_answer(checkpoint, "31*42", max_new_tokens=6, position_gap=8)  # CoT "2 6 0 + 0 4 2 1"
    with pytest.raises(ValueError, match="--position-gap N"):
        generate_answer(checkpoint, "How many apples?", max_new_tokens=4)


def test_export_info_restores_join_and_keep_position(hf_folder, tmp_path):
    """An exported folder's icot_jax.json (written by `icot export-hf`) sets the join mode and position
    handling that `open_run` would otherwise default to the reference's."""
    import dataclasses
    import shutil

    from icot_jax.errors import UserError
    from icot_jax.runs import open_run, read_export_info, write_export_info

    folder = tmp_path / "exported"
    shutil.copytree(hf_folder[0], folder)
    plain = open_run(folder)
    assert (plain.join, plain.keep_position, plain.removal_side) == ("reference", False, "left")
    assert (plain.config, plain.which, plain.step, plain.url) == (None, None, None, str(folder))
    trained = dataclasses.replace(plain, url="runs/x", join="segments", keep_position=True, removal_side="right")
    write_export_info(folder, trained)
    assert read_export_info(folder) == {"join": "segments", "keep_position": True, "removal_side": "right",
                                        "source": str(Path("runs/x").resolve())}
    loaded = open_run(folder)
    assert (loaded.join, loaded.keep_position, loaded.removal_side) == ("segments", True, "right")
    assert open_run(folder, join="reference").join == "reference"  # --join still overrides
    (folder / "icot_jax.json").write_text('{"join": "words"}')
    with pytest.raises(UserError, match=r"icot_jax.json: key 'join' must be one of"):
        open_run(folder)
    (folder / "icot_jax.json").write_text('{"join": ')
    with pytest.raises(UserError, match=r"icot_jax.json: not valid JSON"):
        open_run(folder)


def test_bad_checkpoint_is_a_clear_error(tmp_path, data_file):
    with pytest.raises(SystemExit, match="neither a training run directory"):
        run_cli(["eval", "--checkpoint", str(tmp_path), "--data", str(data_file)])


@pytest.mark.slow
def test_eval_command_on_a_training_run(tmp_path, capsys):
    """A few steps of the demo config, then `icot eval --n-remove K` on the run directory: its teacher-forced
    loss is the loop's own validation loss at the same removal count."""
    from icot_jax.config import DEMO_CONFIG, load_config
    from icot_jax.loop.logs import read_metrics
    from icot_jax.loop.training import train

    overrides = ["train.epochs=1", "train.pretrain_epochs=0", "data.generate_train=320", "data.generate_valid=40",
                 "train.remove_per_epoch=4", "train.schedule=fixed", "eval.every_epochs=1", f"run_dir={tmp_path / 'run'}"]
    summary = train(load_config(DEMO_CONFIG, overrides), progress=False)
    last = summary["last_eval"]
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    removed = [r for r in records if "scheduled_to_remove" in r][-1]["scheduled_to_remove"]
    # The same decoding as the loop's (the demo's eval batch size and max_new_tokens); the demo trains with
    # keep_position, so both decode after a gap of the removed count.
    assert run_cli(["eval", "--checkpoint", summary["run_dir"], "--data", str(tmp_path / "run" / "data" / "valid.txt"),
                    "--batch-size", "250", "--max-new-tokens", "32", "--n-remove", str(removed)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["teacher_forced_loss"] == pytest.approx(last["val_loss"], rel=1e-5)
    assert printed["accuracy"] == last["val_accuracy"] and printed["n_examples"] == 40
