"""Generation with a static cache: one jit'd prefill, then a jit'd decode loop that stops at EOS.

The sampler lives apart from the model and talks to a family only through the generation methods of
jaxvlm.models.base.VisionLanguageModel: `prepare_inputs`, `init_cache`, `prefill`, `decode`,
`next_positions`, `logits`. Prompts are left-padded (right padding is converted); what a cache holds
(keys and values, a window, cross-attention states) and how positions map to rotary angles is the
family's business.

On a device mesh (`generate(..., mesh=...)`, jaxvlm.sharding) the same jit'd programs run on sharded arrays: the
weights where `shard_model` puts them, the prompts and the cache split over the batch axes, the cache's kv heads over
"tensor" (`cache_shardings`). Placement changes memory and communication, not the tokens.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxvlm.layers import activation_layout, unrolled_layers
from jaxvlm.sharding import (BATCH_AXES, as_mesh, batch_sharding, cache_shardings, lives_on, shard_batch,
                             shard_model)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0


def sample(logits: jax.Array, rng: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """Next tokens `[batch]` from fp32 logits `[batch, vocab]`: greedy, or temperature -> top-k -> top-p
    -> min-p filtering then a categorical draw (transformers' order of logits warpers)."""
    if not cfg.do_sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / max(cfg.temperature, 1e-6)
    neg = jnp.finfo(logits.dtype).min
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, cfg.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if cfg.top_p < 1.0:
        order = jnp.argsort(logits, axis=-1)  # ascending, as transformers' TopPLogitsWarper
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        remove_sorted = cum <= 1 - cfg.top_p
        remove_sorted = remove_sorted.at[..., -1].set(False)  # always keep the most likely token
        remove = jnp.zeros_like(remove_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(remove_sorted)
        logits = jnp.where(remove, neg, logits)
    if cfg.min_p > 0.0:
        probs = jax.nn.softmax(logits, axis=-1)
        logits = jnp.where(probs < cfg.min_p * probs.max(-1, keepdims=True), neg, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def left_pad(input_ids: np.ndarray, attention_mask: np.ndarray, pad_token_id: int):
    """Rows moved so that every prompt ends at the last column (generation appends on the right)."""
    ids, mask = input_ids.copy(), attention_mask.copy()
    for b in range(ids.shape[0]):
        n = int(mask[b].sum())
        real = input_ids[b][attention_mask[b].astype(bool)]
        ids[b] = pad_token_id
        ids[b, ids.shape[1] - n:] = real
        mask[b] = 0
        mask[b, ids.shape[1] - n:] = 1
    return ids, mask


def _keep_placed(cache, batch, mesh):
    """`cache` pinned where `cache_shardings` puts it on `mesh` (None: left to XLA), so that no step gathers it."""
    if mesh is None:
        return cache
    return jax.lax.with_sharding_constraint(cache, cache_shardings(cache, batch, mesh))


def _empty_cache(model, batch, length, mesh):
    """The family's empty cache; on a mesh created in place, each device writing only its slices."""
    if mesh is None:
        return model.init_cache(batch, length)
    make = lambda: model.init_cache(batch, length)  # noqa: E731
    return jax.jit(make, out_shardings=cache_shardings(jax.eval_shape(make), batch, mesh))()


def _jit_model(**jit_kwargs):
    """`fn(model, *args, **kwargs)` jit'd with the module's arrays as inputs only (nnx.jit hands a module's state
    back as outputs, and XLA copies an input it returns: twice the weights' memory)."""
    def wrap(fn):
        def pure(graphdef, state, *args, **kwargs):
            return fn(nnx.merge(graphdef, state), *args, **kwargs)
        pure.__name__ = pure.__qualname__ = fn.__name__  # the program's name in dumps and profiles
        pure = jax.jit(pure, static_argnums=0, **jit_kwargs)

        @functools.wraps(fn)
        def call(model, *args, **kwargs):
            return pure(*nnx.split(model), *args, **kwargs)
        call.pure = pure  # for callers that hold the model split already: pure(graphdef, state, *args, **kwargs)
        return call
    return wrap


def loop_model(model):
    """A function that rebuilds `model` inside a lax loop body. NNX modules (and their Variables) may not cross into a
    loop body: the weights' arrays are closed over (loop invariants, read in place) and the module rebuilt around them.
    (Carried through the loop state, every weight was copied: twice the weights' memory.)"""
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree_util.tree_flatten(state)
    return lambda: nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, leaves))


@_jit_model(static_argnames=("mesh",))
def _prefill(model, inputs, cache, key_mask, mesh):
    h, cache = model.prefill(inputs, cache, key_mask)
    return model.logits(h[:, -1]).astype(jnp.float32), _keep_placed(cache, key_mask.shape[0], mesh)


def _decode_logits(model, cache, token, step, key_mask, next_pos, prompt_len, mesh):
    """Logits `[batch, vocab]` after feeding `token [batch]` as generated token number `step`."""
    with unrolled_layers():
        h, cache = model.decode(token, next_pos + step, cache, key_mask, prompt_len + step)
    return model.logits(h[:, 0]).astype(jnp.float32), _keep_placed(cache, key_mask.shape[0], mesh)


# The cache (argument 2 of the jit'd function: graphdef, state, cache) is donated: updated in place, never copied.
_decode_step = _jit_model(static_argnames=("prompt_len", "mesh"), donate_argnums=(2,))(_decode_logits)


@_jit_model(static_argnames=("prompt_len", "max_new_tokens", "sampling", "mesh"), donate_argnums=(2,))
def _decode_loop(model, cache, first, key_mask, next_pos, rng, eos, pad, *, prompt_len, max_new_tokens,
                 sampling, mesh):
    batch = first.shape[0]
    rebuilt = loop_model(model)

    def cond(state):
        step, _, done, *_ = state
        return (step < max_new_tokens) & ~done.all()

    def body(state):
        step, token, done, out, cache, rng = state
        out = out.at[:, step].set(jnp.where(done, pad, token))
        done = done | jnp.isin(token, eos)
        logits, cache = _decode_logits(rebuilt(), cache, token, step, key_mask, next_pos, prompt_len, mesh)
        rng, key = jax.random.split(rng)
        return step + 1, sample(logits, key, sampling), done, out, cache, rng

    out = jnp.full((batch, max_new_tokens), pad, jnp.int32)
    state = (jnp.int32(0), first, jnp.zeros((batch,), bool), out, cache, rng)
    _, _, _, out, cache, _ = jax.lax.while_loop(cond, body, state)
    return out, cache  # the cache returned into the donated input's buffers: the loop updates it in place


def generate(model, input_ids, attention_mask=None, *, max_new_tokens: int = 128, do_sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
             eos_token_id=None, pad_token_id: int | None = None, seed: int = 0, streamer=None,
             max_seq_length: int | None = None, mesh=None, **processor_outputs) -> np.ndarray:
    """Prompt + generated token ids `[batch, prompt_len + new]`, as transformers' generate returns them.

    Takes what the processor returns (input_ids, attention_mask, pixel_values, image_grid_thw, ...).
    Each sequence stops at its first EOS (`eos_token_id`: int or list); later slots hold `pad_token_id`.
    `streamer`: an object with `put(token_ids)` / `end()` (transformers' TextStreamer works), fed after
    each step; decoding then runs step by step from Python instead of one on-device loop.
    `mesh`: the devices to generate on ("tensor=4", "data=2,tensor=4", a dict or a jax Mesh, as
    jaxvlm.sharding.make_mesh takes; None: one device). The weights are placed by jaxvlm.sharding.shard_model for
    the call unless they already live on that mesh; the prompts and the KV cache are split over "data" x "fsdp" when
    that divides the batch, the cache's kv heads over "tensor" when it divides them. The tokens are those of one device.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: expected a positive int")
    input_ids = np.asarray(input_ids).astype(np.int32)
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids: expected [batch, prompt_len] with prompt_len >= 1, got shape {input_ids.shape}")
    attention_mask = (np.ones_like(input_ids) if attention_mask is None
                      else np.asarray(attention_mask).astype(np.int32))
    eos = np.atleast_1d(np.asarray(eos_token_id if eos_token_id is not None else -1, np.int32))
    pad = int(pad_token_id if pad_token_id is not None else eos[0] if eos[0] >= 0 else 0)
    batch, prompt_len = input_ids.shape
    if max_seq_length is not None and prompt_len + max_new_tokens > max_seq_length:
        allowed = max_seq_length - prompt_len
        if allowed <= 0:
            raise ValueError(f"the prompt ({prompt_len} tokens) already fills max_seq_length={max_seq_length}")
        warnings.warn(f"max_new_tokens={max_new_tokens} + prompt {prompt_len} exceeds max_seq_length="
                      f"{max_seq_length}; generating {allowed} tokens")
        max_new_tokens = allowed
    if (attention_mask[:, -1] == 0).any():
        input_ids, attention_mask = left_pad(input_ids, attention_mask, pad)

    if mesh is not None:
        mesh = as_mesh(mesh)
        if not lives_on(nnx.state(model), mesh):
            model = shard_model(model, mesh)
    inputs = model.prepare_inputs(input_ids=input_ids, attention_mask=attention_mask, **processor_outputs)
    cache_len = -(-(prompt_len + max_new_tokens) // 64) * 64  # a few lengths -> a few compiled programs
    key_mask = np.concatenate([attention_mask, np.ones((batch, cache_len - prompt_len), np.int32)], axis=1)
    next_pos = model.next_positions(inputs)
    limit = model.max_positions
    if limit is not None and int(next_pos.max()) + max_new_tokens > limit:
        # As transformers does: warn, and go on (positions past the trained range may degrade the output).
        warnings.warn(f"generating up to position {int(next_pos.max()) + max_new_tokens - 1}, past the model's "
                      f"max_position_embeddings={limit}: the output may degrade past that length")
    if mesh is None:
        inputs, key_mask, next_pos = jax.tree.map(jnp.asarray, inputs), jnp.asarray(key_mask), jnp.asarray(next_pos)
    else:
        inputs = shard_batch(inputs, batch, mesh)
        key_mask, next_pos = (jax.device_put(a, batch_sharding(a, batch, mesh)) for a in (key_mask, next_pos))
    # On a mesh, attention's operands are laid out on it while the programs trace.
    layout = functools.partial(activation_layout, mesh, BATCH_AXES, "tensor")
    with layout():
        logits, cache = _prefill(model, inputs, _empty_cache(model, batch, cache_len, mesh), key_mask, mesh=mesh)
    sampling = SamplingConfig(do_sample, temperature, top_k, top_p, min_p)
    rng, key = jax.random.split(jax.random.key(seed))
    first = sample(logits, key, sampling)

    if streamer is None:
        with layout():
            new, _ = _decode_loop(model, cache, first, key_mask, next_pos, rng, jnp.asarray(eos), jnp.int32(pad),
                               prompt_len=prompt_len, max_new_tokens=max_new_tokens, sampling=sampling, mesh=mesh)
        return np.concatenate([input_ids, _trim(np.asarray(new), eos)], axis=1)

    streamer.put(input_ids)  # as transformers does, so that TextStreamer(skip_prompt=True) skips it
    token, done, out = first, np.zeros(batch, bool), []
    for step in range(max_new_tokens):
        token_np = np.where(done, pad, np.asarray(token))
        out.append(token_np)
        streamer.put(token_np)
        done |= np.isin(token_np, eos)
        if done.all():
            break
        with layout():
            logits, cache = _decode_step(model, cache, token, step, key_mask, next_pos, prompt_len=prompt_len,
                                         mesh=mesh)
        rng, key = jax.random.split(rng)
        token = sample(logits, key, sampling)
    streamer.end()
    return np.concatenate([input_ids, np.stack(out, axis=1)], axis=1)


def _trim(new: np.ndarray, eos: np.ndarray) -> np.ndarray:
    """Drops the columns after every sequence has ended (transformers stops there too)."""
    hit = np.isin(new, eos)
    if not hit.any(axis=1).all():
        return new
    return new[:, :hit.argmax(axis=1).max() + 1]
