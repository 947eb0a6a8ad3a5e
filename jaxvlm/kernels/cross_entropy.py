"""Next-token cross-entropy fused with the lm_head product, in chunks of tokens.

The reference (`token_loss_sum`) forms fp32 logits for every token of the batch: at batch 8, 514 tokens
and Qwen2-VL's 151,936-word vocabulary that is 2.5 GB, and its softmax and gradient as much again.
`chunked_token_loss_sum` runs a loop over chunks of tokens; each chunk's logits exist only inside the
loop body. Differentiated, the forward loop also forms each chunk's gradient (the loss is linear in its
cotangent, so the backward only scales it): the lm_head product runs twice a chunk (logits, dh), no chunk's
logits are kept, and none is formed again. Peak memory for the loss is then one chunk's logits and their
gradient (`nll_sum`), which is written in the logits' dtype in one pass.
"""
from __future__ import annotations

import functools
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxvlm.kernels import one_device_on

IGNORE_INDEX = -100

# Chunks whose every target is IGNORE_INDEX (images, masked prompts: half of the Qwen2-VL-2B benchmark's tokens) skip
# their lm_head products (`_live_chunks_nll`: a loop of as many steps as chunks hold a trained token; the host reads
# each step's bound): "auto" (the default) in a process with one device (not measured over a mesh), "on"
# always, "off" never. Read at trace time. On an H200 (docs/BENCHMARKS.md, "The loss's chunk skip, measured on every
# family"): Qwen2-VL-2B bf16 step -2.4%, NF4 -2.1%, Gemma 3 4B -2.3%, Qwen3-VL-2B, LLaVA-1.5-7B and Llama 3.2 Vision
# (every text token trained) within their spread, no peak higher. A first form (a lax.cond per chunk) cost 335 MB of
# the 2B step's peak: the cond returned the lm_head weight as a residual.
skip_ignored = os.environ.get("JAXVLM_LOSS_SKIP_IGNORED", "auto")


def token_loss_sum(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of token NLLs, number of tokens) for logits `[B, T, V]` and unshifted labels `[B, T]`, fp32."""
    logits = logits[:, :-1].astype(jnp.float32)
    targets = labels[:, 1:]
    valid = targets != IGNORE_INDEX
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(valid)


@jax.custom_vjp
def nll_sum(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Sum over rows of `logsumexp(logits) - logits[target]` (fp32), rows whose target is IGNORE_INDEX left out.
    logits `[n, V]` in the model's dtype, targets int `[n]`.

    Its gradient, `(softmax - onehot(target)) * g` per valid row, is one elementwise pass that writes the logits'
    dtype: autodiff of the same formula wrote it in fp32 `[n, V]` and cast it in a second pass (on an H200 the
    Qwen2-VL-2B step, 9 chunks of 456 tokens, 0.1879 -> 0.1871 s; docs/BENCHMARKS.md)."""
    return _nll_sum_fwd(logits, targets)[0]


def _nll_sum_fwd(logits, targets):
    valid = targets != IGNORE_INDEX
    top = jnp.max(logits, axis=-1).astype(jnp.float32)  # the max in the logits' own dtype: one reduction reads fp32
    lse = top + jnp.log(jnp.sum(jnp.exp(logits.astype(jnp.float32) - top[:, None]), axis=-1))
    picked = jnp.take_along_axis(logits, jnp.where(valid, targets, 0)[:, None], axis=-1)[:, 0].astype(jnp.float32)
    return jnp.sum(jnp.where(valid, lse - picked, 0.0)), (logits, targets, lse)


def _nll_sum_bwd(res, g):
    logits, targets, lse = res
    valid = targets != IGNORE_INDEX
    onehot = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1) == targets[:, None]
    grad = (jnp.exp(logits.astype(jnp.float32) - lse[:, None]) - onehot) * jnp.where(valid, g, 0.0)[:, None]
    return grad.astype(logits.dtype), np.zeros(targets.shape, jax.dtypes.float0)


nll_sum.defvjp(_nll_sum_fwd, _nll_sum_bwd)


def chunked_token_loss_sum(logits_fn: Callable[[jax.Array], jax.Array], hidden: jax.Array, labels: jax.Array,
                           chunk: int = 512) -> tuple[jax.Array, jax.Array]:
    """`token_loss_sum(logits_fn(hidden), labels)` without forming all logits at once.

    logits_fn: final hidden states `[n, D]` -> logits `[n, V]` (the model's lm_head, any weight type);
    hidden `[B, T, D]`; labels `[B, T]` unshifted (position t predicts labels[t + 1]). Tokens go in
    ceil(n / chunk) chunks of equal size (batch 8 x 513 predicted tokens: 9 chunks of 456, no padding). With
    the skip on (`skip_ignored`) the trained tokens go first and only the chunks holding one are formed.
    """
    b, t, d = hidden.shape
    h = hidden[:, :-1].reshape(-1, d)
    targets = labels[:, 1:].reshape(-1)
    n = h.shape[0]
    skip = one_device_on(skip_ignored)
    if skip:  # the trained tokens first (stable), so that the chunks past their count hold none
        order = jnp.argsort(targets == IGNORE_INDEX, stable=True)
        # A permutation, declared unique: the backward scatters without autodiff's ids for colliding rows.
        h, targets = h.at[order].get(unique_indices=True), targets[order]
    # As many chunks as `chunk` asks for, but of equal size (a multiple of 8), so that little is padding.
    chunks = -(-n // max(1, min(chunk, n)))
    chunk = -(-n // chunks)
    chunk = min(-(-chunk // 8) * 8, n) if chunks > 1 else n
    pad = -n % chunk
    h = jnp.pad(h, ((0, pad), (0, 0))).reshape(-1, chunk, d)
    targets = jnp.pad(targets, (0, pad), constant_values=IGNORE_INDEX).reshape(-1, chunk)
    trained = jnp.sum(targets != IGNORE_INDEX)
    fn, consts = jax.closure_convert(logits_fn, h[0])  # the lm_head's arrays as arguments of the custom_vjp
    # Without the skip every chunk, in a loop of static length (no host read of its bound).
    steps = None if skip else h.shape[0]
    return _live_chunks_nll(fn, steps, h, targets, -(-trained // chunk), *consts), trained


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _live_chunks_nll(fn, steps, h, targets, live, *consts):
    """Sum of `nll_sum(fn(h[i], *consts), targets[i])` over the first `live` chunks (a loop of `live` steps; the rest
    hold no trained token), or over the first `steps` chunks where it is a static int (None: `live`).

    Differentiated, the forward loop also forms each chunk's gradient for a cotangent of 1: the chunk's dh, and the
    consts' gradients where they are trained (e.g. a LoRA on the lm_head). The loss is linear in its cotangent, so
    the backward only scales them: every chunk's logits are formed once a step (a backward that formed them again ran
    the lm_head product 3 times a live chunk instead of 2), none outlives its loop step, and nothing of the skipped
    chunks is formed, in particular no zero cotangent of the frozen lm_head weight, which a `lax.cond` per chunk had
    to return as a residual from both its branches."""
    def body(i, total):
        return total + nll_sum(fn(h[i], *consts), targets[i])
    return jax.lax.fori_loop(0, live if steps is None else steps, body, jnp.zeros((), jnp.float32))


def _live_chunks_fwd(fn, steps, h, targets, live, *consts):
    values = [c.value for c in consts]
    which = [i for i, c in enumerate(consts) if c.perturbed]  # the consts that get a cotangent
    h, targets = h.value, targets.value

    def body(i, carry):
        total, dh, dconsts = carry

        def loss(hc, *tc):
            full = list(values)
            for j, c in zip(which, tc):
                full[j] = c
            return nll_sum(fn(hc, *full), targets[i])
        value, vjp = jax.vjp(loss, h[i], *(values[j] for j in which))
        d = vjp(jnp.ones((), jnp.float32))
        return total + value, dh.at[i].set(d[0]), tuple(a + b.astype(a.dtype) for a, b in zip(dconsts, d[1:]))

    init = (jnp.zeros((), jnp.float32), jnp.zeros_like(h), tuple(jnp.zeros_like(values[j]) for j in which))
    total, dh, dconsts = jax.lax.fori_loop(0, live.value if steps is None else steps, body, init)
    grads = dict(zip(which, dconsts))
    return total, (dh, tuple(grads.get(j) for j in range(len(consts))))  # None: a const without a cotangent


def _live_chunks_bwd(fn, steps, res, g):
    dh, dconsts = res
    if isinstance(g, jax.custom_derivatives.SymbolicZero):
        g = jnp.zeros((), jnp.float32)
    scaled = lambda d: None if d is None else (d * g).astype(d.dtype)  # noqa: E731
    return (scaled(dh), None, None, *map(scaled, dconsts))


_live_chunks_nll.defvjp(_live_chunks_fwd, _live_chunks_bwd, symbolic_zeros=True)
