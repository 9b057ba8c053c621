"""The `SRC||COT #### ANS` line format of the reference, and GSM8K conversion into it.

Parsing follows the reference `CoTDataset` exactly (see REFERENCE_SEMANTICS.md, "Data format"):
a line is stripped and split on `||`; `cot` is the text before the first `####`, stripped; `answer`
is `'####'` plus the rest, stripped, with commas removed. Where the reference silently drops a
malformed line, we raise `DataFormatError` naming `file:line`, or skip and count on request.
Blank lines are skipped silently, as in the reference.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Literal

from icot_jax.errors import MissingPathError, UserError

logger = logging.getLogger(__name__)

OnError = Literal["raise", "skip"]
CotStyle = Literal["formula", "text"]

SOURCE_SEPARATOR = "||"
ANSWER_MARKER = "####"
_CALCULATOR_ANNOTATION = re.compile(r"<<([^<>]*)>>")


class DataFormatError(UserError):
    """A line or record that does not follow the expected format."""


@dataclasses.dataclass(frozen=True)
class Example:
    """One question with its chain of thought and answer, as the reference holds them.

    `answer` keeps the leading `####` (e.g. `'#### 72'`) because the reference trains on and
    scores that exact string; `cot` may be empty.
    """

    source: str
    cot: str
    answer: str

    def to_line(self) -> str:
        """The `SRC||COT #### ANS` line that `parse_line` maps back to this example."""
        return f"{self.source}{SOURCE_SEPARATOR}{self.cot} {self.answer}"


@dataclasses.dataclass(frozen=True)
class ParsedFile:
    """The examples read from one file, the line each came from, and how many malformed lines were skipped."""

    path: Path
    examples: list[Example]
    n_skipped: int
    line_numbers: list[int] = dataclasses.field(default_factory=list)
    """1-based line of each example (error messages name ``file:line``)."""


def parse_line(line: str) -> Example:
    """Parses one `SRC||COT #### ANS` line; raises `DataFormatError` saying what is wrong."""
    parts = line.strip().split(SOURCE_SEPARATOR)
    if len(parts) == 1:
        raise DataFormatError(f"no {SOURCE_SEPARATOR!r} between source and CoT")
    if len(parts) > 2:
        raise DataFormatError(f"{len(parts) - 1} {SOURCE_SEPARATOR!r} separators, expected exactly one")
    source, target = parts
    if not source.strip():
        raise DataFormatError("empty source before '||'")
    cot, marker, rest = target.partition(ANSWER_MARKER)
    if not marker:
        raise DataFormatError(f"no {ANSWER_MARKER!r} before the answer")
    answer = (ANSWER_MARKER + rest).strip().replace(",", "")
    if answer == ANSWER_MARKER:
        raise DataFormatError(f"empty answer after {ANSWER_MARKER!r}")
    # The source is kept unstripped: the reference builds its sequence string from it verbatim.
    return Example(source=source, cot=cot.strip(), answer=answer)


def read_examples(path: str | Path, *, on_error: OnError = "raise") -> ParsedFile:
    """Reads a `SRC||COT #### ANS` file (multiplication, GSM8K-Aug, or GSM8K with prose CoT)."""
    return _parse_file(Path(path), parse_line, on_error)


def write_examples(path: str | Path, examples: Iterable[Example]) -> int:
    """Writes examples one line each; returns the number written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8") as f:
        for example in examples:
            f.write(example.to_line() + "\n")
            count += 1
    return count


def gsm8k_record_to_example(record: object, *, style: CotStyle = "formula") -> Example:
    """Converts an original GSM8K record `{"question", "answer"}` into an `Example`.

    `style="formula"` keeps only the calculator annotations, as GSM8K-Aug does:
    `'<<48/2=24>> <<48+24=72>>'`. `style="text"` keeps the prose with the annotations removed and
    the lines joined by spaces, like the reference's `train_no_aug.txt`.
    """
    if not isinstance(record, dict):
        raise DataFormatError(f"expected a JSON object, got {type(record).__name__}")
    question, solution = (_string_field(record, key) for key in ("question", "answer"))
    reasoning, marker, final = solution.partition(ANSWER_MARKER)
    if not marker:
        raise DataFormatError(f"'answer' has no {ANSWER_MARKER!r} line with the final answer")
    if style == "formula":
        cot = " ".join(f"<<{expr}>>" for expr in _CALCULATOR_ANNOTATION.findall(reasoning))
    elif style == "text":
        cot = " ".join(_CALCULATOR_ANNOTATION.sub("", reasoning).split())
    else:
        raise ValueError(f"unknown CoT style {style!r}; expected 'formula' or 'text'")
    source = " ".join(question.splitlines()).strip()
    # Round-trip through the line format so that every converted example is a valid line.
    return parse_line(f"{source}{SOURCE_SEPARATOR}{cot} {ANSWER_MARKER} {final.strip()}")


def convert_gsm8k_jsonl(
    path: str | Path, *, style: CotStyle = "formula", on_error: OnError = "raise"
) -> ParsedFile:
    """Reads an original GSM8K `.jsonl` file into examples (see `gsm8k_record_to_example`)."""

    def parse(line: str) -> Example:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFormatError(f"bad JSON: {e.msg} (column {e.colno})") from None
        return gsm8k_record_to_example(record, style=style)

    return _parse_file(Path(path), parse, on_error)


def _string_field(record: dict, key: str) -> str:
    if key not in record:
        raise DataFormatError(f"missing key {key!r} (keys: {sorted(record)})")
    value = record[key]
    if not isinstance(value, str):
        raise DataFormatError(f"key {key!r} is a {type(value).__name__}, expected a string")
    return value


def _parse_file(path: Path, parse: Callable[[str], Example], on_error: OnError) -> ParsedFile:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    examples: list[Example] = []
    line_numbers: list[int] = []
    skipped: list[str] = []
    if not path.is_file():
        raise MissingPathError(f"{path}: no such file")
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                examples.append(parse(line))
                line_numbers.append(lineno)
            except DataFormatError as e:
                message = f"{path}:{lineno}: {e}"
                if on_error == "raise":
                    raise DataFormatError(message) from None
                skipped.append(message)
    if skipped:
        logger.warning("%s: skipped %d malformed lines, first: %s", path, len(skipped), skipped[0])
    return ParsedFile(path=path, examples=examples, n_skipped=len(skipped), line_numbers=line_numbers)


def cot_lengths(examples: Sequence[Example]) -> list[int]:
    """Length of each CoT in whitespace-separated tokens (the unit of the paper's table)."""
    return [len(example.cot.split()) for example in examples]
