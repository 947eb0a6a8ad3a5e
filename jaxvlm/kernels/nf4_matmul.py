"""`x @ W.T` for an NF4 weight W and a few rows of x (a decode step), by a Pallas (Triton) GPU kernel.

XLA forms such a product by dequantizing W in the reduction that multiplies it with x: per weight a
lookup in the 16 NF4 values and a multiply by the block's (double-quantized) absmax, which it decodes per
element too. Measured on an H200 (Qwen2-VL-2B, batch-1 decode), that is bound by the arithmetic, not by
reading the codes. This kernel reads the packed codes once and spends per weight:

- The values by gathers from the 16 NF4 values (a kernel input, 64 bytes: the lanes of a warp read one cache line):
  `VALUES[code >> 4]` for a byte's even element, `VALUES[code & 15]` for its odd one; no select tree. (Byte-pair
  tables of 256 entries, one gather per weight with no shifts, measured slower: 430.7 vs 500.1 decode tokens/s, a
  warp's gathers there spread over 8 cache lines. The lookup in registers by inline PTX byte permutes, commit
  c6ab383, measured slower: 5.0M against 3.0M instructions for gate/up; docs/BENCHMARKS.md, "NF4 decode products
  profiled".)
- The absmax once per 64-block: per block and row of x, `sum(x_even * hi + x_odd * lo)` over the block's 32
  bytes, times the block's absmax. A double-quantized absmax is decoded in the kernel, per block, exactly as
  `block_absmax` does (table8[code] * nested_absmax[block // 256], rounded, + offset): the float32 absmax
  written by XLA would cost 1/8 byte of traffic per weight against the codes' 1/2.
- Grid: (N / block_n tiles, split_k ranges of K). A program walks its range of K in chunks of `block_k`
  64-blocks (fori_loop) and writes float32 partial sums [split_k, rows, N], which XLA sums. The K split lets
  the small products (N = 256) fill the GPU's SMs.
- A stacked weight (leaves with a leading layer axis, as the decoder's layer scan holds them) is read in
  place: `layer` (a python int) is folded into the codes' BlockSpec index and the statistics' indices, so no
  slice of the stack is copied out for the custom call.

Layout: one layer's weight [N, K], K a multiple of 64, is viewed as codes [N, K/64, 32] (byte j of a block
holds its elements 2j and 2j+1), absmax [N, K/64]. x [rows, K] is split into its even and odd columns,
[rows, K/64, 32] each, in float32.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxvlm.quant.nf4 import NF4, NF4_TABLE, NESTED_BLOCKSIZE, dequantize_nf4

MAX_ROWS = 8  # the kernel is for decode-shaped products; larger ones go through XLA


VALUES = NF4_TABLE  # what a code's nibble stands for

_SMS = 132  # an H100/H200's SMs; the heuristic aims for a couple of programs per SM


def _layer_weight(w: NF4, layer: int | None) -> NF4:
    """One layer of w: w itself when unstacked (layer None), else the leaves' row `layer`."""
    if layer is None:
        return w
    return jax.tree.map(lambda a: a[layer], w)


def nf4_matmul_reference(x: jax.Array, w: NF4, layer: int | None = None) -> jax.Array:
    """x [..., K] @ dequantize(w[layer]).T -> [..., N], in x's dtype (the XLA path)."""
    wd = dequantize_nf4(_layer_weight(w, layer), x.dtype)
    return jax.lax.dot_general(x, wd, (((x.ndim - 1,), (1,)), ((), ())))


def supported(x: jax.Array, w: NF4, layer: int | None = None) -> bool:
    """Whether the kernel takes this product: a 2-D weight (one, or a stack of them with `layer` given) of
    whole 64-blocks per row, N a multiple of 16, at most MAX_ROWS rows of x."""
    rows = int(np.prod(x.shape[:-1]))
    stacked = w.stack_ndim == 1 and layer is not None and 0 <= layer < w.codes.shape[0]
    return (len(w.shape) == 2 and (w.stack_ndim == 0 and layer is None or stacked)
            and x.shape[-1] == w.shape[1] and w.shape[1] % 64 == 0 and w.shape[0] % 16 == 0
            and w.blocksize == 64 and 1 <= rows <= MAX_ROWS)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def default_config(rows: int, n: int, k: int, block_n: int | None = None, per_sm: int = 2, num_warps: int = 4) -> dict:
    """block_n, block_k (64-blocks per loop step) and split_k for a [rows, k] @ [n, k].T product: tiles of
    `block_n` outputs (default 32, 16 where N has too few), and K split until there are about `per_sm` programs per
    SM."""
    nb = k // 64
    block_n = block_n or (32 if n % 32 == 0 else 16)
    tiles = n // block_n
    want = -(-per_sm * _SMS // tiles)
    # Splits that leave at least two 64-blocks each; the smallest one reaching `want`, else the largest.
    splits = [d for d in _divisors(nb) if nb // d >= 2] or [1]
    split_k = next((d for d in splits if d >= want), splits[-1])
    per_split = nb // split_k
    block_k = max(c for c in (1, 2, 4, 8) if per_split % c == 0)
    if rows > 4:
        block_k = min(block_k, 4)
    return dict(block_n=block_n, block_k=block_k, split_k=split_k, num_warps=num_warps, num_stages=2)


def _round(x: jax.Array, zero: jax.Array) -> jax.Array:
    """x, rounded on its own: `x | zero` on the bits, zero an int32 0 the compiler cannot see, so that a
    product passed through here is not contracted with a following add into one fused multiply-add."""
    return jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(x, jnp.int32) | zero, jnp.float32)


def _kernel(xe_ref, xo_ref, values_ref, codes_ref, *refs, rows: int, block_n: int, block_k: int,
            steps: int, n_blocks: int, layer: int, double_quantized: bool):
    """One program: outputs [j * block_n, +block_n) over 64-blocks [s * steps * block_k, +steps * block_k).

    xe_ref, xo_ref: f32 [rows, K/64, 32]; values_ref: f32 [16]; codes_ref: u8 [block_n, K/64, 32] (the
    layer's tile); statistics: absmax u8 (double quantized) or f32 [L, N, K/64] whole, then when double
    quantized nested_absmax f32 [L, G], nested_table f32 [L, 256], offset f32 [L, 1], zero i32 [1]; out_ref:
    f32 [rows, block_n] of partial sums.
    """
    if double_quantized:
        absmax_ref, nested_ref, table8_ref, offset_ref, zero_ref, out_ref = refs
    else:
        (absmax_ref, out_ref) = refs
    j, s = pl.program_id(0), pl.program_id(1)
    n_idx = j * block_n + jax.lax.broadcasted_iota(jnp.int32, (block_n, block_k), 0)  # [bn, bk] output rows
    blk = jax.lax.broadcasted_iota(jnp.int32, (block_n, block_k), 1)
    if double_quantized:
        offset = offset_ref[layer, 0]
        zero = zero_ref[0]

    def step(i, accs):
        b0 = (s * steps + i) * block_k
        codes = codes_ref[:, pl.ds(b0, block_k), :].astype(jnp.int32)  # [bn, bk, 32]
        hi, lo = values_ref[codes >> 4], values_ref[codes & 15]
        if double_quantized:
            code8 = absmax_ref[layer, pl.ds(j * block_n, block_n), pl.ds(b0, block_k)].astype(jnp.int32)
            group = (n_idx * n_blocks + b0 + blk) // NESTED_BLOCKSIZE  # [bn, bk]: the block's 256-group
            absmax = _round(table8_ref[layer, code8] * nested_ref[layer, group], zero) + offset
        else:
            absmax = absmax_ref[layer, pl.ds(j * block_n, block_n), pl.ds(b0, block_k)]
        new = []
        for r in range(rows):
            xe = xe_ref[r, pl.ds(b0, block_k), :]  # [bk, 32]
            xo = xo_ref[r, pl.ds(b0, block_k), :]
            per_block = jnp.sum(xe[None] * hi + xo[None] * lo, axis=-1)  # [bn, bk]
            new.append(accs[r] + per_block * absmax)
        return tuple(new)

    accs = jax.lax.fori_loop(0, steps, step, tuple(jnp.zeros((block_n, block_k), jnp.float32) for _ in range(rows)))
    for r in range(rows):
        out_ref[r, :] = jnp.sum(accs[r], axis=1)


@functools.partial(jax.jit, static_argnames=("layer", "block_n", "block_k", "split_k", "num_warps", "num_stages",
                                             "interpret"))
def nf4_matmul(x: jax.Array, w: NF4, layer: int | None = None, *, block_n: int | None = None,
               block_k: int | None = None, split_k: int | None = None, num_warps: int | None = None,
               num_stages: int | None = None, interpret: bool = False) -> jax.Array:
    """x [..., K] @ dequantize(w).T -> [..., N] in x's dtype, by the Pallas kernel (see `supported`).

    w: one NF4 weight [N, K] (layer None), or a stack of them (leaves with a leading layer axis) and `layer`,
    the static index of the one to use, read in place. block_n (outputs per program, a power of 2 dividing N),
    block_k (64-blocks per loop step, a power of 2), split_k (programs along K; block_k * split_k must divide
    K / 64), num_warps, num_stages: default to `default_config`'s pick for the shape.
    """
    if not supported(x, w, layer):
        raise ValueError(f"nf4_matmul: x {x.shape} and weight {w.shape} (stacked: {w.stack_ndim}, layer {layer}) "
                         f"are not a supported product")
    n, k = w.shape
    nb = k // 64
    lead = x.shape[:-1]
    rows = int(np.prod(lead))
    cfg = default_config(rows, n, k)
    block_n = block_n or cfg["block_n"]
    block_k = block_k or cfg["block_k"]
    split_k = split_k or cfg["split_k"]
    num_warps = num_warps or cfg["num_warps"]
    num_stages = num_stages or cfg["num_stages"]
    if n % block_n or block_n & (block_n - 1) or block_k & (block_k - 1) or nb % (block_k * split_k):
        raise ValueError(f"nf4_matmul: block_n {block_n}, block_k {block_k}, split_k {split_k} do not tile "
                         f"N {n} (a power of 2 dividing it) and K / 64 = {nb} (block_k * split_k dividing it)")
    steps = nb // (block_k * split_k)

    stacked = w if layer is not None else jax.tree.map(lambda a: a[None], w)  # leaves [L, ...]
    lyr = 0 if layer is None else layer
    n_layers = stacked.codes.shape[0]
    x2 = x.reshape(rows, nb, 32, 2).astype(jnp.float32)
    xe, xo = x2[..., 0], x2[..., 1]  # [rows, K/64, 32]: the elements of the high and low nibbles
    codes = stacked.codes.reshape(n_layers, n, nb, 32)
    absmax = stacked.absmax.reshape(n_layers, n, nb)
    whole = lambda a: pl.BlockSpec(a.shape, lambda j, s: (0,) * a.ndim)  # noqa: E731
    args = [xe, xo, jnp.asarray(VALUES), codes, absmax]
    if w.double_quantized:
        args += [stacked.nested_absmax, stacked.nested_table, stacked.offset.reshape(n_layers, 1),
                 jnp.zeros((1,), jnp.int32)]
    in_specs = [whole(a) for a in args]
    in_specs[3] = pl.BlockSpec((None, block_n, nb, 32), lambda j, s: (lyr, j, 0, 0))
    kernel = functools.partial(_kernel, rows=rows, block_n=block_n, block_k=block_k, steps=steps, n_blocks=nb,
                               layer=lyr, double_quantized=w.double_quantized)
    extra = {} if interpret else dict(compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages))
    partial = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((split_k, rows, n), jnp.float32),
        grid=(n // block_n, split_k),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, rows, block_n), lambda j, s: (s, 0, j)),
        interpret=interpret,
        name="nf4_matmul",
        **extra,
    )(*args)
    return jnp.sum(partial, axis=0).astype(x.dtype).reshape(*lead, n)
