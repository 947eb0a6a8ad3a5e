"""An 8-bit weight type with bitsandbytes' LLM.int8() storage (`weight` int8 + `SCB` row scales).

Row-wise absmax quantization: codes = round(w * 127 / absmax_row) (half to even, as torch.round),
scale = absmax_row (bnb's SCB), weight = codes * scale / 127. Outlier decomposition (bnb's threshold)
is not used: bitsandbytes' default threshold for weights loaded with load_in_8bit is 0 as well.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

_INV_127 = np.float32(7.874015718698502e-3)  # bnb multiplies by this rather than dividing by 127


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class Int8:
    """codes: int8 [*stack, out, in]; scale: float32 [*stack, out] (the row absmax); static original dtype."""

    codes: jax.Array
    scale: jax.Array
    dtype: np.dtype = dataclasses.field(metadata={"static": True})

    @property
    def stack_ndim(self) -> int:
        return self.codes.ndim - 2

    def dequantize(self, dtype=None) -> jax.Array:
        """The weight [*stack, out, in] in `dtype` (default: the original dtype)."""
        w = self.codes.astype(jnp.float32) * self.scale[..., None] * _INV_127
        return w.astype(dtype or self.dtype)


@jax.jit
def quantize_int8(w: jax.Array) -> Int8:
    """Row-wise int8 of `w [*stack, out, in]` (float), bit-compatible with bnb's int8_vectorwise_quant."""
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(f"quantize_int8: expected a float weight, got {w.dtype}")
    absmax = jnp.max(jnp.abs(w), axis=-1).astype(jnp.float32)
    # bnb writes 127.0 / absmax, which torch evaluates as absmax.reciprocal() * 127 (two roundings); the
    # select keeps XLA from folding that back into one division (see nf4.py).
    reciprocal = 1.0 / absmax
    scale = jnp.where(jnp.isnan(reciprocal), jnp.nan, reciprocal) * 127.0
    codes = jnp.round(w.astype(jnp.float32) * scale[..., None])
    codes = jnp.where(absmax[..., None] > 0, codes, 0).astype(jnp.int8)  # an all-zero row stays zero
    return Int8(codes=codes, scale=absmax, dtype=np.dtype(w.dtype))
