"""The batched KV-cached decoder generates exactly the tokens of Hugging Face ``generate`` on every family."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flax import nnx

from icot_jax.generate import DecodeSettings, Decoder
from icot_jax.models import load_pretrained
from icot_jax.models.testing import save_random_hf_model, tiny_hf_config

PAD = 2  # the tiny configs' EOS id
# Ragged prompts: left padding, per-row positions, and (10 + 12 tokens) Mistral's 4-token sliding window.
PROMPTS = [[5, 17, 42, 8, 99, 23, 61, 3, 77, 12], [31, 4], [88, 6, 54, 19, 70], [9, 45, 13, 66, 27, 38, 91]]
NEW_TOKENS = 12


def left_pad(prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    width = max(map(len, prompts))
    mask = np.arange(width)[None] >= np.array([width - len(p) for p in prompts])[:, None]
    ids = np.full(mask.shape, PAD, np.int32)
    ids[mask] = np.concatenate(prompts)
    return ids, mask


def hf_generate(hf_model, ids: np.ndarray, mask: np.ndarray) -> list[list[int]]:
    with torch.no_grad():
        out = hf_model.generate(input_ids=torch.from_numpy(ids.astype(np.int64)),
                                attention_mask=torch.from_numpy(mask.astype(np.int64)), max_new_tokens=NEW_TOKENS,
                                min_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=PAD)
    return out[:, ids.shape[1]:].tolist()


@pytest.mark.parametrize("name", ["gpt2", "llama", "mistral", "phi3"])
def test_decoder_generates_the_tokens_of_hf_generate(name, tmp_path):
    """Greedy tokens of a ragged batch and of a single prompt, across a cache growth (a 5-token first stage),
    equal transformers' ``generate`` on the same random weights (Llama: one KV head, biases, tied head, llama3
    RoPE; Mistral: sliding window; Phi-3: fused projections, partial rotary)."""
    hf_model = save_random_hf_model(tiny_hf_config(name), tmp_path)
    graphdef, state = nnx.split(load_pretrained(tmp_path)[0])
    settings = DecodeSettings(max_new_tokens=NEW_TOKENS, stop_after_eos=None, short_cache_tokens=5)
    decoder = Decoder(graphdef, eos_id=PAD, settings=settings)
    for prompts in (PROMPTS, PROMPTS[:1]):
        ids, mask = left_pad(prompts)
        assert decoder(state, ids, mask).tokens.tolist() == hf_generate(hf_model, ids, mask)
