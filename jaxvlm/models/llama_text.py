"""The plain decoder-only language model of Llama, Mistral and Qwen2 (transformers' LlamaModel, MistralModel,
Qwen2Model), the text half of LLaVA (llava, llava_next) and Mistral Small 3 (mistral3); a building block, no family.

As transformers computes it:
  layers     RMSNorm, grouped-query self-attention with rotary positions (`head_dim` may differ from
             hidden / heads, as Mistral Small 3's does), residual, RMSNorm, SwiGLU MLP, residual; a final RMSNorm;
  biases     Llama: q/k/v/o biases when `attention_bias`; Mistral: none; Qwen2: q/k/v biases, none on o;
  rotary     the default rope, linear scaling (frequencies / factor) or llama3's (`rope_inv_freq`, which
             Llama 3.2 Vision's text model uses too), at 1-D positions counting real tokens;
  masks      causal, padding keys masked; Mistral's `sliding_window` (every layer) and Qwen2's (the layers its
             `layer_types` / `max_window_layers` make sliding, when `use_sliding_window`) let a query see only keys
             less than `sliding_window` slots back. A prompt's windowed mask is a layers.CausalBlockMask (made dense
             off the GPU kernel path); a cache step's mask is dense over the cache.
The layers are stacked and run by jaxvlm.layers.scan_blocks; attention, decoder layer and module layout are
jaxvlm.models.qwen_text's (its Attention's bias switches read from this config). Attribute paths mirror transformers'
in-memory names under the language model (`embed_tokens`, `layers.N.self_attn.q_proj`, ..., `norm`); the output
head (`lm_head`, or the tied embedding) belongs to the family that holds this model.

Not supported (ConfigError): `mlp_bias`, rope types other than default / linear / llama3, a partial rotary factor.
"""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxvlm.layers import ACTIVATIONS, CausalBlockMask, query_slots, scan_blocks
from jaxvlm.models.base import ConfigError
from jaxvlm.models.qwen_text import KVCache, TextModel

# transformers' text config model_types this model implements.
MODEL_TYPES = ("llama", "mistral", "qwen2")
ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class LlamaTextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    hidden_act: str
    rope_theta: float
    # (("rope_type", ...), ...): linear's factor; llama3's factor, low/high_freq_factor, original length.
    rope_scaling: tuple = (("rope_type", "default"),)
    # Keys less than this many slots back are seen (None: no window) in the layers `sliding_layers` lists
    # (None: every layer).
    sliding_window: int | None = None
    sliding_layers: tuple[int, ...] | None = None
    tie_word_embeddings: bool = False
    max_position_embeddings: int | None = None
    # qwen_text.Attention's switches: biases of q/k/v and of o (Llama's attention_bias sets both, Qwen2 has q/k/v).
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: ClassVar[bool] = False

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads or self.head_dim % 2:
            raise ConfigError(f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                              f"head_dim={self.head_dim}: expected kv heads dividing the heads and an even head_dim")

    @property
    def sliding(self) -> tuple[bool, ...]:
        """Per layer: whether it attends within the window."""
        if self.sliding_window is None:
            return (False,) * self.num_layers
        rows = range(self.num_layers) if self.sliding_layers is None else self.sliding_layers
        return tuple(i in rows for i in range(self.num_layers))


def text_config_from_hf(t, where: str = "text_config") -> LlamaTextConfig:
    """A LlamaTextConfig from a transformers Llama / Mistral / Qwen2 config; ConfigError naming `where.field` for
    what this model does not implement."""
    kind = getattr(t, "model_type", None)
    if kind not in MODEL_TYPES:
        raise ConfigError(f"{where}.model_type={kind!r}: expected one of {MODEL_TYPES}")
    if t.hidden_act not in ACTIVATIONS:
        raise ConfigError(f"{where}.hidden_act={t.hidden_act!r}: expected one of {tuple(ACTIVATIONS)}")
    if getattr(t, "mlp_bias", False):
        raise ConfigError(f"{where}.mlp_bias=True: MLP biases are not supported")
    rope = dict(getattr(t, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"{where}.rope_parameters.rope_type={rope_type!r}: expected one of {ROPE_TYPES}")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"{where}.rope_parameters.partial_rotary_factor={rope['partial_rotary_factor']!r}: "
                          f"only 1.0 (rotary over the whole head) is supported")
    keep = {"default": (), "linear": ("factor",),
            "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}[rope_type]
    if missing := [k for k in keep if rope.get(k) is None]:
        raise ConfigError(f"{where}.rope_parameters: rope_type {rope_type!r} needs {missing}")
    window, sliding_layers = None, None
    if kind == "mistral":  # every layer (MistralModel ignores layer_types)
        window = getattr(t, "sliding_window", None)
    elif kind == "qwen2" and getattr(t, "use_sliding_window", False):
        window = getattr(t, "sliding_window", None)
        types = list(getattr(t, "layer_types", None) or ["full_attention"] * t.num_hidden_layers)
        if len(types) != t.num_hidden_layers or set(types) - {"full_attention", "sliding_attention"}:
            raise ConfigError(f"{where}.layer_types={types!r}: expected num_hidden_layers={t.num_hidden_layers} of "
                              f"'full_attention' / 'sliding_attention'")
        sliding_layers = tuple(i for i, kind_i in enumerate(types) if kind_i == "sliding_attention")
        if not sliding_layers:  # all layers below max_window_layers: no window anywhere (as transformers)
            window, sliding_layers = None, None
    if window is not None and int(window) < 1:
        raise ConfigError(f"{where}.sliding_window={window!r}: expected a positive int or null")
    bias = bool(getattr(t, "attention_bias", False))  # Llama's: all four projections
    heads = t.num_attention_heads
    return LlamaTextConfig(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_layers=t.num_hidden_layers, num_heads=heads, num_kv_heads=t.num_key_value_heads or heads,
        head_dim=getattr(t, "head_dim", None) or t.hidden_size // heads, rms_norm_eps=t.rms_norm_eps,
        hidden_act=t.hidden_act, rope_theta=float(rope.get("rope_theta", 10000.0)),
        rope_scaling=(("rope_type", rope_type), *((k, float(rope[k])) for k in keep)),
        sliding_window=None if window is None else int(window), sliding_layers=sliding_layers,
        tie_word_embeddings=bool(getattr(t, "tie_word_embeddings", False)),
        max_position_embeddings=getattr(t, "max_position_embeddings", None),
        qkv_bias=kind == "qwen2" or bias, o_bias=bias)


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


def rope_cos_sin(positions: jax.Array, inv_freq) -> tuple[jax.Array, jax.Array]:
    """cos/sin `[..., head_dim]` at 1-D positions `[...]` (rotate_half layout, fp32)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def inv_freq(cfg: LlamaTextConfig) -> jax.Array:
    """float32 rotary inverse frequencies `[head_dim / 2]` of the config's rope type."""
    scaling = dict(cfg.rope_scaling)
    if scaling["rope_type"] == "linear":  # positions / factor, folded into the frequencies
        return jnp.asarray(rope_inv_freq(cfg.head_dim, cfg.rope_theta, {"rope_type": "default"})) / scaling["factor"]
    return jnp.asarray(rope_inv_freq(cfg.head_dim, cfg.rope_theta, scaling))


class LlamaTextModel(TextModel):
    """`embed_tokens`, `layers` (qwen_text.DecoderLayer, stacked), `norm`."""

    def cos_sin(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """cos/sin `[batch, seq, head_dim]` at 1-D positions `[batch, seq]` (rotate_half layout)."""
        return rope_cos_sin(positions, inv_freq(self.cfg))

    def __call__(self, h: jax.Array, positions: jax.Array, attention_mask: jax.Array,
                 cache: KVCache | None = None, index=0):
        """Final hidden states `[batch, seq, hidden]` (after `norm`) from input embeddings `h [batch, seq, hidden]`
        at `positions [batch, seq]`.

        Without a cache, `attention_mask [batch, seq]` marks the real tokens. With one (`init_cache`), the step's
        tokens go to cache slots index..index+seq (a prompt at 0, then a token at a time; `index` int32 `[batch]`: each
        row's slot) and `attention_mask
        [batch, cache_len]` marks the slots holding real tokens. Returns (hidden, cache).
        """
        c = self.cfg
        cos, sin = self.cos_sin(positions)
        b, t = h.shape[:2]
        key_ok = attention_mask > 0
        window = c.sliding_window
        sliding = c.sliding
        # Which layers slide: a constant when all or none do, else a per-layer flag riding along the scan.
        per_layer = () if len(set(sliding)) == 1 else (jnp.asarray(sliding),)

        if cache is None:
            if window is None:  # causal over the sequence itself: the attention kernel applies it
                mask_of = lambda _: jnp.broadcast_to(key_ok[:, None, None, :], (b, 1, t, t))  # noqa: E731
            else:
                blocks = jnp.full((b, t), -1, jnp.int32)  # no image runs: plain causal
                mask_of = lambda s: CausalBlockMask(key_ok, blocks, s, window)  # noqa: E731

            def layer_step(layer, x, *flag):
                return layer(x, cos, sin, mask_of(flag[0] if flag else sliding[0]))[0], None

            h, _ = scan_blocks(self.layers, h, layer_step, *per_layer, remat=self.remat)
            return self.norm(h), None

        keys = jnp.arange(attention_mask.shape[1])
        queries = query_slots(t, index)[..., None]  # the queries' cache slots, [batch or 1, t, 1]
        full = (keys <= queries)[:, None] & key_ok[:, None, None, :]
        windowed = full if window is None else full & (keys > queries - window)[:, None]

        def layer_step(layer, carry, i, *flag):  # the cache a carry, written in place (see qwen_text.TextModel)
            x, kv = carry
            mask = jnp.where(flag[0], windowed, full) if flag else windowed if sliding[0] else full
            return layer(x, cos, sin, mask, kv, index, i), None

        (h, kv), _ = scan_blocks(self.layers, (h, (cache.k, cache.v)), layer_step, np.arange(self.cfg.num_layers),
                                 *per_layer)
        return self.norm(h), KVCache(*kv)

    def init_cache(self, batch: int, length: int, dtype) -> KVCache:
        """An empty cache: keys and values `[layers, batch, length, kv_heads, head_dim]` each."""
        c = self.cfg
        shape = (c.num_layers, batch, length, c.num_kv_heads, c.head_dim)
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
