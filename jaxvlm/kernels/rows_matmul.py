"""`x @ W.T` for a dense weight W and a few rows of x (a decode step), by a Pallas (Triton) GPU kernel.

What it is for: in generation's unrolled decode step each layer's weight is a static slice of the stacked `[L, N, K]`
array; XLA's GEMM cannot read such a slice in place (it copies the layer out first: 1.2-1.8 ms a token at the
Qwen2-VL-2B geometry), and its one-row reduction (layers.rows_product) reads it in place at about 1.9 TB/s. This
kernel takes the whole stack and a static layer index and reads that layer's rows where they lie.

A program computes `block_n` outputs for every row of x over one of `split_k` ranges of K, walking it `block_k`
elements at a time (fori_loop) with a float32 accumulator [block_n, block_k] per row of x; XLA adds the split_k
float32 partial sums. The tiling follows `nf4_matmul.default_config` (its 64-blocks are 64 elements here).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from jaxvlm.kernels.nf4_matmul import _compiler_params, default_config

MAX_ROWS = 8  # decode-shaped products; larger ones go through XLA's GEMM


def rows_matmul_reference(x: jax.Array, w: jax.Array, layer: int | None = None) -> jax.Array:
    """x [..., K] @ w[layer].T -> [..., N] in x's dtype: float32 products summed over K (XLA)."""
    w = w if layer is None else w[layer]
    return jnp.sum(x.astype(jnp.float32)[..., None, :] * w.astype(jnp.float32), axis=-1).astype(x.dtype)


def supported(x: jax.Array, w: jax.Array, layer: int | None = None) -> bool:
    """Whether the kernel takes this product: a weight [N, K] (or a stack [L, N, K] with `layer` given), K a multiple
    of 64, N of 16, at most MAX_ROWS rows of x."""
    rows = int(np.prod(x.shape[:-1]))
    shape = w.shape if layer is None else w.shape[1:]
    stacked_ok = layer is None or (w.ndim == 3 and 0 <= layer < w.shape[0])
    return (stacked_ok and len(shape) == 2 and x.shape[-1] == shape[1] and shape[1] % 64 == 0
            and shape[0] % 16 == 0 and 1 <= rows <= MAX_ROWS and jnp.issubdtype(w.dtype, jnp.floating))


def _kernel(x_ref, w_ref, out_ref, *, rows: int, block_n: int, block_k: int, steps: int):
    """x_ref: f32 [rows, K]; w_ref: [block_n, K] (the layer's tile); out_ref: f32 [rows, block_n] partial sums."""
    s = pl.program_id(1)

    def step(i, accs):
        k0 = (s * steps + i) * block_k
        w = w_ref[:, pl.ds(k0, block_k)].astype(jnp.float32)  # [bn, bk]
        return tuple(acc + w * x_ref[r, pl.ds(k0, block_k)][None, :] for r, acc in enumerate(accs))

    accs = jax.lax.fori_loop(0, steps, step, tuple(jnp.zeros((block_n, block_k), jnp.float32) for _ in range(rows)))
    for r in range(rows):
        out_ref[r, :] = jnp.sum(accs[r], axis=1)


@functools.partial(jax.jit, static_argnames=("layer", "block_n", "block_k", "split_k", "num_warps", "num_stages",
                                             "interpret"))
def rows_matmul(x: jax.Array, w: jax.Array, layer: int | None = None, *, block_n: int | None = None,
                block_k: int | None = None, split_k: int | None = None, num_warps: int | None = None,
                num_stages: int | None = None, interpret: bool = False) -> jax.Array:
    """x [..., K] @ w.T -> [..., N] in x's dtype, float32 sums, by the Pallas kernel (see `supported`).

    w: [N, K] (layer None) or a stack [L, N, K] and `layer`, the static index of the one to use, read in place.
    block_n (a power of 2 dividing N), block_k (elements per loop step: 64 times a power of 2), split_k (block_k *
    split_k dividing K), num_warps, num_stages: default to the shape's pick.
    """
    if not supported(x, w, layer):
        raise ValueError(f"rows_matmul: x {x.shape} and weight {w.shape} (layer {layer}) are not a supported product")
    stacked = w[None] if layer is None else w
    lyr = 0 if layer is None else layer
    _, n, k = stacked.shape
    lead = x.shape[:-1]
    rows = int(np.prod(lead))
    cfg = default_config(rows, n, k)
    block_n = block_n or cfg["block_n"]
    block_k = block_k or 64 * cfg["block_k"]
    split_k = split_k or cfg["split_k"]
    if n % block_n or block_n & (block_n - 1) or block_k % 64 or k % (block_k * split_k):
        raise ValueError(f"rows_matmul: block_n {block_n}, block_k {block_k}, split_k {split_k} do not tile N {n} "
                         f"(a power of 2 dividing it) and K {k} (block_k, a multiple of 64, times split_k dividing it)")
    steps = k // (block_k * split_k)
    extra = {} if interpret else dict(
        compiler_params=_compiler_params(num_warps or cfg["num_warps"], num_stages or cfg["num_stages"]))
    partial = pl.pallas_call(
        functools.partial(_kernel, rows=rows, block_n=block_n, block_k=block_k, steps=steps),
        out_shape=jax.ShapeDtypeStruct((split_k, rows, n), jnp.float32),
        grid=(n // block_n, split_k),
        in_specs=[pl.BlockSpec((rows, k), lambda j, s: (0, 0)),
                  pl.BlockSpec((None, block_n, k), lambda j, s: (lyr, j, 0))],
        out_specs=pl.BlockSpec((None, rows, block_n), lambda j, s: (s, 0, j)),
        interpret=interpret,
        name="rows_matmul",
        **extra,
    )(x.reshape(rows, k).astype(jnp.float32), stacked)
    return jnp.sum(partial, axis=0).astype(x.dtype).reshape(*lead, n)
