"""jaxvlm param tree -> HF tensors (transformers' in-memory key names, stacked blocks split per layer)."""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
from flax import nnx

from converters.hf_import import path_key


def hf_tensors(model: nnx.Module, stacked: Iterable[str]) -> Iterator[tuple[str, np.ndarray]]:
    """(HF key, host array) for every plain-array param, one tensor at a time.

    `model.language_model.layers.self_attn.q_proj.weight [L, out, in]` becomes L tensors
    `model.language_model.layers.{i}.self_attn.q_proj.weight [out, in]`.
    """
    prefixes = tuple(stacked)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        key, value = path_key(path), np.asarray(var.get_value())
        prefix = next((p for p in prefixes if key.startswith(p + ".")), None)
        if prefix is None:
            yield key, value
            continue
        rest = key[len(prefix) + 1:]
        for i in range(value.shape[0]):
            yield f"{prefix}.{i}.{rest}", value[i]
