"""Llama, Mistral and Phi-3: the model (``modeling.py``) and their Hugging Face key maps and config conversion
(``params.py``)."""

from icot_jax.models.llama.modeling import LlamaConfig, LlamaLM, RopeConfig, apply_rope

__all__ = ["LlamaConfig", "LlamaLM", "RopeConfig", "apply_rope"]
