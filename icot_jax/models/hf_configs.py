"""The transformers config of a run's model, resolved the same way for training and ``icot aot``.

``model.hf`` names a local folder, a hub repository (the local cache is tried first, then
:data:`BUILTIN_HF_CONFIGS`, so the paper's models resolve offline, then the hub) or nothing (then
``model.family`` with its defaults). ``model.overrides`` are applied on top, and a from-scratch model takes
its vocabulary and special tokens from the run's tokenizer -- the built-in tokenizer's 17 tokens, not
GPT-2's 50,257 -- so that every consumer builds the model the run trains.
"""

from __future__ import annotations

from typing import Any

BUILTIN_HF_CONFIGS: dict[str, dict[str, Any]] = {
    # config.json of each hub repository (architecture fields), for hosts that cannot reach the hub.
    "mistralai/Mistral-7B-v0.1": dict(
        model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, hidden_act="silu", max_position_embeddings=32768,
        rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=4096, tie_word_embeddings=False,
        initializer_range=0.02, bos_token_id=1, eos_token_id=2),
    "microsoft/Phi-3-mini-4k-instruct": dict(
        model_type="phi3", vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, hidden_act="silu", max_position_embeddings=4096,
        original_max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None,
        sliding_window=2047, attention_dropout=0.0, embd_pdrop=0.0, resid_pdrop=0.0, tie_word_embeddings=False,
        initializer_range=0.02, bos_token_id=1, eos_token_id=32000, pad_token_id=32000),
    "gpt2": dict(
        model_type="gpt2", vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
        activation_function="gelu_new", layer_norm_epsilon=1e-5, embd_pdrop=0.1, attn_pdrop=0.1, resid_pdrop=0.1,
        initializer_range=0.02, bos_token_id=50256, eos_token_id=50256),
    "gpt2-medium": dict(
        model_type="gpt2", vocab_size=50257, n_positions=1024, n_embd=1024, n_layer=24, n_head=16,
        activation_function="gelu_new", layer_norm_epsilon=1e-5, embd_pdrop=0.1, attn_pdrop=0.1, resid_pdrop=0.1,
        initializer_range=0.02, bos_token_id=50256, eos_token_id=50256),
}
BUILTIN_HF_CONFIGS["openai-community/gpt2"] = BUILTIN_HF_CONFIGS["gpt2"]
BUILTIN_HF_CONFIGS["openai-community/gpt2-medium"] = BUILTIN_HF_CONFIGS["gpt2-medium"]


def model_hf_config(config, tokenizer: Any = None):
    """The transformers config of ``config.model`` (a run :class:`~icot_jax.config.Config`), without
    downloading weights (see the module docs). ``tokenizer`` is required for a from-scratch model."""
    import transformers

    m = config.model
    if m.hf is None:
        hf_config = transformers.AutoConfig.for_model(m.family)
    else:
        try:
            hf_config = transformers.AutoConfig.from_pretrained(m.hf, local_files_only=True)
        except OSError:
            builtin = BUILTIN_HF_CONFIGS.get(m.hf)
            hf_config = (transformers.AutoConfig.from_pretrained(m.hf) if builtin is None else
                         transformers.AutoConfig.for_model(**builtin))
    for key, value in m.overrides.items():
        if not hasattr(hf_config, key):
            raise ValueError(f"model.overrides.{key}: {type(hf_config).__name__} has no field '{key}'")
        setattr(hf_config, key, value)
    if m.from_scratch:
        if tokenizer is None:
            raise ValueError("model.from_scratch: the model's vocabulary comes from the run's tokenizer; pass it")
        hf_config.vocab_size = len(tokenizer)
        hf_config.eos_token_id = tokenizer.eos_token_id
        bos = tokenizer.bos_token_id
        hf_config.bos_token_id = bos if bos is not None else tokenizer.eos_token_id
    return hf_config
