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

- ``vs-hf``: the same tiny GPT-2 and 4×4 prompts, explicit lengths, decoded by ``GenerationEvaluator`` and by
  Hugging Face ``generate`` (PyTorch) on the same weights (exported with ``export_pretrained``), with the
  same EOS schedule as a ``LogitsProcessor`` and the reference's double-EOS stop as a ``StoppingCriteria``.
  At batch 1, 32 and the evaluator's default batch size; the two alternate within each repeat, and the
  generated tokens are checked to be identical.

    python bench/decode_speed.py                   # everything: ~8 minutes on a busy 2-core CPU
    python bench/decode_speed.py --setting vs-hf --repeats 5
    python bench/decode_speed.py --setting 9x9 --batch-sizes 32 --repeats 5

Throughput excludes compilation (reported separately); each figure is the median over ``--repeats``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

from icot_jax.data.formats import read_examples
from icot_jax.data.multiplication import make_example, sample_pairs
from icot_jax.data.tokenize import build_builtin_tokenizer, encode_examples
from icot_jax.generate import DecodeSettings, GenerationEvaluator, auto_batch_size
from icot_jax.models.hf import export_pretrained, from_config

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


def tiny_gpt2_config(tokenizer, n_positions: int) -> transformers.GPT2Config:
    """BENCHMARKS.md's tiny GPT-2 architecture for the built-in tokenizer."""
    eos = tokenizer.eos_token_id
    return transformers.GPT2Config(vocab_size=len(tokenizer), n_positions=n_positions, n_embd=256, n_layer=4,
                                   n_head=4, bos_token_id=eos, eos_token_id=eos)


def tiny_gpt2(tokenizer, n_positions: int) -> nnx.Module:
    """BENCHMARKS.md's tiny GPT-2 (random init, fp32) for the built-in tokenizer."""
    return from_config(tiny_gpt2_config(tokenizer, n_positions), seed=0)


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


class HFScheduledEos(transformers.LogitsProcessor):
    """:class:`ScheduledEos` for Hugging Face ``generate``: EOS is the argmax exactly after ``eos_after``.

    Prompts are left-padded to ``prompt_width``; a row's last token sits at position
    ``prompt_length - 1 + tokens generated so far`` (HF numbers positions from the first real token, as we do).
    """

    def __init__(self, eos_id: int, eos_after: tuple[int, int], prompt_lengths, prompt_width: int):
        self.eos_id, self.eos_after, self.prompt_width = eos_id, torch.tensor(eos_after), prompt_width
        self.last_prompt_position = torch.as_tensor(prompt_lengths) - 1

    def __call__(self, input_ids, scores):
        positions = self.last_prompt_position + (input_ids.shape[1] - self.prompt_width)
        eos_next = torch.isin(positions, self.eos_after)[:, None]
        is_eos = torch.arange(scores.shape[-1]) == self.eos_id
        top = scores.max(dim=-1, keepdim=True).values + 1.0
        return torch.where(is_eos, torch.where(eos_next, top, -torch.inf), torch.where(eos_next, -torch.inf, scores))


class DoubleEosStop(transformers.StoppingCriteria):
    """The reference's stop: a row is done once it has generated two EOS tokens. Having an ``eos_token_id``
    attribute makes ``generate`` pad finished rows with ``pad_token_id`` (EOS), as our decoder does."""

    def __init__(self, eos_id: int, prompt_width: int):
        self.eos_token_id, self.prompt_width = eos_id, prompt_width

    def __call__(self, input_ids, scores, **kwargs):
        return (input_ids[:, self.prompt_width:] == self.eos_token_id).sum(dim=1) >= 2


def hf_generate(hf_model, prompt_ids: np.ndarray, prompt_mask: np.ndarray, batch_size: int, max_new_tokens: int,
                eos_id: int, eos_after: tuple[int, int]) -> tuple[float, list[list[int]]]:
    """Greedy ``generate`` over every prompt in batches: (seconds spent in ``generate``, each row's tokens up
    to its stopping EOS)."""
    seconds, generated = 0.0, []
    for start in range(0, len(prompt_ids), batch_size):
        ids = torch.from_numpy(prompt_ids[start:start + batch_size].astype(np.int64))
        mask = torch.from_numpy(prompt_mask[start:start + batch_size].astype(np.int64))
        width = ids.shape[1]
        tic = time.perf_counter()
        with torch.no_grad():
            out = hf_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                    do_sample=False, eos_token_id=None, pad_token_id=eos_id,
                                    logits_processor=[HFScheduledEos(eos_id, eos_after, mask.sum(1), width)],
                                    stopping_criteria=[DoubleEosStop(eos_id, width)])
        seconds += time.perf_counter() - tic
        for row in out[:, width:].tolist():
            eos_seen = np.cumsum(np.asarray(row) == eos_id)
            generated.append(row[: int(np.searchsorted(eos_seen, 2)) + 1])
    return seconds, generated


def run_vs_hf(n_examples: int, batch_sizes: list[int], repeats: int) -> list[dict]:
    """Our decoder and HF ``generate`` on the same tiny GPT-2 weights, 4×4 prompts and explicit lengths;
    rows per batch size (those asked for and the evaluator's default), medians over ``repeats`` alternating runs."""
    tokenizer = build_builtin_tokenizer()
    eos = tokenizer.eos_token_id
    data = encode_examples(examples_for(4, n_examples), tokenizer)
    _, cot_end, last = (int(s) for s in data.seps[0])
    explicit = (cot_end - 1, last - 1)
    config = tiny_gpt2_config(tokenizer, 256)
    model = from_config(config, seed=0)
    scheduled = ScheduledEos(model, eos, explicit)
    with tempfile.TemporaryDirectory() as folder:
        export_pretrained(model, config, folder)
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    settings = DecodeSettings(max_new_tokens=100)
    rows = []
    for batch_size in dict.fromkeys([*batch_sizes, auto_batch_size(len(data))]):
        evaluator = GenerationEvaluator(tokenizer, data, batch_size=batch_size, settings=settings, progress=False)
        ours, hf = [], []
        for _ in range(repeats):
            ours.append(evaluator(scheduled))
            hf.append(hf_generate(hf_model, evaluator.prompt_ids, evaluator.prompt_mask, batch_size, 100, eos,
                                  explicit))
        hf_texts = tokenizer.batch_decode(hf[0][1], skip_special_tokens=True)
        identical = (hf_texts == [p.generated_text for p in ours[0].predictions]
                     and [len(t) for t in hf[0][1]] == [p.n_generated for p in ours[0].predictions])
        ours_rate = statistics.median(r.examples_per_second for r in ours)
        hf_rate = statistics.median(len(data) / seconds for seconds, _ in hf)
        rows.append({"batch_size": batch_size, "ours_examples_per_s": ours_rate, "hf_examples_per_s": hf_rate,
                     "ratio": ours_rate / hf_rate, "identical_tokens": identical,
                     "mean_generated_tokens": ours[0].mean_generated_tokens,
                     "default_batch": batch_size == auto_batch_size(len(data))})
        print(json.dumps(rows[-1]), flush=True)  # progress: batch 1 of HF takes minutes on a busy CPU
    return rows


def print_vs_hf(rows: list[dict]) -> None:
    print(f"tiny-gpt2-decode, explicit lengths, vs HF generate (torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {rows[0]['mean_generated_tokens']:.1f} tokens/example)")
    print(f"{'batch':>9} {'ours ex/s':>10} {'HF ex/s':>8} {'ratio':>6} {'identical tokens':>17}")
    for r in rows:
        batch = f"{r['batch_size']}{' (auto)' if r['default_batch'] else ''}"
        print(f"{batch:>9} {r['ours_examples_per_s']:>10.1f} {r['hf_examples_per_s']:>8.1f} {r['ratio']:>5.1f}x "
              f"{str(r['identical_tokens']):>17}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=("4x4", "9x9", "vs-hf", "all"), default="all")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--n-4x4", type=int, default=200, help="4x4 examples (tiny-gpt2-decode: 200)")
    parser.add_argument("--n-9x9", type=int, default=32, help="9x9 examples")
    parser.add_argument("--torch-threads", type=int, help="threads of the HF baseline (default: torch's)")
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    vs_hf = run_vs_hf(args.n_4x4, args.batch_sizes, args.repeats) if args.setting in ("vs-hf", "all") else []
    if args.setting == "vs-hf":
        print_vs_hf(vs_hf)
        print(json.dumps({"device": jax.devices()[0].device_kind, "vs_hf": vs_hf}))
        return
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
    if vs_hf:
        print_vs_hf(vs_hf)
    print(json.dumps({"device": jax.devices()[0].device_kind, "rows": rows, "speedup_implicit_vs_explicit": ratios,
                      "vs_hf": vs_hf}))


if __name__ == "__main__":
    main()
