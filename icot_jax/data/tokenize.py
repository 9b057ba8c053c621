"""Tokenization of examples into fixed-shape int32 arrays with the three separator positions.

A row is `[BOS] question EOS cot EOS answer EOS` right-padded with the EOS id (docs/architecture.md,
"Batches"); `seps` holds the absolute positions of the three EOS tokens. Two ways to join:

- `"reference"` (default) tokenizes the reference's string
  `' ' + src + ' ' + EOS + ' ' + cot + ' ' + EOS + ' ' + ans + ' ' + EOS` with special tokens.
  With GPT-2 BPE each `' ' + EOS` leaves a lone space token before the EOS, so the CoT region
  (between the first two EOS) is the CoT tokens plus one space token, exactly as in the reference.
- `"segments"` tokenizes `' ' + src`, `' ' + cot`, `' ' + ans` separately and joins them with EOS
  ids (after the BOS the tokenizer adds, if any), which avoids the stray space token.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import typing
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from tqdm.auto import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from icot_jax.config import ErrorOrSkip, JoinMode
from icot_jax.data.formats import Example, read_examples
from icot_jax.errors import UserError

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
UNK_TOKEN = "<unk>"
BUILTIN_VOCAB = (*"0123456789", "*", "+", "(", ")", "####", "=", UNK_TOKEN, EOS_TOKEN)
_FIELDS = ("source", "cot", "answer")
_CHUNK = 8192  # examples per tokenizer call: large enough for Rust-side parallelism, small for memory
_PROGRESS_MIN_EXAMPLES = 50_000


def build_builtin_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer for multiplication from scratch: digits, `* + ( ) #### =`, EOS, unk.

    Tokens are whitespace-separated words, so a CoT of n whitespace tokens is n model tokens and
    both join modes give identical ids. Like GPT-2 it adds no BOS.
    """
    vocab = {token: i for i, token in enumerate(BUILTIN_VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens([AddedToken(EOS_TOKEN, special=True), AddedToken(UNK_TOKEN, special=True)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=EOS_TOKEN, unk_token=UNK_TOKEN, pad_token=EOS_TOKEN
    )


def save_builtin_tokenizer(path: str | Path) -> Path:
    """Saves the built-in tokenizer in HF format so `load_tokenizer(path)` loads it."""
    build_builtin_tokenizer().save_pretrained(str(path))
    return Path(path)


def load_tokenizer(name_or_path: str | Path, *, local_files_only: bool = False) -> PreTrainedTokenizerBase:
    """Any HF tokenizer (local folder or hub name) through `AutoTokenizer.from_pretrained`;
    `local_files_only=True` never asks the hub (a folder or the local cache, else `OSError`)."""
    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), local_files_only=local_files_only)
    if tokenizer.eos_token_id is None:
        raise UserError(f"tokenizer {name_or_path} has no EOS token, which separates the segments")
    return tokenizer


@dataclasses.dataclass(frozen=True)
class EncodedDataset:
    """Token ids of a dataset, padded to its largest bucket, with the examples they came from.

    `input_ids[i, :lengths[i]]` is row i; the rest is `pad_id` (the EOS id). `seps[i]` are the
    positions of its three EOS tokens. Each row belongs to the smallest bucket length that fits it.
    """

    input_ids: np.ndarray  # int32[N, max(bucket used)]
    seps: np.ndarray  # int32[N, 3]
    lengths: np.ndarray  # int32[N]
    buckets: tuple[int, ...]
    pad_id: int
    examples: list[Example]
    n_skipped: int = 0  # over-length examples dropped by on_overlength="skip"

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def cot_lengths(self) -> np.ndarray:
        """Tokens in each CoT region, the unit in which removal counts are counted."""
        return self.seps[:, 1] - self.seps[:, 0] - 1



def encode_examples(
    examples: Sequence[Example],
    tokenizer: PreTrainedTokenizerBase,
    *,
    mode: JoinMode = "reference",
    max_length: int | None = None,
    buckets: Sequence[int] | None = None,
    on_overlength: ErrorOrSkip = "error",
    source: str | Path | None = None,
) -> EncodedDataset:
    """Tokenizes examples into an `EncodedDataset`.

    Rows are padded to the smallest of `buckets` that fits the longest row; without buckets, to the
    longest row (one shape for the whole dataset). Rows longer than `max_length` or than the largest
    bucket raise (`on_overlength="error"`) or are dropped and counted (`"skip"`). `source` names the
    file in error messages.
    """
    if not examples:
        raise UserError(f"no examples to encode{_where(source)}")
    if on_overlength not in typing.get_args(ErrorOrSkip):
        raise ValueError(f"on_overlength must be one of {typing.get_args(ErrorOrSkip)}, got {on_overlength!r}")
    buckets = _checked_buckets(buckets)
    _check_no_eos_in_content(examples, tokenizer.eos_token, source)
    eos_id, prefix = tokenizer.eos_token_id, _special_prefix(tokenizer)
    flat, lengths = _tokenize_rows(examples, tokenizer, mode, prefix)
    position = np.arange(flat.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    seps = _eos_positions(flat, lengths, position, eos_id, len(prefix), source)
    keep = _check_max_length(lengths, _length_limit(buckets, max_length), on_overlength, source)
    if not keep.all():
        in_kept_row = np.repeat(keep, lengths)
        flat, position, lengths, seps = flat[in_kept_row], position[in_kept_row], lengths[keep], seps[keep]
        examples = [example for example, kept in zip(examples, keep) if kept]
    buckets = buckets or (int(lengths.max()),)
    width = smallest_bucket(buckets, int(lengths.max()))
    input_ids = np.full((len(lengths), width), eos_id, np.int32)
    np.put(input_ids, np.repeat(np.arange(len(lengths)) * width, lengths) + position, flat)
    return EncodedDataset(
        input_ids=input_ids,
        seps=seps,
        lengths=lengths,
        buckets=buckets,
        pad_id=eos_id,
        examples=list(examples),
        n_skipped=int((~keep).sum()),
    )


def smallest_bucket(buckets: Sequence[int], length: int) -> int:
    """The smallest of the sorted `buckets` that holds `length` tokens."""
    i = int(np.searchsorted(buckets, length))
    if i == len(buckets):
        raise UserError(f"a row of {length} tokens fits no bucket (largest: {buckets[-1]})")
    return int(buckets[i])


def encode_file(path: str | Path, tokenizer: PreTrainedTokenizerBase, **kwargs) -> EncodedDataset:
    """Reads a `SRC||COT #### ANS` file and encodes it (keyword arguments of `encode_examples`)."""
    return encode_examples(read_examples(path).examples, tokenizer, source=path, **kwargs)


def _where(source: str | Path | None) -> str:
    return f" in {source}" if source is not None else ""


def _checked_buckets(buckets: Sequence[int] | None) -> tuple[int, ...]:
    buckets = tuple(sorted(set(int(b) for b in buckets or ())))
    if buckets and buckets[0] < 1:
        raise UserError(f"data.buckets must be positive lengths, got {buckets}")
    return buckets


def _length_limit(buckets: tuple[int, ...], max_length: int | None) -> tuple[int, str] | None:
    """The longest row accepted, and how to name that limit in messages."""
    limits = [(max_length, f"max_length={max_length} tokens")] if max_length is not None else []
    limits += [(buckets[-1], f"the largest bucket ({buckets[-1]} tokens)")] if buckets else []
    return min(limits, default=None)


class OverlengthError(UserError):
    """Examples are longer than the length limit: ``detail`` says how many and by how much, ``first`` is
    the index of the first one (callers that know its line or config key can say more)."""

    def __init__(self, detail: str, *, first: int):
        super().__init__(f"{detail}; raise max_length / buckets or use on_overlength='skip'")
        self.detail = detail
        self.first = first


def _check_max_length(
    lengths: np.ndarray, limit: tuple[int, str] | None, on_overlength: ErrorOrSkip, source: str | Path | None
) -> np.ndarray:
    """Mask of the rows to keep; raises or logs about the rows longer than `limit`."""
    if limit is None:
        return np.ones(lengths.size, bool)
    keep = lengths <= limit[0]
    n_long = int((~keep).sum())
    if n_long:
        message = (
            f"{n_long} of {lengths.size} examples{_where(source)} are longer than {limit[1]} "
            f"(longest: {lengths.max()})"
        )
        if on_overlength == "error" or n_long == lengths.size:
            raise OverlengthError(message, first=int(np.argmin(keep)))
        logger.warning("skipped %s", message)
    return keep


def _check_no_eos_in_content(examples: Sequence[Example], eos: str, source: str | Path | None) -> None:
    for i, example in enumerate(examples):
        for field in _FIELDS:
            text = getattr(example, field)
            if eos in text:
                raise UserError(
                    f"example {i}{_where(source)} has the EOS token {eos!r} inside its {field}: "
                    f"{text[:80]!r}; EOS separates the segments and cannot appear in them"
                )


def _tokenize_rows(
    examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, mode: JoinMode, prefix: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """All rows' ids concatenated (int32) and each row's length."""
    if mode not in typing.get_args(JoinMode):
        raise ValueError(f"mode must be one of {typing.get_args(JoinMode)}, got {mode!r}")
    eos, eos_id = tokenizer.eos_token, tokenizer.eos_token_id
    flats, lengths = [], []
    progress = tqdm(
        total=len(examples), desc="tokenizing", unit=" examples", disable=len(examples) < _PROGRESS_MIN_EXAMPLES
    )
    for start in range(0, len(examples), _CHUNK):
        chunk = examples[start : start + _CHUNK]
        if mode == "reference":
            texts = [f" {e.source} {eos} {e.cot} {eos} {e.answer} {eos}" for e in chunk]
            rows = _ids(tokenizer, texts, add_special_tokens=True)
        else:
            src, cot, ans = (_ids(tokenizer, [f" {getattr(e, f)}" for e in chunk]) for f in _FIELDS)
            rows = [prefix + s + [eos_id] + c + [eos_id] + a + [eos_id] for s, c, a in zip(src, cot, ans)]
        progress.update(len(chunk))
        lengths.append(np.fromiter(map(len, rows), np.int32, len(rows)))
        flats.append(np.fromiter(itertools.chain.from_iterable(rows), np.int32, int(lengths[-1].sum())))
    progress.close()
    return np.concatenate(flats), np.concatenate(lengths)


def _ids(tokenizer: PreTrainedTokenizerBase, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=add_special_tokens, return_attention_mask=False)["input_ids"]


def _special_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids the tokenizer puts before the text when adding special tokens (e.g. Llama's BOS)."""
    plain = _ids(tokenizer, [" 0"])[0]
    special = _ids(tokenizer, [" 0"], add_special_tokens=True)[0]
    for start in range(len(special) - len(plain) + 1):
        if special[start : start + len(plain)] == plain:
            return special[:start]
    raise UserError(f"cannot locate the text among the special tokens {tokenizer.__class__.__name__} adds")


def _eos_positions(
    flat: np.ndarray,
    lengths: np.ndarray,
    position: np.ndarray,
    eos_id: int,
    prefix_length: int,
    source: str | Path | None,
) -> np.ndarray:
    """int32[N, 3]: positions of the three EOS tokens after the special prefix of each row."""
    is_sep = (flat == eos_id) & (position >= prefix_length)  # a BOS equal to EOS is no separator
    rows = np.repeat(np.arange(lengths.size), lengths)[is_sep]
    counts = np.bincount(rows, minlength=lengths.size)
    if (counts != 3).any():
        i = int(np.flatnonzero(counts != 3)[0])
        raise UserError(
            f"example {i}{_where(source)} has {counts[i]} EOS tokens instead of 3; does the tokenizer "
            "append an EOS itself or map other text to the EOS id?"
        )
    return position[is_sep].reshape(-1, 3).astype(np.int32)
