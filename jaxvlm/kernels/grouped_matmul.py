"""The grouped matmul of mixture-of-experts layers on Hopper GPUs: JAX's Mosaic GPU ragged dot.

XLA's GPU lowering of `jax.lax.ragged_dot_general` computes every row against every group's weight and masks
(128x the work for 128 experts: the Qwen3-VL-30B-A3B step ran at 484 tokens/s, docs/BENCHMARKS.md). JAX ships a
Hopper kernel that visits each row tile with its own group only (jax.experimental.pallas.ops.gpu.ragged_dot_mgpu);
here it computes the product and the input gradient (the same kernel, the weight read untransposed), and XLA
the weight gradient, which is dead code (removed by XLA) when the experts are frozen, as under LoRA.

`grouped_matmul(x, w, sizes)` is `jax.lax.ragged_dot_general` with `w [groups, out, in]` (HF layout). The
kernel runs on a GPU of compute capability 9.x for bf16/fp16 operands whose in and out widths are multiples
of 128; elsewhere, and with JAXVLM_GROUPED_MATMUL=xla, XLA's op runs. Read at trace time.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

_DIMS = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(((1,), (2,)), ((), ())), lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])
IMPLEMENTATIONS = ("auto", "xla", "mgpu")
implementation = os.environ.get("JAXVLM_GROUPED_MATMUL", "auto")
# The kernel's tiling (rows, columns, contraction per step; pipelined steps; column tiles per row tile).
TILING = dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=1)


def xla_grouped_matmul(x: jax.Array, w: jax.Array, sizes: jax.Array) -> jax.Array:
    """`x [m, in]` (rows sorted by group) times each group's `w [groups, out, in]`: [m, out]."""
    return jax.lax.ragged_dot_general(x, w, sizes, _DIMS)


def _mgpu_kernel(lhs, rhs, sizes, transpose_rhs):
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
    return ragged_dot_mgpu.ragged_dot(lhs, rhs, group_sizes=sizes, transpose_rhs=transpose_rhs, **TILING)


def with_kernel(kernel):
    """The grouped matmul whose product and input gradient run `kernel(lhs, rhs, sizes, transpose_rhs)`
    (`rhs [groups, n, k]` read transposed, or `[groups, k, n]` as it is): a custom VJP."""

    @jax.custom_vjp
    def grouped(x, w, sizes):
        return kernel(x, w, sizes, True)

    def forward(x, w, sizes):
        return grouped(x, w, sizes), (x, w, sizes)

    def backward(saved, dy):
        x, w, sizes = saved
        dx = kernel(dy.astype(w.dtype), w, sizes, False)  # dy [m, out] times each group's [out, in]
        _, weight_vjp = jax.vjp(lambda w_: xla_grouped_matmul(x, w_, sizes), w)
        return dx.astype(x.dtype), weight_vjp(dy)[0], None

    grouped.defvjp(forward, backward)
    return grouped


_mgpu_grouped_matmul = with_kernel(_mgpu_kernel)


@functools.cache
def _hopper() -> bool:
    device = jax.devices()[0]
    return device.platform == "gpu" and str(getattr(device, "compute_capability", "")).startswith("9")


def use_kernel(x: jax.Array, w: jax.Array) -> bool:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"grouped matmul implementation {implementation!r}: expected one of {IMPLEMENTATIONS}")
    if implementation == "xla":
        return False
    fits = (x.dtype == w.dtype and x.dtype in (jnp.bfloat16, jnp.float16) and w.shape[1] % 128 == 0
            and w.shape[2] % 128 == 0)
    if implementation == "mgpu":
        if not fits:
            raise ValueError(f"the Mosaic GPU grouped matmul needs bf16/fp16 operands of one dtype and widths that "
                             f"are multiples of 128; got {x.dtype} x {w.dtype}{tuple(w.shape)}")
        return True
    return fits and jax.default_backend() == "gpu" and _hopper()


def grouped_matmul(x: jax.Array, w: jax.Array, sizes: jax.Array) -> jax.Array:
    """`x [m, in]` (rows sorted by group; `sizes [groups]` rows each) times `w [groups, out, in]`: [m, out]."""
    sizes = sizes.astype(jnp.int32)
    if use_kernel(x, w):
        return _mgpu_grouped_matmul(x, w, sizes)
    return xla_grouped_matmul(x, w, sizes)
