"""The Qwen M-RoPE language model (Qwen2-VL, Qwen2.5-VL): decoder layers with 3-axis rotary positions.

Positions are `[3, batch, seq]` (temporal, height, width): text tokens count up on all three axes,
vision tokens take their grid coordinates (jaxvlm.models.qwen_inputs.rope_index). Attribute paths mirror transformers'
`model.language_model.*`, with the decoder layers stacked.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxvlm.layers import (Embedding, GatedMLP, Linear, RMSNorm, apply_rotary, attention, cached_attention, linear,
                           query_slots, scan_blocks, sibling_linears)


# The Qwen chat tokens shared by the Qwen VLM families: those standing for images and videos (the loss
# never targets them) and the turn markers; and their ids in jaxvlm.tiny's 300-token vocabulary.
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
USER_TURN, ASSISTANT_TURN = "<|im_start|>user\n", "<|im_start|>assistant\n"
TINY_SPECIAL_TOKENS = {"<|endoftext|>": 285, "<|im_start|>": 286, "<|im_end|>": 287, "<|vision_start|>": 288,
                       "<|vision_end|>": 289, "<|image_pad|>": 290, "<|video_pad|>": 291}


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, int, int]
    hidden_act: str
    # The attention layout (Qwen2's; another Qwen text config sets its own): biases and per-head q/k norms.
    qkv_bias: ClassVar[bool] = True
    o_bias: ClassVar[bool] = False
    qk_norm: ClassVar[bool] = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def mrope_cos_sin(cfg: TextConfig, position_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos/sin `[batch, seq, head_dim]` for M-RoPE positions `[3, batch, seq]`.

    The head_dim/2 frequencies are split into mrope_section chunks taking their angle from the
    temporal, height and width positions in turn; the halves are then repeated (rotate_half layout).
    """
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    freqs = position_ids.astype(jnp.float32)[..., None] * inv_freq  # [3, B, T, d/2]
    axis = np.repeat(np.arange(3), cfg.mrope_section)  # which position axis each frequency reads
    freqs = freqs[axis, :, :, np.arange(d // 2)].transpose(1, 2, 0)  # [B, T, d/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys and values of every layer: `[layers, batch, cache_len, kv_heads, head_dim]` each."""
    k: jax.Array
    v: jax.Array


class Attention(nnx.Module):
    SIBLINGS = (("q_proj", "k_proj", "v_proj"),)  # what __call__ passes to layers.sibling_linears

    def __init__(self, cfg: TextConfig, dtype, stack):
        d, hd = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
        self.q_proj = Linear(d, cfg.num_heads * hd, bias=cfg.qkv_bias, dtype=dtype, stack=stack)
        self.k_proj = Linear(d, cfg.num_kv_heads * hd, bias=cfg.qkv_bias, dtype=dtype, stack=stack)
        self.v_proj = Linear(d, cfg.num_kv_heads * hd, bias=cfg.qkv_bias, dtype=dtype, stack=stack)
        self.o_proj = Linear(cfg.num_heads * hd, d, bias=cfg.o_bias, dtype=dtype, stack=stack)
        # Qwen3: RMSNorm over each head of q and k, before the rotary.
        self.q_norm = RMSNorm(hd, eps=cfg.rms_norm_eps, dtype=dtype, stack=stack) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd, eps=cfg.rms_norm_eps, dtype=dtype, stack=stack) if cfg.qk_norm else None

    def __call__(self, x, cos, sin, mask, kv=None, index=None, layer=None):
        """Self-attention over `x [batch, seq, hidden]`; with a cache `kv = (k, v)` of every layer, each
        `[layers, batch, cache_len, kv_heads, head_dim]`, this step's keys/values are written in place at entry
        `layer`, slot `index` (an int, or int32 `[batch]`: each row's slot; see `layers.write_step`) and attention
        reads that layer's whole cache (`mask` then spans the cache). Returns (out, kv)."""
        b, t, _ = x.shape
        q, k, v = sibling_linears(x, (self.q_proj, self.k_proj, self.v_proj))
        q = q.reshape(b, t, self.num_heads, -1)
        k, v = (y.reshape(b, t, self.num_kv_heads, -1) for y in (k, v))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv is None:
            out = attention(q, k, v, mask, causal=True)
        else:
            out, kv = cached_attention(q, k, v, kv, index, layer, mask)
        return self.o_proj(out.reshape(b, t, -1)), kv


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, dtype, stack):
        self.self_attn = Attention(cfg, dtype, stack)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, bias=False, dtype=dtype,
                            stack=stack)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype, stack=stack)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype, stack=stack)

    def __call__(self, x, cos, sin, mask, kv=None, index=None, layer=None):
        attn, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, kv, index, layer)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), kv


def add_deepstack(h: jax.Array, layer: jax.Array, deepstack) -> jax.Array:
    """`h [batch, seq, hidden]` plus deepstack feature `layer` at the vision tokens, when the layer has one
    (Qwen3-VL adds features of the vision tower's middle blocks to the first decoder layers' outputs).

    deepstack: (image_pos [merged] flat token indices (out of range: dropped), features
    [deepstack, merged, hidden]) or None.
    """
    if deepstack is None or deepstack[1].shape[0] == 0:
        return h
    image_pos, features = deepstack
    n = features.shape[0]
    add = jnp.where(layer < n, features[jnp.minimum(layer, n - 1)], 0).astype(h.dtype)
    b, t, d = h.shape
    return h.reshape(b * t, d).at[image_pos].add(add, mode="drop").reshape(b, t, d)


class TextModel(nnx.Module):
    """The decoder stack. A variant sets `LAYER` (its decoder layer class) and overrides `cos_sin` (its M-RoPE
    frequency layout)."""

    LAYER: ClassVar[type] = DecoderLayer

    def __init__(self, cfg: TextConfig, dtype):
        self.cfg = cfg
        self.remat = None
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.layers = self.LAYER(cfg, dtype, stack=(cfg.num_layers,))
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)

    def cos_sin(self, position_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        return mrope_cos_sin(self.cfg, position_ids)

    def __call__(self, h: jax.Array, position_ids: jax.Array, attention_mask: jax.Array,
                 cache: KVCache | None = None, index=0, deepstack=None):
        """Final hidden states `[batch, seq, hidden]` from input embeddings `[batch, seq, hidden]`.

        Without a cache, `attention_mask [batch, seq]` marks the real tokens. With one, the step's
        tokens go to cache slots index..index+seq (`index` an int, or int32 `[batch]` for a one-token step: each
        row's slot), and `attention_mask [batch, cache_len]` marks the
        slots holding real tokens. `deepstack` (see `add_deepstack`) is added after the first layers.
        Returns (hidden, cache).
        """
        cos, sin = self.cos_sin(position_ids)
        t = h.shape[1]
        keys = attention_mask.shape[1]
        key_ok = jnp.broadcast_to(attention_mask[:, None, None, :] > 0, (h.shape[0], 1, t, keys))
        # The layer index rides along the scan only when deepstack features need it.
        per_layer = () if deepstack is None else (jnp.arange(self.cfg.num_layers),)
        if cache is None:  # causal over the sequence itself: the attention kernel applies it
            def layer_step(layer, x, *i):
                x = layer(x, cos, sin, key_ok)[0]
                return (add_deepstack(x, i[0], deepstack) if i else x), None

            h, _ = scan_blocks(self.layers, h, layer_step, *per_layer, remat=self.remat)
        else:
            mask = (jnp.arange(keys) <= query_slots(t, index)[..., None])[:, None] & key_ok

            # The cache rides along as a carry, each layer writing its entry in place (as per-layer slices, the
            # updated slices were stacked into a new cache every step: a copy of the whole cache).
            def layer_step(layer, carry, i):
                x, kv = carry
                x, kv = layer(x, cos, sin, mask, kv, index, i)
                return (add_deepstack(x, i, deepstack), kv), None

            # (np.arange: unrolled, each layer's index is a static int, which the decode kernel needs.)
            (h, kv), _ = scan_blocks(self.layers, (h, (cache.k, cache.v)), layer_step, np.arange(self.cfg.num_layers))
            cache = KVCache(*kv)
        return self.norm(h), cache


class LMHeadMethods:
    """The output head (lm_head, or the tied embedding when `self.lm_head` is None) and `max_positions` of a VLM
    whose text model sits at `self.model.language_model` (with `embed_tokens`) and whose config has
    `max_position_embeddings`."""

    def logits(self, h: jax.Array) -> jax.Array:
        if self.lm_head is None:
            return linear(h, self.model.language_model.embed_tokens.weight.get_value())
        return self.lm_head(h)

    @property
    def max_positions(self) -> int | None:
        return self.config.max_position_embeddings


class MRoPEModelMethods(LMHeadMethods):
    """The methods of a Qwen VLM's top module that depend only on its M-RoPE language model: the output
    head and generation's protocol (jaxvlm.models.base). Expects `self.model.language_model` (a TextModel
    or one with the same call), `self.lm_head` (None when tied) and `self.config.text` /
    `.max_position_embeddings`."""

    def init_cache(self, batch: int, length: int) -> KVCache:
        """An empty KV cache `[layers, batch, length, kv_heads, head_dim]`."""
        t = self.config.text
        shape = (t.num_layers, batch, length, t.num_kv_heads, t.head_dim)
        return KVCache(jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype))

    def decode(self, tokens, positions, cache, key_mask, index):
        # A generated token is text: the same position on the three M-RoPE axes.
        pos = jnp.broadcast_to(positions[None, :, None], (3, tokens.shape[0], 1))
        h = self.model.language_model.embed_tokens(tokens[:, None])
        return self.model.language_model(h, pos, key_mask, cache, index)

    def next_positions(self, inputs) -> np.ndarray:
        return (np.asarray(inputs["position_ids"]).max(axis=(0, 2)) + 1).astype(np.int32)
