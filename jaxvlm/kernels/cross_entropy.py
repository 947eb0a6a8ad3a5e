"""Next-token cross-entropy fused with the lm_head product, in chunks of tokens.

The reference (`token_loss_sum`) forms fp32 logits for every token of the batch: at batch 8, 514 tokens
and Qwen2-VL's 151,936-word vocabulary that is 2.5 GB, and its softmax and gradient as much again.
`chunked_token_loss_sum` runs a scan over chunks of tokens; each chunk's logits exist only inside the
scan body, and the backward pass recomputes them (jax.checkpoint) instead of keeping them. Peak memory
for the loss is then one chunk's [chunk, vocab] fp32 logits.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

IGNORE_INDEX = -100


def token_loss_sum(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of token NLLs, number of tokens) for logits `[B, T, V]` and unshifted labels `[B, T]`, fp32."""
    logits = logits[:, :-1].astype(jnp.float32)
    targets = labels[:, 1:]
    valid = targets != IGNORE_INDEX
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(valid)


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
        logits = logits_fn(hc).astype(jnp.float32)
        valid = tc != IGNORE_INDEX
        picked = jnp.take_along_axis(logits, jnp.where(valid, tc, 0)[:, None], axis=-1)[:, 0]
        nll = jax.nn.logsumexp(logits, axis=-1) - picked
        return jnp.sum(jnp.where(valid, nll, 0.0))

    def body(total, xs):
        return total + chunk_nll(*xs), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (h, targets))
    return total, jnp.sum(targets != IGNORE_INDEX)
