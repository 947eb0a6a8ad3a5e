"""The language model of Llama 3.2 Vision (transformers' MllamaTextModel): Llama self-attention layers with gated
cross-attention layers at `cross_attention_layers`, as a building block of the `mllama` family (not registered yet).

As transformers computes it:
  self-attention layers  Llama's: RMSNorm, grouped-query attention with rotary positions (llama3 rope scaling),
                         RMSNorm, SwiGLU MLP;
  cross-attention layers the text attends to the vision states (the projector's output, [batch, vision tokens,
                         hidden]) through q/k/v/o projections with q/k RMSNorm, the output scaled by
                         tanh(cross_attn_attn_gate); then the MLP, zeroed on text rows that may see no vision token
                         (the "full text row" mask) and scaled by tanh(cross_attn_mlp_gate). A text row that may see
                         no vision token attends to all of them uniformly (transformers zeroes that row's bias
                         rather than masking it), and its attention output is kept;
  without vision states  (a text-only batch) the cross-attention layers are skipped.
The two kinds of layers have different params, so they form two stacks: `layers` (the self-attention layers, in
order) and `cross_attention_layers`; one scan runs over all layer positions and, at each, a `lax.cond` runs the
self-attention or the cross-attention layer with that stack's row.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax.ad_checkpoint import checkpoint_name

from jaxvlm.layers import (Embedding, GatedMLP, Linear, RMSNorm, attention, cache_attention, checkpoint_policy,
                           query_slots, unrolling)
from jaxvlm.models.base import ConfigError
from jaxvlm.models.llama_text import rope_cos_sin, rope_inv_freq  # noqa: F401 (rope_inv_freq re-exported)
from jaxvlm.models.qwen_text import Attention  # Llama-style grouped-query attention with a cache

# Generation's cache of image keys and values (KVCache.k_cross) holds its slots in multiples of CROSS_SLOTS, so that a
# decode step reads them in place in whole steps of the decode kernel (layers.cache_attention); `last_cross` marks
# each slot ABSENT (padding), PRESENT or SEEN (by the prompt's last token, hence by the generated tokens).
CROSS_SLOTS = 64
ABSENT, PRESENT, SEEN = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class MllamaTextConfig:
    vocab_size: int  # the embedding table has vocab_size + 8 rows, as transformers'
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rms_norm_eps: float
    hidden_act: str
    rope_theta: float
    rope_scaling: tuple  # (("rope_type", ...), ...): llama3's factor, low/high_freq_factor, original length
    cross_attention_layers: tuple[int, ...]
    # The self-attention layout (qwen_text.Attention's switches): Llama's, no biases, no q/k norms.
    qkv_bias: ClassVar[bool] = False
    o_bias: ClassVar[bool] = False
    qk_norm: ClassVar[bool] = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def self_attention_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if i not in self.cross_attention_layers)


def text_config_from_hf(t, where: str = "text_config") -> MllamaTextConfig:
    rope = dict(getattr(t, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ("default", "llama3"):
        raise ConfigError(f"{where}.rope_parameters.rope_type={rope_type!r}: only 'default' and 'llama3' are supported")
    cross = tuple(sorted(int(i) for i in t.cross_attention_layers))
    if any(not 0 <= i < t.num_hidden_layers for i in cross):
        raise ConfigError(f"{where}.cross_attention_layers={list(cross)}: expected layer indices below "
                          f"num_hidden_layers={t.num_hidden_layers}")
    keep = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return MllamaTextConfig(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_layers=t.num_hidden_layers, num_heads=t.num_attention_heads,
        num_kv_heads=t.num_key_value_heads or t.num_attention_heads, rms_norm_eps=t.rms_norm_eps,
        hidden_act=t.hidden_act, rope_theta=float(rope.get("rope_theta", 500000.0)),
        rope_scaling=(("rope_type", rope_type), *((k, float(rope[k])) for k in keep if k in rope)),
        cross_attention_layers=cross)


class SelfAttentionDecoderLayer(nnx.Module):
    def __init__(self, cfg: MllamaTextConfig, dtype, stack):
        self.self_attn = Attention(cfg, dtype, stack)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, bias=False, dtype=dtype, stack=stack)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype, stack=stack)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype, stack=stack)

    def __call__(self, x, cos, sin, mask, kv=None, index=None, layer=None):
        attn, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, kv, index, layer)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), kv


class CrossAttention(nnx.Module):
    def __init__(self, cfg: MllamaTextConfig, dtype, stack):
        d, hd = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
        self.q_proj = Linear(d, cfg.num_heads * hd, bias=False, dtype=dtype, stack=stack)
        self.k_proj = Linear(d, cfg.num_kv_heads * hd, bias=False, dtype=dtype, stack=stack)
        self.v_proj = Linear(d, cfg.num_kv_heads * hd, bias=False, dtype=dtype, stack=stack)
        self.o_proj = Linear(cfg.num_heads * hd, d, bias=False, dtype=dtype, stack=stack)
        self.q_norm = RMSNorm(hd, eps=cfg.rms_norm_eps, dtype=dtype, stack=stack)
        self.k_norm = RMSNorm(hd, eps=cfg.rms_norm_eps, dtype=dtype, stack=stack)

    def keys_values(self, vision: jax.Array) -> tuple[jax.Array, jax.Array]:
        """This layer's keys and values `[batch, vision tokens, kv_heads, head_dim]` of the vision states."""
        b, s, _ = vision.shape
        k = self.k_norm(self.k_proj(vision).reshape(b, s, self.num_kv_heads, -1))
        return k, self.v_proj(vision).reshape(b, s, self.num_kv_heads, -1)

    def __call__(self, x, k, v, mask, layer=None):
        """`mask [batch, 1, seq, vision tokens]`: what each text row may see (rows that may see nothing: all). `k, v`:
        the layer's keys and values, or with `layer` the stacked cache (`KVCache.k_cross`, `v_cross`) read at entry
        `layer` (a decode step; `cache_attention`)."""
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(b, t, self.num_heads, -1))
        out = attention(q, k, v, mask) if layer is None else cache_attention(q, (k, v), layer, mask)
        return self.o_proj(out.reshape(b, t, -1))


class CrossAttentionDecoderLayer(nnx.Module):
    def __init__(self, cfg: MllamaTextConfig, dtype, stack):
        self.cross_attn = CrossAttention(cfg, dtype, stack)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype, stack=stack)
        self.cross_attn_attn_gate = nnx.Param(jnp.zeros((*stack, 1), dtype))
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, bias=False, dtype=dtype, stack=stack)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype, stack=stack)
        self.cross_attn_mlp_gate = nnx.Param(jnp.zeros((*stack, 1), dtype))

    def __call__(self, x, k, v, mask, rows, layer=None):
        """`k, v`: this layer's `cross_attn.keys_values(vision states)` (or with `layer` the stacked cache, as
        CrossAttention's); `mask` as CrossAttention's; `rows [batch, seq]` (1: the row may see some vision token)."""
        attn = self.cross_attn(self.input_layernorm(x), k, v, mask, layer)
        x = x + jnp.tanh(self.cross_attn_attn_gate.get_value()).astype(x.dtype) * attn
        mlp = self.mlp(self.post_attention_layernorm(x)) * rows[..., None].astype(x.dtype)
        return x + jnp.tanh(self.cross_attn_mlp_gate.get_value()).astype(x.dtype) * mlp


class MllamaTextModel(nnx.Module):
    """`embed_tokens` (vocab + 8 rows), `layers` (the self-attention layers, stacked), `cross_attention_layers`
    (stacked), `norm`."""

    def __init__(self, cfg: MllamaTextConfig, dtype):
        self.cfg = cfg
        self.remat = None
        self.embed_tokens = Embedding(cfg.vocab_size + 8, cfg.hidden_size, dtype=dtype)
        self.layers = SelfAttentionDecoderLayer(cfg, dtype, stack=(len(cfg.self_attention_layers),))
        self.cross_attention_layers = CrossAttentionDecoderLayer(cfg, dtype, stack=(len(cfg.cross_attention_layers),))
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)

    def cos_sin(self, positions: jax.Array):
        c = self.cfg
        return rope_cos_sin(positions, rope_inv_freq(c.head_dim, c.rope_theta, dict(c.rope_scaling)))

    def _layer_rows(self):
        c = self.cfg
        order = np.zeros(c.num_layers, np.int32)  # each position's row in its stack
        order[list(c.self_attention_layers)] = np.arange(len(c.self_attention_layers))
        order[list(c.cross_attention_layers)] = np.arange(len(c.cross_attention_layers))
        return order, np.isin(np.arange(c.num_layers), c.cross_attention_layers)

    def __call__(self, h, positions, attention_mask, vision=None, cross_mask=None, cache: "KVCache | None" = None,
                 index=0):
        """Final hidden states `[batch, seq, hidden]` from input embeddings `h` at `positions [batch, seq]`.

        `attention_mask [batch, seq]`: the real tokens. `vision [batch, vision tokens, hidden]` (None: a text-only
        batch, the cross-attention layers skipped) and `cross_mask [batch, seq, vision tokens]` (bool: which vision
        tokens each text token may see).

        With `cache` (generation; `attention_mask` then spans the cache's slots): a prompt (`index` 0) writes its
        self-attention keys and values to slots 0..seq-1 and, with `vision`, each cross-attention layer's image keys
        and values, computed once, and its last row of `cross_mask` (what generated tokens see, as in transformers);
        a one-token step writes slot `index` and reads the cached image keys and values. Returns (hidden, cache).
        """
        c = self.cfg
        cos, sin = self.cos_sin(positions)
        t = h.shape[1]
        order, is_cross = self._layer_rows()
        self_graph, self_state = nnx.split(self.layers)
        cross_graph, cross_state = nnx.split(self.cross_attention_layers)
        prefill = cache is None or (isinstance(index, int) and index == 0)
        if cache is None:
            self_mask = attention_mask[:, None, None, :] > 0
        else:
            keys = attention_mask.shape[1]
            self_mask = ((jnp.arange(keys) <= query_slots(t, index)[..., None])[:, None]
                         & (attention_mask[:, None, None, :] > 0))
            if prefill and vision is not None:
                n, (b, s, _) = len(c.cross_attention_layers), vision.shape
                shape = (n, b, -(-s // CROSS_SLOTS) * CROSS_SLOTS, c.num_kv_heads, c.head_dim)
                last = jnp.where(cross_mask[:, -1], SEEN, PRESENT).astype(jnp.int8)
                cache = dataclasses.replace(cache, k_cross=jnp.zeros(shape, cache.k_self.dtype),
                                            v_cross=jnp.zeros(shape, cache.k_self.dtype),
                                            last_cross=jnp.pad(last, ((0, 0), (0, shape[2] - s))))
        with_vision = vision is not None or (cache is not None and cache.k_cross.shape[2] > 0)
        if with_vision and not prefill:  # a decode step: what the prompt's last token saw, from the cache
            seen, present = cache.last_cross == SEEN, cache.last_cross != ABSENT
            sees = seen.any(axis=-1)  # [batch]: the row may see some vision token
            mask = (seen | present & ~sees[:, None])[:, None, None, :]  # rows that see nothing see every image token
            sees = jnp.broadcast_to(sees[:, None], (h.shape[0], t))
        elif with_vision:
            sees = cross_mask.any(axis=-1)  # [batch, seq]: the row may see some vision token
            mask = (cross_mask | ~sees[..., None])[:, None]  # rows that see nothing see everything (transformers)

        def row(state, i):
            return jax.tree.map(lambda a: a[i], state)

        def self_layer(x, i, caches):
            layer = nnx.merge(self_graph, row(self_state, i))
            if caches is None:
                return layer(x, cos, sin, self_mask)[0], None
            ks, vs, kc, vc = caches
            x, (ks, vs) = layer(x, cos, sin, self_mask, (ks, vs), index, i)  # entry i written in place
            return x, (ks, vs, kc, vc)

        def cross_layer(x, i, caches):
            layer = nnx.merge(cross_graph, row(cross_state, i))
            if caches is not None and not prefill:  # decode: the cached image keys and values, entry i read in place
                ks, vs, kc, vc = caches
                return layer(x, kc, vc, mask, sees, i), caches
            k, v = layer.cross_attn.keys_values(vision)
            x = layer(x, k, v, mask, sees)
            if caches is None:
                return x, None
            ks, vs, kc, vc = caches
            s = k.shape[1]  # the cache's slots past s: padding (ABSENT)
            return x, (ks, vs, kc.at[i, :, :s].set(k.astype(kc.dtype)), vc.at[i, :, :s].set(v.astype(vc.dtype)))

        def body(carry, xs):
            x, caches = carry
            x = checkpoint_name(x, "block_input")
            if not with_vision:
                return self_layer(x, xs[0], caches), None
            i, cross = xs
            return jax.lax.cond(cross, lambda: cross_layer(x, i, caches), lambda: self_layer(x, i, caches)), None

        if self.remat is not None and cache is None:
            body = jax.checkpoint(body, policy=checkpoint_policy(self.remat), prevent_cse=False)
        caches = None if cache is None else (cache.k_self, cache.v_self, cache.k_cross, cache.v_cross)
        if unrolling() and self.remat is None:
            # Generation's step (see layers.unrolled_layers): the layers in order, each one's kind and stack row static
            # (no per-layer cond; a self-attention layer's decode can take the Pallas kernel, layers.cached_attention).
            for i, cross in zip(order, is_cross):
                if cross and with_vision:
                    h, caches = cross_layer(h, i, caches)
                elif not cross:
                    h, caches = self_layer(h, i, caches)
        else:
            rows = (jnp.asarray(order), jnp.asarray(is_cross)) if with_vision else (jnp.asarray(order[~is_cross]),)
            (h, caches), _ = jax.lax.scan(body, (h, caches), rows)
        if cache is not None:
            cache = dataclasses.replace(cache, k_self=caches[0], v_self=caches[1], k_cross=caches[2], v_cross=caches[3])
        return self.norm(h), cache

    def init_cache(self, batch: int, length: int, dtype) -> "KVCache":
        """Self-attention keys and values for `length` slots; the image keys and values come with the prompt."""
        c = self.cfg
        full = (len(c.self_attention_layers), batch, length, c.num_kv_heads, c.head_dim)
        empty = (len(c.cross_attention_layers), batch, 0, c.num_kv_heads, c.head_dim)
        return KVCache(jnp.zeros(full, dtype), jnp.zeros(full, dtype), jnp.zeros(empty, dtype), jnp.zeros(empty, dtype),
                       jnp.zeros((batch, 0), jnp.int8))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Self-attention layers' keys and values `[self layers, batch, cache_len, kv_heads, head_dim]`; the
    cross-attention layers' image keys and values `[cross layers, batch, slots, kv_heads, head_dim]`: the prompt's
    vision tokens, then zeros up to a multiple of CROSS_SLOTS (0 slots for a text-only prompt); `last_cross` int8
    `[batch, slots]`, what generated tokens may see: SEEN, PRESENT (a vision token the prompt's last token does not
    see) or ABSENT (padding; zeros, as the engine pads a smaller prompt's rows, read the same)."""
    k_self: jax.Array
    v_self: jax.Array
    k_cross: jax.Array
    v_cross: jax.Array
    last_cross: jax.Array
