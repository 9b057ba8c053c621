"""Generation throughput: explicit CoT vs internalized (answer only) decoding with one model.

Settings of BENCHMARKS.md:

- ``tiny-gpt2-decode``: GPT-2 with 4 layers, d_model 256, 4 heads, 256 positions, random init, fp32, the
  word-level tokenizer; greedy decoding with the double-EOS stop, max_new_tokens 100, 200 examples of 4×4
  validation, batch 1 and 32. A random model emits EOS whenever it likes, so this row alone is not
  comparable across implementations; the ``explicit`` / ``implicit`` rows below fix the lengths.
- ``decode-9x9-explicit-vs-implicit``: the same architecture with 512 positions (a 9×9 prompt plus its
  CoT is 287 tokens), 9×9 prompts, max_new_tokens 800 as in evaluation, batch 1 and 32.

How the lengths are forced. A random model does not write the right CoT, so the model is wrapped in
:class:`ScheduledEos`, which gives EOS the top logit at exactly the positions where a trained model emits
it and forbids it elsewhere. *Explicit*: EOS at the original positions of the 2nd and 3rd EOS (the model
writes CoT + EOS + answer + EOS, 57 tokens for 4×4, 267 for 9×9). *Implicit*: EOS right after the prompt
and after the answer (EOS + answer + EOS, as a fully internalized model: 11 / 21 tokens). Everything else
is the real evaluation path (``GenerationEvaluator``: KV cache with its short first stage, double-EOS stop,
early loop exit, the same max_new_tokens), and the other tokens are the model's own greedy choices. Both
variants share one compiled decoder per batch size (the EOS positions are model state, not constants). Two
more rows: *implicit, full cache* decodes the implicit lengths with one ``max_new_tokens``-slot cache
(``short_cache_tokens=None``) to show what the short first stage saves, and *explicit, tight cap* decodes
the explicit lengths with ``max_new_tokens`` equal to them (the smallest cache that holds them, closer to a
cache that grows with the sequence, as in Hugging Face).

    python bench/decode_speed.py                   # everything: ~8 minutes on a busy 2-core CPU
    python bench/decode_speed.py --setting 9x9 --batch-sizes 32 --repeats 5

Throughput excludes compilation (reported separately); each figure is the median over ``--repeats``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from flax import nnx

from icot_jax.data.formats import read_examples
from icot_jax.data.multiplication import make_example, sample_pairs
from icot_jax.data.tokenize import build_builtin_tokenizer, encode_examples
from icot_jax.generate import DecodeSettings, GenerationEvaluator
from icot_jax.models.hf import from_config

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "reference"


class ScheduledEos(nnx.Module):
    """Wraps a model: EOS is the argmax exactly after positions ``eos_after`` (and never elsewhere).

    ``eos_after`` holds the positions whose *next* token is EOS; it is an ``nnx.Variable`` so that changing
    it (explicit vs implicit) keeps the graph, and with it the compiled decoder.
    """

    def __init__(self, model: nnx.Module, eos_id: int, eos_after: tuple[int, int]):
        self.model, self.eos_id = model, eos_id
        self.eos_after = nnx.Variable(jnp.asarray(eos_after, jnp.int32))

    def _schedule(self, logits, position_ids):
        is_eos = jnp.arange(logits.shape[-1]) == self.eos_id
        eos_next = jnp.isin(position_ids, self.eos_after[...])[..., None]
        top = jnp.max(logits, axis=-1, keepdims=True) + 1.0
        return jnp.where(is_eos, jnp.where(eos_next, top, -jnp.inf), jnp.where(eos_next, -jnp.inf, logits))

    def __call__(self, input_ids, position_ids, attention_mask, *, dropout_key=None):
        return self._schedule(self.model(input_ids, position_ids, attention_mask, dropout_key=dropout_key),
                              position_ids)

    def init_cache(self, batch_size, max_length):
        return self.model.init_cache(batch_size, max_length)

    def decode(self, input_ids, position_ids, attention_mask, cache):
        logits, cache = self.model.decode(input_ids, position_ids, attention_mask, cache)
        return self._schedule(logits, position_ids), cache


def tiny_gpt2(tokenizer, n_positions: int) -> nnx.Module:
    """BENCHMARKS.md's tiny GPT-2 (random init, fp32) for the built-in tokenizer."""
    eos = tokenizer.eos_token_id
    config = transformers.GPT2Config(vocab_size=len(tokenizer), n_positions=n_positions, n_embd=256, n_layer=4,
                                     n_head=4, bos_token_id=eos, eos_token_id=eos)
    return from_config(config, seed=0)


def examples_for(digits: int, n: int) -> list:
    """The first ``n`` reference validation examples of K×K (generated in the same format if absent)."""
    path = REFERENCE / f"{digits}_by_{digits}_mult" / "valid.txt"
    if path.exists():
        return read_examples(path).examples[:n]
    return [make_example(a, b) for a, b in sample_pairs(np.random.default_rng(0), digits, n)]


def measure(evaluator: GenerationEvaluator, model: nnx.Module, repeats: int) -> dict:
    """Medians over ``repeats`` evaluations (the first call's compilation is excluded and reported)."""
    results = [evaluator(model) for _ in range(repeats)]
    return {"examples_per_s": statistics.median(r.examples_per_second for r in results),
            "tokens_per_s": statistics.median(r.tokens_per_second for r in results),
            "mean_generated_tokens": results[0].mean_generated_tokens,
            "compile_s": sum(r.compile_seconds for r in results)}


def run_setting(name: str, digits: int, n_examples: int, n_positions: int, max_new_tokens: int,
                batch_sizes: list[int], repeats: int, natural: bool) -> list[dict]:
    """Rows of measurements for one setting: the random model (if ``natural``), explicit, implicit, and
    implicit with one full-size cache (no short first cache stage)."""
    tokenizer = build_builtin_tokenizer()
    data = encode_examples(examples_for(digits, n_examples), tokenizer)
    seps = data.seps
    if (seps != seps[0]).any():
        raise ValueError(f"{digits}x{digits} examples of different lengths: the EOS schedule needs equal ones")
    q_end, cot_end, last = (int(s) for s in seps[0])
    explicit, implicit = (cot_end - 1, last - 1), (q_end, q_end + last - cot_end)  # CoT EOS ans EOS | EOS ans EOS
    model = tiny_gpt2(tokenizer, n_positions)
    scheduled = ScheduledEos(model, tokenizer.eos_token_id, explicit)
    staged = DecodeSettings(max_new_tokens=max_new_tokens)
    variants = [("explicit", explicit, staged),
                ("explicit, tight cap", explicit, dataclasses.replace(staged, max_new_tokens=last - q_end)),
                ("implicit", implicit, staged),
                ("implicit, full cache", implicit, dataclasses.replace(staged, short_cache_tokens=None))]
    rows = []
    for batch_size in batch_sizes:
        evaluators = {settings: GenerationEvaluator(tokenizer, data, batch_size=batch_size, settings=settings,
                                                    progress=False) for _, _, settings in variants}
        if natural:
            rows.append({"setting": name, "variant": "random model", "batch_size": batch_size,
                         **measure(evaluators[staged], model, repeats)})
        for variant, eos_after, settings in variants:
            scheduled.eos_after.set_value(jnp.asarray(eos_after, jnp.int32))
            rows.append({"setting": name, "variant": variant, "batch_size": batch_size,
                         **measure(evaluators[settings], scheduled, repeats)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=("4x4", "9x9", "all"), default="all")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--n-4x4", type=int, default=200, help="4x4 examples (tiny-gpt2-decode: 200)")
    parser.add_argument("--n-9x9", type=int, default=32, help="9x9 examples")
    args = parser.parse_args()
    rows = []
    if args.setting in ("4x4", "all"):
        rows += run_setting("tiny-gpt2-decode", 4, args.n_4x4, 256, 100, args.batch_sizes, args.repeats, True)
    if args.setting in ("9x9", "all"):
        rows += run_setting("decode-9x9-explicit-vs-implicit", 9, args.n_9x9, 512, 800, args.batch_sizes,
                            args.repeats, False)
    print(f"device: {jax.devices()[0].device_kind}; medians of {args.repeats} runs, compilation excluded")
    print(f"{'setting':>32} {'variant':>20} {'batch':>5} {'examples/s':>11} {'tokens/s':>9} {'tokens/ex':>9} "
          f"{'compile s':>9}")
    for r in rows:
        print(f"{r['setting']:>32} {r['variant']:>20} {r['batch_size']:>5} {r['examples_per_s']:>11.1f} "
              f"{r['tokens_per_s']:>9.0f} {r['mean_generated_tokens']:>9.1f} {r['compile_s']:>9.1f}")
    ratios = {}
    for r in rows:
        if r["variant"] == "implicit":
            for e in rows:
                if e["variant"].startswith("explicit") and (e["setting"], e["batch_size"]) == (r["setting"],
                                                                                                r["batch_size"]):
                    key = f"{r['setting']} batch {r['batch_size']}, vs {e['variant']}"
                    ratios[key] = r["examples_per_s"] / e["examples_per_s"]
    for key, ratio in ratios.items():
        print(f"implicit / explicit examples/s, {key}: {ratio:.1f}x")
    print(json.dumps({"device": jax.devices()[0].device_kind, "rows": rows, "speedup_implicit_vs_explicit": ratios}))


if __name__ == "__main__":
    main()
