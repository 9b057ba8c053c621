"""Evaluating checkpoints: ``icot eval``, ``icot generate`` and ``icot tradeoff``.

A checkpoint is a training run directory (``config.yaml``, orbax checkpoints) or a Hugging Face folder
(``config.json`` + safetensors + tokenizer, as written by ``icot export-hf``), local or ``gs://``, opened
by :func:`icot_jax.runs.open_run`. The decoding itself lives in :mod:`icot_jax.generate`.

Heavy modules (jax, transformers) are imported inside the functions: ``icot`` registers these commands
on every invocation, and ``icot --help`` or ``icot data`` must not pay for them.
"""

from __future__ import annotations

import csv
import dataclasses
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from icot_jax.data.formats import Example
    from icot_jax.runs import OpenedRun
    from icot_jax.data.tokenize import EncodedDataset
    from icot_jax.generate import GenerationResult

TRADEOFF_FIELDS = ("label", "checkpoint", "accuracy", "examples_per_second", "tokens_per_second",
                   "mean_generated_tokens", "speedup_vs_slowest")

# ------------------------------------------------------------------------------ multiplication notation

_NORMAL_PRODUCT = re.compile(r"\s*(\d+)\s*\*\s*(\d+)\s*")
_MODEL_PRODUCT = re.compile(r"\d( \d)* \* \d( \d)*")


def to_model_notation(question: str) -> str:
    """``'3719*3349'`` -> ``'9 1 7 3 * 9 4 3 3'`` (digits reversed and space-separated, as the models are
    trained); any other text (already in model notation, or a GSM8K question) is returned stripped."""
    match = _NORMAL_PRODUCT.fullmatch(question)
    if match is None:
        return question.strip()
    return " * ".join(" ".join(reversed(number)) for number in match.groups())


def reversed_digits_value(text: str) -> int | None:
    """The number written as reversed, space-separated digits (``'1 3 9 4'`` -> 4931), else None."""
    digits = text.split()
    if not digits or not all(len(d) == 1 and d.isdigit() for d in digits):
        return None
    return int("".join(reversed(digits)))


def multiplication_operands(model_input: str) -> tuple[int, int] | None:
    """The two operands of a multiplication question in model notation, or None for other questions."""
    if _MODEL_PRODUCT.fullmatch(model_input) is None:
        return None
    a, b = model_input.split(" * ")
    return reversed_digits_value(a), reversed_digits_value(b)


# -------------------------------------------------------------------------------------------- evaluation


def device_description() -> str:
    """``'cpu: cpu (x1)'``-style name of the devices JAX computes on."""
    import jax

    device = jax.devices()[0]
    return f"{device.platform}: {device.device_kind} (x{jax.device_count()})"


def read_eval_examples(path: str | Path, limit: int | None = None) -> list[Example]:
    """The first ``limit`` (default: all) examples of a ``SRC||COT #### ANS`` file."""
    from icot_jax.data.formats import read_examples

    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    examples = read_examples(path).examples[:limit]
    if not examples:
        raise ValueError(f"{path}: no examples")
    return examples


def teacher_forced_metrics(checkpoint: OpenedRun, data: EncodedDataset, n_remove: int, batch_size: int) -> dict:
    """Teacher-forced loss, token accuracy and perplexity with ``n_remove`` CoT tokens removed per example
    (no smoothing offsets): the training loop's validation numbers at that point of the curriculum."""
    import numpy as np

    from icot_jax.removal import REMOVE_ALL
    from icot_jax.train.step import EvalStep, StepConfig, split_model
    from icot_jax.train.teacher_forced import teacher_forced

    config = StepConfig(pad_id=data.pad_id, side=checkpoint.removal_side, keep_position=checkpoint.keep_position)
    graphdef, params, rest = split_model(checkpoint.model)
    metrics = teacher_forced(EvalStep(graphdef, config), params, rest, data,
                             lambda rows: np.full(rows, n_remove, np.int32), batch_size)
    return {"n_remove": "all" if n_remove >= REMOVE_ALL else n_remove,
            **{key.replace("val_", "teacher_forced_"): value for key, value in metrics.items()}}


def evaluate_checkpoint(checkpoint: OpenedRun, examples: Sequence[Example], *, batch_size: int | None = None,
                        max_new_tokens: int = 800, n_remove: int | None = None, progress: bool = True,
                        position_gap: str | int = "auto") -> tuple[GenerationResult, dict]:
    """Generation accuracy and speed (and, with ``n_remove``, teacher-forced metrics) of a checkpoint.

    ``position_gap``: positions skipped between prompt and generated tokens (see
    :func:`icot_jax.generate.keep_position_gaps`). ``"auto"``: none, unless the run was trained with
    ``train.keep_position``; then each example's CoT length as read from ``examples`` (the model is taken
    to be fully internalized), or ``min(n_remove, CoT length)`` when ``n_remove`` is given.
    Returns the full result (with per-example predictions) and the JSON-ready metrics of ``eval.json``.
    """
    import numpy as np

    from icot_jax.data.tokenize import encode_examples
    from icot_jax.generate import DecodeSettings, GenerationEvaluator, keep_position_gaps
    from icot_jax.removal import REMOVE_ALL

    data = encode_examples(examples, checkpoint.tokenizer, mode=checkpoint.join)
    evaluator = GenerationEvaluator(checkpoint.tokenizer, data, batch_size=batch_size, progress=progress,
                                    settings=DecodeSettings(max_new_tokens=max_new_tokens))
    if position_gap == "auto":
        removed = REMOVE_ALL if n_remove is None else n_remove
        gaps = keep_position_gaps(data, removed) if checkpoint.keep_position else None
    else:
        gaps = int(position_gap)
    result = evaluator(checkpoint.model, gaps)
    metrics = {"checkpoint": checkpoint.url, "device": device_description(), **result.metrics(),
               "mean_position_gap": 0.0 if gaps is None else float(np.mean(gaps))}
    if n_remove is not None:
        metrics.update(teacher_forced_metrics(checkpoint, data, n_remove, evaluator.batch_size))
    return result, metrics


@dataclasses.dataclass(frozen=True)
class Answer:
    """What ``icot generate`` prints."""

    model_input: str
    generated_text: str
    cot: str
    """Text the model emitted before ``####`` (empty once the CoT is internalized)."""
    answer: str | None
    """The extracted answer (``'#### ...'``), None when the model produced no ``####``."""


DEFAULT_MAX_NEW_TOKENS = 800
"""The reference's generation budget, for checkpoints without a run config."""


def generation_budget(checkpoint: OpenedRun, prompt_length: int, position_gap: int, requested: int | None) -> int:
    """``max_new_tokens`` for one prompt: ``requested``, by default the run's ``eval.max_new_tokens``
    (:data:`DEFAULT_MAX_NEW_TOKENS` for a Hugging Face folder), capped (with a note on stderr) so that every
    generated token has a row in a learned position table: past it JAX would silently reuse the last row."""
    run = checkpoint.config
    wanted = requested if requested is not None else run.eval.max_new_tokens if run else DEFAULT_MAX_NEW_TOKENS
    n_positions = getattr(checkpoint.model.config, "n_positions", None)
    if n_positions is None:
        return wanted
    room = n_positions - prompt_length - position_gap
    used = f"the prompt takes {prompt_length}" + (f" and the position gap {position_gap}" if position_gap else "")
    if room < 1:
        raise ValueError(f"nothing can be generated: the model has {n_positions} positions and {used}")
    if wanted > room:
        print(f"max_new_tokens capped at {room} (asked for {wanted}): the model has {n_positions} positions and "
              f"{used}", file=sys.stderr)
    return min(wanted, room)


def generate_answer(checkpoint: OpenedRun, question: str, *, max_new_tokens: int | None = None,
                    position_gap: str | int = "auto") -> Answer:
    """Greedy-decode one question (multiplication in normal or model notation, or raw text).

    ``position_gap="auto"``: 0, unless the run was trained with ``train.keep_position``; then the length of
    the CoT the question would have, which is known for multiplication (the CoT is a function of the
    operands); for other questions pass the number. ``max_new_tokens``: see :func:`generation_budget`.
    """
    if not question.strip():
        raise ValueError("the question is empty: give the text to answer, e.g. '3719*3349'")
    import numpy as np
    from flax import nnx

    from icot_jax.data.formats import ANSWER_MARKER, Example, parse_line
    from icot_jax.data.multiplication import format_example
    from icot_jax.data.tokenize import encode_examples
    from icot_jax.generate import Decoder, DecodeSettings, extract_answer, keep_position_gaps, left_pad_prompts
    from icot_jax.removal import REMOVE_ALL

    model_input = to_model_notation(question)
    tokenizer = checkpoint.tokenizer
    prompt = encode_examples([Example(model_input, "", ANSWER_MARKER)], tokenizer, mode=checkpoint.join)
    gap = 0 if position_gap == "auto" else int(position_gap)
    if position_gap == "auto" and checkpoint.keep_position:
        operands = multiplication_operands(model_input)
        if operands is None or None in operands:
            raise ValueError("this checkpoint was trained with train.keep_position: pass --position-gap N (the "
                             "length of the CoT it was trained without); 'auto' knows it only for multiplication")
        full = encode_examples([parse_line(format_example(*operands))], tokenizer, mode=checkpoint.join)
        gap = int(keep_position_gaps(full, REMOVE_ALL)[0])
    max_new_tokens = generation_budget(checkpoint, int(prompt.seps[0, 0]) + 1, gap, max_new_tokens)
    graphdef, state = nnx.split(checkpoint.model)
    decoder = Decoder(graphdef, eos_id=tokenizer.eos_token_id, settings=DecodeSettings(max_new_tokens=max_new_tokens))
    decoded = decoder(state, *left_pad_prompts(prompt), position_gap=np.array([gap]))
    text = tokenizer.decode(decoded.tokens[0, : decoded.n_generated[0]], skip_special_tokens=True)
    return Answer(model_input, text, text.partition(ANSWER_MARKER)[0].strip(), extract_answer(text))


def format_answer(answer: Answer) -> str:
    """Human-readable lines for ``icot generate``; multiplication answers are also given in normal notation."""
    lines = [f"model input: {answer.model_input}", f"generated: {answer.generated_text or '(only EOS)'}"]
    if answer.answer is None:
        return "\n".join([*lines, "answer: none (no '####' in the generated text)"])
    lines.append(f"CoT: {answer.cot or '(none: internalized)'}")
    operands = multiplication_operands(answer.model_input)
    value = reversed_digits_value(answer.answer.removeprefix("####")) if operands else None
    if value is None:
        return "\n".join([*lines, f"answer: {answer.answer.removeprefix('####').strip()}"])
    a, b = operands
    verdict = "correct" if value == a * b else f"wrong, {a}*{b} = {a * b}"
    return "\n".join([*lines, f"answer: {value}  (model notation: {answer.answer}; {verdict})"])


# ---------------------------------------------------------------------------------------------- trade-off


def tradeoff(checkpoints: Sequence[str | Path], examples: Sequence[Example], *, labels: Sequence[str] | None = None,
             batch_size: int | None = None, max_new_tokens: int = 800, progress: bool = True,
             position_gap: str | int = "auto", **open_kwargs) -> list[dict]:
    """Accuracy and speed of each checkpoint on the same examples (one row per checkpoint, in order).

    ``position_gap`` as in :func:`evaluate_checkpoint` (``auto`` takes a ``keep_position`` checkpoint to be
    fully internalized; pass a number for partially internalized ones). ``open_kwargs`` go to
    :func:`icot_jax.runs.open_run` (``which``, ``dtype``, ``join``). Default labels: the last part of each path
    or URL."""
    from icot_jax.runs import open_run

    labels = list(labels) if labels else [str(c).rstrip("/").rpartition("/")[2] or str(c) for c in checkpoints]
    if len(labels) != len(checkpoints):
        raise ValueError(f"{len(labels)} labels for {len(checkpoints)} checkpoints")
    rows = []
    for label, path in zip(labels, checkpoints):
        result, _ = evaluate_checkpoint(open_run(path, **open_kwargs), examples, batch_size=batch_size,
                                        max_new_tokens=max_new_tokens, progress=progress, position_gap=position_gap)
        rows.append({"label": label, "checkpoint": str(path), "accuracy": result.accuracy,
                     "examples_per_second": result.examples_per_second,
                     "tokens_per_second": result.tokens_per_second,
                     "mean_generated_tokens": result.mean_generated_tokens})
    slowest = min(row["examples_per_second"] for row in rows)
    return [{**row, "speedup_vs_slowest": row["examples_per_second"] / slowest} for row in rows]


def write_tradeoff(rows: Sequence[dict], out_dir: str | Path, *, title: str = "") -> tuple[Path, Path]:
    """``tradeoff.csv`` and ``tradeoff.png`` (accuracy against examples/s, points in checkpoint order)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out_dir / "tradeoff.csv", out_dir / "tradeoff.png"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=TRADEOFF_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    speeds, accuracies = [r["examples_per_second"] for r in rows], [r["accuracy"] for r in rows]
    ax.plot(speeds, accuracies, "o-")
    for row, x, y in zip(rows, speeds, accuracies):
        ax.annotate(row["label"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set(xlabel="examples / s (greedy decoding)", ylabel="exact-match accuracy", ylim=(-0.02, 1.02),
           title=title or "speed-accuracy trade-off")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return csv_path, png_path
