"""Gemma 3 vision (4B, 12B, 27B): the SigLIP tower, the multimodal projector and the Gemma 3 language model.

As transformers' modeling_gemma3.py computes it:
  vision     each image (square, the processor's size; pan-and-scan crops are more images) through SigLIP
             (jaxvlm.models.siglip);
  projector  the patch grid average-pooled to `mm_tokens_per_image` tokens, Gemma's RMSNorm (`mm_soft_emb_norm`),
             then a product with `mm_input_projection_weight [vision, text]` (a bare parameter, no Linear);
  language   the embedding scaled by sqrt(hidden) (in the compute dtype), decoder layers that are sliding-window
             ("sliding_attention", rotary base `rope_local_base_freq`) or global ("full_attention", their own base
             and linear rope scaling), q/k RMSNorm, attention logits scaled by query_pre_attn_scalar^-0.5,
             Gemma's zero-centred RMSNorm (1 + weight) before and after attention and the MLP;
  masks      causal, except that the tokens of one image attend to each other both ways (transformers' blocks
             from `token_type_ids`: a run of image tokens), padding masked; the sliding layers see keys less than
             `sliding_window` slots back. A prompt's mask is a layers.CausalBlockMask (per-token arrays): on a GPU
             the Pallas kernel makes it tile by tile (no [seq, seq] mask in memory), elsewhere it is made dense.
Positions count real tokens only (a left-padded row starts at 0, as transformers' generate sets them). The
layers are stacked with a per-layer sliding flag. Generation's cache keeps the whole sequence for the global
layers and a ring of `sliding_window` slots for the sliding ones (KVCache), so those layers' memory grows with
the window, not the sequence. Attribute paths mirror transformers 5's in-memory names
(`model.vision_tower.encoder.layers...`, `model.multi_modal_projector...`, `model.language_model.layers...`).

Not supported: attention logit soft-capping (no Gemma 3 checkpoint uses it), `use_bidirectional_attention`
(EmbeddingGemma's text-only switch).
"""
from __future__ import annotations

import dataclasses
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxvlm.layers import (ACTIVATIONS, CausalBlockMask, Embedding, GatedMLP, GemmaRMSNorm, Linear, apply_rotary,
                           attention, cached_attention, linear, query_slots, scan_blocks, scatter_rows,
                           sibling_linears, write_step)
from jaxvlm.models.base import ConfigError, FamilyInfo, TinySpec, VisionLanguageModel
from jaxvlm.models.siglip import SiglipVisionConfig, SiglipVisionTower, patchify, siglip_config_from_hf

MODEL_TYPE = "gemma3"
USER_TURN, MODEL_TURN = "<start_of_turn>user\n", "<start_of_turn>model\n"


@dataclasses.dataclass(frozen=True)
class GemmaTextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    hidden_act: str
    query_pre_attn_scalar: float
    sliding_window: int
    sliding: tuple[bool, ...]  # per layer: a sliding-window layer (else global)
    rope_local_theta: float
    rope_global_theta: float
    rope_global_factor: float  # linear rope scaling of the global layers (1.0: none)
    final_logit_softcapping: float | None
    max_position_embeddings: int | None


@dataclasses.dataclass(frozen=True)
class Gemma3Config:
    text: GemmaTextConfig
    vision: SiglipVisionConfig
    mm_tokens_per_image: int
    image_token_id: int
    boi_token_id: int
    eoi_token_id: int
    tie_word_embeddings: bool

    @property
    def max_position_embeddings(self) -> int | None:
        return self.text.max_position_embeddings


def _rope(t, kind: str) -> tuple[float, float]:
    """(theta, linear factor) of one layer kind from text_config.rope_parameters."""
    params = dict((t.rope_parameters or {}).get(kind) or {})
    rope_type = params.get("rope_type", "default")
    if rope_type not in ("default", "linear"):
        raise ConfigError(f"text_config.rope_parameters.{kind}.rope_type={rope_type!r}: only 'default' and 'linear' "
                          f"are supported")
    default = 1e4 if kind == "sliding_attention" else 1e6
    return float(params.get("rope_theta", default)), float(params.get("factor", 1.0)) if rope_type == "linear" else 1.0


def text_config_from_hf(t) -> GemmaTextConfig:
    """Our language-model config from a transformers Gemma3TextConfig."""
    if getattr(t, "attn_logit_softcapping", None):
        raise ConfigError(f"text_config.attn_logit_softcapping={t.attn_logit_softcapping}: not supported (Gemma 3 "
                          f"checkpoints leave it null)")
    if getattr(t, "use_bidirectional_attention", False):
        raise ConfigError("text_config.use_bidirectional_attention=true: not supported (a text-embedding switch)")
    kinds = list(t.layer_types)
    unknown = sorted(set(kinds) - {"sliding_attention", "full_attention"})
    if unknown or len(kinds) != t.num_hidden_layers:
        raise ConfigError(f"text_config.layer_types={kinds}: expected {t.num_hidden_layers} entries of "
                          f"'sliding_attention' / 'full_attention'")
    if t.hidden_activation not in ACTIVATIONS:
        raise ConfigError(f"text_config.hidden_activation={t.hidden_activation!r}: expected one of {sorted(ACTIVATIONS)}")
    local_theta, local_factor = _rope(t, "sliding_attention")
    global_theta, global_factor = _rope(t, "full_attention")
    if local_factor != 1.0:
        raise ConfigError("text_config.rope_parameters.sliding_attention: rope scaling of the sliding layers is not "
                          "supported")
    return GemmaTextConfig(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_layers=t.num_hidden_layers, num_heads=t.num_attention_heads,
        num_kv_heads=t.num_key_value_heads or t.num_attention_heads,
        head_dim=getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads,
        rms_norm_eps=t.rms_norm_eps, hidden_act=t.hidden_activation,
        query_pre_attn_scalar=float(t.query_pre_attn_scalar), sliding_window=int(t.sliding_window),
        sliding=tuple(k == "sliding_attention" for k in kinds), rope_local_theta=local_theta,
        rope_global_theta=global_theta, rope_global_factor=global_factor,
        final_logit_softcapping=getattr(t, "final_logit_softcapping", None),
        max_position_embeddings=getattr(t, "max_position_embeddings", None))


def from_hf(hf) -> Gemma3Config:
    if hf.model_type != MODEL_TYPE:
        raise ConfigError(f"model_type {hf.model_type!r} is not a Gemma 3 vision model ({MODEL_TYPE})")
    text, vision = text_config_from_hf(hf.text_config), siglip_config_from_hf(hf.vision_config)
    side = math.isqrt(hf.mm_tokens_per_image)
    if side * side != hf.mm_tokens_per_image or vision.patches_per_side % side:
        raise ConfigError(f"mm_tokens_per_image={hf.mm_tokens_per_image}: expected a square whose side divides the "
                          f"{vision.patches_per_side} patches per side of the vision tower")
    return Gemma3Config(text=text, vision=vision, mm_tokens_per_image=hf.mm_tokens_per_image,
                        image_token_id=hf.image_token_id, boi_token_id=hf.boi_token_id, eoi_token_id=hf.eoi_token_id,
                        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", True)))


# ----------------------------------------------------------------------------------------------
# Host-side inputs.


def image_blocks(tokens: np.ndarray) -> np.ndarray:
    """int32 `[batch, seq]`: for each image token (`tokens` true) the index of its run of image tokens in its row,
    -1 at text (transformers' `get_block_sequence_ids_for_mask`)."""
    tokens = np.asarray(tokens, bool)
    start = tokens & ~np.pad(tokens, ((0, 0), (1, 0)))[:, :-1]
    return np.where(tokens, np.cumsum(start, axis=1) - 1, -1).astype(np.int32)


def prepare_inputs(cfg: Gemma3Config, input_ids, attention_mask=None, pixel_values=None, token_type_ids=None,
                   n_pad_patches: int = 0, **unused) -> dict[str, np.ndarray]:
    """The arrays the jit'd forward takes, from what Gemma3Processor returns.

    `token_type_ids` (1 at image tokens) makes each image's tokens attend to each other both ways; without it
    the image tokens in input_ids say the same. `pixel_values [images, 3, size, size]` (crops included);
    `n_pad_patches`: that many images at the end are the collator's padding (their outputs are dropped).
    """
    ids = np.asarray(input_ids).astype(np.int32)
    if ids.ndim != 2:
        raise ValueError(f"input_ids: expected [batch, seq], got shape {ids.shape}")
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask).astype(np.int32)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask has shape {mask.shape}, input_ids {ids.shape}")
    image_tokens = ids == cfg.image_token_id
    typed = image_tokens if token_type_ids is None else np.asarray(token_type_ids) == 1
    out = {"input_ids": ids, "attention_mask": mask,
           "positions": np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32),
           "blocks": image_blocks(typed & (mask > 0))}
    n_tokens = int(image_tokens.sum())
    if pixel_values is None:
        if n_tokens:
            raise ValueError(f"input_ids hold {n_tokens} image tokens (id {cfg.image_token_id}) but no pixel_values "
                             f"were given")
        return out
    patches = patchify(cfg.vision, pixel_values)
    n_real = patches.shape[0] - int(n_pad_patches)
    if n_tokens != n_real * cfg.mm_tokens_per_image:
        raise ValueError(f"input_ids hold {n_tokens} image tokens, pixel_values {n_real} images of "
                         f"{cfg.mm_tokens_per_image} tokens each ({n_real * cfg.mm_tokens_per_image})")
    flat = np.flatnonzero(image_tokens.reshape(-1))
    pad = ids.size + np.arange(int(n_pad_patches) * cfg.mm_tokens_per_image)  # out of range, distinct: dropped
    out.update(patches=patches, image_pos=np.concatenate([flat, pad]).astype(np.int32))
    return out


# ----------------------------------------------------------------------------------------------
# The network.


class MultiModalProjector(nnx.Module):
    """Average pooling of each image's patch grid to mm_tokens_per_image tokens, `mm_soft_emb_norm`, and the
    product with `mm_input_projection_weight [vision hidden, text hidden]`."""

    def __init__(self, cfg: Gemma3Config, dtype):
        self.mm_input_projection_weight = nnx.Param(jnp.zeros((cfg.vision.hidden_size, cfg.text.hidden_size), dtype))
        self.mm_soft_emb_norm = GemmaRMSNorm(cfg.vision.hidden_size, eps=cfg.vision.layer_norm_eps, dtype=dtype)
        self.side = math.isqrt(cfg.mm_tokens_per_image)
        self.patches_per_side = cfg.vision.patches_per_side

    def __call__(self, x: jax.Array) -> jax.Array:
        """`[images, patches, vision hidden]` -> `[images, mm_tokens_per_image, text hidden]` in x's dtype."""
        n, _, d = x.shape
        g, s = self.patches_per_side, self.side
        k = g // s
        pooled = x.reshape(n, s, k, s, k, d).astype(jnp.float32).mean(axis=(2, 4)).astype(x.dtype)
        h = self.mm_soft_emb_norm(pooled.reshape(n, s * s, d))
        w = self.mm_input_projection_weight.get_value().astype(x.dtype)
        return jax.lax.dot_general(h, w, (((2,), (0,)), ((), ())))


def rope_cos_sin(cfg: GemmaTextConfig, positions: jax.Array, theta: float, factor: float):
    """cos/sin `[batch, seq, head_dim]` for positions `[batch, seq]` (rotate_half layout, fp32)."""
    d = cfg.head_dim
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d)) / factor
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys and values: the global layers' `[global layers + 1, batch, cache_len, kv_heads, head_dim]`, the sliding
    layers' rings `[sliding layers + 1, batch, ring, kv_heads, head_dim]` of ring = min(sliding_window, cache_len)
    slots (slot s holds the latest token whose cache slot is s modulo ring). The last entry of each is scratch: in a
    scan over the layers a layer of the other kind writes there, so that every layer writes both without branching
    (generation's unrolled step knows each layer's kind and writes its own entry only)."""
    k_global: jax.Array
    v_global: jax.Array
    k_local: jax.Array
    v_local: jax.Array


def cache_indices(cfg: GemmaTextConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per layer: its entry in the global and in the sliding cache (the scratch entry for the other kind)."""
    sliding = np.asarray(cfg.sliding)
    n_local, n_global = int(sliding.sum()), int((~sliding).sum())
    global_index = np.where(sliding, n_global, np.cumsum(~sliding) - 1)
    local_index = np.where(sliding, np.cumsum(sliding) - 1, n_local)
    return global_index.astype(np.int32), local_index.astype(np.int32)


class Attention(nnx.Module):
    SIBLINGS = (("q_proj", "k_proj", "v_proj"),)  # what __call__ passes to layers.sibling_linears

    def __init__(self, cfg: GemmaTextConfig, dtype, stack):
        d, hd = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
        self.scale = cfg.query_pre_attn_scalar ** -0.5
        self.q_proj = Linear(d, cfg.num_heads * hd, bias=False, dtype=dtype, stack=stack)
        self.k_proj = Linear(d, cfg.num_kv_heads * hd, bias=False, dtype=dtype, stack=stack)
        self.v_proj = Linear(d, cfg.num_kv_heads * hd, bias=False, dtype=dtype, stack=stack)
        self.o_proj = Linear(cfg.num_heads * hd, d, bias=False, dtype=dtype, stack=stack)
        self.q_norm = GemmaRMSNorm(hd, eps=cfg.rms_norm_eps, dtype=dtype, stack=stack)
        self.k_norm = GemmaRMSNorm(hd, eps=cfg.rms_norm_eps, dtype=dtype, stack=stack)

    def __call__(self, x, cos, sin, mask, cache=None):
        """Self-attention over `x [batch, seq, hidden]` with `mask` (a CausalBlockMask). With `cache` (a `LayerCache`)
        the step's keys and values are also written to the cache, and a one-token step (decode) attends to the
        cache instead (its layer's entry: the whole cache for a global layer, the ring for a sliding one).
        Returns (out, cache)."""
        b, t, _ = x.shape
        q, k, v = sibling_linears(x, (self.q_proj, self.k_proj, self.v_proj))
        q = self.q_norm(q.reshape(b, t, self.num_heads, -1))
        k = self.k_norm(k.reshape(b, t, self.num_kv_heads, -1))
        v = v.reshape(b, t, self.num_kv_heads, -1)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is None:
            return self.o_proj(attention(q, k, v, mask, scale=self.scale).reshape(b, t, -1)), None
        if cache.prefill:  # the prompt attends to itself: its keys are all here
            cache = cache.write(k, v)
            out = attention(q, k, v, mask, scale=self.scale)
        else:
            out, cache = cache.step(q, k, v, self.scale)
        return self.o_proj(out.reshape(b, t, -1)), cache


def _static(is_sliding) -> bool:
    """Whether a layer's kind is known at trace time (a NumPy bool: the unrolled loop), not traced (a scan)."""
    return isinstance(is_sliding, (bool, np.bool_))


@dataclasses.dataclass
class LayerCache:
    """One layer's view of the KVCache inside the layer loop: where it writes, what it reads. Its kind and entries
    are traced in a scan over the layers, static (NumPy scalars) when the loop is unrolled (generation's step)."""
    caches: tuple  # (k_global, v_global, k_local, v_local), all layers
    is_sliding: jax.Array | np.bool_
    global_index: jax.Array | np.integer
    local_index: jax.Array | np.integer
    index: object  # the step's first cache slot (an int for the prefill, traced in decode; [batch]: each row's)
    key_mask: jax.Array  # [batch, cache_len]
    prefill: bool

    def write(self, k, v):
        kg, vg, kl, vl = self.caches
        t, ring = k.shape[1], kl.shape[2]
        kg, vg = (write_step(c, a, self.index, (self.global_index,)) for c, a in ((kg, k), (vg, v)))
        if self.prefill:  # the prompt at slots 0..t-1: its last `ring` tokens, each at its slot modulo ring
            if t >= ring:
                k, v = (jnp.roll(a[:, t - ring:], (t - ring) % ring, axis=1) for a in (k, v))
            slot = 0
        else:  # one token
            slot = self._ring_slot()
        kl, vl = (write_step(c, a, slot, (self.local_index,)) for c, a in ((kl, k), (vl, v)))
        return dataclasses.replace(self, caches=(kg, vg, kl, vl))

    def _ring_slot(self) -> jax.Array:
        """Where a one-token step goes in the ring: its cache slot modulo the ring (each row's, when index is
        [batch])."""
        return jnp.asarray(self.index, jnp.int32) % self.caches[2].shape[2]

    def _global_mask(self) -> jax.Array:
        """bool [batch, 1, 1, cache_len]: the global cache's slots up to the step's, that hold real tokens."""
        index = query_slots(1, self.index)  # [batch or 1, 1]: the step's slot, each row's or one for all
        return ((jnp.arange(self.key_mask.shape[1]) <= index) & (self.key_mask > 0))[:, None, None, :]

    def _ring_mask(self) -> jax.Array:
        """bool [batch, 1, 1, ring]: the ring entries that hold real tokens of the window up to the step's slot."""
        index = query_slots(1, self.index)
        batch, keys = self.key_mask.shape
        ring = self.caches[2].shape[2]
        # The cache slot each ring entry holds (negative: never written).
        slot = index - (index - jnp.arange(ring)) % ring
        slot = jnp.broadcast_to(slot, (batch, ring))
        ok = (slot >= 0) & (jnp.take_along_axis(self.key_mask, jnp.clip(slot, 0, keys - 1), axis=1) > 0)
        return ok[:, None, None, :]

    def step(self, q, k, v, scale):
        """A one-token step: k, v written and q attending this layer's entry. Returns (out, LayerCache). A static kind
        writes its own entry only and goes through `layers.cached_attention` (the decode kernel where it takes the
        step: the writes and the attention in one kernel); a traced one writes both kinds' entries (the other's
        scratch) and picks its attention with a `lax.cond`."""
        kg, vg, kl, vl = self.caches
        if _static(self.is_sliding):
            if self.is_sliding:
                out, (kl, vl) = cached_attention(q, k, v, (kl, vl), self._ring_slot(), int(self.local_index),
                                                 self._ring_mask(), scale)
            else:
                out, (kg, vg) = cached_attention(q, k, v, (kg, vg), self.index, int(self.global_index),
                                                 self._global_mask(), scale)
            return out, dataclasses.replace(self, caches=(kg, vg, kl, vl))
        view = self.write(k, v)
        kg, vg, kl, vl = view.caches

        def global_attention():
            return attention(q, kg[self.global_index], vg[self.global_index], self._global_mask(), scale=scale)

        def sliding_attention():
            return attention(q, kl[self.local_index], vl[self.local_index], self._ring_mask(), scale=scale)

        return jax.lax.cond(self.is_sliding, sliding_attention, global_attention), view


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: GemmaTextConfig, dtype, stack):
        d, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = Attention(cfg, dtype, stack)
        self.mlp = GatedMLP(d, cfg.intermediate_size, cfg.hidden_act, bias=False, dtype=dtype, stack=stack)
        self.input_layernorm = GemmaRMSNorm(d, eps=eps, dtype=dtype, stack=stack)
        self.post_attention_layernorm = GemmaRMSNorm(d, eps=eps, dtype=dtype, stack=stack)
        self.pre_feedforward_layernorm = GemmaRMSNorm(d, eps=eps, dtype=dtype, stack=stack)
        self.post_feedforward_layernorm = GemmaRMSNorm(d, eps=eps, dtype=dtype, stack=stack)

    def __call__(self, x, cos, sin, mask, cache=None):
        attn, cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        x = x + self.post_attention_layernorm(attn)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x))), cache


class GemmaTextModel(nnx.Module):
    """`embed_tokens`, `layers` (stacked, each sliding or global), `norm`."""

    def __init__(self, cfg: GemmaTextConfig, dtype):
        self.cfg = cfg
        self.remat = None
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.layers = DecoderLayer(cfg, dtype, stack=(cfg.num_layers,))
        self.norm = GemmaRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)

    def embed(self, ids: jax.Array) -> jax.Array:
        """Token embeddings times sqrt(hidden), the scale rounded to the compute dtype as in transformers."""
        h = self.embed_tokens(ids)
        return h * jnp.asarray(math.sqrt(self.cfg.hidden_size), h.dtype)

    def __call__(self, h, positions, blocks, key_mask, cache: KVCache | None = None, index=0):
        """Final hidden states from input embeddings `h [batch, seq, hidden]` at `positions [batch, seq]`.

        `blocks [batch, seq]`: image runs (`image_blocks`). Without a cache `key_mask [batch, seq]` marks the real
        tokens. With one, `key_mask [batch, cache_len]` marks the cache slots that hold real tokens; a prompt
        (`index` 0, an int) is written to slots 0..seq-1, a one-token step to slot `index`. Returns (hidden, cache).
        """
        c = self.cfg
        t = h.shape[1]
        mask_over = key_mask if cache is None else key_mask[:, :t]
        prefill = cache is None or (isinstance(index, int) and index == 0)
        if cache is not None and not prefill and t != 1:
            raise ValueError(f"a step of {t} tokens at cache slot {index}: only a prompt (at slot 0) or one token at a "
                             f"time is supported")
        local = rope_cos_sin(c, positions, c.rope_local_theta, 1.0)
        glob = rope_cos_sin(c, positions, c.rope_global_theta, c.rope_global_factor)

        def pick(is_sliding):
            if _static(is_sliding):  # a layer of the unrolled loop
                cos, sin = local if is_sliding else glob
            else:
                cos, sin = (jnp.where(is_sliding, a, g) for a, g in zip(local, glob))
            # A prompt's mask as per-token arrays (no [seq, seq] mask on the GPU's kernel path); a decode step
            # builds its masks over the cache (LayerCache.step).
            mask = CausalBlockMask(mask_over, blocks, is_sliding, c.sliding_window) if prefill else None
            return cos, sin, mask

        sliding = np.asarray(c.sliding)  # NumPy: static per layer when the loop is unrolled
        if cache is None:
            def layer_step(layer, x, is_sliding):
                return layer(x, *pick(is_sliding))[0], None

            h, _ = scan_blocks(self.layers, h, layer_step, sliding, remat=self.remat)
            return self.norm(h), None

        def layer_step(layer, carry, is_sliding, global_index, local_index):
            x, caches = carry
            view = LayerCache(caches, is_sliding, global_index, local_index, index, key_mask, prefill and t > 1)
            x, view = layer(x, *pick(is_sliding), view)
            return (x, view.caches), None

        global_index, local_index = cache_indices(c)
        carry = (h, (cache.k_global, cache.v_global, cache.k_local, cache.v_local))
        (h, caches), _ = scan_blocks(self.layers, carry, layer_step, sliding, global_index, local_index)
        return self.norm(h), KVCache(*caches)


class Gemma3Model(nnx.Module):
    def __init__(self, cfg: Gemma3Config, dtype):
        self.vision_tower = SiglipVisionTower(cfg.vision, dtype)
        self.multi_modal_projector = MultiModalProjector(cfg, dtype)
        self.language_model = GemmaTextModel(cfg.text, dtype)


_CHAT_TEMPLATE = (
    # Gemma 3's template: <bos>, a system message folded into the first user turn, assistant -> model,
    # each image as <start_of_image> (the processor expands it), texts trimmed.
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% if messages[0]['content'] is string %}{% set first_user_prefix = messages[0]['content'] + '\n\n' %}"
    "{% else %}{% set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' %}{% endif %}"
    "{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n{{ first_user_prefix if loop.first else '' }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<start_of_image>"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


class Gemma3ForConditionalGeneration(VisionLanguageModel):
    """Gemma 3: `model.vision_tower`, `model.multi_modal_projector`, `model.language_model`, `lm_head` (absent
    when tied, as in the released checkpoints)."""

    INFO = FamilyInfo(
        model_types=(MODEL_TYPE,),
        stacked=("model.language_model.layers", "model.vision_tower.encoder.layers"),
        # The hub's checkpoints (transformers 4.x) and transformers 5's save_pretrained: the language model under
        # language_model.model, the tower under vision_tower.vision_model (4.x) or vision_tower (5).
        legacy_keys=((r"^language_model\.model\.", "model.language_model."),
                     (r"^language_model\.lm_head\.", "lm_head."),
                     (r"^vision_tower\.vision_model\.", "model.vision_tower."),
                     (r"^vision_tower\.", "model.vision_tower."),
                     (r"^multi_modal_projector\.", "model.multi_modal_projector.")),
        # Exports write the hub's names, which transformers 4.x and 5 both read.
        export_keys=((r"^model\.language_model\.", "language_model.model."),
                     (r"^lm_head\.", "language_model.lm_head."),
                     (r"^model\.vision_tower\.", "vision_tower.vision_model."),
                     (r"^model\.multi_modal_projector\.", "multi_modal_projector.")),
        ignored_keys=(),
        # Unsloth keeps the SigLIP tower and the projector 16-bit (SKIP_QUANTIZATION_MODULES), and lm_head.
        quant_skip=("lm_head", "multi_modal_projector", "vision_tower"),
        processor_classes=((MODEL_TYPE, "Gemma3Processor"),),
        vision_tokens=("<start_of_image>", "<end_of_image>", "<image_soft_token>"),
        instruction_part=USER_TURN,
        response_part=MODEL_TURN,
    )
    TINY = TinySpec(
        special_tokens={"<pad>": 285, "<eos>": 286, "<bos>": 287, "<start_of_image>": 288, "<end_of_image>": 289,
                        "<image_soft_token>": 290, "<start_of_turn>": 291, "<end_of_turn>": 292},
        pad_token="<pad>", eos_token="<end_of_turn>", bos_token="<bos>",
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                              "image_token": "<image_soft_token>"},
        chat_template=_CHAT_TEMPLATE,
        # 28-pixel images of 7-pixel patches: 16 patches pooled to 4 tokens (the processor's image_seq_length).
        image_processor={
            "image_processor_type": "Gemma3ImageProcessor", "size": {"height": 28, "width": 28}, "resample": 2,
            "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_convert_rgb": None,
            "do_pan_and_scan": None},
        processor={"image_seq_length": 4},
    )

    PIXEL_BUCKET_MIN = 1  # pixel_values rows are whole images: the collator pads to 1, 2, 3, 4, 6, 8, ... images

    def __init__(self, cfg: Gemma3Config, dtype=jnp.bfloat16):
        super().__init__(cfg, dtype)
        self.model = Gemma3Model(cfg, dtype)
        self.lm_head = (None if cfg.tie_word_embeddings else
                        Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False, dtype=dtype))

    @classmethod
    def config_from_hf(cls, hf_config) -> Gemma3Config:
        return from_hf(hf_config)

    @classmethod
    def resolve_dtype(cls, dtype):
        """Gemma 3's activations overflow float16 (as Unsloth says, and uses bfloat16 instead): so do we."""
        if jnp.dtype(dtype) == jnp.float16:
            warnings.warn("Gemma 3 does not run in float16 (its activations overflow it); using bfloat16", stacklevel=3)
            return jnp.bfloat16
        return dtype

    @classmethod
    def tiny_config(cls, model_type: str, size: str = "test", **text_overrides):
        """Both layer kinds, a 7-token sliding window (shorter than the tests' sequences, longer than an image's 4
        tokens), head_dim x heads != hidden, query_pre_attn_scalar != head_dim, linear rope scaling on the
        global layers, untied head unless asked."""
        import transformers
        tokens = cls.TINY.special_tokens
        text = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=24, query_pre_attn_scalar=20, sliding_window=7,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                    rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                     "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}},
                    max_position_embeddings=1024, rms_norm_eps=1e-6, pad_token_id=tokens["<pad>"],
                    eos_token_id=tokens["<end_of_turn>"], bos_token_id=tokens["<bos>"])
        if size == "demo":
            text.update(hidden_size=128, intermediate_size=256, num_hidden_layers=6, head_dim=32, sliding_window=64,
                        query_pre_attn_scalar=32,
                        layer_types=["sliding_attention"] * 2 + ["full_attention"] + ["sliding_attention"] * 2
                        + ["full_attention"])
        tie = text_overrides.pop("tie_word_embeddings", True)
        text.update(text_overrides)
        vision = dict(hidden_size=32 if size == "test" else 64, intermediate_size=48 if size == "test" else 128,
                      num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=7, layer_norm_eps=1e-6,
                      vision_use_head=False)
        return transformers.Gemma3Config(
            text_config=text, vision_config=vision, mm_tokens_per_image=4, boi_token_index=tokens["<start_of_image>"],
            eoi_token_index=tokens["<end_of_image>"], image_token_index=tokens["<image_soft_token>"],
            tie_word_embeddings=tie)

    # Batches padded to one length and one image count have one shape.
    PER_SHARD_INPUTS = True

    def prepare_inputs(self, **processor_outputs) -> dict[str, np.ndarray]:
        return prepare_inputs(self.config, **processor_outputs)

    def pixel_row_shape(self, image_processor) -> tuple[int, ...]:
        v = self.config.vision
        return (v.num_channels, v.image_size, v.image_size)

    def embed(self, inputs: dict[str, jax.Array]) -> jax.Array:
        lm = self.model.language_model
        h = lm.embed(inputs["input_ids"])
        if "patches" in inputs:
            feats = self.model.multi_modal_projector(self.model.vision_tower(inputs["patches"], h.dtype))
            h = scatter_rows(h, inputs["image_pos"], feats)
        return h

    def hidden_states(self, inputs: dict[str, jax.Array]) -> jax.Array:
        h, _ = self.model.language_model(self.embed(inputs), inputs["positions"], inputs["blocks"],
                                         inputs["attention_mask"])
        return h

    def logits(self, h: jax.Array) -> jax.Array:
        if self.lm_head is None:
            out = linear(h, self.model.language_model.embed_tokens.weight.get_value())
        else:
            out = self.lm_head(h)
        cap = self.config.text.final_logit_softcapping
        if cap:
            out = (jnp.tanh(out.astype(jnp.float32) / cap) * cap).astype(out.dtype)
        return out

    # -- generation ------------------------------------------------------------------------------

    @property
    def max_positions(self) -> int | None:
        return self.config.text.max_position_embeddings

    def init_cache(self, batch: int, length: int) -> KVCache:
        """Global layers: `length` slots each; sliding layers: a ring of min(sliding_window, length) slots."""
        t = self.config.text
        n_local = sum(t.sliding)
        ring = min(t.sliding_window, length)
        full = (t.num_layers - n_local + 1, batch, length, t.num_kv_heads, t.head_dim)
        local = (n_local + 1, batch, ring, t.num_kv_heads, t.head_dim)
        return KVCache(*(jnp.zeros(shape, self.dtype) for shape in (full, full, local, local)))

    def prefill(self, inputs, cache, key_mask):
        return self.model.language_model(self.embed(inputs), inputs["positions"], inputs["blocks"], key_mask,
                                         cache, 0)

    def decode(self, tokens, positions, cache, key_mask, index):
        lm = self.model.language_model
        return lm(lm.embed(tokens[:, None]), positions[:, None], jnp.full((tokens.shape[0], 1), -1, jnp.int32),
                  key_mask, cache, index)

    def next_positions(self, inputs) -> np.ndarray:
        return (np.asarray(inputs["positions"]).max(axis=1) + 1).astype(np.int32)
