"""Data for ICoT-SI: every format of the paper, as fixed-shape batches.

- `formats`: the `SRC||COT #### ANS` line format (`Example`), GSM8K jsonl conversion.
- `multiplication`: K-by-K generator reproducing the reference lines exactly.
- `tokenize`: examples -> int32 arrays with separator positions; the built-in digit tokenizer.
- `tfds_builders`: `array_record` tfds datasets, readable with `tfds.data_source` (no TensorFlow).
- `loader`: deterministic, resumable, host-sliced batches.

Submodules are imported explicitly (`from icot_jax.data import tokenize`) so that light tasks do
not pay for importing transformers or tensorflow-datasets.
"""
