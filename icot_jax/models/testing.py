"""Tiny model configurations for tests and CPU demos (2 layers, hidden 32, vocabulary 101).

``tiny_hf_config`` needs only transformers; ``save_random_hf_model`` builds transformers' PyTorch model
(torch is a test dependency) so parity tests can compare against it.
"""

from __future__ import annotations

from pathlib import Path

import transformers

_COMMON = dict(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               bos_token_id=1, eos_token_id=2)

# Each variant exercises something: Mistral grouped-query attention with a sliding window shorter than the
# test sequences (and without), Phi-3's fused projections, partial rotary and padding_idx, Llama's biases,
# tied head and llama3 RoPE scaling.
TINY_CONFIGS: dict[str, tuple[str, dict]] = {
    "gpt2": ("gpt2", dict(vocab_size=101, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=1,
                          eos_token_id=2)),
    "mistral": ("mistral", dict(_COMMON, num_key_value_heads=2, sliding_window=4)),
    "mistral_full": ("mistral", dict(_COMMON, num_key_value_heads=2, sliding_window=None)),
    "phi3": ("phi3", dict(_COMMON, num_key_value_heads=2, pad_token_id=0, partial_rotary_factor=0.5)),
    "llama": ("llama", dict(_COMMON, num_key_value_heads=1, attention_bias=True, mlp_bias=True,
                            tie_word_embeddings=True, max_position_embeddings=64,
                            rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                              high_freq_factor=4.0, original_max_position_embeddings=16))),
}


def tiny_hf_config(name: str, **overrides) -> transformers.PretrainedConfig:
    """The transformers config of tiny variant ``name`` (a key of ``TINY_CONFIGS``)."""
    model_type, fields = TINY_CONFIGS[name]
    return transformers.AutoConfig.for_model(model_type, **{**fields, **overrides})


def save_random_hf_model(hf_config: transformers.PretrainedConfig, path: str | Path, *, seed: int = 0,
                         noise: float = 0.1):
    """Build transformers' PyTorch model for ``hf_config``, perturb every parameter, save it to ``path``.

    The perturbation makes biases and norm scales non-trivial (HF initialises them to 0 and 1), so a parity
    test also checks they are loaded into the right place. Returns the model in eval mode (eager attention).
    """
    import torch

    torch.manual_seed(seed)
    hf_config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(noise * torch.randn_like(parameter))
    model.save_pretrained(path)
    return model
