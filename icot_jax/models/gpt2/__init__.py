"""GPT-2: the model (``modeling.py``) and its Hugging Face key map and config conversion (``params.py``)."""

from icot_jax.models.gpt2.modeling import GPT2Config, GPT2LM, extend_positions

__all__ = ["GPT2Config", "GPT2LM", "extend_positions"]
