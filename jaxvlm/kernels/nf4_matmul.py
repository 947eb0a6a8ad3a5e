"""`x @ W.T` for an NF4 weight W and a few rows of x (decoding), without a dense copy of W.

XLA's path (`nf4_matmul_reference`) dequantizes the whole weight to the compute dtype, writes it, and
reads it back for the product: 4.5 bytes of traffic per weight element where the codes are 0.5. For a
decode step (a handful of rows) the product is bound by that traffic. The Pallas kernel reads the
packed codes once, decodes them in registers (nibble -> NF4 value by a select tree, times the block's
absmax) and accumulates the product there.

Layout: one weight [N, K] with K a multiple of 64 (so each row is a whole number of 64-blocks) is
viewed as codes [N, K/2] (byte j of a row holds elements 2j in the high nibble and 2j+1 in the low) and
absmax [N, K/64]. x's even and odd columns meet the high and low nibbles. A program computes a tile of
`block_n` outputs for all rows of x, walking K one 64-block at a time, `unroll` blocks per iteration.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from jaxvlm.quant.nf4 import NF4, block_absmax, dequantize_nf4, nf4_values_by_select

MAX_ROWS = 16  # the kernel is for decode-shaped products; larger ones go through XLA


def nf4_matmul_reference(x: jax.Array, w: NF4) -> jax.Array:
    """x [..., K] @ dequantize(w).T -> [..., N], in x's dtype (the XLA path)."""
    wd = dequantize_nf4(w, x.dtype)
    return jax.lax.dot_general(x, wd, (((x.ndim - 1,), (1,)), ((), ())))


def supported(x: jax.Array, w: NF4) -> bool:
    """Whether the kernel takes this product: one 2-D weight of whole 64-blocks per row, few rows."""
    rows = int(np.prod(x.shape[:-1]))
    return (len(w.shape) == 2 and w.codes.ndim == 1 and w.shape[1] % 64 == 0 and w.shape[0] % 16 == 0
            and w.blocksize == 64 and rows <= MAX_ROWS)


def _kernel(xe_ref, xo_ref, codes_ref, absmax_ref, out_ref, *, n_blocks: int, unroll: int):
    m, bn = out_ref.shape

    def block(b, acc):
        codes = codes_ref[:, pl.ds(b * 32, 32)].astype(jnp.int32)  # [bn, 32]: one 64-block per row
        scale = absmax_ref[:, pl.ds(b, 1)]  # [bn, 1]
        hi = nf4_values_by_select(codes >> 4) * scale
        lo = nf4_values_by_select(codes & 0xF) * scale
        xe = xe_ref[:, pl.ds(b * 32, 32)].astype(jnp.float32)  # [m, 32]
        xo = xo_ref[:, pl.ds(b * 32, 32)].astype(jnp.float32)
        prod = xe[:, None, :] * hi[None, :, :] + xo[:, None, :] * lo[None, :, :]  # [m, bn, 32]
        return acc + jnp.sum(prod, axis=-1)

    def body(i, acc):
        for u in range(unroll):
            acc = block(i * unroll + u, acc)
        return acc

    acc = jax.lax.fori_loop(0, n_blocks // unroll, body, jnp.zeros((m, bn), jnp.float32))
    for b in range(n_blocks - n_blocks % unroll, n_blocks):
        acc = block(b, acc)
    out_ref[...] = acc.astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_n", "unroll", "interpret"))
def nf4_matmul(x: jax.Array, w: NF4, *, block_n: int = 32, unroll: int = 4, interpret: bool = False) -> jax.Array:
    """x [..., K] @ dequantize(w).T -> [..., N] in x's dtype, by the Pallas kernel (see `supported`)."""
    if not supported(x, w):
        raise ValueError(f"nf4_matmul: x {x.shape} and weight {w.shape} are not a supported product")
    n, k = w.shape
    lead = x.shape[:-1]
    rows = int(np.prod(lead))
    m = max(1, pl.next_power_of_2(rows))
    x2 = jnp.pad(x.reshape(rows, k), ((0, m - rows), (0, 0)))
    xe, xo = x2[:, 0::2], x2[:, 1::2]  # [m, K/2]: the elements of the high and low nibbles
    codes = w.codes.reshape(n, k // 2)
    absmax = block_absmax(w).reshape(n, k // 64)
    block_n = min(block_n, n)
    while n % block_n:  # n is a multiple of 16
        block_n //= 2
    out = pl.pallas_call(
        functools.partial(_kernel, n_blocks=k // 64, unroll=unroll),
        out_shape=jax.ShapeDtypeStruct((m, n), x.dtype),
        grid=(n // block_n,),
        in_specs=[pl.BlockSpec((m, k // 2), lambda j: (0, 0)),
                  pl.BlockSpec((m, k // 2), lambda j: (0, 0)),
                  pl.BlockSpec((block_n, k // 2), lambda j: (j, 0)),
                  pl.BlockSpec((block_n, k // 64), lambda j: (j, 0))],
        out_specs=pl.BlockSpec((m, block_n), lambda j: (0, j)),
        interpret=interpret,
    )(xe, xo, codes, absmax)
    return out[:rows].reshape(*lead, n)
