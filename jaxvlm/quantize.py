"""Quantization as a transform of the param tree: which weights go to 4 or 8 bits, and the importer hook
that quantizes them as they stream in from a checkpoint."""
from __future__ import annotations

import jax
from flax import nnx

from jaxvlm.layers import Experts, Linear
from jaxvlm.paths import path_key
from jaxvlm.quant import quantize_int8, quantize_nf4


def linear_weight_keys(model, skip: tuple[str, ...]) -> set[str]:
    """The param keys of the model's Linear weights, except modules whose path contains a `skip` name."""
    keys = set()
    for path, module in nnx.iter_modules(model):
        name = path_key(path)
        if isinstance(module, Linear) and not any(s in name.split(".") for s in skip):
            keys.add(f"{name}.weight")
    return keys


def quantized_weight_keys(model, skip: tuple[str, ...]) -> set[str]:
    """The param keys that load_in_4bit / load_in_8bit quantize: the Linear weights (`linear_weight_keys`) and
    the experts' 3-D matrices (one NF4 per expert matrix), except modules whose path contains a `skip` name.

    A merged 4-bit export quantizes `linear_weight_keys` only: bitsandbytes holds Linear weights, not 3-D
    parameters, so transformers + bitsandbytes keep (and read) the experts in 16-bit.
    """
    keys = linear_weight_keys(model, skip)
    for path, module in nnx.iter_modules(model):
        name = path_key(path)
        if isinstance(module, Experts) and not any(s in name.split(".") for s in skip):
            keys.update(f"{name}.{w}" for w in Experts.WEIGHTS)
    return keys


def quantize(dense: jax.Array, quant: str):
    """`dense [*stack, out, in]` as NF4 ("nf4", one NF4 per [out, in] matrix: per layer of a stacked weight,
    per layer and expert of stacked experts) or Int8 ("int8", row-wise)."""
    if quant == "int8":
        return quantize_int8(dense)
    if quant != "nf4":
        raise ValueError(f"quantization {quant!r}: expected 'nf4' or 'int8'")
    fn = quantize_nf4
    for _ in range(dense.ndim - 2):
        fn = jax.vmap(fn)
    return fn(dense)
