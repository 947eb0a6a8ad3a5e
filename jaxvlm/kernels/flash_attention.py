"""Flash attention for Gemma 3's language model, its mask computed inside the kernel from per-token arrays.

The mask (`dense_mask`): query i of a row may attend key j when key j is a real token (`key_ok`), and j <= i
(causal) or i and j are tokens of one image (`blocks`: the image run id of each token, -1 at text), and, in a
sliding layer of window W, j > i - W. XLA's path (`block_attention_reference`) builds that mask densely,
[B, 1, T, T], and the [B, H, T, T] logits. The Pallas kernels never build either: each program loads the
per-token arrays of its rows, makes the mask of one [block_q, block_k] tile at a time, and keeps the online
softmax (running max, running sum, fp32 accumulator) in registers.

Block skipping. Two more per-token int32 arrays, made in the wrapper, bound the loops:
  reach[i]  the last key that query i may attend: i, or the last token of i's image when i is an image token;
  first[j]  the first query that may attend key j: j, or the first token of j's image; T (no query) when key j
            is padding.
A query block [q0, q0 + block_q) visits the key blocks from the one holding max(0, q0 - W + 1) (window; else
0) to the one holding max(reach[q0:q0 + block_q]) (`_key_block_range`). A key block [k0, k0 + block_k)
visits the query blocks from the one holding min(first[k0:k0 + block_k]) to the one holding
k0 + block_k - 1 + W - 1 (window; else the last) (`_query_block_range`). Tiles inside those ranges are
masked elementwise; causal text rows thus do about half the work of full attention, sliding rows O(T W).

Layout: q [B, T, H, D], k and v [B, T, KH, D] as the model holds them (no transposes); query head h reads kv
head h // (H // KH). The wrapper pads T up to a multiple of the block sizes (padded keys are masked, padded
queries get a zero cotangent and are sliced off) and D up to a power of two >= 16 (zero columns change no
logit). Grids:
  forward  (B, H, T / block_q): one query block of one head; a loop over its key blocks; writes the output
           and the row log-sum-exp (lse, fp32 [B, H, T]) for the backward.
  dq       (B, H, T / block_q): the same loop, recomputing p = exp(s - lse) tile by tile.
  dk, dv   (B, H, T / block_k): one key block, for one *query* head, looping over its query blocks; the
           [B, T, H, D] fp32 results are summed over the H // KH query heads of each kv head in the wrapper.
delta = rowsum(out * d_out) comes from XLA. Logits, softmax and accumulators are fp32; the products take the
inputs' dtype (bf16 on the fast path) with fp32 accumulation (fp32 inputs: Triton's default TF32 products,
as XLA's default precision on the GPU; errors ~1e-3 there, exact in interpret mode).

Defaults (block 64 x 64, 4 warps, 2 stages), measured on an H200 (scripts/bench_attention.py, docs/BENCHMARKS.md),
bf16, 8,192 tokens, one row: head dim 256 with 8 query / 4 kv heads: forward 1.34 ms, forward + backward 6.77 (cuDNN
with the dense mask: 2.66 and 9.46); with a 1,024 window 0.70 and 2.22. Head dim 128, 32 / 16 heads: 2.61 and 7.85
(cuDNN 3.81 and 13.37). While tuning, 8 warps were slower at both head dims; 128-row blocks with 8 warps and 1
stage made the head-dim-256 backward faster but the head-dim-128 one slower; 3 stages or 128-row blocks with 2
stages overflow shared memory in the head-dim-256 backward.

A query with no allowed key (a left-padding query whose keys are all padding) gets a zero output, lse 0 and
zero gradients: masked logits are -inf, the running max is replaced by 0 while it is -inf, and a zero sum
divides by 1 -- never NaN. The reference does the same.

Contract on `blocks`: the tokens of one image are consecutive, and two runs never share an id (as
gemma3.image_blocks numbers them). `dense_mask` compares ids alone, so two separate runs with one id would
attend each other there, while `reach` and `first` (which follow runs) would skip some of those tiles.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


# ----------------------------------------------------------------------------------------------
# The mask and the XLA reference.


def _allowed(q_pos, q_blk, k_pos, k_blk, k_ok, window: int | None):
    """Whether query q may attend key k, by broadcasting: the q_* arrays [..., Tq, 1], the k_* [..., 1, Tk]
    (positions, image run ids, key_ok). Shared by `dense_mask` and the kernels' tiles."""
    ok = (k_pos <= q_pos) | ((q_blk >= 0) & (q_blk == k_blk))
    ok = ok & (k_ok != 0)
    if window is not None:
        ok = ok & (k_pos > q_pos - window)
    return ok


def dense_mask(key_ok: jax.Array, blocks: jax.Array | None, window: int | None) -> jax.Array:
    """[B, 1, T, T] bool: mask[b, 0, i, j] = query i of row b may attend key j (see the module docstring)."""
    key_ok = jnp.asarray(key_ok)
    b, t = key_ok.shape
    blocks = jnp.full((b, t), -1, jnp.int32) if blocks is None else jnp.asarray(blocks, jnp.int32)
    pos = jnp.arange(t, dtype=jnp.int32)
    ok = _allowed(pos[None, :, None], blocks[:, :, None], pos[None, None, :], blocks[:, None, :],
                  key_ok[:, None, :], window)
    return ok[:, None]


def block_attention_reference(q, k, v, key_ok, blocks=None, *, window: int | None = None,
                              scale: float | None = None) -> jax.Array:
    """Softmax attention under `dense_mask` in plain XLA: [B, T, H, D] in q's dtype, fp32 logits and softmax.
    A query with no allowed key gets zeros (and zero gradients)."""
    b, t, h, d = q.shape
    kh = k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    mask = dense_mask(key_ok, blocks, window)[:, :, None]  # [B, 1, 1, T, T]
    hi = lax.Precision.HIGHEST
    qg = q.reshape(b, t, kh, h // kh, d)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32, precision=hi) * scale
    s = jnp.where(mask, s, -jnp.inf)
    m = lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)  # all keys masked: exp(-inf - 0) = 0 everywhere
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(l > 0, l, 1.0)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", p, v.astype(jnp.float32), precision=hi)
    return out.reshape(b, t, h, d).astype(q.dtype)


# ----------------------------------------------------------------------------------------------
# Loop bounds (pure functions of int32 scalars: used inside the kernels and tested directly).


def _div(a, b: int):
    """a // b for non-negative int32 a (lax.div truncates; the Triton lowering has no floor division)."""
    return lax.div(jnp.asarray(a, jnp.int32), jnp.int32(b))


def _key_block_range(q_start, reach_max, *, block_k: int, window: int | None):
    """[lo, hi) of the key blocks that the query block starting at `q_start` visits, `reach_max` the largest
    key any of its queries may attend (max of `reach` over the block)."""
    lo = jnp.int32(0) if window is None else _div(jnp.maximum(q_start - window + 1, 0), block_k)
    return lo, _div(reach_max, block_k) + 1


def _query_block_range(k_start, first_min, *, block_q: int, block_k: int, window: int | None,
                       num_q_blocks: int):
    """[lo, hi) of the query blocks that the key block starting at `k_start` visits, `first_min` the first
    query that may attend any of its keys (min of `first` over the block; T when all are padding: no block).
    With a window, query i sees key j only when i <= j + W - 1, so the last query is k_start + block_k - 1 + W - 1."""
    lo = _div(first_min, block_q)
    if window is None:
        return lo, jnp.int32(num_q_blocks)
    return lo, jnp.minimum(_div(k_start + block_k + window - 2, block_q) + 1, num_q_blocks)


def _reach_first(key_ok: jax.Array, blocks: jax.Array) -> tuple[jax.Array, jax.Array]:
    """int32 [B, T] each: `reach` and `first` (module docstring). An image is a run of consecutive tokens with
    one id >= 0: its last token is the first index >= i whose next token differs (a reverse running min), its
    first the last index <= j whose previous token differs (a running max)."""
    b, t = blocks.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    image = blocks >= 0
    same_next = jnp.pad(image[:, :-1] & (blocks[:, :-1] == blocks[:, 1:]), ((0, 0), (0, 1)))
    same_prev = jnp.pad(image[:, 1:] & (blocks[:, 1:] == blocks[:, :-1]), ((0, 0), (1, 0)))
    run_end = lax.cummin(jnp.where(same_next, t, pos), axis=1, reverse=True)
    run_start = lax.cummax(jnp.where(same_prev, -1, pos), axis=1)
    reach = jnp.where(image, run_end, pos)
    first = jnp.where(image, run_start, pos)
    first = jnp.where(key_ok != 0, first, t)  # a padding key: no query attends it
    return reach.astype(jnp.int32), first.astype(jnp.int32)


# ----------------------------------------------------------------------------------------------
# Kernels. Refs carry the leading (batch, head) dims squeezed: q_ref [block_q, D] or [T, D], etc.


def _dot_nt(a, b):
    """a @ b.T with fp32 accumulation."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_nn(a, b):
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_tn(a, b):
    """a.T @ b with fp32 accumulation."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _iota(n: int):
    return jnp.arange(n, dtype=jnp.int32)


def _fwd_kernel(q_ref, k_ref, v_ref, ok_ref, blk_ref, reach_ref, o_ref, lse_ref, *, scale, window, block_k):
    # q_ref [block_q, D]: this program's queries of one head; k_ref, v_ref [T, D]: its kv head's whole row;
    # ok_ref, blk_ref [T]: the row's key_ok and image ids; reach_ref [block_q]: its queries' reach.
    block_q, d = q_ref.shape
    q_start = pl.program_id(2) * block_q
    q = q_ref[...]
    q_pos = (q_start + _iota(block_q))[:, None]
    q_blk = blk_ref[pl.ds(q_start, block_q)][:, None]

    def body(j, carry):
        acc, m, l = carry
        k_start = j * block_k
        ks = pl.ds(k_start, block_k)
        s = _dot_nt(q, k_ref[ks, :]) * scale
        ok = _allowed(q_pos, q_blk, (k_start + _iota(block_k))[None, :], blk_ref[ks][None, :],
                      ok_ref[ks][None, :], window)
        s = jnp.where(ok, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        base = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # no allowed key yet: exp(-inf - 0) = 0, never -inf + inf
        p = jnp.exp(s - base[:, None])
        corr = jnp.exp(m - base)  # rescales what was summed under the old max (0 while that was -inf)
        l = l * corr + jnp.sum(p, axis=1)
        v = v_ref[ks, :]
        acc = acc * corr[:, None] + _dot_nn(p.astype(v.dtype), v)
        return acc, m_new, l

    lo, hi = _key_block_range(q_start, jnp.max(reach_ref[...]), block_k=block_k, window=window)
    init = (jnp.zeros((block_q, d), jnp.float32), jnp.full((block_q,), -jnp.inf, jnp.float32),
            jnp.zeros((block_q,), jnp.float32))
    acc, m, l = lax.fori_loop(lo, hi, body, init)
    empty = l == 0.0  # a query with no allowed key: output 0, lse 0
    l_safe = jnp.where(empty, 1.0, l)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, 0.0, m + jnp.log(l_safe))


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, ok_ref, blk_ref, reach_ref, dq_ref, *, scale,
               window, block_k):
    # As the forward: one query block of one head, over the same key blocks. p = exp(s - lse) is the softmax
    # (0 where masked); ds = p * (do . v - delta); dq = scale * sum ds @ k.
    block_q, d = q_ref.shape
    q_start = pl.program_id(2) * block_q
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
    q_pos = (q_start + _iota(block_q))[:, None]
    q_blk = blk_ref[pl.ds(q_start, block_q)][:, None]

    def body(j, dq):
        k_start = j * block_k
        ks = pl.ds(k_start, block_k)
        k, v = k_ref[ks, :], v_ref[ks, :]
        ok = _allowed(q_pos, q_blk, (k_start + _iota(block_k))[None, :], blk_ref[ks][None, :],
                      ok_ref[ks][None, :], window)
        p = jnp.where(ok, jnp.exp(_dot_nt(q, k) * scale - lse), 0.0)
        ds = p * (_dot_nt(do, v) - delta)
        return dq + _dot_nn(ds.astype(k.dtype), k)

    lo, hi = _key_block_range(q_start, jnp.max(reach_ref[...]), block_k=block_k, window=window)
    dq = lax.fori_loop(lo, hi, body, jnp.zeros((block_q, d), jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, ok_ref, blk_ref, first_ref, dk_ref, dv_ref, *,
                scale, window, block_q, num_q_blocks):
    # k_ref, v_ref [block_k, D]: one key block of the kv head of query head h; q_ref, do_ref [T, D] and
    # lse_ref, delta_ref [T]: query head h's whole row; first_ref [block_k]: the block's keys' `first`.
    # dv = sum p.T @ do, dk = scale * sum ds.T @ q over the query blocks that may attend these keys.
    block_k, d = k_ref.shape
    k_start = pl.program_id(2) * block_k
    ks = pl.ds(k_start, block_k)
    k, v = k_ref[...], v_ref[...]
    k_pos = (k_start + _iota(block_k))[None, :]
    k_blk, k_ok = blk_ref[ks][None, :], ok_ref[ks][None, :]

    def body(i, carry):
        dk, dv = carry
        q_start = i * block_q
        qs = pl.ds(q_start, block_q)
        q, do = q_ref[qs, :], do_ref[qs, :]
        ok = _allowed((q_start + _iota(block_q))[:, None], blk_ref[qs][:, None], k_pos, k_blk, k_ok, window)
        p = jnp.where(ok, jnp.exp(_dot_nt(q, k) * scale - lse_ref[qs][:, None]), 0.0)  # [block_q, block_k]
        dv = dv + _dot_tn(p.astype(do.dtype), do)
        ds = p * (_dot_nt(do, v) - delta_ref[qs][:, None])
        dk = dk + _dot_tn(ds.astype(q.dtype), q)
        return dk, dv

    lo, hi = _query_block_range(k_start, jnp.min(first_ref[...]), block_q=block_q, block_k=block_k,
                                window=window, num_q_blocks=num_q_blocks)
    zeros = jnp.zeros((block_k, d), jnp.float32)
    dk, dv = lax.fori_loop(lo, hi, body, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ----------------------------------------------------------------------------------------------
# The pallas_calls and the custom VJP. Inside here every array is padded: T a multiple of both block
# sizes, D a power of two >= 16.


class _Config(NamedTuple):
    scale: float
    window: int | None
    block_q: int
    block_k: int
    num_warps: int
    num_stages: int
    interpret: bool


def _params(cfg: _Config):
    return plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _forward(q, k, v, key_ok, blocks, reach, cfg: _Config):
    b, t, h, d = q.shape
    group = h // k.shape[2]
    bq = cfg.block_q
    row_q = pl.BlockSpec((None, bq, None, d), lambda b_, h_, i: (b_, i, h_, 0))
    row_kv = pl.BlockSpec((None, t, None, d), lambda b_, h_, i: (b_, 0, lax.div(h_, group), 0))
    tokens = pl.BlockSpec((None, t), lambda b_, h_, i: (b_, 0))
    tokens_q = pl.BlockSpec((None, bq), lambda b_, h_, i: (b_, i))
    return pl.pallas_call(
        functools.partial(_fwd_kernel, scale=cfg.scale, window=cfg.window, block_k=cfg.block_k),
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, t), jnp.float32)],
        grid=(b, h, t // bq),
        in_specs=[row_q, row_kv, row_kv, tokens, tokens, tokens_q],
        out_specs=[row_q, pl.BlockSpec((None, None, bq), lambda b_, h_, i: (b_, h_, i))],
        compiler_params=_params(cfg),
        interpret=cfg.interpret,
        name="block_attention_fwd",
    )(q, k, v, key_ok, blocks, reach)


def _backward(q, k, v, do, lse, delta, key_ok, blocks, reach, first, cfg: _Config):
    b, t, h, d = q.shape
    kh = k.shape[2]
    group = h // kh
    bq, bk = cfg.block_q, cfg.block_k
    head = lambda b_, h_, i: (b_, h_, 0)  # noqa: E731
    tokens = pl.BlockSpec((None, t), lambda b_, h_, i: (b_, 0))
    # dq: grid over query blocks.
    row_q = pl.BlockSpec((None, bq, None, d), lambda b_, h_, i: (b_, i, h_, 0))
    row_kv = pl.BlockSpec((None, t, None, d), lambda b_, h_, i: (b_, 0, lax.div(h_, group), 0))
    per_q = pl.BlockSpec((None, None, bq), lambda b_, h_, i: (b_, h_, i))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=cfg.scale, window=cfg.window, block_k=bk),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=(b, h, t // bq),
        in_specs=[row_q, row_kv, row_kv, row_q, per_q, per_q, tokens, tokens,
                  pl.BlockSpec((None, bq), lambda b_, h_, i: (b_, i))],
        out_specs=row_q,
        compiler_params=_params(cfg),
        interpret=cfg.interpret,
        name="block_attention_dq",
    )(q, k, v, do, lse, delta, key_ok, blocks, reach)
    # dk, dv: grid over key blocks, one query head per program; summed over each kv head's query heads below.
    all_q = pl.BlockSpec((None, t, None, d), lambda b_, h_, j: (b_, 0, h_, 0))
    blk_kv = pl.BlockSpec((None, bk, None, d), lambda b_, h_, j: (b_, j, lax.div(h_, group), 0))
    blk_out = pl.BlockSpec((None, bk, None, d), lambda b_, h_, j: (b_, j, h_, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=cfg.scale, window=cfg.window, block_q=bq, num_q_blocks=t // bq),
        out_shape=[jax.ShapeDtypeStruct(q.shape, jnp.float32)] * 2,
        grid=(b, h, t // bk),
        in_specs=[all_q, blk_kv, blk_kv, all_q, pl.BlockSpec((None, None, t), head),
                  pl.BlockSpec((None, None, t), head), tokens, tokens,
                  pl.BlockSpec((None, bk), lambda b_, h_, j: (b_, j))],
        out_specs=[blk_out, blk_out],
        compiler_params=_params(cfg),
        interpret=cfg.interpret,
        name="block_attention_dkv",
    )(q, k, v, do, lse, delta, key_ok, blocks, first)
    dk = dk.reshape(b, t, kh, group, d).sum(axis=3)
    dv = dv.reshape(b, t, kh, group, d).sum(axis=3)
    return dq, dk, dv


def _pad(x: jax.Array, t: int, d: int | None = None) -> jax.Array:
    """Zero-pads axis 1 to t (and the last axis to d); no copy when nothing is added."""
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, t - x.shape[1])
    if d is not None:
        widths[-1] = (0, d - x.shape[-1])
    return x if all(w == (0, 0) for w in widths) else jnp.pad(x, widths)


# The name of the forward's output and statistics, which the "attention" remat policy keeps.
RESIDUAL_NAME = "attention"


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _attention(q, k, v, key_ok, blocks, reach, first, cfg: _Config):
    return _attention_fwd(q, k, v, key_ok, blocks, reach, first, cfg)[0]


def _attention_fwd(q, k, v, key_ok, blocks, reach, first, cfg: _Config):
    # q, k, v unpadded; the int arrays already padded to tp.
    t, d = q.shape[1], q.shape[3]
    tp, dp = key_ok.shape[1], max(16, pl.next_power_of_2(d))
    out, lse = _forward(_pad(q, tp, dp), _pad(k, tp, dp), _pad(v, tp, dp), key_ok, blocks, reach, cfg)
    # Named for the "attention" remat policy (jaxvlm.layers.checkpoint_policy): kept, the backward needs no forward.
    out, lse = checkpoint_name(out[:, :t, :, :d], RESIDUAL_NAME), checkpoint_name(lse, RESIDUAL_NAME)
    return out, (q, k, v, out, lse, key_ok, blocks, reach, first)


def _attention_bwd(cfg: _Config, res, g):
    q, k, v, out, lse, key_ok, blocks, reach, first = res
    t, d = q.shape[1], q.shape[3]
    tp, dp = key_ok.shape[1], max(16, pl.next_power_of_2(d))
    delta = jnp.sum(out.astype(jnp.float32) * g.astype(jnp.float32), axis=-1)  # [B, T, H]
    delta = jnp.pad(jnp.swapaxes(delta, 1, 2), ((0, 0), (0, 0), (0, tp - t)))  # [B, H, T padded]
    g = _pad(g.astype(q.dtype), tp, dp)  # padded queries: zero cotangent
    dq, dk, dv = _backward(_pad(q, tp, dp), _pad(k, tp, dp), _pad(v, tp, dp), g, lse, delta, key_ok, blocks,
                           reach, first, cfg)
    dq = dq[:, :t, :, :d]
    dk = dk[:, :t, :, :d].astype(k.dtype)
    dv = dv[:, :t, :, :d].astype(v.dtype)
    return dq, dk, dv, None, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


@functools.partial(jax.jit, static_argnames=("window", "scale", "block_q", "block_k", "num_warps", "num_stages",
                                             "interpret"))
def block_attention(q, k, v, key_ok, blocks=None, *, window: int | None = None, scale: float | None = None,
                    block_q: int = 64, block_k: int = 64, num_warps: int | None = None, num_stages: int = 2,
                    interpret: bool = False) -> jax.Array:
    """Attention of q [B, T, H, D] over k, v [B, T, KH, D] under `dense_mask(key_ok, blocks, window)`, by the
    Pallas kernels: [B, T, H, D] in q's dtype. key_ok [B, T]: nonzero at real tokens; blocks [B, T] int32 or
    None: image run ids, -1 at text; window: None (global) or W >= 1 (keys j > i - W); scale: None for
    1/sqrt(D). block_q, block_k: powers of two >= 16 (shrunk for short sequences). Differentiable in q, k, v."""
    b, t, h, d = q.shape
    if k.shape != v.shape or k.shape[:2] != (b, t) or k.shape[3] != d or h % k.shape[2]:
        raise ValueError(f"block_attention: q {q.shape}, k {k.shape}, v {v.shape}: expected k = v = [B, T, KH, D] "
                         f"with H a multiple of KH")
    if key_ok.shape != (b, t) or (blocks is not None and blocks.shape != (b, t)):
        raise ValueError(f"block_attention: key_ok {key_ok.shape} and blocks must be [B, T] = {(b, t)}")
    if window is not None and window < 1:
        raise ValueError(f"block_attention: window must be None or >= 1, got {window}")
    for name, size in (("block_q", block_q), ("block_k", block_k)):
        if size < 16 or size & (size - 1):
            raise ValueError(f"block_attention: {name} must be a power of two >= 16, got {size}")
    # Short sequences: no block larger than the sequence's next power of two (and >= 16, Triton's smallest dot).
    cap = max(16, pl.next_power_of_2(t))
    block_q, block_k = min(block_q, cap), min(block_k, cap)
    tp = pl.cdiv(t, max(block_q, block_k)) * max(block_q, block_k)  # both powers of two: a multiple of each
    cfg = _Config(scale=float(d ** -0.5 if scale is None else scale), window=window, block_q=block_q,
                  block_k=block_k, num_warps=num_warps or 4, num_stages=num_stages,
                  interpret=interpret)
    key_ok = _pad((key_ok != 0).astype(jnp.int32), tp)  # padded keys: masked
    blocks = jnp.full((b, t), -1, jnp.int32) if blocks is None else blocks.astype(jnp.int32)
    blocks = jnp.pad(blocks, ((0, 0), (0, tp - t)), constant_values=-1)
    reach, first = _reach_first(key_ok, blocks)
    return _attention(q, k, v, key_ok, blocks, reach, first, cfg)
