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
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax.ad_checkpoint import checkpoint_name

from jaxvlm.layers import Embedding, GatedMLP, Linear, RMSNorm, apply_rotary, attention, checkpoint_policy
from jaxvlm.models.base import ConfigError


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


def rope_inv_freq(head_dim: int, theta: float, scaling: dict) -> np.ndarray:
    """float32 inverse frequencies [head_dim / 2] of the default rope or llama3's scaled one (transformers'
    `_compute_llama3_parameters`: long wavelengths divided by `factor`, short ones kept, the middle smoothed)."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    if scaling.get("rope_type", "default") == "default":
        return inv_freq.astype(np.float32)
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / low, old / high
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


class SelfAttention(nnx.Module):
    def __init__(self, cfg: MllamaTextConfig, dtype, stack):
        d, hd = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
        self.q_proj = Linear(d, cfg.num_heads * hd, bias=False, dtype=dtype, stack=stack)
        self.k_proj = Linear(d, cfg.num_kv_heads * hd, bias=False, dtype=dtype, stack=stack)
        self.v_proj = Linear(d, cfg.num_kv_heads * hd, bias=False, dtype=dtype, stack=stack)
        self.o_proj = Linear(cfg.num_heads * hd, d, bias=False, dtype=dtype, stack=stack)

    def __call__(self, x, cos, sin, mask):
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, -1)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, -1)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, -1)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return self.o_proj(attention(q, k, v, mask, causal=True).reshape(b, t, -1))


class SelfAttentionDecoderLayer(nnx.Module):
    def __init__(self, cfg: MllamaTextConfig, dtype, stack):
        self.self_attn = SelfAttention(cfg, dtype, stack)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, bias=False, dtype=dtype, stack=stack)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype, stack=stack)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype, stack=stack)

    def __call__(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


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

    def __call__(self, x, k, v, mask):
        """`mask [batch, 1, seq, vision tokens]`: what each text row may see (rows that may see nothing: all)."""
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(b, t, self.num_heads, -1))
        return self.o_proj(attention(q, k, v, mask).reshape(b, t, -1))


class CrossAttentionDecoderLayer(nnx.Module):
    def __init__(self, cfg: MllamaTextConfig, dtype, stack):
        self.cross_attn = CrossAttention(cfg, dtype, stack)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype, stack=stack)
        self.cross_attn_attn_gate = nnx.Param(jnp.zeros((*stack, 1), dtype))
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, bias=False, dtype=dtype, stack=stack)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype, stack=stack)
        self.cross_attn_mlp_gate = nnx.Param(jnp.zeros((*stack, 1), dtype))

    def __call__(self, x, vision, mask, rows):
        """`vision [batch, vision tokens, hidden]`, `mask` as CrossAttention's, `rows [batch, seq]` (1: the row may
        see some vision token)."""
        k, v = self.cross_attn.keys_values(vision)
        attn = self.cross_attn(self.input_layernorm(x), k, v, mask)
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
        inv_freq = jnp.asarray(rope_inv_freq(c.head_dim, c.rope_theta, dict(c.rope_scaling)))
        freqs = positions.astype(jnp.float32)[..., None] * inv_freq
        emb = jnp.concatenate([freqs, freqs], axis=-1)
        return jnp.cos(emb), jnp.sin(emb)

    def __call__(self, h, positions, attention_mask, vision=None, cross_mask=None):
        """Final hidden states `[batch, seq, hidden]` from input embeddings `h` at `positions [batch, seq]`.

        `attention_mask [batch, seq]`: the real tokens. `vision [batch, vision tokens, hidden]` (None: a text-only
        batch, the cross-attention layers skipped) and `cross_mask [batch, seq, vision tokens]` (bool: which vision
        tokens each text token may see).
        """
        c = self.cfg
        cos, sin = self.cos_sin(positions)
        key_ok = attention_mask[:, None, None, :] > 0
        order = np.zeros(c.num_layers, np.int32)  # each position's row in its stack
        order[list(c.self_attention_layers)] = np.arange(len(c.self_attention_layers))
        order[list(c.cross_attention_layers)] = np.arange(len(c.cross_attention_layers))
        is_cross = np.isin(np.arange(c.num_layers), c.cross_attention_layers)
        self_graph, self_state = nnx.split(self.layers)
        if vision is None:  # text only: the self-attention layers alone, one scan
            rows = (jnp.asarray(order[~is_cross]),)
            cross_graph = cross_state = None
        else:
            rows = (jnp.asarray(order), jnp.asarray(is_cross))
            cross_graph, cross_state = nnx.split(self.cross_attention_layers)
            sees = cross_mask.any(axis=-1)  # [batch, seq]: the row may see some vision token
            mask = (cross_mask | ~sees[..., None])[:, None]  # rows that see nothing see everything (transformers)

        def row(state, i):
            return jax.tree.map(lambda a: a[i], state)

        def self_layer(x, i):
            return nnx.merge(self_graph, row(self_state, i))(x, cos, sin, key_ok)

        def body(x, xs):
            x = checkpoint_name(x, "block_input")
            if vision is None:
                return self_layer(x, xs[0]), None
            i, cross = xs
            cross_layer = lambda: nnx.merge(cross_graph, row(cross_state, i))(x, vision, mask, sees)  # noqa: E731
            return jax.lax.cond(cross, cross_layer, lambda: self_layer(x, i)), None

        if self.remat is not None:
            body = jax.checkpoint(body, policy=checkpoint_policy(self.remat), prevent_cse=False)
        h, _ = jax.lax.scan(body, h, rows)
        return self.norm(h)
