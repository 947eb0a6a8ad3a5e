"""Next-token cross-entropy fused with the lm_head product, in chunks of tokens.

The reference (`token_loss_sum`) forms fp32 logits for every token of the batch: at batch 8, 514 tokens
and Qwen2-VL's 151,936-word vocabulary that is 2.5 GB, and its softmax and gradient as much again.
`chunked_token_loss_sum` runs a scan over chunks of tokens; each chunk's logits exist only inside the
scan body, and the backward pass recomputes them (jax.checkpoint) instead of keeping them. Peak memory
for the loss is then one chunk's [chunk, vocab] fp32 logits; their gradient (`nll_sum`) is written in the logits'
dtype in one pass.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

IGNORE_INDEX = -100


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
    ceil(n / chunk) chunks of equal size (batch 8 x 513 predicted tokens: 9 chunks of 456, no padding).
    """
    b, t, d = hidden.shape
    h = hidden[:, :-1].reshape(-1, d)
    targets = labels[:, 1:].reshape(-1)
    n = h.shape[0]
    # As many chunks as `chunk` asks for, but of equal size (a multiple of 8), so that little is padding.
    chunks = -(-n // max(1, min(chunk, n)))
    chunk = -(-n // chunks)
    chunk = min(-(-chunk // 8) * 8, n) if chunks > 1 else n
    pad = -n % chunk
    h = jnp.pad(h, ((0, pad), (0, 0))).reshape(-1, chunk, d)
    targets = jnp.pad(targets, (0, pad), constant_values=IGNORE_INDEX).reshape(-1, chunk)

    @jax.checkpoint
    def chunk_nll(hc, tc):
        return nll_sum(logits_fn(hc), tc)

    def body(total, xs):
        return total + chunk_nll(*xs), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (h, targets))
    return total, jnp.sum(targets != IGNORE_INDEX)
