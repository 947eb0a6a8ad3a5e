"""The grouped matmul of mixture-of-experts layers on Hopper GPUs: JAX's Mosaic GPU ragged dot.

XLA's GPU lowering of `jax.lax.ragged_dot_general` computes every row against every group's weight and masks
(128x the work for 128 experts: the Qwen3-VL-30B-A3B step ran at 484 tokens/s, docs/BENCHMARKS.md). JAX ships a
Hopper kernel that visits each row tile with its own group only (jax.experimental.pallas.ops.gpu.ragged_dot_mgpu);
here it computes the product and the input gradient (the same kernel, the weight read untransposed), and its
companion (transposed_ragged_dot_mgpu: each group's rows contracted) the weight gradient, which is computed
only for a weight that is differentiated (LoRA factors on the experts; never the frozen experts themselves).

`grouped_matmul(x, w, sizes)` is `jax.lax.ragged_dot_general` with `w [groups, out, in]` (HF layout). The
kernels run on a GPU of compute capability 9.x for bf16/fp16 operands; widths that are no multiple of 128 (a
LoRA factor's rank) are zero-padded to one, which costs less than XLA's every-row-by-every-group product for
any number of groups above 128 / width. Elsewhere, and with JAXVLM_GROUPED_MATMUL=xla, XLA's op runs. Read at
trace time.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

_DIMS = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(((1,), (2,)), ((), ())), lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])
IMPLEMENTATIONS = ("auto", "xla", "mgpu")
implementation = os.environ.get("JAXVLM_GROUPED_MATMUL", "auto")
# The kernels' tiling (rows, columns, contraction per step; pipelined steps; column tiles per row tile).
TILING = dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=1)
WIDTH = 128  # the kernels' widths (out and in) are multiples of this


def xla_grouped_matmul(x: jax.Array, w: jax.Array, sizes: jax.Array) -> jax.Array:
    """`x [m, in]` (rows sorted by group) times each group's `w [groups, out, in]`: [m, out]."""
    return jax.lax.ragged_dot_general(x, w, sizes, _DIMS)


def _mgpu_kernel(lhs, rhs, sizes, transpose_rhs):
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
    return ragged_dot_mgpu.ragged_dot(lhs, rhs, group_sizes=sizes, transpose_rhs=transpose_rhs, **TILING)


def _mgpu_weight_kernel(dy, x, sizes):
    from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu
    return transposed_ragged_dot_mgpu.transposed_ragged_dot(dy, x, group_sizes=sizes, **TILING)


def with_kernel(kernel, weight_kernel=None):
    """The grouped matmul whose product and input gradient run `kernel(lhs, rhs, sizes, transpose_rhs)`
    (`rhs [groups, n, k]` read transposed, or `[groups, k, n]` as it is) and whose weight gradient runs
    `weight_kernel(dy [m, out], x [m, in], sizes) -> [groups, out, in]` (XLA's op without one): a custom VJP
    that forms each gradient only for an argument that is differentiated."""

    @jax.custom_vjp
    def grouped(x, w, sizes):
        return kernel(x, w, sizes, True)

    def forward(x, w, sizes):  # CustomVJPPrimal arguments: the value, and whether it is differentiated
        y = grouped(x.value, w.value, sizes.value)
        # Which gradients are wanted, kept in the residuals' tree structure (() or None), not as values.
        wanted = tuple(() if a.perturbed else None for a in (x, w))
        return y, (x.value, w.value, sizes.value, wanted)

    def backward(saved, dy):
        x, w, sizes, wanted = saved
        dx_wanted, dw_wanted = (flag is not None for flag in wanted)
        if isinstance(dy, SymbolicZero):
            return None, None, None
        # dy [m, out] times each group's [out, in]; dy's rows contracted with x's, group by group.
        dx = kernel(dy.astype(w.dtype), w, sizes, False).astype(x.dtype) if dx_wanted else None
        dw = None
        if dw_wanted and weight_kernel is not None:
            dw = weight_kernel(dy.astype(x.dtype), x, sizes).astype(w.dtype)
        elif dw_wanted:
            _, weight_vjp = jax.vjp(lambda w_: xla_grouped_matmul(x, w_, sizes), w)
            dw = weight_vjp(dy)[0]
        return dx, dw, None

    grouped.defvjp(forward, backward, symbolic_zeros=True)
    return grouped


_mgpu_grouped_matmul = with_kernel(_mgpu_kernel, _mgpu_weight_kernel)


@functools.cache
def _hopper() -> bool:
    device = jax.devices()[0]
    return device.platform == "gpu" and str(getattr(device, "compute_capability", "")).startswith("9")


def use_kernel(x: jax.Array, w: jax.Array) -> bool:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"grouped matmul implementation {implementation!r}: expected one of {IMPLEMENTATIONS}")
    if implementation == "xla":
        return False
    fits = x.dtype == w.dtype and x.dtype in (jnp.bfloat16, jnp.float16)
    if implementation == "mgpu":
        if not fits:
            raise ValueError(f"the Mosaic GPU grouped matmul needs bf16/fp16 operands of one dtype; got "
                             f"{x.dtype} x {w.dtype}{tuple(w.shape)}")
        return True
    return fits and jax.default_backend() == "gpu" and _hopper()


def grouped_matmul(x: jax.Array, w: jax.Array, sizes: jax.Array) -> jax.Array:
    """`x [m, in]` (rows sorted by group; `sizes [groups]` rows each) times `w [groups, out, in]`: [m, out]."""
    sizes = sizes.astype(jnp.int32)
    if use_kernel(x, w):
        return padded(_mgpu_grouped_matmul)(x, w, sizes)
    return xla_grouped_matmul(x, w, sizes)


def padded(grouped):
    """`grouped` for any widths: out and in zero-padded to multiples of WIDTH (x's columns with w's in), the
    output's padding sliced off."""
    def call(x, w, sizes):
        out_f, in_f = w.shape[1:]
        pad_out, pad_in = -out_f % WIDTH, -in_f % WIDTH
        if pad_out or pad_in:
            w = jnp.pad(w, ((0, 0), (0, pad_out), (0, pad_in)))
            x = jnp.pad(x, ((0, 0), (0, pad_in)))
        y = grouped(x, w, sizes)
        return y[:, :out_f] if pad_out else y
    return call
