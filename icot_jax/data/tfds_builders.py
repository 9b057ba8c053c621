"""tensorflow-datasets builders writing `array_record` files, readable without TensorFlow.

Two builders share one schema `{"source", "cot", "answer"}` (UTF-8 text, as in `Example`):

- `icot_multiplication`: generated K-by-K data. A config per K (`"4x4"`, ..., `"20x20"`) with the
  reference sizes (808,000 / 1,000 / 1,000, fewer where K is too small); `multiplication_config`
  makes configs with other sizes, seeds, mixtures of K, or pairs excluded from existing files.
- `icot_text`: `SRC||COT #### ANS` files given by path, one per split (GSM8K, or any such file).

Shuffling is disabled, so record i of a split is line i of its source: the loader's `index` maps
straight back to the file. Read back with `tfds.data_source(name, split=..., data_dir=...)`, or
`read_split`, which returns `Example`s.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path

import tensorflow_datasets as tfds
from etils import epath

from icot_jax.data import multiplication
from icot_jax.data.formats import Example, OnError, read_examples

_FIELDS = ("source", "cot", "answer")
_READ_CHUNK = 4096


def _features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({field: tfds.features.Text() for field in _FIELDS})


class _ExamplesBuilder(tfds.core.GeneratorBasedBuilder):
    """Shared schema and record writer; abstract (no `_split_generators`), so never registered."""

    VERSION = tfds.core.Version("1.0.0")

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # tfds 4.9 resolves this through the `importlib_resources` backport, which it declares only
        # for Python < 3.9 (so it is missing here); the builder's own file is all it needs.
        return epath.Path(inspect.getfile(cls))

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, description=self.__doc__, features=_features(), disable_shuffling=True
        )

    def _generate_examples(self, examples: Sequence[Example]):
        for i, example in enumerate(examples):
            yield i, dataclasses.asdict(example)


def default_sizes(digits: int) -> dict[str, int]:
    """Reference sizes, or for small K 10% each (at most 1,000) to valid/test and the rest to train."""
    total = multiplication.count_pairs(digits)
    held_out = min(multiplication.REFERENCE_SIZES["valid"], total // 10)
    train = min(multiplication.REFERENCE_SIZES["train"], total - 2 * held_out)
    return {"train": train, "valid": held_out, "test": held_out}


@dataclasses.dataclass(kw_only=True)
class MultiplicationConfig(tfds.core.BuilderConfig):
    """What to generate: K values, split sizes, seed, and files whose pairs must not reappear."""

    digits: tuple[int, ...] = (4,)
    sizes: Mapping[str, int] = dataclasses.field(default_factory=lambda: dict(multiplication.REFERENCE_SIZES))
    seed: int = 0
    exclude_files: tuple[str, ...] = ()


def multiplication_config(
    digits: Sequence[int],
    sizes: Mapping[str, int] | None = None,
    *,
    seed: int = 0,
    exclude_files: Sequence[str | Path] = (),
) -> MultiplicationConfig:
    """A config named after its content, e.g. `4x4` (defaults) or `4x4+5x5-1000-100-100-seed3`."""
    digits = tuple(sorted(set(digits)))
    default = sizes is None and seed == 0 and not exclude_files and len(digits) == 1
    sizes = dict(sizes) if sizes is not None else default_sizes(min(digits))
    name = "+".join(f"{k}x{k}" for k in digits)
    if not default:
        name += "-" + "-".join(str(sizes.get(split, 0)) for split in multiplication.SPLITS) + f"-seed{seed}"
        name += "-excl" if exclude_files else ""
    return MultiplicationConfig(
        name=name, digits=digits, sizes=sizes, seed=seed, exclude_files=tuple(map(str, exclude_files))
    )


class IcotMultiplication(_ExamplesBuilder):
    """K-by-K multiplication with partial products as CoT, in the exact format of the reference."""

    BUILDER_CONFIGS = [
        multiplication_config([k]) for k in range(multiplication.MIN_DIGITS, multiplication.MAX_DIGITS + 1)
    ]

    def _split_generators(self, dl_manager):
        config = self.builder_config
        splits = multiplication.generate_splits(
            config.digits, config.sizes, seed=config.seed, exclude=multiplication.read_pairs(config.exclude_files)
        )
        return {
            split: self._generate_examples([multiplication.make_example(a, b) for a, b in pairs])
            for split, pairs in splits.items()
            if pairs
        }


@dataclasses.dataclass(kw_only=True)
class TextFilesConfig(tfds.core.BuilderConfig):
    """One `SRC||COT #### ANS` file per split, and what to do with malformed lines."""

    split_files: Mapping[str, str] = dataclasses.field(default_factory=dict)
    on_error: OnError = "raise"


class IcotText(_ExamplesBuilder):
    """`SRC||COT #### ANS` text files (GSM8K-Aug, GSM8K with prose CoT, multiplication files)."""

    def _split_generators(self, dl_manager):
        config = self.builder_config
        if not isinstance(config, TextFilesConfig) or not config.split_files:
            raise ValueError("icot_text needs config=TextFilesConfig(name=..., split_files={split: path})")
        return {
            split: self._generate_examples(read_examples(path, on_error=config.on_error).examples)
            for split, path in config.split_files.items()
        }


def build(
    builder_cls: type[tfds.core.GeneratorBasedBuilder], config: tfds.core.BuilderConfig, data_dir: str | Path
) -> tfds.core.GeneratorBasedBuilder:
    """Prepares `builder_cls` with `config` as `array_record` files under `data_dir`."""
    builder = builder_cls(config=config, data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare()
    return builder


def read_split(name: str, split: str, data_dir: str | Path) -> list[Example]:
    """All examples of a prepared split, e.g. `read_split("icot_text/gsm8k", "valid", data_dir)`."""
    source = tfds.data_source(name, split=split, data_dir=str(data_dir))
    examples = []
    for start in range(0, len(source), _READ_CHUNK):
        for record in source.__getitems__(range(start, min(start + _READ_CHUNK, len(source)))):
            examples.append(Example(**{field: record[field].decode("utf-8") for field in _FIELDS}))
    return examples
