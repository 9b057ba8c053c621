"""What a model family declares to read and write Hugging Face checkpoints: key maps and a :class:`Family`.

Each family folder (``gpt2/``, ``llama/``) holds, next to its modeling code, a ``params.py`` that lists how
checkpoint tensors map onto its parameters (:class:`TensorRule`, built with :func:`linear`, :func:`matrix`,
:func:`vector`) and converts a transformers config into the model's config; ``icot_jax.models.hf`` does the
family-independent reading, writing and dispatch on ``model_type``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import transformers

from icot_jax.models.common import CausalLM


@dataclasses.dataclass(frozen=True)
class TensorRule:
    """How one checkpoint tensor maps onto one or more of our parameters.

    ``hf_key`` and ``params`` (dotted paths into ``nnx.state(model)``) may contain ``{i}``, the layer index.
    Our parameter of shape ``in_axes + out_axes`` (``n_in`` input axes; 0 for vectors) is stored flattened
    to ``[in, out]``, or ``[out, in]`` when ``transpose`` (torch ``nn.Linear``). Several ``params`` are
    concatenated along the output axis in the checkpoint (Phi-3's fused ``qkv_proj`` / ``gate_up_proj``).
    """

    hf_key: str
    params: tuple[str, ...]
    n_in: int
    transpose: bool

    @property
    def out_axis(self) -> int:
        return 0 if self.transpose or self.n_in == 0 else 1

    def hf_shape(self, shapes: Iterable[tuple[int, ...]]) -> tuple[int, ...]:
        """The checkpoint shape of this tensor given our parameters' shapes."""
        stored = [self._stored_shape(shape) for shape in shapes]
        merged = list(stored[0])
        merged[self.out_axis] = sum(shape[self.out_axis] for shape in stored)
        return tuple(merged)

    def to_params(self, tensor: np.ndarray, shapes: Iterable[tuple[int, ...]]) -> list[np.ndarray]:
        """Split (if fused), transpose (if ``nn.Linear``) and reshape a checkpoint tensor into our params."""
        shapes = list(shapes)
        sizes = [self._stored_shape(shape)[self.out_axis] for shape in shapes]
        pieces = np.split(tensor, np.cumsum(sizes)[:-1], axis=self.out_axis)
        return [(piece.T if self.transpose else piece).reshape(shape) for piece, shape in zip(pieces, shapes)]

    def to_tensor(self, values: Iterable[np.ndarray]) -> np.ndarray:
        """The inverse of :meth:`to_params`."""
        matrices = [value.reshape(self._matrix_shape(value.shape)) for value in values]
        stored = [matrix.T if self.transpose else matrix for matrix in matrices]
        return np.ascontiguousarray(np.concatenate(stored, axis=self.out_axis))

    def _matrix_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Our parameter flattened to ``[in, out]`` (``[n]`` for a vector)."""
        if self.n_in == 0:
            return (math.prod(shape),)
        return (math.prod(shape[:self.n_in]), math.prod(shape[self.n_in:]))

    def _stored_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        matrix = self._matrix_shape(shape)
        return matrix[::-1] if self.transpose else matrix


def linear(hf_key: str, *params: str, n_in: int = 1) -> TensorRule:
    """A torch ``nn.Linear`` weight ``[out, in]``."""
    return TensorRule(hf_key, params, n_in, transpose=True)


def matrix(hf_key: str, param_path: str, n_in: int = 1) -> TensorRule:
    """A matrix stored ``[in, out]`` as ours: GPT-2's ``Conv1D`` weights and embedding tables."""
    return TensorRule(hf_key, (param_path,), n_in, transpose=False)


def vector(hf_key: str, *params: str) -> TensorRule:
    """A bias or norm scale."""
    return TensorRule(hf_key, params, 0, transpose=False)


@dataclasses.dataclass(frozen=True)
class Family:
    """Everything needed to build, load and export one Hugging Face ``model_type``."""

    model_type: str
    model_config: Callable[[transformers.PretrainedConfig], Any]
    model_class: type[CausalLM]
    rules: tuple[TensorRule, ...]
    base_prefix: str  # checkpoints saved from the base model (e.g. the hub's openai-community/gpt2) omit it
    ignored: tuple[str, ...] = ()  # regexes of checkpoint keys that hold no parameter (old buffers)
    export_config: Callable[[Any], dict] = lambda model_config: {}  # config.json fields the model may change
