"""The Llama 3.2 Vision (Mllama) vision encoder: transformers' `MllamaVisionModel`, a building block of `mllama`.

Each image arrives from `MllamaImageProcessor` cut into `max_num_tiles` square tiles of `image_size` pixels (tiles
past the image's own count are zeros and switched off in `aspect_ratio_mask`). Per tile: the patch convolution (no
bias; a product with its flattened kernel on host-cut patches, `prepare_vision_inputs`), a gated tile embedding
chosen by the image's aspect-ratio id (`pre_tile_positional_embedding`), a class token in front, a gated mix of a
learned position embedding and a per-aspect-ratio tile-position table (`gated_positional_embedding`), and
`layernorm_pre`. Each tile's tokens are then zero-padded to a multiple of 8 and the tiles of one image are laid end
to end into ONE sequence: both encoders attend across all tiles of an image. Then the local encoder
(`transformer.layers`: pre-norm layers, no gates), `layernorm_post`, a second gated tile embedding
(`post_tile_positional_embedding`) and the global encoder (`global_transformer.layers`: the same layers with
tanh-gated residual branches, `gate_attn` / `gate_ffn`); no norm after it. The output is the global encoder's
state concatenated with the local encoder's outputs at `intermediate_layers_indices` (before `layernorm_post`),
these interleaved as transformers stacks them (feature d of tap k at d * taps + k), padding tokens dropped:
`[batch, images, tiles, 1 + patches, hidden * (1 + taps)]` (class token first).

Attention mask (transformers' `_prepare_aspect_ratio_attention_mask`, kept as is): a token is "masked" when it is a
padding token or lies in a tile that `aspect_ratio_mask` switches off; only pairs where BOTH the query and the key
are masked are excluded. Real tokens therefore also attend to padding tokens and to the switched-off tiles, as in
the reference.

Attribute paths mirror transformers' names relative to `MllamaVisionModel` (`patch_embedding.weight`,
`gated_positional_embedding.tile_embedding.weight`, `transformer.layers.self_attn.q_proj.weight`,
`global_transformer.layers.gate_attn`), the two encoders each stacked along a leading layer axis (`STACKED`).
"""
from __future__ import annotations

import dataclasses
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxvlm.layers import (
    ACTIVATIONS,
    ConvWeight,
    Embedding,
    FeedForward,
    LayerNorm,
    Linear,
    attention,
    dropout_key,
    gather_rows,
    linear,
    next_dropout_key,
    scan_blocks,
    sibling_linears,
)
from jaxvlm.models.base import ConfigError
from jaxvlm.paths import per_layer_keys

# The stacked blocks (HF module paths relative to MllamaVisionModel; see jaxvlm.paths).
STACKED = ("transformer.layers", "global_transformer.layers")

# transformers' nn.LayerNorm(hidden_size) for layernorm_pre / layernorm_post: the default eps, not config.norm_eps.
OUTER_NORM_EPS = 1e-5

# How the encoders apply transformers' mask (only pairs of two masked tokens excluded): "split" (the default) needs
# no [tokens, tokens] array (`SplitMask`, `split_attention`); "dense" hands `attention` the mask, [images, 1, tokens,
# tokens] (cuDNN reads it as a bias, for every head). H200, 11B geometry, bf16 (docs/BENCHMARKS.md, "Llama 3.2
# Vision: the vision attention without its mask"): the LoRA training step at batch 4 1.448 -> 1.097 s, a 64-image
# generate call 5.60 -> 4.27 s. Read at trace time.
vision_attention = os.environ.get("JAXVLM_MLLAMA_VISION_ATTENTION", "split")


@dataclasses.dataclass(frozen=True)
class MllamaVisionConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int  # local encoder (`transformer.layers`)
    num_global_layers: int  # gated global encoder (`global_transformer.layers`)
    num_heads: int
    num_channels: int
    image_size: int  # tile side in pixels
    patch_size: int
    hidden_act: str
    norm_eps: float  # the encoder layers' norms
    max_num_tiles: int
    max_aspect_ratio_id: int  # len(supported_aspect_ratios); id 0 stands for "no image" (batch padding)
    intermediate_layers_indices: tuple[int, ...]  # local layers (0-based, outputs) concatenated to the output

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Tokens per tile: the patches plus the class token (transformers' `num_patches`)."""
        return self.patches_per_side ** 2 + 1

    @property
    def padded_patches(self) -> int:
        """Tokens per tile inside the encoders: `num_patches` rounded up to a multiple of 8."""
        return -(-self.num_patches // 8) * 8

    @property
    def patch_dim(self) -> int:
        return self.num_channels * self.patch_size * self.patch_size

    @property
    def output_dim(self) -> int:
        """Width of the output (the config's `vision_output_dim`, the multi_modal_projector's input)."""
        return self.hidden_size * (1 + len(self.intermediate_layers_indices))


def vision_config_from_hf(v, where: str = "vision_config") -> MllamaVisionConfig:
    """Our config from a transformers MllamaVisionConfig; ConfigError naming the field we cannot take."""
    def field(name, default=None):
        return getattr(v, name, default)

    def side(name):
        value = field(name)
        if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
            value = value[0]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{where}.{name}={value!r}: expected a positive int (square tiles and patches)")
        return value

    image_size, patch_size = side("image_size"), side("patch_size")
    if image_size % patch_size:
        raise ConfigError(f"{where}.image_size={image_size}: expected a multiple of patch_size={patch_size}")
    if field("hidden_act") not in ACTIVATIONS:
        raise ConfigError(f"{where}.hidden_act={field('hidden_act')!r}: expected one of {sorted(ACTIVATIONS)}")
    heads = field("attention_heads", field("num_attention_heads"))
    if not heads or v.hidden_size % heads:
        raise ConfigError(f"{where}.attention_heads={heads}: expected a divisor of hidden_size={v.hidden_size}")
    layers, global_layers = v.num_hidden_layers, field("num_global_layers", 0)
    if layers < 1:
        raise ConfigError(f"{where}.num_hidden_layers={layers}: expected at least 1")
    if global_layers < 0:
        raise ConfigError(f"{where}.num_global_layers={global_layers}: expected 0 or more")
    if field("max_num_tiles", 0) < 1:
        raise ConfigError(f"{where}.max_num_tiles={field('max_num_tiles')}: expected at least 1")
    ratios = field("supported_aspect_ratios")
    if not ratios:
        raise ConfigError(f"{where}.supported_aspect_ratios={ratios!r}: expected a non-empty list")
    taps = field("intermediate_layers_indices")
    if taps is None or not all(isinstance(i, int) and -layers <= i < layers for i in taps):
        # transformers indexes the tuple of the local layers' outputs with them (Python indexing)
        raise ConfigError(f"{where}.intermediate_layers_indices={taps!r}: expected local layer indices in "
                          f"[-{layers}, {layers})")
    taps = tuple(i % layers for i in taps)
    out = v.hidden_size * (1 + len(taps))
    vision_output_dim = field("vision_output_dim", out)
    if vision_output_dim != out:
        raise ConfigError(f"{where}.vision_output_dim={vision_output_dim}: the encoder outputs hidden_size * "
                          f"(1 + len(intermediate_layers_indices)) = {out} features")
    return MllamaVisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=layers,
        num_global_layers=global_layers, num_heads=heads, num_channels=v.num_channels, image_size=image_size,
        patch_size=patch_size, hidden_act=v.hidden_act, norm_eps=float(v.norm_eps),
        max_num_tiles=v.max_num_tiles, max_aspect_ratio_id=len(ratios), intermediate_layers_indices=taps)


# ----------------------------------------------------------------------------------------------
# Host-side input preparation.


def _padding_tokens(cfg: MllamaVisionConfig, tiles: int) -> np.ndarray:
    """bool [tiles * padded_patches]: the tokens that pad each tile's `num_patches` up to `padded_patches`."""
    return np.tile(np.arange(cfg.padded_patches) >= cfg.num_patches, tiles)


def prepare_vision_inputs(cfg: MllamaVisionConfig, pixel_values, aspect_ratio_ids, aspect_ratio_mask
                          ) -> dict[str, np.ndarray]:
    """The arrays `MllamaVisionModel.__call__` takes, from what MllamaImageProcessor returns.

    pixel_values [batch, images, tiles, channels, size, size] (tiles = max_num_tiles), aspect_ratio_ids
    [batch, images] (0 = padding image), aspect_ratio_mask [batch, images, tiles] (1 = real tile). Returns
      patches float32 [batch, images, tiles, patches, channels * patch * patch]: each tile's patches row by row,
        each flattened as the convolution's kernel is (channel, row, column);
      aspect_ratio_ids int32 [batch, images];
      token_valid bool [batch, images, tiles * padded_patches]: per token of an image's encoder sequence, False
        for padding tokens and for the tokens of tiles that aspect_ratio_mask switches off.
    """
    x = np.asarray(pixel_values, np.float32)
    c, s, t = cfg.num_channels, cfg.image_size, cfg.max_num_tiles
    if x.ndim != 6 or x.shape[2:] != (t, c, s, s):
        raise ValueError(f"pixel_values has shape {tuple(x.shape)}; expected [batch, images, {t}, {c}, {s}, {s}] "
                         f"(max_num_tiles={t}, num_channels={c}, image_size={s})")
    b, m = x.shape[:2]
    ids = np.asarray(aspect_ratio_ids)
    if ids.shape != (b, m):
        raise ValueError(f"aspect_ratio_ids has shape {tuple(ids.shape)}; expected {(b, m)}")
    if ids.size and (ids.min() < 0 or ids.max() > cfg.max_aspect_ratio_id):
        raise ValueError(f"aspect_ratio_ids range over [{ids.min()}, {ids.max()}]; expected ids in "
                         f"[0, {cfg.max_aspect_ratio_id}] (len(supported_aspect_ratios)={cfg.max_aspect_ratio_id})")
    mask = np.asarray(aspect_ratio_mask)
    if mask.shape != (b, m, t):
        raise ValueError(f"aspect_ratio_mask has shape {tuple(mask.shape)}; expected {(b, m, t)}")
    if not np.isin(mask, (0, 1)).all():
        raise ValueError("aspect_ratio_mask: expected only 0 and 1")
    p, g = cfg.patch_size, cfg.patches_per_side
    patches = x.reshape(b, m, t, c, g, p, g, p).transpose(0, 1, 2, 4, 6, 3, 5, 7)
    patches = np.ascontiguousarray(patches.reshape(b, m, t, g * g, c * p * p))
    token_valid = (mask.astype(bool)[..., None] & ~_padding_tokens(cfg, 1)).reshape(b, m, t * cfg.padded_patches)
    return {"patches": patches, "aspect_ratio_ids": ids.astype(np.int32), "token_valid": token_valid}


# ----------------------------------------------------------------------------------------------
# Modules.


def _param(shape, dtype) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, dtype))


def _tanh(gate: nnx.Param, dtype) -> jax.Array:
    return jnp.tanh(gate.get_value().astype(jnp.float32)).astype(dtype)


class PrecomputedAspectRatioEmbedding(nnx.Module):
    """Per aspect-ratio id, one gated vector per tile added to all of the tile's tokens: `embedding.weight
    [max_aspect_ratio_id + 1, tiles * hidden]`, `gate [1]` (tanh)."""

    def __init__(self, cfg: MllamaVisionConfig, dtype):
        self.embedding = Embedding(cfg.max_aspect_ratio_id + 1, cfg.max_num_tiles * cfg.hidden_size, dtype=dtype)
        self.gate = _param((1,), dtype)
        self.tiles = cfg.max_num_tiles

    def __call__(self, h: jax.Array, aspect_ratio_ids: jax.Array) -> jax.Array:
        """h [images, tiles, tokens, hidden]; aspect_ratio_ids [images]."""
        e = self.embedding(aspect_ratio_ids).reshape(-1, self.tiles, 1, h.shape[-1]).astype(h.dtype)
        return h + e * _tanh(self.gate, h.dtype)


class PrecomputedPositionEmbedding(nnx.Module):
    """(1 - tanh(gate)) * embedding [num_patches, hidden] + tanh(gate) * a per-aspect-ratio table of every tile's
    tokens, `tile_embedding.weight [max_aspect_ratio_id + 1, tiles * num_patches * hidden]`."""

    def __init__(self, cfg: MllamaVisionConfig, dtype):
        self.gate = _param((1,), dtype)
        self.embedding = _param((cfg.num_patches, cfg.hidden_size), dtype)
        self.tile_embedding = Embedding(cfg.max_aspect_ratio_id + 1,
                                        cfg.max_num_tiles * cfg.num_patches * cfg.hidden_size, dtype=dtype)
        self.tiles = cfg.max_num_tiles

    def __call__(self, h: jax.Array, aspect_ratio_ids: jax.Array) -> jax.Array:
        """h [images, tiles, num_patches, hidden]; aspect_ratio_ids [images]."""
        gate = _tanh(self.gate, h.dtype)
        h = h + (1 - gate) * self.embedding.get_value().astype(h.dtype)
        tile = self.tile_embedding(aspect_ratio_ids).reshape(h.shape[0], self.tiles, *h.shape[2:]).astype(h.dtype)
        return h + gate * tile


class SplitMask(NamedTuple):
    """transformers' encoder mask as `split_attention` applies it. `valid` bool [images, tokens]: the real tokens
    (not padding, in a tile that is on); `real` int32 [images]: their count; `order`, `inverse` int32 [images, tokens]
    and [images * tokens]: each image's tokens with the real ones first (flat row indices, and where each row went:
    `gather_rows`' arguments); `masked_order`, `masked_inverse`: the same with the masked ones first; `all_on` bool
    []: every tile of every image is on (the masked tokens are then the tiles' padding tokens alone, at the positions
    `pads` (NumPy, static), the others at `kept`)."""
    valid: jax.Array
    real: jax.Array
    order: jax.Array
    inverse: jax.Array
    masked_order: jax.Array
    masked_inverse: jax.Array
    all_on: jax.Array
    pads: np.ndarray
    kept: np.ndarray


def _rows_first(first: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(flat row indices [n, t], where each row went [n * t]) of each image's tokens with those where `first` [n, t]
    holds first, each group in its order."""
    n, t = first.shape
    rows = jnp.argsort(~first, axis=1, stable=True).astype(jnp.int32) + (jnp.arange(n, dtype=jnp.int32) * t)[:, None]
    return rows, jnp.zeros(n * t, jnp.int32).at[rows.reshape(-1)].set(jnp.arange(n * t, dtype=jnp.int32))


def split_mask(cfg: MllamaVisionConfig, valid: jax.Array) -> SplitMask:
    """The SplitMask of `valid` [images, tiles * padded_patches] (`prepare_vision_inputs`' token_valid)."""
    padding = _padding_tokens(cfg, valid.shape[1] // cfg.padded_patches)
    return SplitMask(valid, valid.sum(axis=1).astype(jnp.int32), *_rows_first(valid), *_rows_first(~valid),
                     jnp.all(valid | padding), np.flatnonzero(padding), np.flatnonzero(~padding))


def split_attention(q, k, v, m: SplitMask) -> jax.Array:
    """transformers' masked encoder attention without a [tokens, tokens] mask: a real query attends every key, a
    masked one (padding, or in a tile that is off) the real keys only. When every tile is on, the masked queries
    are the tiles' padding tokens (static positions): every query over every key, then those again over the other
    tokens. Otherwise each image's real queries are gathered to the front and attend every key, its masked queries
    are gathered to the front and attend its real keys (gathered to the front too), both with the counts as
    `attention`'s lengths (cuDNN's sequence lengths: about real x all + masked x real query-key pairs rather than
    twice all x all), and the rows are gathered back. H200, 11B LoRA step at batch 4, every second image at 2 of 4
    tiles: 1.18 s against 1.35 s for every query twice, at a peak 1.1 GiB above that form's whatever the tiles
    (docs/BENCHMARKS.md)."""

    def padding_only():
        out = attention(q, k, v)
        return out.at[:, m.pads].set(attention(q[:, m.pads], k[:, m.kept], v[:, m.kept]))

    def with_off_tiles():
        n, t = k.shape[:2]
        flat = lambda x: x.reshape(n * t, *x.shape[2:])  # noqa: E731
        real_first = [gather_rows(flat(x), m.order, m.inverse) for x in (q, k, v)]
        real = attention(real_first[0], k, v, lengths=m.real, key_lengths=jnp.full_like(m.real, t))
        masked = attention(gather_rows(flat(q), m.masked_order, m.masked_inverse), *real_first[1:],
                           lengths=t - m.real, key_lengths=m.real)
        back = [gather_rows(flat(x), index.reshape(n, t), rows.reshape(-1))
                for x, index, rows in ((real, m.inverse, m.order), (masked, m.masked_inverse, m.masked_order))]
        return jnp.where(m.valid[:, :, None, None], *back)

    return jax.lax.cond(m.all_on, padding_only, with_off_tiles)


class SelfAttention(nnx.Module):
    SIBLINGS = (("q_proj", "k_proj", "v_proj"),)  # what __call__ passes to layers.sibling_linears

    def __init__(self, cfg: MllamaVisionConfig, dtype, stack):
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.q_proj = Linear(d, d, bias=False, dtype=dtype, stack=stack)
        self.k_proj = Linear(d, d, bias=False, dtype=dtype, stack=stack)
        self.v_proj = Linear(d, d, bias=False, dtype=dtype, stack=stack)
        self.o_proj = Linear(d, d, bias=False, dtype=dtype, stack=stack)

    def __call__(self, x: jax.Array, mask: jax.Array | SplitMask) -> jax.Array:
        n, t, _ = x.shape
        q, k, v = (y.reshape(n, t, self.num_heads, -1)
                   for y in sibling_linears(x, (self.q_proj, self.k_proj, self.v_proj)))
        out = split_attention(q, k, v, mask) if isinstance(mask, SplitMask) else attention(q, k, v, mask)
        return self.o_proj(out.reshape(n, t, -1))



class EncoderLayer(nnx.Module):
    """Pre-norm attention + MLP; `gated` (the global encoder): each branch scaled by tanh of `gate_attn [*stack, 1]`
    / `gate_ffn [*stack, 1]` before its residual add."""

    def __init__(self, cfg: MllamaVisionConfig, dtype, stack, *, gated: bool):
        self.self_attn = SelfAttention(cfg, dtype, stack)
        self.mlp = FeedForward(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, dtype=dtype, stack=stack)
        self.input_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, dtype=dtype, stack=stack)
        self.post_attention_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, dtype=dtype, stack=stack)
        self.gated = gated
        if gated:
            self.gate_attn = _param((*stack, 1), dtype)
            self.gate_ffn = _param((*stack, 1), dtype)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        h = self.self_attn(self.input_layernorm(x), mask)
        if self.gated:
            h = _tanh(self.gate_attn, h.dtype) * h
        x = x + h
        h = self.mlp(self.post_attention_layernorm(x))
        if self.gated:
            h = _tanh(self.gate_ffn, h.dtype) * h
        return x + h


class Encoder(nnx.Module):
    def __init__(self, cfg: MllamaVisionConfig, dtype, num_layers: int, *, gated: bool):
        self.layers = EncoderLayer(cfg, dtype, stack=(num_layers,), gated=gated)


def _layer_slice(stack: nnx.Module, start: int, stop: int) -> nnx.Module:
    """Layers start..stop-1 of a stacked module (every array leaf, whatever the weight type, has the layer axis)."""
    graphdef, state = nnx.split(stack)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[start:stop], state))


class MllamaVisionModel(nnx.Module):
    """transformers' MllamaVisionModel: tiles of images -> `[batch, images, tiles, num_patches, output_dim]`."""

    def __init__(self, cfg: MllamaVisionConfig, dtype):
        self.cfg = cfg
        self.remat = None  # a REMAT_POLICIES name while training (set by FastVisionModel.for_training)
        d = cfg.hidden_size
        # The patch Conv2d (no bias): not a Linear, so LoRA targets and 4-bit quantization leave it alone.
        self.patch_embedding = ConvWeight((d, cfg.num_channels, cfg.patch_size, cfg.patch_size), dtype=dtype)
        self.class_embedding = _param((d,), dtype)
        self.gated_positional_embedding = PrecomputedPositionEmbedding(cfg, dtype)
        self.pre_tile_positional_embedding = PrecomputedAspectRatioEmbedding(cfg, dtype)
        self.post_tile_positional_embedding = PrecomputedAspectRatioEmbedding(cfg, dtype)
        self.layernorm_pre = LayerNorm(d, eps=OUTER_NORM_EPS, dtype=dtype)
        self.layernorm_post = LayerNorm(d, eps=OUTER_NORM_EPS, dtype=dtype)
        self.transformer = Encoder(cfg, dtype, cfg.num_hidden_layers, gated=False)
        self.global_transformer = Encoder(cfg, dtype, cfg.num_global_layers, gated=True)

    def __call__(self, patches: jax.Array, aspect_ratio_ids: jax.Array, token_valid: jax.Array, dtype) -> jax.Array:
        """`prepare_vision_inputs`' arrays -> transformers' `last_hidden_state`, in `dtype`:
        `[batch, images, tiles, num_patches, output_dim]` (token 0 of each tile the class token; features: the
        global encoder's `hidden`, then the taps interleaved, feature d of tap k at hidden + d * taps + k)."""
        cfg = self.cfg
        b, m, t, p, _ = patches.shape
        n, d, tp = b * m, cfg.hidden_size, cfg.padded_patches
        ids = aspect_ratio_ids.reshape(n)
        w = self.patch_embedding.weight.get_value()
        h = linear(patches.reshape(n, t, p, -1).astype(dtype), w.reshape(w.shape[0], -1))  # [n, t, p, d]
        h = self.pre_tile_positional_embedding(h, ids)
        cls = jnp.broadcast_to(self.class_embedding.get_value().astype(h.dtype), (n, t, 1, d))
        h = jnp.concatenate([cls, h], axis=2)  # [n, t, num_patches, d]
        h = self.gated_positional_embedding(h, ids)
        h = self.layernorm_pre(h)
        h = jnp.pad(h, ((0, 0), (0, 0), (0, tp - cfg.num_patches), (0, 0))).reshape(n, t * tp, d)

        # transformers' mask: excluded only where both the query and the key are masked tokens.
        valid = token_valid.reshape(n, t * tp)
        if vision_attention == "split":
            mask = split_mask(cfg, valid)
        elif vision_attention == "dense":
            mask = valid[:, None, :, None] | valid[:, None, None, :]  # [n, 1, t*tp, t*tp]
        else:
            raise ValueError(f"JAXVLM_MLLAMA_VISION_ATTENTION={vision_attention!r}: expected 'dense' or 'split'")

        def layer_fn(layer, x):
            return layer(x, mask), None

        # The local layers run as scans between the taps, so that no tap rides in a scan carry or in the
        # per-layer outputs (which autodiff would keep for every layer).
        taps, start = {}, 0
        for stop in sorted(set(cfg.intermediate_layers_indices)) + [cfg.num_hidden_layers - 1]:
            if stop >= start:  # layers start..stop
                with dropout_key(next_dropout_key()):  # each scan its own dropout keys (none in inference)
                    h, _ = scan_blocks(_layer_slice(self.transformer.layers, start, stop + 1), h, layer_fn,
                                       remat=self.remat)
                start = stop + 1
            taps[stop] = h
        h = self.layernorm_post(h)

        h = self.post_tile_positional_embedding(h.reshape(n, t, tp, d), ids).reshape(n, t * tp, d)
        if cfg.num_global_layers:
            with dropout_key(next_dropout_key()):
                h, _ = scan_blocks(self.global_transformer.layers, h, layer_fn, remat=self.remat)

        features = [h]
        if cfg.intermediate_layers_indices:  # stacked on a last axis, then flattened: interleaved, as transformers
            stacked = jnp.stack([taps[i] for i in cfg.intermediate_layers_indices], axis=-1)
            features.append(stacked.reshape(n, t * tp, -1))
        out = jnp.concatenate(features, axis=-1).reshape(n, t, tp, -1)[:, :, :cfg.num_patches]
        return out.reshape(b, m, t, cfg.num_patches, -1)


def hf_key_map(cfg: MllamaVisionConfig) -> dict[str, tuple[str, int | None]]:
    """{transformers' state_dict key (relative to MllamaVisionModel): (our param path, layer index or None)}."""
    return per_layer_keys(nnx.eval_shape(lambda: MllamaVisionModel(cfg, jnp.float32)), STACKED)
