"""icot-jax: Stepwise Internalization of chain-of-thought (ICoT-SI) in JAX/Flax NNX.

Deng, Choi, Shieber (2024), "From Explicit CoT to Implicit CoT: Learning to Internalize CoT Step by Step".
"""

__version__ = "0.1.0"
