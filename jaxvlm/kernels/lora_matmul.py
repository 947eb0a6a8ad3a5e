"""LoRA's products: the widening product as one matmul with a hand-written backward (see jaxvlm.lora.LoRA.linear),
and the adapter's skinny products by Pallas (Triton) GPU kernels.

An adapter of rank r adds, per Linear and step, products with r (16-64) columns on one side and the batch's tokens
(thousands) on the other: x A^T [M, r] (forward and recompute), and in the backward dB = g^T xa [out, r] and
dA = dxa^T x [r, in], both contracting over the M tokens. Each reads one wide operand once and is bound by reading it.
XLA forms them as Triton GEMMs that run at a fifth of the HBM's bandwidth (an H200's profile of the Qwen2-VL-2B
step: 26 us for an x of 21 MB) and, contracting over M = 8 x 514 tokens, pads the wide operand to a multiple of 32
or 64 rows first (a copy of it). Two kernels read the wide operand in place, masking the ragged rows:

- `narrow(x, a)`: x [M, K] @ a[r, K]^T -> [M, r] (or @ a [K, r] with `kr=True`: B read in its own layout, where
  a transposed operand made XLA hoist a transposed float32 copy of the whole stacked B out of the layer loop, live
  through the backward); programs over (row blocks, ranges of K).
- `tall(u, v)`: u [M, P]^T @ v [M, r] -> [P, r] float32; programs over (P tiles, ranges of M).

Both write float32 partial sums per range, which XLA adds.

`lora_in` and `lora_out` are x A^T and xa B^T with backward passes made of those two (and of XLA's dots where the
output is wide). JAXVLM_LORA_KERNEL (read at trace time): "auto" (the default: the kernels on a process with one GPU;
under a device mesh a Pallas call has no sharding rule and XLA would gather its operands, so XLA's dots there), "on"
(the kernels on a GPU), "interpret" (Pallas' interpreter on any backend: the tests), "off" (XLA's dots). Where the
setting allows them, `kernels_for` takes them for ragged token counts only.

Measured on an H200 (Qwen2-VL-2B geometry, LoRA r=16 on every Linear, batch 8; docs/BENCHMARKS.md, "Training step:
inputs one micro-batch ahead, LoRA's skinny products in Pallas"):
the training step 0.1928 -> 0.1880 s in bf16, 0.1962 -> 0.1879 s in NF4.
"""
from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from jaxvlm.kernels import kernel_on

lora_kernel = os.environ.get("JAXVLM_LORA_KERNEL", "auto")

_SMS = 132  # an H100/H200's SMs


def kernels_on() -> bool:
    return kernel_on(lora_kernel)


def kernels_for(rows: int) -> bool:
    """Whether the adapter's skinny products over `rows` tokens go through the kernels: allowed (`kernels_on`), at
    least 64 rows, and a count that is not a multiple of 64 (XLA's GEMMs pad those first; where it pads nothing the
    kernels measured no faster on an H200: docs/BENCHMARKS.md, "LoRA kernels per family")."""
    return kernels_on() and rows >= 64 and rows % 64 != 0


# A frozen plain base kept whole as its product's [w | b] while the trainer trains the adapter(s) (jaxvlm.lora.widen):
# "auto" (the default: a trainer on one device, no mesh), "off".
widen_setting = os.environ.get("JAXVLM_LORA_WIDEN_WEIGHTS", "auto")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class Widened:
    """The frozen base of a widening adapted Linear, or of sibling Linears (q/k/v, gate/up), stored as the weight
    operand of `concat_linear`: buf [*stack, out, in + r] = [w | b], w the base weights stacked along out (`parts`:
    their widths) and b the adapters' B (block-diagonal for siblings) in the last r columns. The trainer writes the
    current B into b at the start of each step, in place (the buffer is donated), so that no step copies the weights
    into [w | b] (three times a layer before: the forward, its recomputation and the backward's dx). The product
    reads buf as it is; the adapters' gradients come from their own B, passed beside it."""

    buf: jax.Array
    parts: tuple = dataclasses.field(metadata={"static": True})
    in_features: int = dataclasses.field(metadata={"static": True})

    @property
    def stack_ndim(self) -> int:
        return self.buf.ndim - 2

    def dequantize(self, dtype) -> jax.Array:
        """The first part's weight [out_0, in] (the Linear whose base this is)."""
        return self.buf[..., :self.parts[0], :self.in_features].astype(dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class InSibling:
    """The base of a sibling Linear while its weight lives in the first sibling's `Widened` buffer (training only)."""

    shape: tuple = dataclasses.field(metadata={"static": True})

    def dequantize(self, dtype):
        raise ValueError(f"this Linear's base weight {self.shape} is held in its first sibling's widened buffer while "
                         f"the trainer trains it; only the siblings' joint product (layers.sibling_linears) reads it")


@jax.custom_vjp
def concat_linear(x: jax.Array, xa: jax.Array, w, b: jax.Array) -> jax.Array:
    """x @ w.T + xa @ b.T as one matmul, [x | xa] @ [w | b].T (K = in + r): the base product and the
    adapter's B product share the pass over the output. x [..., in], xa [..., r], w [out, in] or a tuple of weights
    [out_i, in] stacked along out (sibling Linears, jaxvlm.lora.LoRA.sibling_linear), b [out, r].
    The backward pass reads the output's cotangent g once for dx and dxa together (g @ [w | b]); dw
    (g.T @ x) is formed only if w is differentiated (a frozen base's is dropped as dead code). Siblings' weights are
    kept as they are for the backward and stacked only inside each product's [w | b], so that the backward forms its
    copy where it ties it (below), not in the recomputed forward. [x | xa] formed in place instead (x padded with r
    zero columns, xa written into them: no separate concatenation pass) measured 0.6-2.2% slower on an H200 and was
    removed (docs/BENCHMARKS.md, "[x | xa] formed in place"). w a `Widened` is [w | b] already (b its B part)."""
    return jax.lax.dot_general(jnp.concatenate([x, xa], axis=-1), _stack_wb(w, b), (((x.ndim - 1,), (1,)), ((), ())))


def _stack_wb(w, b: jax.Array) -> jax.Array:
    """[w | b] with w [out, in] or a tuple of [out_i, in] stacked along out (a `Widened` holds it)."""
    if isinstance(w, Widened):
        return w.buf.astype(b.dtype)
    w = jnp.concatenate(w, axis=0) if isinstance(w, (tuple, list)) else w
    return jnp.concatenate([w, b], axis=-1)


def _weight_cotangent(g: jax.Array, x: jax.Array, w):
    """g^T x over every leading axis: the cotangent of w [out, in], or of each weight of a tuple stacked along out (a
    frozen base's is dead code that XLA drops). A `Widened` is frozen: zeros."""
    if isinstance(w, Widened):
        return jax.tree.map(jnp.zeros_like, w)
    lead = tuple(range(g.ndim - 1))
    dw = jax.lax.dot_general(g, x, ((lead, lead), ((), ())))
    if not isinstance(w, (tuple, list)):
        return dw
    parts = jnp.split(dw, np.cumsum([part.shape[0] for part in w])[:-1])
    return type(w)(d.astype(part.dtype) for d, part in zip(parts, w))


def _concat_linear_fwd(x, xa, w, b):
    return concat_linear(x, xa, w, b), (x, xa, w, b)


def _concat_linear_bwd(res, g):
    x, xa, w, b = res
    n = x.shape[-1]
    if isinstance(w, (tuple, list)):
        # Siblings' [w | b] is formed once g exists (b tied to g): left free, XLA formed it first, and the copy (56 MB
        # for the 2B gate/up) was live beside the activation gradient's inputs and output, the step's peak (H200 buffer
        # assignment; docs/BENCHMARKS.md, "Sibling Linears"). The tie took it out: 2B bf16 peak -54.9 MB, Qwen3-VL-2B
        # -45.3 MB, no step slower ("The siblings' backward barrier measured"). Tied by b, not w, so that a quantized
        # w's decoding still fuses into the copy.
        g, b = jax.lax.optimization_barrier((g, b))
    gc = jax.lax.dot_general(g, _stack_wb(w, b), (((g.ndim - 1,), (0,)), ((), ())))
    lead = tuple(range(g.ndim - 1))
    dw = _weight_cotangent(g, x, w)
    if kernels_for(xa.size // xa.shape[-1]):
        db = _tall_or_dot(g, xa).astype(b.dtype)
    else:
        db = jax.lax.dot_general(g, xa, ((lead, lead), ((), ())))
    return gc[..., :n], gc[..., n:], dw, db


concat_linear.defvjp(_concat_linear_fwd, _concat_linear_bwd)


@jax.custom_vjp
def adapted_linear(x: jax.Array, w: jax.Array, a: jax.Array, b: jax.Array, scale) -> jax.Array:
    """x @ w.T + (scale * x @ a.T) @ b.T for a narrowing Linear over many rows (jaxvlm.lora.LoRA.linear says which):
    the same products as two separate ones (x A^T by `narrow` for a ragged row count), with a backward that forms dx
    as one matmul, [g | ds] @ [w ; a] (K = out + r), where ds = scale * g b is the cotangent of x A^T. Autodiff of the
    two products wrote the adapter's share of dx ([tokens, in]: 73.7 MB for the 2B down projection at batch 8) as a
    buffer of its own beside the base's, live together at the peak of the Qwen2-VL-2B step (an H200's buffer
    assignment; docs/BENCHMARKS.md, "The adapter's share of dx"). x [..., in], w [out, in] in x's dtype, a [r, in],
    b [out, r], scale a scalar (a float, or the layer's mask times it); dw is formed only if w is differentiated."""
    return _adapted_linear_fwd(x, w, a, b, scale)[0]


def _adapted_linear_fwd(x, w, a, b, scale):
    dims = (((x.ndim - 1,), (1,)), ((), ()))
    ac = a.astype(x.dtype)
    xa = (_narrow_or_dot(x, ac) if kernels_for(x.size // x.shape[-1]) else jax.lax.dot_general(x, ac, dims)) * scale
    y = jax.lax.dot_general(x, w, dims) + jax.lax.dot_general(xa, b.astype(x.dtype), dims)
    return y, (x, xa, w, a, b, scale)


def _adapted_linear_bwd(res, g):
    x, xa, w, a, b, scale = res
    skinny = kernels_for(x.size // x.shape[-1])
    lead = tuple(range(g.ndim - 1))
    over_rows, last = ((lead, lead), ((), ())), (((g.ndim - 1,), (0,)), ((), ()))
    dxa = _narrow_or_dot(g, b, kr=True) if skinny else jax.lax.dot_general(g, b.astype(g.dtype), last)
    db = _tall_or_dot(g, xa) if skinny else jax.lax.dot_general(g, xa, over_rows)
    ds = (dxa * scale).astype(x.dtype)
    da = _tall_or_dot(x, ds).T if skinny else jax.lax.dot_general(ds, x, over_rows)
    # dA is x's last read: tied to ds, which dx's product reads, it runs first and x dies there (see _lora_in_bwd).
    ds, da = jax.lax.optimization_barrier((ds, da))
    dx = jax.lax.dot_general(jnp.concatenate([g, ds], axis=-1), jnp.concatenate([w, a.astype(w.dtype)], axis=0), last)
    dw = jax.lax.dot_general(g, x, over_rows)
    return dx, dw.astype(w.dtype), da.astype(a.dtype), db.astype(b.dtype), jnp.zeros_like(scale)


adapted_linear.defvjp(_adapted_linear_fwd, _adapted_linear_bwd)


# ----------------------------------------------------------------------------------------------
# The skinny products.


def _rank_pad(r: int) -> int:
    """The adapter's width as the kernels' dots take it: a power of 2, at least 16."""
    return max(16, 1 << (r - 1).bit_length())


def _block(n: int, sizes=(128, 64, 32, 16)) -> int | None:
    return next((s for s in sizes if n % s == 0), None)


def narrow_supported(x: jax.Array, a: jax.Array, kr: bool = False) -> bool:
    """Whether `narrow` takes x [..., K] @ a[r, K]^T (a [K, r] with `kr`): K a multiple of 16, r at most 128."""
    if x.ndim < 2 or a.ndim != 2:
        return False
    k, r = a.shape if kr else a.shape[::-1]
    return x.shape[-1] == k and _block(k) is not None and r <= 128


def _narrow_kernel(x_ref, a_ref, o_ref, *, m: int, block_m: int, block_k: int, steps: int, kr: bool):
    i, s = pl.program_id(0), pl.program_id(1)
    rows = i * block_m + jax.lax.broadcasted_iota(jnp.int32, (block_m, 1), 0)
    inside = rows < m

    def step(t, acc):
        k0 = (s * steps + t) * block_k
        xb = plt.load(x_ref.at[pl.ds(i * block_m, block_m), pl.ds(k0, block_k)],
                      mask=jnp.broadcast_to(inside, (block_m, block_k)), other=0)
        if kr:
            return acc + plt.dot(xb, a_ref[pl.ds(k0, block_k), :].astype(xb.dtype))
        return acc + plt.dot(xb, a_ref[:, pl.ds(k0, block_k)].astype(xb.dtype), trans_b=True)

    acc = jax.lax.fori_loop(0, steps, step, jnp.zeros((block_m, o_ref.shape[-1]), jnp.float32))
    plt.store(o_ref.at[pl.ds(i * block_m, block_m), :], acc, mask=jnp.broadcast_to(inside, acc.shape))


def _narrow_config(m: int, k: int) -> dict:
    """block_m, block_k and splits (ranges of K) for a [m, k] x: K split until there are about 4 programs per SM."""
    block_m, block_k = 64, _block(k, (256, 128, 64, 32, 16))
    chunks = k // block_k
    want = -(-4 * _SMS // -(-m // block_m))
    splits = max([d for d in range(1, chunks + 1) if chunks % d == 0 and d <= want])
    return dict(block_m=block_m, block_k=block_k, splits=splits)


@functools.partial(jax.jit, static_argnames=("kr", "block_m", "block_k", "splits", "num_warps", "num_stages",
                                             "interpret"))
def narrow(x: jax.Array, a: jax.Array, *, kr: bool = False, block_m: int | None = None, block_k: int | None = None,
           splits: int | None = None, num_warps: int = 4, num_stages: int = 3, interpret: bool = False) -> jax.Array:
    """x [..., K] @ a[r, K]^T (`kr`: @ a [K, r]) -> [..., r] in x's dtype (float32 sums), reading x once: programs
    over (blocks of block_m rows, `splits` ranges of K), their partial sums added by XLA (see the module's doc). `a`
    is read in its own dtype and cast to x's in the kernel."""
    if not narrow_supported(x, a, kr):
        raise ValueError(f"narrow: x {x.shape} @ a {a.shape}{'' if kr else '.T'} is not a supported product (K a "
                         f"multiple of 16, r <= 128)")
    lead, k, r = x.shape[:-1], x.shape[-1], a.shape[1 if kr else 0]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    rp = _rank_pad(r)
    ap = jnp.pad(a, ((0, 0), (0, rp - r)) if kr else ((0, rp - r), (0, 0)))
    cfg = _narrow_config(m, k)
    block_m, block_k = block_m or cfg["block_m"], block_k or cfg["block_k"]
    splits = splits or (cfg["splits"] if block_k == cfg["block_k"] else 1)
    if k % (block_k * splits):
        raise ValueError(f"narrow: block_k {block_k} x splits {splits} does not divide K {k}")
    whole = lambda s: pl.BlockSpec(s, lambda i, j: (0,) * len(s))  # noqa: E731
    extra = {} if interpret else dict(compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages))
    partial = pl.pallas_call(
        functools.partial(_narrow_kernel, m=m, block_m=block_m, block_k=block_k, steps=k // (block_k * splits),
                          kr=kr),
        out_shape=jax.ShapeDtypeStruct((splits, m, rp), jnp.float32),
        grid=(pl.cdiv(m, block_m), splits),
        in_specs=[whole(x2.shape), whole(ap.shape)],
        out_specs=pl.BlockSpec((None, m, rp), lambda i, j: (j, 0, 0)),
        interpret=interpret,
        name="lora_narrow",
        **extra,
    )(x2, ap)
    return jnp.sum(partial[:, :, :r], axis=0).astype(x.dtype).reshape(*lead, r)


def tall_supported(u: jax.Array, v: jax.Array) -> bool:
    """Whether `tall` takes u [..., P]^T @ v [..., r]: P a multiple of 16, r at most 128."""
    return u.ndim >= 2 and u.shape[:-1] == v.shape[:-1] and _block(u.shape[-1]) is not None and v.shape[-1] <= 128


def _tall_kernel(u_ref, v_ref, o_ref, *, m: int, block_m: int, block_p: int, steps: int):
    j, s = pl.program_id(0), pl.program_id(1)

    def step(t, acc):
        m0 = (s * steps + t) * block_m
        inside = m0 + jax.lax.broadcasted_iota(jnp.int32, (block_m, 1), 0) < m
        ub = plt.load(u_ref.at[pl.ds(m0, block_m), pl.ds(j * block_p, block_p)],
                      mask=jnp.broadcast_to(inside, (block_m, block_p)), other=0)
        vb = plt.load(v_ref.at[pl.ds(m0, block_m), :], mask=jnp.broadcast_to(inside, (block_m, v_ref.shape[1])),
                      other=0)
        return acc + plt.dot(ub, vb, trans_a=True)

    acc = jax.lax.fori_loop(0, steps, step, jnp.zeros((block_p, v_ref.shape[1]), jnp.float32))
    o_ref[...] = acc


@functools.partial(jax.jit, static_argnames=("block_m", "block_p", "splits", "num_warps", "num_stages",
                                             "interpret"))
def tall(u: jax.Array, v: jax.Array, *, block_m: int = 64, block_p: int | None = None, splits: int | None = None,
         num_warps: int = 4, num_stages: int = 3, interpret: bool = False) -> jax.Array:
    """u [..., P]^T @ v [..., r] -> [P, r] float32, contracting every leading axis, reading u once: programs over
    (P tiles of block_p, `splits` ranges of the M rows), their partial sums added by XLA (see the module's doc)."""
    if not tall_supported(u, v):
        raise ValueError(f"tall: u {u.shape}.T @ v {v.shape} is not a supported product (P a multiple of 16, "
                         f"r <= 128, the same leading axes)")
    p, r = u.shape[-1], v.shape[-1]
    u2, v2 = u.reshape(-1, p), v.reshape(-1, r)
    m = u2.shape[0]
    rp = _rank_pad(r)
    vp = jnp.pad(v2.astype(u.dtype), ((0, 0), (0, rp - r)))
    block_p = block_p or _block(p)
    tiles, m_blocks = p // block_p, pl.cdiv(m, block_m)
    splits = splits or max(1, min(m_blocks, -(-2 * _SMS // tiles)))
    steps = -(-m_blocks // splits)
    whole = lambda s: pl.BlockSpec(s, lambda j, i: (0,) * len(s))  # noqa: E731
    extra = {} if interpret else dict(compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages))
    partial = pl.pallas_call(
        functools.partial(_tall_kernel, m=m, block_m=block_m, block_p=block_p, steps=steps),
        out_shape=jax.ShapeDtypeStruct((splits, p, rp), jnp.float32),
        grid=(tiles, splits),
        in_specs=[whole(u2.shape), whole(vp.shape)],
        out_specs=pl.BlockSpec((None, block_p, rp), lambda j, i: (i, j, 0)),
        interpret=interpret,
        name="lora_tall",
        **extra,
    )(u2, vp)
    return jnp.sum(partial[:, :, :r], axis=0)


def _interpret() -> bool:
    return lora_kernel == "interpret"


def _narrow_or_dot(x: jax.Array, a: jax.Array, kr: bool = False) -> jax.Array:
    """x [..., K] @ a [r, K]^T (`kr`: @ a [K, r]) -> [..., r] in x's dtype: the kernel where it takes the shapes."""
    if narrow_supported(x, a, kr):
        return narrow(x, a, kr=kr, interpret=_interpret())
    return jax.lax.dot_general(x, a.astype(x.dtype), (((x.ndim - 1,), (0 if kr else 1,)), ((), ())))


def _tall_or_dot(u: jax.Array, v: jax.Array) -> jax.Array:
    """u [..., P]^T @ v [..., r] -> [P, r] float32 over every leading axis."""
    if tall_supported(u, v):
        return tall(u, v, interpret=_interpret())
    lead = tuple(range(u.ndim - 1))
    return jax.lax.dot_general(u, v, ((lead, lead), ((), ())), preferred_element_type=jnp.float32)


@jax.custom_vjp
def lora_in(x: jax.Array, a: jax.Array) -> jax.Array:
    """The adapter's input product x [..., in] @ a [r, in]^T -> [..., r] (a cast to x's dtype); its backward forms
    dA = dxa^T x with `tall` (dx = dxa a stays XLA's: its output is wide)."""
    return _narrow_or_dot(x, a)


def _lora_in_fwd(x, a):
    return lora_in(x, a), (x, a)


def _lora_in_bwd(res, dxa):
    x, a = res
    dx = jax.lax.dot_general(dxa, a.astype(dxa.dtype), (((dxa.ndim - 1,), (0,)), ((), ())))
    # dA is x's last read: tied to dx, it runs before dx's users, and x dies there. Left free, XLA ran it late in the
    # layer's backward, keeping x alive across the SiLU backward (the down projection's input, [tokens, 8960]): the
    # peak of the Qwen2-VL-2B batch-8 step (H200 buffer assignment; docs/BENCHMARKS.md, "Where the LoRA kernels'
    # peak memory went").
    dx, da = jax.lax.optimization_barrier((dx, _tall_or_dot(x, dxa).T))
    return dx.astype(x.dtype), da.astype(a.dtype)


lora_in.defvjp(_lora_in_fwd, _lora_in_bwd)


@jax.custom_vjp
def lora_out(xa: jax.Array, b: jax.Array) -> jax.Array:
    """The adapter's output product xa [..., r] @ b [out, r]^T -> [..., out] (an XLA dot: its output is wide); its
    backward forms dxa = g b with `narrow` and dB = g^T xa with `tall`, each reading g once."""
    return jax.lax.dot_general(xa, b.astype(xa.dtype), (((xa.ndim - 1,), (1,)), ((), ())))


def _lora_out_fwd(xa, b):
    return lora_out(xa, b), (xa, b)


def _lora_out_bwd(res, g):
    xa, b = res
    dxa = _narrow_or_dot(g, b, kr=True)
    return dxa.astype(xa.dtype), _tall_or_dot(g, xa).astype(b.dtype)


lora_out.defvjp(_lora_out_fwd, _lora_out_bwd)
