"""One decode step's attention over a stacked KV cache, the step's keys and values written into it, by one Pallas
(Triton) GPU kernel per layer.

In a decode step XLA forms this as five small kernels per layer (the key and value writes into the cache, the
scores, the softmax's sums, the weighted values), each a few microseconds of launch and tail for a few hundred KB of
cache: on an H200 (Qwen2-VL-2B geometry, batch 1) 278 of the 1,750 microseconds of a token. Here one kernel does
them: a program per (row, kv head, range of cache slots) reads its slots' keys and values once for the kv head's
query group, with an online softmax, and the program of the first range writes the step's key and value into the
cache in place (the cache is an input aliased to an output). A program's range that holds the slot being written
reads the step's key and value from their inputs there, so no program waits for that write.

Operands: q [batch, 1, heads, head_dim] (rotated), k, v [batch, 1, kv_heads, head_dim] (k rotated), the caches
[layers, batch, slots, kv_heads, head_dim] (or without the layer axis) of which entry `layer` (a static int) is read
and written in place, `index` (an int, a scalar or int32 [batch]: each row's slot; a slot outside the cache is not
written), `mask` (bool, broadcastable to [batch, 1, 1, slots]: the keys each row attends, the written slot included).
Ranges of slots ("splits", when one range per (row, kv head) leaves most SMs idle) write float32 partial sums with
their softmax's maximum and total, which XLA combines; the ranges hold whole loop steps of `block_k` slots, the last
range fewer when they do not divide evenly. The XLA path it replaces, and its reference in the tests:
`jaxvlm.layers.cached_attention_xla`.

`attend` is the same kernel reading a cache entry without writing a step into it (cross-attention over keys and
values cached once per prompt, as Llama 3.2 Vision's image keys); its XLA path: `jaxvlm.layers.attention` over the
entry.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from jaxvlm.kernels.flash_attention import _dot_nn, _dot_nt

_SMS = 132  # an H100/H200's SMs
_NEG = float(np.finfo(np.float32).min)


def supported(q: jax.Array, k_cache: jax.Array, layer, mask: jax.Array | None = None) -> bool:
    """Whether the kernel takes this step: one query per row, head_dim a power of 2 from 16 on, slots a multiple of
    16, the query heads a multiple of the kv heads, a static layer (a Python or NumPy int) for a stacked cache, and
    (when given) a mask of one row of slots per batch row, `[batch or 1, 1, 1, slots]`."""
    if q.ndim != 4 or q.shape[1] != 1 or k_cache.ndim not in (4, 5):
        return False
    if mask is not None and (jnp.ndim(mask) != 4 or mask.shape[1:] != (1, 1, k_cache.shape[-3])):
        return False
    stacked = k_cache.ndim == 5
    if stacked and not isinstance(layer, (int, np.integer)) or not stacked and layer is not None:
        return False
    slots, kv_heads, d = k_cache.shape[-3:]
    return (d >= 16 and d & (d - 1) == 0 and slots % 16 == 0 and q.shape[-1] == d and q.shape[2] % kv_heads == 0
            and q.shape[0] == k_cache.shape[-4])


def default_config(batch: int, kv_heads: int, slots: int) -> dict:
    """block_k (slots per loop step) and splits (ranges of slots per row and kv head): as many ranges as it takes to
    give every SM a program (one range when the rows and kv heads already do), each at least one loop step."""
    block_k = max(b for b in (16, 32, 64) if slots % b == 0)
    return dict(block_k=block_k, splits=_ranges(slots // block_k, -(-_SMS // (batch * kv_heads)))[0])


def _ranges(chunks: int, splits: int) -> tuple[int, int]:
    """(ranges, steps per range): the ranges of whole loop steps that cover `chunks` steps when asked for `splits`
    (at most `chunks`), each but the last ceil(chunks / splits) steps long, none empty."""
    per = -(-chunks // max(1, min(splits, chunks)))
    return -(-chunks // per), per


def _kernel(*refs, block_k: int, per: int, chunks: int, slots: int, scale: float, partial: bool, write: bool):
    """One program: row b, kv head h, loop steps [s * per, min(s * per + per, chunks)) of `block_k` slots each.

    Inputs: q_ref [rows, D] (the kv head's query heads, zero rows padding them to a power of 2 from 16 on: the
    products run on the tensor cores); with `write`, kn_ref, vn_ref [D] (this step's key and value) and index_ref
    int32 [batch]; mask_ref int32 [batch, slots]; kc_ref, vc_ref [slots, D] (the layer's cache for b, h). Outputs: o
    [rows, D] (normalized, or with `partial` float32 sums then m_ref, l_ref [rows]: the softmax's maximum and total),
    then with `write` the caches (aliased)."""
    if write:
        q_ref, kn_ref, vn_ref, index_ref, mask_ref, kc_ref, vc_ref, *out_refs = refs
    else:
        q_ref, mask_ref, kc_ref, vc_ref, *out_refs = refs
    o_ref, m_ref, l_ref = out_refs[:3] if partial else (out_refs[0], None, None)
    b, s = pl.program_id(0), pl.program_id(2)
    q = q_ref[...]
    if write:
        slot = index_ref[b]
        kn, vn = kn_ref[...], vn_ref[...]
    offsets = jax.lax.broadcasted_iota(jnp.int32, (block_k,), 0)

    def step(i, carry):
        m, l, acc = carry
        c = s * per + i  # past the last step (the last range's tail): step `chunks - 1` again, all of it masked
        start = jnp.minimum(c, chunks - 1) * block_k
        keys, values = kc_ref[pl.ds(start, block_k), :], vc_ref[pl.ds(start, block_k), :]
        if write:  # the slot this step writes: its key and value from the inputs
            here = (start + offsets == slot)[:, None]
            keys, values = jnp.where(here, kn[None, :], keys), jnp.where(here, vn[None, :], values)
        ok = ((mask_ref[b, pl.ds(start, block_k)] != 0) & (c < chunks))[None, :]
        scores = jnp.where(ok, _dot_nt(q, keys) * scale, _NEG)  # [rows, block_k]
        m_new = jnp.maximum(m, jnp.max(scores, axis=1))
        p = jnp.where(ok, jnp.exp(scores - m_new[:, None]), 0.0)
        correction = jnp.exp(m - m_new)
        acc = acc * correction[:, None] + _dot_nn(p.astype(values.dtype), values)
        return m_new, l * correction + jnp.sum(p, axis=1), acc

    rows = q.shape[0]
    init = (jnp.full((rows,), _NEG, jnp.float32), jnp.zeros((rows,), jnp.float32),
            jnp.zeros(q.shape, jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, per, step, init)
    if partial:
        o_ref[...] = acc
        m_ref[...] = m
        l_ref[...] = l
    else:
        o_ref[...] = (acc / jnp.maximum(l, 1e-30)[:, None]).astype(o_ref.dtype)

    if write:
        kco_ref, vco_ref = out_refs[-2:]

        @pl.when((s == 0) & (slot >= 0) & (slot < slots))
        def _write():
            kco_ref[pl.ds(slot, 1), :] = kn[None, :]
            vco_ref[pl.ds(slot, 1), :] = vn[None, :]


@functools.partial(jax.jit, static_argnames=("layer", "scale", "block_k", "splits", "num_warps", "interpret"))
def decode_attention(q, k, v, k_cache, v_cache, layer, index, mask, *, scale: float | None = None,
                     block_k: int | None = None, splits: int | None = None, num_warps: int = 4,
                     interpret: bool = False):
    """(out [batch, 1, heads, head_dim] in q's dtype, k_cache, v_cache): this step's k, v (rotated already) written
    at entry `layer`, slot `index` of the caches, and q's (rotated) attention over that entry under `mask` (see the
    module docstring and `supported`). block_k, splits (at most that many ranges, see `_ranges`) default to
    `default_config`'s pick."""
    return _call(q, (k, v, index), k_cache, v_cache, layer, mask, scale, block_k, splits, num_warps, interpret)


@functools.partial(jax.jit, static_argnames=("layer", "scale", "block_k", "splits", "num_warps", "interpret"))
def attend(q, k_cache, v_cache, layer, mask, *, scale: float | None = None, block_k: int | None = None,
           splits: int | None = None, num_warps: int = 4, interpret: bool = False):
    """out [batch, 1, heads, head_dim] in q's dtype: q's attention over entry `layer` of the caches under `mask`, the
    caches only read (no step written; they are not outputs). As `decode_attention` otherwise."""
    return _call(q, None, k_cache, v_cache, layer, mask, scale, block_k, splits, num_warps, interpret)


def _call(q, step, k_cache, v_cache, layer, mask, scale, block_k, splits, num_warps, interpret):
    """The kernel's pallas_call: `step` (k, v, index) written into the caches (returned after the output), or None."""
    if not supported(q, k_cache, layer, mask):
        raise ValueError(f"decode_attention: q {q.shape} and cache {k_cache.shape} (layer {layer!r}) are not a "
                         f"supported step")
    batch, _, heads, d = q.shape
    stacked = k_cache.ndim == 5
    slots, kv_heads = k_cache.shape[-3], k_cache.shape[-2]
    groups = heads // kv_heads
    rows = max(16, 1 << (groups - 1).bit_length())  # the query group padded for the tensor cores
    cfg = default_config(batch, kv_heads, slots)
    block_k = block_k or cfg["block_k"]
    if slots % block_k or block_k & (block_k - 1):
        raise ValueError(f"decode_attention: block_k {block_k} (a power of 2) must divide the {slots} slots")
    chunks = slots // block_k
    splits, per = _ranges(chunks, splits or cfg["splits"])
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    kc, vc = (k_cache, v_cache) if stacked else (k_cache[None], v_cache[None])
    lyr = layer if stacked else 0

    qg = jnp.pad(q.reshape(batch, kv_heads, groups, d), ((0, 0), (0, 0), (0, rows - groups), (0, 0)))
    keys_ok = jnp.broadcast_to(jnp.asarray(mask).reshape(mask.shape[0], -1), (batch, slots)).astype(jnp.int32)

    whole = lambda a: pl.BlockSpec(a.shape, lambda b, h, s: (0,) * a.ndim)  # noqa: E731
    group = pl.BlockSpec((None, None, rows, d), lambda b, h, s: (b, h, 0, 0))
    head = pl.BlockSpec((None, None, d), lambda b, h, s: (b, h, 0))
    cache_spec = pl.BlockSpec((None, None, slots, None, d), lambda b, h, s: (lyr, b, 0, h, 0))
    write = step is not None
    if write:
        k, v, index = step
        kn, vn = k.reshape(batch, kv_heads, d).astype(kc.dtype), v.reshape(batch, kv_heads, d).astype(vc.dtype)
        idx = jnp.broadcast_to(jnp.asarray(index, jnp.int32).reshape(-1), (batch,))
        args, in_specs = [qg, kn, vn, idx, keys_ok, kc, vc], [group, head, head, whole(idx)]
    else:
        args, in_specs = [qg, keys_ok, kc, vc], [group]
    in_specs += [whole(keys_ok), cache_spec, cache_spec]
    partial = splits > 1
    if partial:
        out_shape = [jax.ShapeDtypeStruct((splits, *qg.shape), jnp.float32),
                     jax.ShapeDtypeStruct((splits, batch, kv_heads, rows), jnp.float32),
                     jax.ShapeDtypeStruct((splits, batch, kv_heads, rows), jnp.float32)]
        stat = pl.BlockSpec((None, None, None, rows), lambda b, h, s: (s, b, h, 0))
        out_specs = [pl.BlockSpec((None, None, None, rows, d), lambda b, h, s: (s, b, h, 0, 0)), stat, stat]
    else:
        out_shape, out_specs = [jax.ShapeDtypeStruct(qg.shape, q.dtype)], [group]
    aliases = {}
    if write:
        aliases = {5: len(out_shape), 6: len(out_shape) + 1}
        out_shape += [jax.ShapeDtypeStruct(kc.shape, kc.dtype), jax.ShapeDtypeStruct(vc.shape, vc.dtype)]
        out_specs += [cache_spec, cache_spec]
    kernel = functools.partial(_kernel, block_k=block_k, per=per, chunks=chunks, slots=slots, scale=scale,
                               partial=partial, write=write)
    extra = {} if interpret else dict(compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=2))
    outs = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(batch, kv_heads, splits),
        in_specs=in_specs,
        out_specs=out_specs,
        input_output_aliases=aliases,
        interpret=interpret,
        name="decode_attention",
        **extra,
    )(*args)
    if partial:  # the ranges' sums combined (XLA fuses this with the slice of the padding rows)
        o, m, l = outs[:3]
        top = jnp.max(m, axis=0)
        w = jnp.exp(m - top[None])
        out = jnp.sum(o * w[..., None], axis=0) / jnp.maximum(jnp.sum(l * w, axis=0), 1e-30)[..., None]
        out = out.astype(q.dtype)
    else:
        out = outs[0]
    out = out[:, :, :groups].reshape(batch, 1, heads, d)
    if not write:
        return out
    kc, vc = outs[-2:]
    if not stacked:
        kc, vc = kc[0], vc[0]
    return out, kc, vc
